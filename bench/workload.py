"""The benchmark's data: a database, static users, and request mixes with their expected replies.

K distinct addresses: users u0..u{K-1} (primary email on d1.test or d2.test), one alias per user
(a{i}@d1.test -> u{i}), apps app0..app{A-1} each allowed to send as noreply{j}@d1.test.
The policy mix exercises the rows of SPEC §6; the socketmap mix aliases, `+ext` forms, case
variants, unknown keys, real users' addresses (Postfix looks every answer up again) and bare
domains. Every request carries the full attribute set Postfix sends (the captured request).
"""

from __future__ import annotations

import random
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import GO_SCHEMA, go_hash  # noqa: E402

DOMAINS = ("d1.test", "d2.test")
APPS = 20

# The request Postfix sends (shared/notes/postfix-dovecot-here.md, "What goes over the wire").
CAPTURED = (
    "request=smtpd_access_policy\n"
    "protocol_state={state}\n"
    "protocol_name=ESMTP\n"
    "client_address=127.0.0.1\n"
    "client_name=localhost\n"
    "client_port={port}\n"
    "reverse_client_name=localhost\n"
    "server_address=127.0.0.1\n"
    "server_port=47377\n"
    "helo_name=client.test\n"
    "sender={sender}\n"
    "recipient={recipient}\n"
    "recipient_count=0\n"
    "queue_id=\n"
    "instance={instance}\n"
    "size=0\n"
    "etrn_domain=\n"
    "stress=\n"
    "sasl_method={method}\n"
    "sasl_username={login}\n"
    "sasl_sender=\n"
    "ccert_subject=\n"
    "ccert_issuer=\n"
    "ccert_fingerprint=\n"
    "ccert_pubkey_fingerprint=\n"
    "encryption_protocol=\n"
    "encryption_cipher=\n"
    "encryption_keysize=0\n"
    "policy_context=\n"
    "\n"
)

DUNNO = "DUNNO"
NO_SUCH_USER = "550 5.1.1 No such user"
NOT_LOCAL = "550 5.7.1 Recipient domain not local"
AUTH_REQUIRED = "553 5.7.1 Sending from local domains requires authentication"
NOT_OWNED = "553 5.7.1 Sender not owned by authenticated user"
UNSUPPORTED = "553 5.7.1 Unsupported authentication method"


def user_email(i: int) -> str:
    return f"u{i}@{DOMAINS[i % 2]}"


def static_users(k: int) -> list[dict]:
    return [{"username": f"u{i}", "email": user_email(i)} for i in range(k)]


def make_database(path: Path, k: int, extra_aliases: int = 0) -> Path:
    """The Go project's schema; K aliases a{i}@d1.test -> u{i}; `extra_aliases` more
    (x{n}@d2.test -> u{n % K}) for the scale test; APPS apps."""
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    con.executescript(GO_SCHEMA)
    con.executemany("INSERT INTO domains(domain_name, enabled) VALUES (?, 1)", [(d,) for d in DOMAINS])
    con.executemany("INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, ?, ?)",
                    ((f"a{i}@d1.test", f"u{i}", "d1.test") for i in range(k)))
    con.executemany("INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, ?, ?)",
                    ((f"x{n}@d2.test", f"u{n % k}", "d2.test") for n in range(extra_aliases)))
    secret = go_hash("bench-app-secret")
    con.executemany("INSERT INTO apps(app_id, secret_hash) VALUES (?, ?)",
                    [(f"app{j}", secret) for j in range(APPS)])
    con.executemany("INSERT INTO app_from(app_id, from_addr) VALUES (?, ?)",
                    [(f"app{j}", f"noreply{j}@d1.test") for j in range(APPS)])
    con.commit()
    con.close()
    return path


def _mixed_case(rng: random.Random, address: str) -> str:
    return "".join(c.upper() if rng.random() < 0.3 else c for c in address)


