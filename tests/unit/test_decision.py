"""SPEC §6: the policy decision as a pure function, and the facts gathered for it."""

from __future__ import annotations

import asyncio
import re
from types import MappingProxyType

import pytest

from mailcloak.errors import IdPError
from mailcloak.idp.base import IdentityProvider, IdPUser
from mailcloak.policy.codec import PolicyRequest
from mailcloak.policy.decision import (
    AUTH_REQUIRED,
    DUNNO,
    IDP_TEMPFAIL,
    INTERNAL_TEMPFAIL,
    MALFORMED,
    NO_SUCH_USER,
    NOT_LOCAL,
    NOT_OWNED,
    UNAVAILABLE,
    UNSUPPORTED_METHOD,
    Decision,
    Facts,
    decide,
)
from mailcloak.policy.facts import gather_facts
from mailcloak.store.model import Alias, App, AppSender, Domain, Rows, Snapshot

ALICE = IdPUser("alice", "alice@d1.test")
BOB = IdPUser("bob", "bob@d2.test")
MAILER = App("Mailer", "{ARGON2ID}x", True, 0,
             (AppSender("noreply@d1.test", True), AppSender("billing@d1.test", False)))
MAILER_OFF = App("Mailer", "{ARGON2ID}x", False, 0, (AppSender("noreply@d1.test", True),))
NOW = 1_800_000_000
# An app that ages (passdb rules reused by row 7): expires a minute after NOW, two networks.
MAILER_AGING = App("Mailer", "{ARGON2ID}x", True, 0, (AppSender("noreply@d1.test", True),),
                   "", NOW + 60, ("192.0.2.0/24", "2001:db8::/32"))

FAILURE_ACTIONS = {"tempfail": IDP_TEMPFAIL, "dunno": DUNNO}


def req(state: str = "RCPT", **attributes: str) -> PolicyRequest:
    attrs = {"request": "smtpd_access_policy", "protocol_state": state, **attributes}
    return PolicyRequest(MappingProxyType(attrs))


# Facts presets -------------------------------------------------------------------------------
LOCAL_EXISTS = dict(recipient_local=True, recipient_exists=True)
LOCAL_MISSING = dict(recipient_local=True, recipient_exists=False)
REMOTE = dict(recipient_local=False, recipient_exists=None)
OUT = "bob@elsewhere.example"
IN = "alice@d1.test"
AGING_SENDS = dict(recipient=OUT, sender="noreply@d1.test", sasl_method="PLAIN", sasl_username="Mailer")

