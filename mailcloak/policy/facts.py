"""Looks up the facts a policy request needs: from the in-memory snapshot (free) and the IdP.

Only what the rows of §6 can use is asked of the IdP: recipient existence for a local recipient
at RCPT that is no alias and whose domain has no catch-all, the login's user for
XOAUTH2/OAUTHBEARER, and (with IdP lists) who may send as a local sender that is no alias. The
IdP questions run concurrently and are bounded by the request's deadline; a question that fails
or runs out of time becomes UNAVAILABLE, and the decision applies `idp_failure_mode`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Callable

from mailcloak.addresses import domain_of, split_extension
from mailcloak.aio import Resume
from mailcloak.errors import IdPError
from mailcloak.idp.base import IdentityProvider
from mailcloak.policy.codec import PolicyRequest
from mailcloak.policy.decision import APP_METHODS, UNAVAILABLE, USER_METHODS, Facts
from mailcloak.store.model import Snapshot

log = logging.getLogger(__name__)


async def gather_facts(request: PolicyRequest, snapshot: Snapshot, idp: IdentityProvider,
                       delimiters: str, deadline: float,
                       wall_clock: Callable[[], float] = time.time) -> Facts:
    """`deadline` is an event-loop time (`loop.time()`) by which every IdP question is settled;
    `wall_clock` gives the request's time for an app's expiry (read only for an app login)."""
    state = request.protocol_state
    if state not in ("RCPT", "MAIL"):
        return Facts()
    sender = request.sender
    sender_base = _base(sender, delimiters) if sender else ""
    sender_local = bool(sender) and snapshot.is_local(domain_of(sender))

    recipient = request.recipient if state == "RCPT" else ""
    recipient_local = bool(recipient) and snapshot.is_local(domain_of(recipient))
    exists_query = None
    recipient_exists = None
    if recipient_local:
        recipient_base = _base(recipient, delimiters)
        if (snapshot.active_alias(recipient) or snapshot.active_alias(recipient_base)
                or snapshot.catch_all(domain_of(recipient))):
            recipient_exists = True
        else:
            exists_query = functools.partial(_exists, idp, recipient_base)

    method = request.sasl_method
    login_query = None
    list_query = None
    app = None
    now = None
    alias_senders: tuple[str, ...] = ()
    if request.authenticated:
        if method in USER_METHODS and request.sasl_username:
            login_query = functools.partial(idp.user_by_login, request.sasl_username)
            alias = snapshot.active_alias(sender) or snapshot.active_alias(sender_base)
            if alias is not None:
                alias_senders = alias.sender_users
            elif idp.lists_enabled and sender_local:
                list_query = functools.partial(_list_senders, idp, sender_base)
        elif method in APP_METHODS:
            app = snapshot.app(request.sasl_username)
            now = wall_clock() if app is not None else None

    found, login_user, listed = await _answers((exists_query, login_query, list_query), deadline)
    if exists_query is not None:
        recipient_exists = found
    if list_query is not None:
        alias_senders = listed

    return Facts(
        recipient_local=recipient_local,
        recipient_exists=recipient_exists,
        sender_local=sender_local,
        login_user=login_user,
        sender_alias_senders=alias_senders,
        app=app,
        sender_base=sender_base,
        now=now,
    )


async def _exists(idp: IdentityProvider, address: str) -> bool:
    """Is `address` an enabled IdP user's, or an IdP list's with members?"""
    if await idp.user_by_address(address) is not None:
        return True
    if idp.lists_enabled:
        group = await idp.list_by_address(address)
        return group is not None and bool(group.members)
    return False


async def _list_senders(idp: IdentityProvider, address: str) -> tuple[str, ...]:
    group = await idp.list_by_address(address)
    return group.sender_users if group is not None else ()


async def _answers(queries, deadline: float) -> list:
    """The answers of IdP questions (None: not asked → None), concurrently, each UNAVAILABLE
    when it fails or is not answered by `deadline`. A question answered from memory costs no
    task and no timer (see `_at_once`). Questions come as functions that make the coroutine, so
    that none is made before it is run: a caller that stops this attempt part-way (the policy
    server's `_WouldWait`) leaves no coroutine behind that was never awaited."""
    answers = [_at_once(q()) if q is not None else None for q in queries]
    waiting = [i for i, answer in enumerate(answers) if type(answer) is Resume]
    if len(waiting) == 1:
        answers[waiting[0]] = await _ask(answers[waiting[0]], deadline)
    elif waiting:
        settled = await asyncio.gather(*(_ask(answers[i], deadline) for i in waiting))
        for i, answer in zip(waiting, settled):
            answers[i] = answer
    return answers


def _base(address: str, delimiters: str) -> str:
    """`split_extension(address, delimiters).base`, without its loop when no delimiter occurs."""
    for char in delimiters:
        if char in address:
            return split_extension(address, delimiters).base
    return address.lower()


def _at_once(query):
    """Run an IdP question up to its first wait. Most are answered from memory (the static
    provider, a warm cache) without one: their answer (UNAVAILABLE on failure) comes back at
    once, with no timer and no task. Otherwise a `Resume` for `_ask`."""
    try:
        first = query.send(None)
    except StopIteration as done:
        return done.value
    except IdPError as exc:
        log.debug("IdP question failed: %s", exc)
        return UNAVAILABLE
    return Resume(query, first)


async def _ask(query, deadline: float):
    """Await an IdP question (a coroutine or a `Resume`; anything else is its answer already)
    until `deadline`; failure or timeout give UNAVAILABLE."""
    if type(query) is not Resume and not asyncio.iscoroutine(query):
        return query
    try:
        async with asyncio.timeout_at(deadline):
            return await query
    except TimeoutError:
        log.debug("IdP question not answered before the policy deadline")
        return UNAVAILABLE
    except IdPError as exc:
        log.debug("IdP question failed: %s", exc)
        return UNAVAILABLE
