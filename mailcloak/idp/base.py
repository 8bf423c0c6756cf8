"""The identity-provider interface the policy (and later the socketmap and passdb) relies on.

A provider answers two questions, for enabled users only, comparing case-insensitively:
"which user has this address" and "which user has this username". It raises IdPError when it
cannot answer (down, slow, refused, malformed); callers apply `policy.idp_failure_mode`.

A remote provider's cache holds up to 100 000 `IdPUser`s (the scale target), so they are slotted
and share what they can: one empty `NO_ADDRESSES`, and (`same_string`) the asked address or
username as their own field when it is equal, instead of a copy parsed from the IdP's answer.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Final

NO_ADDRESSES: Final[frozenset[str]] = frozenset()  # one object for every user without aliases


def same_string(value: str, asked: str) -> str:
    """`asked` itself when it equals `value`: the cache key and the answer then share one string."""
    return asked if value == asked else value


@dataclass(frozen=True, slots=True)
class IdPUser:
    username: str                     # as the IdP spells it
    email: str                        # primary email, lower-case ("" when the user has none)
    addresses: frozenset[str] = NO_ADDRESSES  # further addresses the user owns (lower-case)

    def owns(self, address: str) -> bool:
        return address == self.email or address in self.addresses


@dataclass(frozen=True, slots=True)
class IdPList:
    """A distribution list kept in the IdP (a Keycloak group carrying a list address)."""

    address: str                       # lower-case
    members: tuple[IdPUser, ...]       # enabled members that have a primary email
    send_policy: str = "members"       # members | nobody | listed (as aliases.send_policy)
    listed_senders: tuple[str, ...] = ()  # usernames, for "listed"

    @property
    def sender_users(self) -> tuple[str, ...]:
        """The IdP usernames that may send as the list address."""
        if self.send_policy == "members":
            return tuple(member.username for member in self.members)
        if self.send_policy == "listed":
            return self.listed_senders
        return ()


class IdentityProvider(ABC):
    """One provider per process; `close()` releases its HTTP session, if any."""

    name: str

    clock: Callable[[], float] = staticmethod(time.monotonic)
    """The clock (seconds) of the ends of freshness its cache notes (mailcloak.idp.freshness)."""

    @abstractmethod
    async def user_by_address(self, address: str) -> IdPUser | None:
        """The enabled user whose primary email (or other owned address) is `address`."""

    @abstractmethod
    async def user_by_username(self, username: str) -> IdPUser | None:
        """The enabled user whose username is `username`."""

    async def user_by_login(self, login: str) -> IdPUser | None:
        """A SASL login: the IdP username, or the primary email (Dovecot's username_attribute = email)."""
        user = await self.user_by_username(login)
        if user is None and "@" in login:
            user = await self.user_by_address(login.lower())
        return user

    lists_enabled: bool = False
    """Whether `list_by_address` can find anything (when not, callers skip asking)."""

    async def list_by_address(self, address: str) -> IdPList | None:
        """The distribution list whose address is `address`. Providers without lists have none."""
        return None

    async def introspect_token(self, token: str) -> IdPUser | None:
        """The enabled user an access token was issued to, if the IdP says it is active.

        For Dovecot's oauth2 passdb (SPEC §8). None for a token the IdP does not accept; raises
        IdPError when the IdP cannot answer. Providers without tokens accept none.
        """
        return None

    async def probe(self) -> str:
        """For --check-config: one real exchange with the IdP; a short summary, or IdPError saying
        what to fix (unreachable, bad credentials, missing permissions, unknown realm)."""
        return "ok"

    def stats(self) -> dict:
        """Counters for /metrics: `http_requests` per endpoint, `lookups` by cache outcome,
        `lookup_errors` by kind. A provider without requests or a cache has none."""
        return {}

    def health(self) -> dict:
        """For /healthz: `ok`, and the kinds of failure of a current outage."""
        return {"ok": True}

    async def close(self) -> None:
        """Release resources; the default provider holds none."""
