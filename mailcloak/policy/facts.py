"""Looks up the facts a policy request needs: from the in-memory snapshot (free) and the IdP.

Only what the rows of §6 can use is asked of the IdP: recipient existence for a local recipient
at RCPT that is no alias, and the login's user for XOAUTH2/OAUTHBEARER. Both IdP questions run
concurrently and are bounded by the request's deadline; a question that fails or runs out of time
becomes UNAVAILABLE, and the decision applies `idp_failure_mode`.
"""

from __future__ import annotations

import asyncio
import logging

from mailcloak.addresses import domain_of, split_extension
from mailcloak.aio import Resume
from mailcloak.errors import IdPError
from mailcloak.idp.base import IdentityProvider
from mailcloak.policy.codec import PolicyRequest
from mailcloak.policy.decision import APP_METHODS, UNAVAILABLE, USER_METHODS, Facts
from mailcloak.store.model import Snapshot

log = logging.getLogger(__name__)


async def gather_facts(request: PolicyRequest, snapshot: Snapshot, idp: IdentityProvider,
                       delimiters: str, deadline: float) -> Facts:
    """`deadline` is an event-loop time (`loop.time()`) by which every IdP question is settled."""
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
        if snapshot.active_alias(recipient) or snapshot.active_alias(recipient_base):
            recipient_exists = True
        else:
            exists_query = idp.user_by_address(recipient_base)

    method = request.sasl_method
    login_query = None
    app = None
    alias_target = None
    if request.authenticated:
        if method in USER_METHODS and request.sasl_username:
            login_query = idp.user_by_login(request.sasl_username)
            alias = snapshot.active_alias(sender) or snapshot.active_alias(sender_base)
            alias_target = alias.target_user if alias else None
        elif method in APP_METHODS:
            app = snapshot.app(request.sasl_username)

    login_user = None
    if exists_query is not None:
        found = _at_once(exists_query)
        if type(found) is Resume:
            if login_query is not None:  # both questions wait concurrently, as with gather()
                login_task = asyncio.ensure_future(_ask(login_query, deadline))
                try:
                    found = await _ask(found, deadline)
                except BaseException:
                    login_task.cancel()
                    raise
                login_user = await login_task
            else:
                found = await _ask(found, deadline)
        elif login_query is not None:
            login_user = await _ask(_at_once(login_query), deadline)
        recipient_exists = found if found is UNAVAILABLE else found is not None
    elif login_query is not None:
        login_user = await _ask(_at_once(login_query), deadline)

    return Facts(
        recipient_local=recipient_local,
        recipient_exists=recipient_exists,
        sender_local=sender_local,
        login_user=login_user,
        sender_alias_target=alias_target,
        app=app,
        sender_base=sender_base,
    )


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