# (id, state, request attributes, facts, expected action), evaluated with failure mode tempfail.
RCPT_TABLE = [
    # 1: no recipient
    ("1-no-recipient", dict(recipient=""), Facts(), DUNNO),
    ("1-no-recipient-even-unauth-local-sender",
     dict(recipient="", sender="x@d1.test"), Facts(sender_local=True), DUNNO),
    ("1-no-recipient-authenticated",
     dict(recipient="", sasl_method="CRAM-MD5", sasl_username="x"), Facts(), DUNNO),
    # 2: local recipient that does not exist, whoever asks
    ("2-unauth", dict(recipient="nobody@d1.test", sender="x@example.org"),
     Facts(**LOCAL_MISSING), NO_SUCH_USER),
    ("2-xoauth2", dict(recipient="nobody@d1.test", sender=IN, sasl_method="XOAUTH2",
                       sasl_username="alice"),
     Facts(**LOCAL_MISSING, login_user=ALICE, sender_base=IN), NO_SUCH_USER),
    ("2-plain-app", dict(recipient="nobody@d1.test", sender="noreply@d1.test", sasl_method="PLAIN",
                         sasl_username="Mailer"),
     Facts(**LOCAL_MISSING, app=MAILER, sender_base="noreply@d1.test"), NO_SUCH_USER),
    ("2-before-unsupported-method", dict(recipient="nobody@d1.test", sasl_method="CRAM-MD5",
                                         sasl_username="x"),
     Facts(**LOCAL_MISSING), NO_SUCH_USER),
    # 3: unauthenticated, recipient not local
    ("3-remote", dict(recipient=OUT, sender="x@example.org"), Facts(**REMOTE), NOT_LOCAL),
    ("3-remote-local-sender", dict(recipient=OUT, sender=IN),
     Facts(**REMOTE, sender_local=True, sender_base=IN), NOT_LOCAL),
    ("3-remote-null-sender", dict(recipient=OUT, sender=""), Facts(**REMOTE), NOT_LOCAL),
    # 4: unauthenticated, sender local
    ("4-local-sender", dict(recipient=IN, sender="bob@d2.test"),
     Facts(**LOCAL_EXISTS, sender_local=True, sender_base="bob@d2.test"), AUTH_REQUIRED),
    # 5: unauthenticated, otherwise
    ("5-inbound", dict(recipient=IN, sender="x@example.org"),
     Facts(**LOCAL_EXISTS, sender_base="x@example.org"), DUNNO),
    ("5-null-sender", dict(recipient=IN, sender=""), Facts(**LOCAL_EXISTS), DUNNO),
    # 6: XOAUTH2/OAUTHBEARER, sender owned by the user
    ("6-primary-email", dict(recipient=OUT, sender=IN, sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(**REMOTE, sender_local=True, login_user=ALICE, sender_base=IN), DUNNO),
    ("6-oauthbearer", dict(recipient=OUT, sender=IN, sasl_method="OAUTHBEARER", sasl_username="alice"),
     Facts(**REMOTE, sender_local=True, login_user=ALICE, sender_base=IN), DUNNO),
    ("6-local-recipient", dict(recipient="bob@d2.test", sender=IN, sasl_method="XOAUTH2",
                               sasl_username="alice"),
     Facts(**LOCAL_EXISTS, sender_local=True, login_user=ALICE, sender_base=IN), DUNNO),
    ("6-alias", dict(recipient=OUT, sender="alias1@d1.test", sasl_method="XOAUTH2",
                     sasl_username="alice"),
     Facts(**REMOTE, sender_local=True, login_user=ALICE, sender_alias_senders=("alice",),
           sender_base="alias1@d1.test"), DUNNO),
    ("6-alias-target-case", dict(recipient=OUT, sender="alias1@d1.test", sasl_method="XOAUTH2",
                                 sasl_username="alice"),
     Facts(**REMOTE, login_user=IdPUser("Alice", "alice@d1.test"), sender_alias_senders=("ALICE",),
           sender_base="alias1@d1.test"), DUNNO),
    ("6-list-member", dict(recipient=OUT, sender="team@d1.test", sasl_method="XOAUTH2",
                           sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_alias_senders=("bob", "alice"),
           sender_base="team@d1.test"), DUNNO),
    ("6-own-address-whatever-the-list-lookup", dict(recipient=OUT, sender=IN, sasl_method="XOAUTH2",
                                                    sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_alias_senders=UNAVAILABLE, sender_base=IN), DUNNO),
    ("6-further-address", dict(recipient=OUT, sender="a.l@d1.test", sasl_method="XOAUTH2",
                               sasl_username="alice"),
     Facts(**REMOTE, login_user=IdPUser("alice", "alice@d1.test", frozenset({"a.l@d1.test"})),
           sender_base="a.l@d1.test"), DUNNO),
    # 7: PLAIN/LOGIN app, enabled, sender allowed and enabled
    ("7-plain", dict(recipient=OUT, sender="noreply@d1.test", sasl_method="PLAIN", sasl_username="Mailer"),
     Facts(**REMOTE, sender_local=True, app=MAILER, sender_base="noreply@d1.test"), DUNNO),
    ("7-login", dict(recipient=OUT, sender="noreply@d1.test", sasl_method="LOGIN", sasl_username="mailer"),
     Facts(**REMOTE, sender_local=True, app=MAILER, sender_base="noreply@d1.test"), DUNNO),
    ("7-local-recipient", dict(recipient=IN, sender="noreply@d1.test", sasl_method="PLAIN",
                               sasl_username="Mailer"),
     Facts(**LOCAL_EXISTS, sender_local=True, app=MAILER, sender_base="noreply@d1.test"), DUNNO),
    ("7-app-before-expiry-inside-networks", dict(AGING_SENDS, client_address="192.0.2.10"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW + 59), DUNNO),
    ("7-app-inside-ipv6-network", dict(AGING_SENDS, client_address="2001:db8:1::5"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW), DUNNO),
    ("7-app-inside-v4-mapped", dict(AGING_SENDS, client_address="::ffff:192.0.2.10"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW), DUNNO),
    ("7-app-without-expiry-time-not-gathered", dict(AGING_SENDS, client_address="198.51.100.1"),
     Facts(**REMOTE, app=MAILER, sender_base="noreply@d1.test", now=None), DUNNO),
    # 8: known method, sender not owned
    ("8-user-other-sender", dict(recipient=OUT, sender="bob@d2.test", sasl_method="XOAUTH2",
                                 sasl_username="alice"),
     Facts(**REMOTE, sender_local=True, login_user=ALICE, sender_base="bob@d2.test"), NOT_OWNED),
    ("8-user-alias-of-other", dict(recipient=OUT, sender="sales@d2.test", sasl_method="XOAUTH2",
                                   sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_alias_senders=("bob",), sender_base="sales@d2.test"), NOT_OWNED),
    ("8-list-send-policy-nobody", dict(recipient=OUT, sender="team@d1.test", sasl_method="XOAUTH2",
                                       sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_alias_senders=(), sender_base="team@d1.test"), NOT_OWNED),
    ("8-list-listed-others", dict(recipient=OUT, sender="team@d1.test", sasl_method="XOAUTH2",
                                  sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_alias_senders=("carol",), sender_base="team@d1.test"),
     NOT_OWNED),
    ("8-user-unknown-login", dict(recipient=OUT, sender=IN, sasl_method="XOAUTH2", sasl_username="ghost"),
     Facts(**REMOTE, login_user=None, sender_base=IN), NOT_OWNED),
    ("8-user-null-sender", dict(recipient=OUT, sender="", sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(**REMOTE, login_user=IdPUser("alice", "")), NOT_OWNED),
    ("8-user-external-sender", dict(recipient=OUT, sender="alice@example.org", sasl_method="XOAUTH2",
                                    sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_base="alice@example.org"), NOT_OWNED),
    ("8-app-not-allowed", dict(recipient=OUT, sender=IN, sasl_method="PLAIN", sasl_username="Mailer"),
     Facts(**REMOTE, app=MAILER, sender_base=IN), NOT_OWNED),
    ("8-app-sender-disabled", dict(recipient=OUT, sender="billing@d1.test", sasl_method="PLAIN",
                                   sasl_username="Mailer"),
     Facts(**REMOTE, app=MAILER, sender_base="billing@d1.test"), NOT_OWNED),
    ("8-app-disabled", dict(recipient=OUT, sender="noreply@d1.test", sasl_method="PLAIN",
                            sasl_username="Mailer"),
     Facts(**REMOTE, app=MAILER_OFF, sender_base="noreply@d1.test"), NOT_OWNED),
    ("8-app-expired", dict(AGING_SENDS, client_address="192.0.2.10"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW + 60), NOT_OWNED),
    ("8-app-time-not-gathered-fails-closed", dict(AGING_SENDS, client_address="192.0.2.10"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=None), NOT_OWNED),
    ("8-app-outside-networks", dict(AGING_SENDS, client_address="198.51.100.1"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW), NOT_OWNED),
    ("8-app-outside-ipv6-networks", dict(AGING_SENDS, client_address="2001:db9::1"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW), NOT_OWNED),
    ("8-app-networks-no-client-address", AGING_SENDS,
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW), NOT_OWNED),
    ("8-app-networks-client-unknown", dict(AGING_SENDS, client_address="unknown"),
     Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=NOW), NOT_OWNED),
    ("8-app-unknown", dict(recipient=OUT, sender="noreply@d1.test", sasl_method="LOGIN",
                           sasl_username="nobody"),
     Facts(**REMOTE, app=None, sender_base="noreply@d1.test"), NOT_OWNED),
    ("8-app-null-sender", dict(recipient=OUT, sender="", sasl_method="PLAIN", sasl_username="Mailer"),
     Facts(**REMOTE, app=MAILER), NOT_OWNED),
    # 9: any other SASL method, whatever the sender
    ("9-cram-md5", dict(recipient=OUT, sender=IN, sasl_method="CRAM-MD5", sasl_username="alice"),
     Facts(**REMOTE, login_user=ALICE, sender_base=IN), UNSUPPORTED_METHOD),
    ("9-anonymous-local", dict(recipient=IN, sender="x@example.org", sasl_method="ANONYMOUS",
                               sasl_username="x"),
     Facts(**LOCAL_EXISTS, sender_base="x@example.org"), UNSUPPORTED_METHOD),
    ("9-username-without-method", dict(recipient=OUT, sender=IN, sasl_username="alice"),
     Facts(**REMOTE, sender_base=IN), UNSUPPORTED_METHOD),
    ("9-scram", dict(recipient=OUT, sender="", sasl_method="SCRAM-SHA-256", sasl_username="a"),
     Facts(**REMOTE), UNSUPPORTED_METHOD),
]


