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
    sender_base = split_extension(sender, delimiters).base if sender else ""
    sender_local = bool(sender) and snapshot.is_local(domain_of(sender))

    recipient = request.recipient if state == "RCPT" else ""
    recipient_local = bool(recipient) and snapshot.is_local(domain_of(recipient))
    exists_query = None
    recipient_exists = None
    if recipient_local:
        recipient_base = split_extension(recipient, delimiters).base
        if snapshot.active_alias(recipient) or snapshot.active_alias(recipient_base):
            recipient_exists = True
        else:
            exists_query = _ask(idp.user_by_address(recipient_base), deadline)

    method = request.sasl_method
    login_query = None
    app = None
    alias_target = None
    if request.authenticated:
        if method in USER_METHODS and request.sasl_username:
            login_query = _ask(idp.user_by_login(request.sasl_username), deadline)
            alias = snapshot.active_alias(sender) or snapshot.active_alias(sender_base)
            alias_target = alias.target_user if alias else None
        elif method in APP_METHODS:
            app = snapshot.app(request.sasl_username)

    login_user = None
    if exists_query is not None and login_query is not None:
        found, login_user = await asyncio.gather(exists_query, login_query)
        recipient_exists = found if found is UNAVAILABLE else found is not None
    elif exists_query is not None:
        found = await exists_query
        recipient_exists = found if found is UNAVAILABLE else found is not None
    elif login_query is not None:
        login_user = await login_query

    return Facts(
        recipient_local=recipient_local,
        recipient_exists=recipient_exists,
        sender_local=sender_local,
        login_user=login_user,
        sender_alias_target=alias_target,
        app=app,
        sender_base=sender_base,
    )


async def _ask(query, deadline: float):
    """Await an IdP question until `deadline`; failure or timeout give UNAVAILABLE."""
    try:
        async with asyncio.timeout_at(deadline):
            return await query
    except TimeoutError:
        log.debug("IdP question not answered before the policy deadline")
        return UNAVAILABLE
    except IdPError as exc:
        log.debug("IdP question failed: %s", exc)
        return UNAVAILABLE
