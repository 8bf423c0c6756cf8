"""Mail addresses as mailcloak compares them: lower-cased, with an optional sub-address extension.

Shared by the policy, the socketmap and mailcloakctl so that "the same address" means the same
thing everywhere.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from mailcloak.errors import InvalidInput

# A domain: dot-separated labels of letters, digits and hyphens (IDNs arrive as punycode or UTF-8).
_LABEL = r"[^\s@.,;:<>()\[\]\\\"\x00-\x1f\x7f-\x9f]+"
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
# What a local part may hold here: printable, no space, no '@', nothing a reply could be broken by.
# Control characters are C0, DEL and C1 (\x80-\x9f: a terminal reads \x9b as an escape).
_LOCAL = re.compile(r"[^\s@,;:<>()\[\]\\\"\x00-\x1f\x7f-\x9f]+")
_NOT_LOCAL = re.compile(r"[\s@,;:<>()\[\]\\\"\x00-\x1f\x7f-\x9f]")  # one character _LOCAL refuses


class Split(NamedTuple):
    base: str       # the address without its extension, lower-cased
    extension: str  # "+tag" (delimiter included), or "" when there is none


def normalize(address: str) -> str:
    return address.strip().lower()


def domain_of(address: str) -> str:
    """The part after the last '@', lower-cased; "" when there is none."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


# Local parts Postfix never splits, whatever the delimiter (split_addr.c: MAIL_ADDR_POSTMASTER,
# MAIL_ADDR_MAIL_DAEMON, and double_bounce_sender at its default).
_NEVER_SPLIT = frozenset({"postmaster", "mailer-daemon", "double-bounce"})
# A Split made without namedtuple's __new__, a Python function: split_extension is on the hot path.
_split = tuple.__new__


def split_extension(address: str, delimiters: str) -> Split:
    """Split `user+tag@domain` into (`user@domain`, `+tag`), as Postfix's recipient_delimiter does
    (src/global/split_addr.c, called through strip_addr by mail_addr_find):

    - `delimiters` is a set of characters; the first character of the local part that is in the
      set splits it (strcspn), whichever delimiter it is. An empty set turns sub-addressing off;
    - when that first one starts the local part, the address is not split at all (the base would
      be empty), even if another delimiter follows;
    - a delimiter that ends the local part splits off an empty tag: `user+@domain` gives
      (`user@domain`, `+`), as strip_addr keeps the delimiter itself as the extension, so the
      socketmap answers `target+@domain` as Postfix's own tables would;
    - postmaster, mailer-daemon and double-bounce are never split;
    - when `-` is a delimiter, `owner-list` and `list-request` are not split (Postfix's
      owner_request_special, default yes: mailing-list conventions older than sub-addressing).
    """
    address = address.lower()
    if len(delimiters) == 1 and delimiters not in address:  # the usual case: nothing to split
        return _split(Split, (address, ""))
    local, _, domain = address.rpartition("@")
    if len(delimiters) == 1:  # the usual recipient_delimiter
        base, delimiter, tag = local.partition(delimiters)
        extension = delimiter + tag
    else:
        base, extension = _cut_at_first(local, delimiters)
    if not (base and extension) or local in _NEVER_SPLIT or ("-" in delimiters and (
            local.startswith("owner-") or (len(local) > 8 and local.endswith("-request")))):
        return _split(Split, (address, ""))  # none, or the first one starts the local part
    return _split(Split, (f"{base}@{domain}", extension))


def _cut_at_first(local: str, delimiters: str) -> tuple[str, str]:
    """`local` cut before the first of several delimiters (strcspn), found by str.find: no loop
    per character; (local, "") when none occurs."""
    cut = -1
    for delimiter in delimiters:
        i = local.find(delimiter)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (local, "") if cut < 0 else (local[:cut], local[cut:])


def add_extension(address: str, extension: str) -> str:
    """Put `+tag` back before the '@' of an answer (what propagate_unmatched_extensions does)."""
    if not extension:
        return address
    at = address.rfind("@")
    return address[:at] + extension + address[at:]


def check_domain(domain: str) -> str:
    """Validate and normalise a domain name for mailcloakctl; raises InvalidInput."""
    value = normalize(domain)
    if not _is_domain(value):
        raise InvalidInput(f"invalid domain: {domain!r}")
    return value


@functools.lru_cache(maxsize=1024)
def _is_domain(value: str) -> bool:
    """Is `value` (normalised) a domain name? Cached: the aliases of a database share a few
    domains, and a load checks the address of each (100 000 of them at a start)."""
    return bool(value) and _DOMAIN.fullmatch(value) is not None and len(value) <= 253


def check_address(address: str) -> str:
    """Validate and normalise an address: exactly one '@', a non-empty local part and domain,
    no spaces or control characters. Raises InvalidInput."""
    value = normalize(address)
    if value.count("@") != 1:
        raise InvalidInput(f"invalid address: {address!r}")
    local, domain = value.split("@")
    if not local or not _LOCAL.fullmatch(local) or len(value) > 320 or not _is_domain(domain.strip()):
        raise InvalidInput(f"invalid address: {address!r}")
    return value


def check_alias_address(address: str) -> str:
    """An alias's address: a full address, or `@domain` for the domain's catch-all. Raises
    InvalidInput."""
    value = normalize(address)
    if value.startswith("@"):
        try:
            return "@" + check_domain(value[1:])
        except InvalidInput:
            raise InvalidInput(f"invalid address: {address!r}") from None
    return check_address(address)


def is_safe_token(value: str) -> bool:
    """True when `value` can be put in a protocol reply as one word (no space, comma, control)."""
    return bool(value) and _NOT_LOCAL.search(value) is None  # search: no match object to make