@pytest.mark.parametrize("attrs, facts, expected", [row[1:] for row in RCPT_TABLE],
                         ids=[row[0] for row in RCPT_TABLE])
@pytest.mark.parametrize("mode", ["tempfail", "dunno"])
def test_rcpt_rows(attrs, facts, expected, mode):
    # No fact is UNAVAILABLE here, so the failure mode must never matter.
    decision = decide(req("RCPT", **attrs), facts, FAILURE_ACTIONS[mode])
    assert decision.action == expected
    assert decision.rule


def test_rcpt_table_covers_every_row():
    rows = {row[0].split("-")[0] for row in RCPT_TABLE}
    assert rows == {str(n) for n in range(1, 10)}


@pytest.mark.parametrize("client_address, now, rule", [
    ("192.0.2.10", NOW + 60, "8 app expired at 2027-01-15T08:01:00Z"),
    ("198.51.100.1", NOW, "8 remote IP 198.51.100.1 is outside the app's networks"),
    ("", NOW, "8 no remote IP to check against the app's networks"),
])
def test_aging_refusal_names_its_reason_in_the_rule_not_the_reply(client_address, now, rule):
    attrs = dict(AGING_SENDS, client_address=client_address) if client_address else AGING_SENDS
    facts = Facts(**REMOTE, app=MAILER_AGING, sender_base="noreply@d1.test", now=now)
    assert decide(req("RCPT", **attrs), facts, IDP_TEMPFAIL) == Decision(NOT_OWNED, rule)


def test_decision_names_its_row():
    decision = decide(req(recipient="nobody@d1.test"), Facts(**LOCAL_MISSING), IDP_TEMPFAIL)
    assert decision.rule.startswith("2")
    decision = decide(req(recipient=OUT, sasl_method="CRAM-MD5", sasl_username="a"), Facts(**REMOTE),
                      IDP_TEMPFAIL)
    assert decision.rule.startswith("9")