def policy_requests(k: int, count: int = 4000, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """(request bytes, expected reply bytes) drawn from K users; row shares in the comments."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        i = rng.randrange(k)
        other = (i + 1 + rng.randrange(k - 1)) % k
        r = rng.random()
        state, method, login = "RCPT", "", ""
        if r < 0.20:      # row 5: unauthenticated, outside sender -> existing local user
            sender, rcpt, want = f"someone{n}@outside.example", user_email(i), DUNNO
        elif r < 0.30:    # row 5 via an alias recipient, sometimes with +ext, any case
            tag = "+news" if rng.random() < 0.5 else ""
            sender, rcpt, want = "list@outside.example", _mixed_case(rng, f"a{i}{tag}@d1.test"), DUNNO
        elif r < 0.40:    # row 3: unauthenticated relay attempt
            sender, rcpt, want = "spam@outside.example", f"victim{i}@elsewhere.example", NOT_LOCAL
        elif r < 0.45:    # row 4: unauthenticated, local sender
            sender, rcpt, want = user_email(other), user_email(i), AUTH_REQUIRED
        elif r < 0.55:    # row 2: unknown local recipient (an IdP question: negative cache)
            sender, rcpt, want = "x@outside.example", f"ghost{i}@{DOMAINS[i % 2]}", NO_SUCH_USER
        elif r < 0.70:    # row 7: PLAIN app, allowed sender
            j = i % APPS
            method, login = rng.choice(("PLAIN", "LOGIN")), f"app{j}"
            sender, rcpt, want = f"noreply{j}@d1.test", f"customer{i}@elsewhere.example", DUNNO
        elif r < 0.75:    # row 8: app, sender not allowed
            j = i % APPS
            method, login = "PLAIN", f"app{j}"
            sender, rcpt, want = user_email(i), f"customer{i}@elsewhere.example", NOT_OWNED
        elif r < 0.90:    # row 6: XOAUTH2 user as primary email or own alias (+tag sometimes)
            method = rng.choice(("XOAUTH2", "OAUTHBEARER"))
            login = f"u{i}" if rng.random() < 0.5 else user_email(i)
            own = user_email(i) if rng.random() < 0.5 else f"a{i}@d1.test"
            if rng.random() < 0.2:
                own = own.replace("@", "+tag@")
            sender, rcpt, want = own, f"friend{i}@elsewhere.example", DUNNO
        elif r < 0.95:    # row 8: user sending as someone else's address
            method, login = "XOAUTH2", f"u{i}"
            sender, rcpt, want = user_email(other), f"friend{i}@elsewhere.example", NOT_OWNED
        else:             # row 9: other SASL method
            method, login = "CRAM-MD5", f"u{i}"
            sender, rcpt, want = user_email(i), f"friend{i}@elsewhere.example", UNSUPPORTED
        if rng.random() < 0.1 and method:
            state = "MAIL"  # smtpd_delay_reject = no: sender rows alone, no recipient
            rcpt = ""
        text = CAPTURED.format(state=state, port=30000 + n % 30000, sender=sender, recipient=rcpt,
                               instance=f"{n:x}.6b061cc7.7e325.0", method=method, login=login)
        out.append((text.encode(), f"action={want}\n\n".encode()))
    return out


def _netstring(text: str) -> bytes:
    data = text.encode()
    return b"%d:%s," % (len(data), data)


def socketmap_requests(k: int, count: int = 4000, seed: int = 2) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        i = rng.randrange(k)
        r = rng.random()
        if r < 0.40:      # alias, as cleanup sends it: any case
            key, want = _mixed_case(rng, f"a{i}@d1.test"), f"OK u{i}@d1.test"
        elif r < 0.60:    # alias with +ext: the extension is carried over
            key, want = f"a{i}+x{n % 7}@d1.test", f"OK u{i}+x{n % 7}@d1.test"
        elif r < 0.80:    # unknown key
            key, want = f"nobody{n}@{DOMAINS[n % 2]}", "NOTFOUND "
        elif r < 0.90:    # the answer looked up again (a real user's address)
            key, want = f"u{i}@d1.test", "NOTFOUND "
        else:             # bare domain (trivial-rewrite's virtual_alias_domains question)
            key, want = rng.choice(("d1.test", "d2.test", "outside.test", "elsewhere.example")), "NOTFOUND "
        out.append((_netstring(f"alias {key}"), _netstring(want)))
    return out


def socketmap_unique_requests(k: int, count: int = 200_000, seed: int = 3) -> list[tuple[bytes, bytes]]:
    """Every key different (a +ext or a local part of its own), so that no answer is asked twice
    within a run: the socketmap's cost without its per-snapshot memo of answers."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        i = rng.randrange(k)
        if n % 2:
            key, want = f"a{i}+u{n}@d1.test", f"OK u{i}+u{n}@d1.test"
        else:
            key, want = f"nobody{n}@{DOMAINS[n % 2]}", "NOTFOUND "
        out.append((_netstring(f"alias {key}"), _netstring(want)))
    return out


def recipient_requests(users: range) -> list[tuple[bytes, bytes]]:
    """(request, expected reply) per user: an outside sender to that user's address (row 5), so
    that the daemon asks the IdP whether the address exists once per user."""
    return [(CAPTURED.format(state="RCPT", port=40000 + i % 20000, sender=f"s{i}@outside.example",
                             recipient=user_email(i), instance=f"i{i}", method="", login="").encode(),
             f"action={DUNNO}\n\n".encode()) for i in users]

