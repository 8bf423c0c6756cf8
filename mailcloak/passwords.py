"""App secrets: argon2id with the Go project's parameters, stored as `{ARGON2ID}<PHC string>`.

The `{ARGON2ID}` prefix is Dovecot's scheme name, so Dovecot's own `passdb sql` and the Go
daemon verify the same rows. Hashing and verifying cost ~50 ms of CPU and 64 MiB each: callers on
the event loop run them in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

SCHEME_PREFIX = "{ARGON2ID}"

HASHER = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=1, hash_len=32, salt_len=16,
                        type=Type.ID)


# The secret of an app created by `mailcloakctl import` (exports carry no secrets): not a PHC
# string, so neither mailcloak nor Dovecot's `passdb sql` ever verifies a password against it.
NO_SECRET = SCHEME_PREFIX + "!no-secret-set"


def hash_secret(secret: str) -> str:
    return SCHEME_PREFIX + HASHER.hash(secret)


def verify_secret(stored: str, secret: str) -> bool:
    """True when `secret` matches; False for a mismatch or a hash this code cannot read."""
    if not stored.startswith(SCHEME_PREFIX):
        return False
    try:
        return HASHER.verify(stored[len(SCHEME_PREFIX):], secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def generate_token() -> str:
    """A URL-safe random token of 256 bits."""
    return secrets.token_urlsafe(32)