# MAIL stage: the sender rows on their own ----------------------------------------------------
MAIL_TABLE = [
    ("4-unauth-local-sender", dict(sender=IN), Facts(sender_local=True, sender_base=IN), AUTH_REQUIRED),
    ("5-unauth-remote-sender", dict(sender="x@example.org"), Facts(sender_base="x@example.org"), DUNNO),
    ("5-unauth-null-sender", dict(sender=""), Facts(), DUNNO),
    ("6-user", dict(sender=IN, sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(sender_local=True, login_user=ALICE, sender_base=IN), DUNNO),
    ("6-alias", dict(sender="alias1@d1.test", sasl_method="OAUTHBEARER", sasl_username="alice"),
     Facts(sender_local=True, login_user=ALICE, sender_alias_senders=("alice",), sender_base="alias1@d1.test"),
     DUNNO),
    ("7-app", dict(sender="noreply@d1.test", sasl_method="PLAIN", sasl_username="Mailer"),
     Facts(sender_local=True, app=MAILER, sender_base="noreply@d1.test"), DUNNO),
    ("8-user", dict(sender="bob@d2.test", sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(sender_local=True, login_user=ALICE, sender_base="bob@d2.test"), NOT_OWNED),
    ("8-app", dict(sender=IN, sasl_method="LOGIN", sasl_username="Mailer"),
     Facts(sender_local=True, app=MAILER, sender_base=IN), NOT_OWNED),
    ("9-method", dict(sender=IN, sasl_method="DIGEST-MD5", sasl_username="alice"),
     Facts(sender_local=True, sender_base=IN), UNSUPPORTED_METHOD),
    # Recipient facts play no part at MAIL (there is no recipient yet).
    ("no-row-2-at-mail", dict(sender="x@example.org"), Facts(**LOCAL_MISSING), DUNNO),
    ("no-row-3-at-mail", dict(sender="x@example.org", recipient=OUT), Facts(**REMOTE), DUNNO),
]


@pytest.mark.parametrize("attrs, facts, expected", [row[1:] for row in MAIL_TABLE],
                         ids=[row[0] for row in MAIL_TABLE])
def test_mail_stage_rows(attrs, facts, expected):
    assert decide(req("MAIL", **attrs), facts, IDP_TEMPFAIL).action == expected


REJECTING_FACTS = Facts(**LOCAL_MISSING, sender_local=True, login_user=UNAVAILABLE, sender_base=IN)


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "DATA", "END-OF-MESSAGE", "VRFY",
                                   "ETRN", "", "BOGUS"])
@pytest.mark.parametrize("attrs", [
    dict(recipient="nobody@d1.test", sender=IN),
    dict(recipient=OUT, sender=IN, sasl_method="XOAUTH2", sasl_username="alice"),
    dict(recipient=OUT, sender=IN, sasl_method="CRAM-MD5", sasl_username="alice"),
])
def test_every_other_state_gets_dunno(state, attrs):
    assert decide(req(state, **attrs), REJECTING_FACTS, IDP_TEMPFAIL).action == DUNNO


def test_protocol_state_case_insensitive():
    assert decide(req("rcpt", recipient="nobody@d1.test"), Facts(**LOCAL_MISSING), IDP_TEMPFAIL).action \
        == NO_SUCH_USER


