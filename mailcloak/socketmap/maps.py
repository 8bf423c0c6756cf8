"""Socketmap answers (SPEC §7), as pure functions of a key and the snapshot.

Postfix sends a socketmap only the full address, in the client's case, and never the shortened
forms it tries on its own tables. So this module lower-cases the key, strips a `+ext` to find the
alias, and puts the same `+ext` on the answer, as propagate_unmatched_extensions would. A key
without '@' (a bare domain, which trivial-rewrite asks because virtual_alias_domains defaults to
$virtual_alias_maps) is NOTFOUND, so no domain becomes a virtual alias domain by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailcloak.addresses import add_extension, is_safe_token, split_extension
from mailcloak.store.model import Snapshot

MAX_KEY = 10_000      # Postfix's socketmap_max_query_size
MAX_REPLY = 100_000   # Postfix's socketmap_max_reply_size


@dataclass(frozen=True, slots=True)
class Reply:
    status: str  # OK | NOTFOUND | TEMP | PERM
    data: str = ""

    def encode(self) -> bytes:
        return f"{self.status} {self.data}".encode("utf-8")


NOTFOUND = Reply("NOTFOUND")


def alias_map(key: str, snapshot: Snapshot, delimiters: str) -> Reply:
    """`alias` map: an enabled alias in an enabled local domain → `OK target_user@alias-domain`."""
    address = key.strip().lower()
    if "@" not in address or len(address) > MAX_KEY:
        return NOTFOUND
    alias = snapshot.active_alias(address)
    if alias is not None:
        return Reply("OK", alias.target_address)
    base, extension = split_extension(address, delimiters)
    if extension:
        alias = snapshot.active_alias(base)
        if alias is not None:
            # An extension that could split the answer (comma, space, quote) is not copied.
            if not is_safe_token(extension):
                return Reply("OK", alias.target_address)
            return Reply("OK", add_extension(alias.target_address, extension))
    return NOTFOUND


MAPS = {"alias": alias_map}
