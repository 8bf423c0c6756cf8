"""The policy decision of SPEC §6: a pure function of the request and the facts looked up for it.

No I/O happens here; `mailcloak.policy.facts` gathers what the rows need. Every reject or defer
carries text after its code (a bare number or an empty action is a permit to Postfix), and the
policy never answers OK, so Postfix's later restrictions still run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from mailcloak.apps_auth import use_refusal
from mailcloak.idp.base import IdPUser
from mailcloak.policy.codec import APP_METHODS, PolicyRequest
from mailcloak.store.model import App

USER_METHODS: Final = frozenset({"XOAUTH2", "OAUTHBEARER"})

DUNNO: Final = "DUNNO"
NO_SUCH_USER: Final = "550 5.1.1 No such user"
NOT_LOCAL: Final = "550 5.7.1 Recipient domain not local"
AUTH_REQUIRED: Final = "553 5.7.1 Sending from local domains requires authentication"
NOT_OWNED: Final = "553 5.7.1 Sender not owned by authenticated user"
UNSUPPORTED_METHOD: Final = "553 5.7.1 Unsupported authentication method"
IDP_TEMPFAIL: Final = "451 4.3.0 Temporary authentication/lookup failure"
INTERNAL_TEMPFAIL: Final = "451 4.3.0 Temporary internal error"
MALFORMED: Final = "DEFER_IF_PERMIT 4.3.0 Malformed policy request"


class Unavailable:
    """Marks a fact the IdP could not provide in time."""

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE: Final = Unavailable()


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rows of §6 need to know, looked up for one request. Addresses are the
    extension-stripped base forms (`user@domain` for `user+tag@domain`)."""

    recipient_local: bool = False
    # Recipient exists: an enabled IdP user's address, an enabled alias or list (static or IdP),
    # or any address of a domain with an enabled catch-all. None when not asked.
    recipient_exists: bool | Unavailable | None = None
    sender_local: bool = False
    # The IdP user behind a XOAUTH2/OAUTHBEARER login.
    login_user: IdPUser | Unavailable | None = None
    # The IdP usernames that the enabled alias or list the sender is lets send as it (its send
    # policy: members, nobody, listed). A catch-all gives no one this right.
    sender_alias_senders: tuple[str, ...] | Unavailable = ()
    # The app behind a PLAIN/LOGIN login, if any (enabled or not).
    app: App | None = None
    sender_base: str = ""
    # Unix seconds of the request, for the app's expiry (row 7). None (not gathered): an app
    # with an expiry counts as expired, failing closed.
    now: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: str
    rule: str  # which row decided, for logs and `mailcloakctl check`


def decide(request: PolicyRequest, facts: Facts, failure_action: str) -> Decision:
    """SPEC §6. `failure_action` is what `idp_failure_mode` makes of an IdP that cannot answer."""
    state = request.protocol_state
    if state == "RCPT":
        if not request.recipient:
            return Decision(DUNNO, "1 no recipient")
        if facts.recipient_local:
            if facts.recipient_exists is UNAVAILABLE:
                # Row 2 cannot be decided. A sender row that rejects applies whatever its answer
                # would have been (so `dunno` never lets an IdP outage lift the sender checks);
                # only when the sender passes does the unknown answer matter.
                later = _sender_decision(request, facts, failure_action)
                if later.action != DUNNO:
                    return later
                return Decision(failure_action, "idp unavailable (recipient)")
            if not facts.recipient_exists:
                return Decision(NO_SUCH_USER, "2 local recipient does not exist")
        if not request.authenticated and not facts.recipient_local:
            return Decision(NOT_LOCAL, "3 unauthenticated, recipient not local")
        return _sender_decision(request, facts, failure_action)
    if state == "MAIL":
        return _sender_decision(request, facts, failure_action)
    return Decision(DUNNO, f"state {state or 'missing'} not checked")


def _sender_decision(request: PolicyRequest, facts: Facts, failure_action: str) -> Decision:
    """Rows 4-9: what the sender and the login allow, on their own."""
    if not request.authenticated:
        return _unauthenticated_sender(facts)
    return _sender_rules(request, facts, failure_action)


def _unauthenticated_sender(facts: Facts) -> Decision:
    if facts.sender_local:
        return Decision(AUTH_REQUIRED, "4 unauthenticated, sender local")
    return Decision(DUNNO, "5 unauthenticated")


def _sender_rules(request: PolicyRequest, facts: Facts, failure_action: str) -> Decision:
    method = request.sasl_method
    sender = facts.sender_base
    if method in USER_METHODS:
        user = facts.login_user
        if user is UNAVAILABLE:
            return Decision(failure_action, "idp unavailable (login)")
        senders = facts.sender_alias_senders
        if user is not None and sender and (
            user.owns(sender)
            or (senders is not UNAVAILABLE
                and any(name.lower() == user.username.lower() for name in senders))
        ):
            return Decision(DUNNO, "6 user owns sender")
        if senders is UNAVAILABLE:
            return Decision(failure_action, "idp unavailable (sender list)")
        return Decision(NOT_OWNED, "8 sender not owned by user")
    if method in APP_METHODS:
        return _app_sender(request, facts)
    return Decision(UNSUPPORTED_METHOD, "9 unsupported authentication method")


def _app_sender(request: PolicyRequest, facts: Facts) -> Decision:
    """Rows 7/8 for an app: beyond SPEC's "enabled, and the sender one of its enabled allowed
    addresses", the app must not be expired at the request's time nor used from outside its
    networks (`client_address`), the passdb's own rule (`use_refusal`) applied again because a
    login cached by Dovecot can outlive the app's expiry. The reason of a refusal goes in the
    rule (logs, `mailcloakctl check`), never in the reply."""
    app = facts.app
    if app is None:
        return Decision(NOT_OWNED, "8 sender not owned by app")
    now = facts.now if facts.now is not None else math.inf
    refused = use_refusal(app, request.get("client_address"), now)
    if refused:
        return Decision(NOT_OWNED, f"8 {refused}")
    sender = facts.sender_base
    if sender and (app.may_send_as(sender) or app.may_send_as(request.sender)):
        return Decision(DUNNO, "7 app may send as sender")
    return Decision(NOT_OWNED, "8 sender not owned by app")