# IdP cannot answer -----------------------------------------------------------------------------
UNAVAILABLE_TABLE = [
    # recipient existence unknown; the sender would pass
    ("rcpt-unauth", "RCPT", dict(recipient="someone@d1.test", sender="x@example.org"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, sender_base="x@example.org")),
    ("rcpt-user", "RCPT", dict(recipient="someone@d1.test", sender=IN, sasl_method="XOAUTH2",
                               sasl_username="alice"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, login_user=ALICE, sender_base=IN)),
    ("rcpt-app", "RCPT", dict(recipient="someone@d1.test", sender="noreply@d1.test", sasl_method="PLAIN",
                              sasl_username="Mailer"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, app=MAILER, sender_base="noreply@d1.test")),
    # login user unknown
    ("rcpt-login", "RCPT", dict(recipient=OUT, sender=IN, sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(**REMOTE, login_user=UNAVAILABLE, sender_base=IN)),
    ("rcpt-login-local-recipient", "RCPT", dict(recipient="bob@d2.test", sender=IN, sasl_method="xoauth2",
                                                sasl_username="alice"),
     Facts(**LOCAL_EXISTS, login_user=UNAVAILABLE, sender_base=IN)),
    ("rcpt-both", "RCPT", dict(recipient="someone@d1.test", sender=IN, sasl_method="XOAUTH2",
                               sasl_username="alice"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, login_user=UNAVAILABLE, sender_base=IN)),
    ("mail-login", "MAIL", dict(sender=IN, sasl_method="OAUTHBEARER", sasl_username="alice"),
     Facts(login_user=UNAVAILABLE, sender_base=IN)),
    # who may send as an IdP list unknown, and the login does not own the sender itself
    ("mail-sender-list", "MAIL", dict(sender="team@d1.test", sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(login_user=ALICE, sender_alias_senders=UNAVAILABLE, sender_base="team@d1.test")),
]


@pytest.mark.parametrize("state, attrs, facts", [row[1:] for row in UNAVAILABLE_TABLE],
                         ids=[row[0] for row in UNAVAILABLE_TABLE])
@pytest.mark.parametrize("mode", ["tempfail", "dunno"])
def test_idp_unavailable_applies_failure_mode(state, attrs, facts, mode):
    assert decide(req(state, **attrs), facts, FAILURE_ACTIONS[mode]).action == FAILURE_ACTIONS[mode]


def test_failure_actions_are_the_spec_ones():
    assert IDP_TEMPFAIL == "451 4.3.0 Temporary authentication/lookup failure"


@pytest.mark.parametrize("attrs, facts, expected", [
    # Unauthenticated, local sender: row 4 needs no IdP and rejects whatever row 2 would say.
    (dict(recipient="someone@d1.test", sender=IN),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, sender_local=True, sender_base=IN),
     AUTH_REQUIRED),
    # An app sending as an address it may not use: row 8 needs no IdP either.
    (dict(recipient="someone@d1.test", sender="ceo@d1.test", sasl_method="PLAIN", sasl_username="Mailer"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, sender_local=True, app=MAILER,
           sender_base="ceo@d1.test"),
     NOT_OWNED),
    (dict(recipient="someone@d1.test", sender=IN, sasl_method="CRAM-MD5", sasl_username="x"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, sender_local=True, sender_base=IN),
     UNSUPPORTED_METHOD),
    (dict(recipient="someone@d1.test", sender="bob@d2.test", sasl_method="XOAUTH2", sasl_username="alice"),
     Facts(recipient_local=True, recipient_exists=UNAVAILABLE, login_user=ALICE, sender_base="bob@d2.test"),
     NOT_OWNED),
], ids=["unauth-local-sender", "app-not-owned", "unsupported-method", "user-not-owned"])
@pytest.mark.parametrize("mode", ["tempfail", "dunno"])
def test_idp_outage_does_not_lift_sender_checks(attrs, facts, expected, mode):
    """With the recipient's existence unknown, a sender row that rejects still applies: `dunno`
    must not let an unauthenticated client (or an app) send as any local address while the IdP
    is down."""
    assert decide(req("RCPT", **attrs), facts, FAILURE_ACTIONS[mode]).action == expected


@pytest.mark.parametrize("method", ["xoauth2", "XOauth2", "oauthbearer", "OAuthBearer"])
def test_user_methods_case_insensitive(method):
    attrs = dict(recipient=OUT, sender=IN, sasl_method=method, sasl_username="alice")
    assert decide(req(**attrs), Facts(**REMOTE, login_user=ALICE, sender_base=IN), IDP_TEMPFAIL).action == DUNNO
    attrs["sender"] = "bob@d2.test"
    assert decide(req(**attrs), Facts(**REMOTE, login_user=ALICE, sender_base="bob@d2.test"),
                  IDP_TEMPFAIL).action == NOT_OWNED


@pytest.mark.parametrize("method", ["plain", "Plain", "login", "LoGiN"])
def test_app_methods_case_insensitive(method):
    attrs = dict(recipient=OUT, sender="noreply@d1.test", sasl_method=method, sasl_username="Mailer")
    facts = Facts(**REMOTE, app=MAILER, sender_base="noreply@d1.test")
    assert decide(req(**attrs), facts, IDP_TEMPFAIL).action == DUNNO


# Every action is a valid Postfix action --------------------------------------------------------
def _all_actions():
    actions = {MALFORMED, INTERNAL_TEMPFAIL, IDP_TEMPFAIL, DUNNO}
    for mode in FAILURE_ACTIONS.values():
        for _id, attrs, facts, _expected in RCPT_TABLE:
            actions.add(decide(req("RCPT", **attrs), facts, mode).action)
        for _id, attrs, facts, _expected in MAIL_TABLE:
            actions.add(decide(req("MAIL", **attrs), facts, mode).action)
        for _id, state, attrs, facts in UNAVAILABLE_TABLE:
            actions.add(decide(req(state, **attrs), facts, mode).action)
    return sorted(actions)


@pytest.mark.parametrize("action", _all_actions())
def test_actions_never_ok_and_rejects_carry_text(action):
    assert action.split()[0].upper() not in ("OK", "RELAY")
    assert action.strip() and not action.isdigit()
    assert "\n" not in action and "\r" not in action
    if action[0] in "45":
        assert re.fullmatch(r"[45]\d\d [45]\.\d{1,3}\.\d{1,3} \S.*", action), action
    elif action != DUNNO:
        assert re.fullmatch(r"DEFER_IF_PERMIT \S.*", action), action


def test_all_reject_constants_covered():
    actions = set(_all_actions())
    for constant in (NO_SUCH_USER, NOT_LOCAL, AUTH_REQUIRED, NOT_OWNED, UNSUPPORTED_METHOD):
        assert constant in actions


# gather_facts ----------------------------------------------------------------------------------

ROWS = Rows(
    domains=(Domain("d1.test", True, 0), Domain("d2.test", True, 0), Domain("d3.test", False, 0)),
    aliases=(
        Alias("alias1@d1.test", "alice", "d1.test", True, 0),
        Alias("off@d1.test", "alice", "d1.test", False, 0),
        Alias("sales@d2.test", "bob", "d2.test", True, 0),
        Alias("old@d3.test", "alice", "d3.test", True, 0),
        Alias("team@d1.test", "Alice", "d1.test", True, 0),
    ),
    apps=(
        App("Mailer", "{ARGON2ID}x", True, 0,
            (AppSender("noreply@d1.test", True), AppSender("billing@d1.test", False))),
        App("Stopped", "{ARGON2ID}x", False, 0, (AppSender("stopped@d1.test", True),)),
    ),
)
SNAPSHOT = Snapshot.from_rows(ROWS, frozenset({"legacy.test"}))


class FakeIdP(IdentityProvider):
    """Users by username and primary email; records every question; can fail or hang."""

    name = "fake"

    def __init__(self, users=(ALICE, BOB, IdPUser("dave", "dave@legacy.test")), mode: str = "ok",
                 fail_on: frozenset[str] = frozenset({"address", "username"})):
        self.users = list(users)
        self.mode = mode
        self.fail_on = fail_on
        self.calls: list[tuple[str, str]] = []

    async def _trouble(self, kind: str) -> None:
        if kind not in self.fail_on:
            return
        if self.mode == "fail":
            raise IdPError("IdP down")
        if self.mode == "hang":
            await asyncio.Event().wait()

    async def user_by_address(self, address):
        self.calls.append(("address", address))
        await self._trouble("address")
        return next((u for u in self.users if u.email == address.lower()), None)

    async def user_by_username(self, username):
        self.calls.append(("username", username))
        await self._trouble("username")
        return next((u for u in self.users if u.username.lower() == username.lower()), None)


async def facts_for(request, idp=None, delimiters="+", timeout=5.0):
    idp = idp if idp is not None else FakeIdP()
    deadline = asyncio.get_running_loop().time() + timeout
    return await gather_facts(request, SNAPSHOT, idp, delimiters, deadline)


async def decide_for(state="RCPT", idp=None, delimiters="+", mode="tempfail", **attrs):
    request = req(state, **attrs)
    facts = await facts_for(request, idp, delimiters)
    return decide(request, facts, FAILURE_ACTIONS[mode]).action


UNAUTH_FROM_OUTSIDE = dict(sender="x@example.org")


@pytest.mark.parametrize("recipient, delimiters, exists", [
    ("alice@d1.test", "+", True),
    ("alice+tag@d1.test", "+", True),
    ("Alice+Tag@D1.Test", "+", True),
    ("alice+@d1.test", "+", True),
    ("alice-tag@d1.test", "+-", True),
    ("alice+a-b@d1.test", "+-", True),
    ("alice+tag@d1.test", "", False),   # sub-addressing off
    ("alice-tag@d1.test", "+", False),
    ("nobody@d1.test", "+", False),
    ("nobody+tag@d1.test", "+", False),
    ("+alice@d1.test", "+", False),
])
async def test_recipient_existence_with_subaddressing(recipient, delimiters, exists):
    facts = await facts_for(req(recipient=recipient, **UNAUTH_FROM_OUTSIDE), delimiters=delimiters)
    assert facts.recipient_local is True
    assert facts.recipient_exists is exists
    action = await decide_for(recipient=recipient, delimiters=delimiters, **UNAUTH_FROM_OUTSIDE)
    assert action == (DUNNO if exists else NO_SUCH_USER)


async def test_idp_asked_for_the_base_address():
    idp = FakeIdP()
    await facts_for(req(recipient="Alice+Tag@D1.test", **UNAUTH_FROM_OUTSIDE), idp)
    assert idp.calls == [("address", "alice@d1.test")]


@pytest.mark.parametrize("recipient", ["alias1@d1.test", "ALIAS1@d1.test", "alias1+x@d1.test",
                                       "sales@d2.test"])
async def test_recipient_alias_exists_without_asking_idp(recipient):
    idp = FakeIdP(mode="fail")
    facts = await facts_for(req(recipient=recipient, **UNAUTH_FROM_OUTSIDE), idp)
    assert facts.recipient_exists is True
    assert idp.calls == []


@pytest.mark.parametrize("recipient", ["off@d1.test", "noreply@d1.test", "stopped@d1.test"])
async def test_disabled_alias_or_app_address_is_no_recipient(recipient):
    # Apps have no mailbox: an app's allowed address is not a recipient unless it also exists.
    assert await decide_for(recipient=recipient, **UNAUTH_FROM_OUTSIDE) == NO_SUCH_USER


@pytest.mark.parametrize("recipient", ["old@d3.test", "alice@d3.test", "bob@elsewhere.example"])
async def test_non_local_recipient_unauthenticated(recipient):
    idp = FakeIdP()
    facts = await facts_for(req(recipient=recipient, **UNAUTH_FROM_OUTSIDE), idp)
    assert facts.recipient_local is False
    assert facts.recipient_exists is None
    assert idp.calls == []
    assert decide(req(recipient=recipient), facts, IDP_TEMPFAIL).action == NOT_LOCAL


async def test_legacy_extra_local_domain():
    assert await decide_for(recipient="dave@legacy.test", **UNAUTH_FROM_OUTSIDE) == DUNNO
    assert await decide_for(recipient="nobody@legacy.test", **UNAUTH_FROM_OUTSIDE) == NO_SUCH_USER
    assert await decide_for(recipient="alice@d1.test", sender="x@legacy.test") == AUTH_REQUIRED


@pytest.mark.parametrize("sender, local", [
    ("", False), ("x@d1.test", True), ("X@D2.TEST", True), ("x@d3.test", False), ("x@example.org", False),
    ("alice+tag@d1.test", True),
])
async def test_sender_local(sender, local):
    facts = await facts_for(req("MAIL", sender=sender))
    assert facts.sender_local is local


async def test_null_sender_never_local_even_with_odd_domains():
    snapshot = Snapshot.from_rows(Rows(domains=(Domain("", True, 0),)), frozenset({""}))
    request = req("RCPT", sender="", recipient="alice@d1.test")
    facts = await gather_facts(request, snapshot, FakeIdP(), "+", asyncio.get_running_loop().time() + 5)
    assert facts.sender_local is False


@pytest.mark.parametrize("login", ["alice", "ALICE", "alice@d1.test", "Alice@D1.Test"])
@pytest.mark.parametrize("sender, expected", [
    ("alice@d1.test", DUNNO),
    ("alice+news@d1.test", DUNNO),
    ("Alice+News@D1.Test", DUNNO),
    ("alias1@d1.test", DUNNO),
    ("alias1+x@d1.test", DUNNO),
    ("team@d1.test", DUNNO),           # target_user spelt "Alice"
    ("off@d1.test", NOT_OWNED),        # disabled alias
    ("old@d3.test", NOT_OWNED),        # alias in a disabled domain
    ("sales@d2.test", NOT_OWNED),      # bob's alias
    ("bob@d2.test", NOT_OWNED),
    ("noreply@d1.test", NOT_OWNED),    # an app's address
    ("", NOT_OWNED),
])
@pytest.mark.parametrize("method", ["XOAUTH2", "oauthbearer"])
async def test_user_sender_ownership(login, sender, expected, method):
    action = await decide_for(recipient="bob@elsewhere.example", sender=sender, sasl_method=method,
                              sasl_username=login)
    assert action == expected


async def test_user_subaddress_with_delimiter_off():
    action = await decide_for(recipient="bob@elsewhere.example", sender="alice+news@d1.test",
                              sasl_method="XOAUTH2", sasl_username="alice", delimiters="")
    assert action == NOT_OWNED


async def test_unknown_user_login():
    action = await decide_for(recipient="bob@elsewhere.example", sender="alias1@d1.test",
                              sasl_method="XOAUTH2", sasl_username="ghost")
    assert action == NOT_OWNED


@pytest.mark.parametrize("login, sender, expected", [
    ("Mailer", "noreply@d1.test", DUNNO),
    ("mailer", "noreply@d1.test", DUNNO),          # Dovecot lower-cases the login
    ("MAILER", "NoReply@D1.test", DUNNO),
    ("mailer", "noreply+x@d1.test", DUNNO),
    ("mailer", "billing@d1.test", NOT_OWNED),      # allowed-sender row disabled
    ("mailer", "alice@d1.test", NOT_OWNED),
    ("mailer", "", NOT_OWNED),
    ("stopped", "stopped@d1.test", NOT_OWNED),     # app disabled
    ("ghost", "noreply@d1.test", NOT_OWNED),       # no such app
    ("alice", "alice@d1.test", NOT_OWNED),         # a user with PLAIN is no app
])
@pytest.mark.parametrize("method", ["PLAIN", "login"])
async def test_app_rules(login, sender, expected, method):
    idp = FakeIdP()
    action = await decide_for(idp=idp, recipient="bob@elsewhere.example", sender=sender, sasl_method=method,
                              sasl_username=login)
    assert action == expected
    assert idp.calls == []   # app logins never need the IdP for a remote recipient


async def test_app_id_case_insensitive_in_facts():
    facts = await facts_for(req(recipient=OUT, sender="noreply@d1.test", sasl_method="Plain",
                                sasl_username="mAiLeR"))
    assert facts.app is not None and facts.app.app_id == "Mailer"


@pytest.mark.parametrize("mode", ["fail", "hang"])
@pytest.mark.parametrize("failure_mode", ["tempfail", "dunno"])
async def test_idp_trouble_on_recipient(mode, failure_mode):
    idp = FakeIdP(mode=mode)
    request = req(recipient="alice@d1.test", **UNAUTH_FROM_OUTSIDE)
    facts = await facts_for(request, idp, timeout=0.05)
    assert facts.recipient_exists is UNAVAILABLE
    assert decide(request, facts, FAILURE_ACTIONS[failure_mode]).action == FAILURE_ACTIONS[failure_mode]


@pytest.mark.parametrize("mode", ["fail", "hang"])
@pytest.mark.parametrize("failure_mode", ["tempfail", "dunno"])
async def test_idp_trouble_on_login(mode, failure_mode):
    idp = FakeIdP(mode=mode)
    request = req(recipient=OUT, sender="alice@d1.test", sasl_method="XOAUTH2", sasl_username="alice")
    facts = await facts_for(request, idp, timeout=0.05)
    assert facts.login_user is UNAVAILABLE
    assert decide(request, facts, FAILURE_ACTIONS[failure_mode]).action == FAILURE_ACTIONS[failure_mode]


@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_idp_trouble_on_one_question_only(mode):
    # Recipient lookup fails, login lookup works: both asked in the same request.
    idp = FakeIdP(mode=mode, fail_on=frozenset({"address"}))
    request = req(recipient="bob@d2.test", sender="alice@d1.test", sasl_method="XOAUTH2",
                  sasl_username="alice")
    facts = await facts_for(request, idp, timeout=0.05)
    assert facts.recipient_exists is UNAVAILABLE
    assert facts.login_user == ALICE
    assert decide(request, facts, IDP_TEMPFAIL).action == IDP_TEMPFAIL
    assert decide(request, facts, DUNNO).action == DUNNO


async def test_hanging_idp_does_not_matter_when_not_asked():
    idp = FakeIdP(mode="hang")
    request = req(recipient="alias1@d1.test", sender="noreply@d1.test", sasl_method="PLAIN",
                  sasl_username="Mailer")
    facts = await facts_for(request, idp)
    assert decide(request, facts, IDP_TEMPFAIL).action == DUNNO
    assert idp.calls == []


@pytest.mark.parametrize("state, attrs", [
    ("RCPT", dict(recipient="alias1@d1.test", sender="x@example.org")),          # recipient is an alias
    ("RCPT", dict(recipient="sales@d2.test", sender="alice@d1.test")),
    ("RCPT", dict(recipient="bob@elsewhere.example", sender="x@example.org")),   # unauth, not local
    ("RCPT", dict(recipient="x@d3.test", sender="x@example.org")),               # disabled domain
    ("RCPT", dict(recipient="", sender="x@example.org")),
    ("RCPT", dict(recipient=OUT, sender="noreply@d1.test", sasl_method="PLAIN", sasl_username="Mailer")),
    ("RCPT", dict(recipient=OUT, sender=IN, sasl_method="CRAM-MD5", sasl_username="alice")),
    ("MAIL", dict(sender="alice@d1.test")),
    ("MAIL", dict(sender="noreply@d1.test", sasl_method="LOGIN", sasl_username="mailer")),
    ("CONNECT", dict()),
    ("DATA", dict(recipient="nobody@d1.test", sender=IN, sasl_method="XOAUTH2", sasl_username="alice")),
    ("END-OF-MESSAGE", dict(recipient="nobody@d1.test")),
])
async def test_idp_not_asked_when_not_needed(state, attrs):
    idp = FakeIdP(mode="fail")
    facts = await facts_for(req(state, **attrs), idp)
    assert idp.calls == []
    assert UNAVAILABLE not in (facts.recipient_exists, facts.login_user)


async def test_idp_asked_only_for_login_at_mail_stage():
    idp = FakeIdP()
    facts = await facts_for(req("MAIL", sender="alice@d1.test", recipient="nobody@d1.test",
                                sasl_method="XOAUTH2", sasl_username="alice"), idp)
    assert idp.calls == [("username", "alice")]
    assert facts.recipient_exists is None and facts.login_user == ALICE


async def test_other_states_gather_nothing():
    facts = await facts_for(req("DATA", recipient="nobody@d1.test", sender="alice@d1.test"))
    assert facts == Facts()


@pytest.mark.parametrize("seconds_after, expected", [(59, DUNNO), (60, NOT_OWNED)])
async def test_app_expiry_time_comes_from_the_facts_wall_clock(seconds_after, expected):
    """gather_facts reads the request's time (decide() never reads a clock), so an app whose
    expiry passed is refused at once, even while Dovecot's auth cache still lets it log in."""
    snapshot = Snapshot.from_rows(Rows(domains=(Domain("d1.test", True, 0),), apps=(MAILER_AGING,)))
    request = req("RCPT", **dict(AGING_SENDS, client_address="192.0.2.10"))
    facts = await gather_facts(request, snapshot, FakeIdP(), "+",
                               asyncio.get_running_loop().time() + 5,
                               wall_clock=lambda: NOW + seconds_after)
    assert facts.now == NOW + seconds_after
    assert decide(request, facts, IDP_TEMPFAIL).action == expected


async def test_the_time_is_read_only_for_an_app_login():
    def no_clock() -> float:
        raise AssertionError("the wall clock was read")

    for attrs in (dict(sender="x@example.org"),
                  dict(sender=IN, sasl_method="XOAUTH2", sasl_username="alice"),
                  dict(sender=IN, sasl_method="PLAIN", sasl_username="nobody")):
        request = req("RCPT", recipient=OUT, **attrs)
        facts = await gather_facts(request, SNAPSHOT, FakeIdP(), "+",
                                   asyncio.get_running_loop().time() + 5, wall_clock=no_clock)
        assert facts.now is None
