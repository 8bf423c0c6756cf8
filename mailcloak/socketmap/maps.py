"""Socketmap answers (SPEC §7, README "Native Postfix maps"): functions of a key, the snapshot and
the IdP.

A map answers at once (a `Reply`) when the snapshot alone decides, and returns a coroutine when
it must ask the IdP; `lookup` is the one entry point and bounds that coroutine (IdP failure or
no answer in time → `TEMP`, so Postfix defers instead of acting on a guess).

Postfix sends a socketmap only the full address, in the client's case, and never the shortened
forms it tries on its own tables (`user@domain` without `+ext`, `@domain`). So this module
lower-cases the key, strips a `+ext` itself, and puts the same `+ext` on the answer, as
propagate_unmatched_extensions would. A key without '@' (a bare domain, which trivial-rewrite asks
because virtual_alias_domains defaults to $virtual_alias_maps) is NOTFOUND for `alias`, so no
domain becomes a virtual alias domain by accident.

Maps:

- `alias` (virtual_alias_maps), in Postfix's own lookup order: the full address as an alias or
  list; the address without `+ext`; then, for an address that is no IdP user, an IdP list (a
  Keycloak group) and last the domain's catch-all (`@domain`). A real user's address is never
  rewritten by a catch-all, and neither is an address some alias rewrites to (Postfix looks every
  answer up again: a target that is no user must not fall into the catch-all and loop).
- `domain` (virtual_mailbox_domains): a bare, enabled local domain → `OK <domain>`.
- `mailbox` (virtual_mailbox_maps): an enabled IdP user's primary email in a local domain (and its
  `+ext` forms) → `OK <domain>/<localpart>/` (a Maildir path under virtual_mailbox_base, for
  virtual(8); LMTP ignores it). Aliases, lists and apps have no mailbox.
- `sender_login` (smtpd_sender_login_maps): the logins that may send as an address, comma-
  separated — the rows 6-7 of the policy: the owning user (username and primary email), the
  users an alias or list lets send as it, and the enabled apps allowed to. A catch-all gives no
  one the right to send as the addresses it receives for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine, Iterable, NamedTuple, Union

from mailcloak.addresses import add_extension, domain_of, is_safe_token, split_extension
from mailcloak.errors import IdPError
from mailcloak.idp.base import IdentityProvider
from mailcloak.store.model import Alias, Snapshot

log = logging.getLogger(__name__)

MAX_KEY = 10_000      # Postfix's socketmap_max_query_size
MAX_REPLY = 100_000   # Postfix's socketmap_max_reply_size


STATUSES = ("OK", "NOTFOUND", "TEMP", "PERM")


class Reply(NamedTuple):
    status: str  # one of STATUSES
    data: str = ""

    def encode(self) -> bytes:
        return f"{self.status} {self.data}".encode("utf-8")


NOTFOUND = Reply("NOTFOUND")
IDP_FAILED = Reply("TEMP", "identity provider unavailable")
IDP_SLOW = Reply("TEMP", "identity provider did not answer in time")

Answer = Union[Reply, Coroutine[Any, Any, Reply]]
Map = Callable[[str, Snapshot, str, IdentityProvider], Answer]


def lookup(name: str, key: str, snapshot: Snapshot, idp: IdentityProvider, delimiters: str,
           timeout: float) -> Reply | Awaitable[Reply]:
    """The answer of map `name` for `key`: a Reply now, or an awaitable one that settles within
    `timeout` seconds when the IdP must be asked."""
    map_ = MAPS.get(name)
    if map_ is None:
        return Reply("PERM", "unknown map or malformed request")
    answer = map_(key, snapshot, delimiters, idp)
    if type(answer) is Reply:
        return answer
    return _bounded(answer, timeout)


async def _bounded(query: Coroutine[Any, Any, Reply], timeout: float) -> Reply:
    try:
        async with asyncio.timeout(timeout):
            return await query
    except TimeoutError:
        log.debug("socketmap: IdP question not answered in time")
        return IDP_SLOW
    except IdPError as exc:
        log.debug("socketmap: IdP question failed: %s", exc)
        return IDP_FAILED


def _address(key: str) -> str | None:
    """The lower-case address of a key, or None for a key that is no address Postfix sends."""
    address = key.strip().lower()
    if len(address) > MAX_KEY or "@" not in address or address[0] == "@":
        return None
    return address


def _safe_word(value: str) -> bool:
    """Can `value` (a login or an address from the IdP or the database) stand in a reply as one
    item of a comma-separated list? No space, comma or control character."""
    return bool(value) and all(is_safe_token(part) for part in value.split("@"))


def _ok(addresses: Iterable[str], extension: str = "") -> Reply:
    """`OK a,b,...` (virtual(5)'s list form). An extension that could split the answer (comma,
    space, quote) is not copied."""
    if extension and is_safe_token(extension):
        addresses = (add_extension(a, extension) for a in addresses)
    data = ",".join(addresses)
    return Reply("OK", data) if data else NOTFOUND


# alias ---------------------------------------------------------------------------------------


def alias_map(key: str, snapshot: Snapshot, delimiters: str, idp: IdentityProvider) -> Answer:
    address = _address(key)
    if address is None:
        return NOTFOUND
    alias = snapshot.active_alias(address)
    if alias is not None:
        return _alias_reply(alias, "")
    base, extension = split_extension(address, delimiters)
    if extension:
        alias = snapshot.active_alias(base)
        if alias is not None:
            return _alias_reply(alias, extension)
    domain = address[address.rfind("@") + 1:]  # _address: lower-case, with an '@'
    catch_all = snapshot.catch_all(domain)
    if catch_all is not None and (snapshot.is_alias_target(address) or snapshot.is_alias_target(base)):
        catch_all = None
    if catch_all is None and not (idp.lists_enabled and snapshot.is_local(domain)):
        return NOTFOUND  # nothing further could match: no IdP question
    return _alias_from_idp(address, base, extension, catch_all, idp)


def _alias_reply(alias: Alias, extension: str) -> Reply:
    """`_ok(alias.target_addresses, extension)`, without its generators for the common alias of
    one target (the same answer: the extension goes before the '@' of `target@domain`)."""
    if alias.extra_targets or "@" in alias.domain:
        return _ok(alias.target_addresses, extension)
    if extension and not is_safe_token(extension):
        extension = ""
    return Reply("OK", f"{alias.target_user}{extension}@{alias.domain}")


async def _alias_from_idp(address: str, base: str, extension: str, catch_all: Alias | None,
                          idp: IdentityProvider) -> Reply:
    """The rest of the lookup order, for an address no alias row matched."""
    if await idp.user_by_address(address) is not None:
        return NOTFOUND
    if base != address and await idp.user_by_address(base) is not None:
        return NOTFOUND
    if idp.lists_enabled:
        for candidate, suffix in ((address, ""), (base, extension)):
            group = await idp.list_by_address(candidate)
            if group is not None and group.members:  # a list nobody is in receives nothing
                return _ok((m.email for m in group.members if _safe_word(m.email)), suffix)
            if base == address:
                break
    if catch_all is not None:
        return _ok(catch_all.target_addresses, extension)
    return NOTFOUND


# domain, mailbox ----------------------------------------------------------------------------


def domain_map(key: str, snapshot: Snapshot, delimiters: str, idp: IdentityProvider) -> Answer:
    domain = key.strip().lower()
    if not domain or "@" in domain or len(domain) > MAX_KEY or not snapshot.is_local(domain):
        return NOTFOUND
    return Reply("OK", domain)


def mailbox_map(key: str, snapshot: Snapshot, delimiters: str, idp: IdentityProvider) -> Answer:
    address = _address(key)
    if address is None or not snapshot.is_local(domain_of(address)):
        return NOTFOUND
    return _mailbox(split_extension(address, delimiters).base, idp)


async def _mailbox(base: str, idp: IdentityProvider) -> Reply:
    user = await idp.user_by_address(base)
    if user is None or user.email != base:  # an address of the IdP's alias attribute: no mailbox
        return NOTFOUND
    local, _, domain = base.rpartition("@")
    # The answer is a path below virtual_mailbox_base: nothing that could leave it.
    if "/" in local or local.startswith(".") or not is_safe_token(local):
        log.warning("socketmap: no mailbox path for %r: its local part cannot be a folder name", base)
        return NOTFOUND
    return Reply("OK", f"{domain}/{local}/")


# sender_login --------------------------------------------------------------------------------


def sender_login_map(key: str, snapshot: Snapshot, delimiters: str, idp: IdentityProvider) -> Answer:
    address = _address(key)
    if address is None:
        return NOTFOUND
    base = split_extension(address, delimiters).base
    apps = tuple(app.app_id for app in snapshot.apps.values()
                 if app.enabled and (app.may_send_as(base) or app.may_send_as(address)))
    if not snapshot.is_local(domain_of(address)):
        return _ok(apps)  # users and aliases send as local addresses only
    alias = snapshot.active_alias(address) or snapshot.active_alias(base)
    return _sender_logins(base, alias, apps, idp)


async def _sender_logins(base: str, alias: Alias | None, apps: tuple[str, ...],
                         idp: IdentityProvider) -> Reply:
    owners = []
    user = await idp.user_by_address(base)
    if user is not None:
        owners.append(user)
    usernames: tuple[str, ...] = ()
    if alias is not None:
        usernames = alias.sender_users
    elif idp.lists_enabled:
        group = await idp.list_by_address(base)
        if group is not None:
            usernames = group.sender_users
    if usernames:
        found = await asyncio.gather(*(idp.user_by_username(name) for name in usernames))
        owners.extend(u for u in found if u is not None)
    logins: dict[str, str] = {}
    for login in (*(name for u in owners for name in (u.username, u.email)), *apps):
        if _safe_word(login):
            logins.setdefault(login.lower(), login)
    return _ok(logins.values())


MAPS: dict[str, Map] = {
    "alias": alias_map,
    "domain": domain_map,
    "mailbox": mailbox_map,
    "sender_login": sender_login_map,
}
