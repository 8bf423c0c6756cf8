"""SPEC §6 rows 1-5 and §7 through a real Postfix 3.7: smtplib sessions, the maillog, postmap -q.

The module runs once per store (SQLite, PostgreSQL: tests/e2e/conftest.py). The daemon runs as
a process over the Go project's data (d1.test and d2.test enabled, d3.test
disabled; aliases alias1@d1.test -> alice and sales@d2.test -> bob enabled, off@d1.test disabled,
old@d3.test in the disabled domain) with the static users alice@d1.test, Bob@D2.test and the
disabled carol@d1.test. Postfix delivers every accepted message to discard(8), so the maillog
line `to=<...>, orig_to=<...>, ... status=sent (virtual-delivered)` proves a delivery.

Row 1 ("no recipient" -> DUNNO) cannot be produced through Postfix: smtpd sends a policy request
at protocol_state=RCPT only for a RCPT command, always with `recipient=` set; the requests
without a recipient are those of other states (MAIL here with smtpd_delay_reject = no; DATA with
more than one recipient), which SPEC §6 answers by the MAIL rules or "every other state gets
DUNNO". The "mailstage" listener covers those states (tests at the end); row 1 itself is left to
the direct policy tests.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.e2e

OUTSIDE = "someone@outside.test"
MESSAGE = b"From: e2e <someone@outside.test>\r\nSubject: e2e\r\n\r\nbody\r\n"

DELIVERY = re.compile(
    r"(?P<qid>\w+): to=<(?P<to>[^>]*)>, (?:orig_to=<(?P<orig_to>[^>]*)>, )?"
    r"relay=(?P<relay>[^,]*), .*status=(?P<status>\w+) \((?P<text>.*)\)$")


def recipient_rejected(address: str, text: str) -> bytes:
    """How smtpd renders a policy reject of a recipient: `<dsn> <addr>: Recipient address rejected: <text>`."""
    return f"<{address}>: Recipient address rejected: {text}".encode()


def session(postfix, sender: str, recipients: list[str], listener: str = "smtpd",
            data: bool = False):
    """One SMTP transaction. Returns (MAIL reply, [RCPT replies], queue id or None)."""
    client = postfix.smtp(listener)
    try:
        mail = client.mail(sender)
        replies = [client.rcpt(r) for r in recipients] if mail[0] == 250 else []
        queue_id = None
        if data and any(code == 250 for code, _ in replies):
            code, text = client.data(MESSAGE)
            assert code == 250, (code, text)
            queue_id = re.search(rb"queued as (\w+)", text).group(1).decode()
        else:
            client.rset()
        return mail, replies, queue_id
    finally:
        client.quit()


def deliveries(postfix, queue_id: str) -> dict[str, dict]:
    """Delivery lines of a message, keyed by final recipient (`to=`), once it left the queue."""
    result = {}
    for line in postfix.wait_for_delivery(queue_id):
        match = DELIVERY.search(line)
        assert match, line
        result[match["to"]] = match.groupdict()
    return result


def assert_sent(delivery: dict, orig_to: str | None) -> None:
    assert delivery["status"] == "sent", delivery
    assert delivery["text"] == "virtual-delivered", delivery
    assert delivery["relay"] == "none", delivery
    assert delivery["orig_to"] == orig_to, delivery


# --- row 2: a local recipient that does not exist --------------------------------------------

@pytest.mark.parametrize("recipient", [
    "nobody@d1.test",
    "NoBody@D2.Test",            # case-insensitive domain match, still unknown
    "carol@d1.test",             # an IdP user that is disabled
    "off@d1.test",               # a disabled alias
    "nobody+tag@d1.test",        # sub-address of an unknown user
])
def test_row2_unknown_local_recipient_is_550_5_1_1(postfix, recipient):
    mail, replies, _ = session(postfix, OUTSIDE, [recipient])
    assert mail[0] == 250
    assert replies == [(550, b"5.1.1 " + recipient_rejected(recipient, "No such user"))]
    postfix.wait_for_log(rf"reject: RCPT from .*: 550 5\.1\.1 <{re.escape(recipient)}>: "
                         rf"Recipient address rejected: No such user;")


# --- row 3: unauthenticated, recipient not local ----------------------------------------------

@pytest.mark.parametrize("recipient", [
    "someone@elsewhere.example",
    "old@d3.test",               # an enabled alias, but its domain is disabled: not local
    "alice@D3.test",
])
def test_row3_unauthenticated_to_non_local_domain_is_rejected_by_the_policy(postfix, recipient):
    # main.cf puts the policy before reject_unauth_destination (see postfix_instance.main_cf), so
    # the answer seen is the policy's, not Postfix's "554 5.7.1 Relay access denied".
    mail, replies, _ = session(postfix, OUTSIDE, [recipient])
    assert mail[0] == 250
    assert replies == [(550, b"5.7.1 " + recipient_rejected(recipient, "Recipient domain not local"))]


def test_row3_with_relay_restrictions_first_postfix_answers_relay_access_denied(postfix):
    # The conventional layout (smtpd_relay_restrictions = ..., reject_unauth_destination, then the
    # policy in smtpd_recipient_restrictions): Postfix refuses the relay before asking the policy.
    # The client is refused either way; only the code and text differ.
    mail, replies, _ = session(postfix, OUTSIDE, ["someone@elsewhere.example", "nobody@d1.test",
                                                   "alice@d1.test"], listener="relayfirst")
    assert mail[0] == 250
    assert replies == [
        (554, b"5.7.1 <someone@elsewhere.example>: Relay access denied"),
        # Local recipients still reach the policy in that layout.
        (550, b"5.1.1 " + recipient_rejected("nobody@d1.test", "No such user")),
        (250, b"2.1.5 Ok"),
    ]


# --- row 4: unauthenticated, local sender -----------------------------------------------------

@pytest.mark.parametrize("sender", [
    "alice@d1.test",
    "Alice@D1.TEST",
    "alias1@d1.test",
    "nobody@d2.test",            # local domain is enough, the sender need not exist
    "alice+tag@d1.test",
])
def test_row4_unauthenticated_local_sender_is_553_5_7_1(postfix, sender):
    mail, replies, _ = session(postfix, sender, ["Bob@D2.test"])
    assert mail[0] == 250  # smtpd_delay_reject = yes: the sender is judged at RCPT
    assert replies == [(553, b"5.7.1 " + recipient_rejected(
        "Bob@D2.test", "Sending from local domains requires authentication"))]


def test_rows_2_and_3_come_before_row_4(postfix):
    _, replies, _ = session(postfix, "alice@d1.test", ["nobody@d1.test", "x@elsewhere.example"])
    assert replies == [
        (550, b"5.1.1 " + recipient_rejected("nobody@d1.test", "No such user")),
        (550, b"5.7.1 " + recipient_rejected("x@elsewhere.example", "Recipient domain not local")),
    ]


def test_sender_in_a_disabled_domain_is_not_local(postfix):
    mail, replies, queue_id = session(postfix, "old@d3.test", ["alice@d1.test"], data=True)
    assert replies == [(250, b"2.1.5 Ok")]
    assert_sent(deliveries(postfix, queue_id)["alice@d1.test"], None)


# --- row 5: unauthenticated, outside sender, existing local recipient -------------------------

@pytest.mark.parametrize("sender", [OUTSIDE, ""])  # "" = the null sender, never local
@pytest.mark.parametrize("recipient, final", [
    ("alice@d1.test", "alice@d1.test"),
    ("bob@d2.test", "bob@d2.test"),          # the IdP has Bob@D2.test
    ("Bob@D2.Test", "Bob@D2.Test"),
])
def test_row5_outside_sender_to_existing_user_is_accepted_and_delivered(postfix, sender,
                                                                         recipient, final):
    mail, replies, queue_id = session(postfix, sender, [recipient], data=True)
    assert mail == (250, b"2.1.0 Ok")
    assert replies == [(250, b"2.1.5 Ok")]
    delivered = deliveries(postfix, queue_id)
    assert list(delivered) == [final]
    assert_sent(delivered[final], None)


# --- aliases (socketmap through smtpd, cleanup and trivial-rewrite) ---------------------------

@pytest.mark.parametrize("recipient, final", [
    ("alias1@d1.test", "alice@d1.test"),
    ("sales@d2.test", "bob@d2.test"),
    ("Alias1@D1.Test", "alice@d1.test"),              # client's case: the daemon folds it
    ("alias1+tag@d1.test", "alice+tag@d1.test"),      # the daemon strips and re-adds +tag
    ("ALIAS1+Tag@d1.test", "alice+tag@d1.test"),
])
def test_alias_recipient_is_rewritten(postfix, recipient, final):
    mail, replies, queue_id = session(postfix, OUTSIDE, [recipient], data=True)
    assert replies == [(250, b"2.1.5 Ok")]
    delivered = deliveries(postfix, queue_id)
    assert list(delivered) == [final]
    # orig_to keeps the address as the client typed it.
    assert_sent(delivered[final], recipient)
    postfix.wait_for_log(rf": to=<{re.escape(final)}>, orig_to=<{re.escape(recipient)}>, "
                         r"relay=none, .*status=sent \(virtual-delivered\)")


def test_plus_addressed_user_is_accepted_and_delivered_unchanged(postfix):
    mail, replies, queue_id = session(postfix, OUTSIDE, ["alice+tag@d1.test"], data=True)
    assert replies == [(250, b"2.1.5 Ok")]
    delivered = deliveries(postfix, queue_id)
    assert list(delivered) == ["alice+tag@d1.test"]
    assert_sent(delivered["alice+tag@d1.test"], None)


def test_one_message_many_recipients_only_accepted_ones_are_delivered(postfix):
    recipients = ["alias1@d1.test", "nobody@d1.test", "sales@d2.test", "x@elsewhere.example",
                  "alice+news@d1.test"]
    _, replies, queue_id = session(postfix, OUTSIDE, recipients, data=True)
    assert [code for code, _ in replies] == [250, 550, 250, 550, 250]
    delivered = deliveries(postfix, queue_id)
    assert sorted(delivered) == ["alice+news@d1.test", "alice@d1.test", "bob@d2.test"]
    assert_sent(delivered["alice@d1.test"], "alias1@d1.test")
    assert_sent(delivered["bob@d2.test"], "sales@d2.test")
    assert_sent(delivered["alice+news@d1.test"], None)


# --- MAIL and DATA states (listener "mailstage": smtpd_delay_reject = no) -----------------------

def test_mail_stage_local_sender_is_refused_at_mail_from(postfix):
    mail, replies, _ = session(postfix, "Alice@D1.test", ["bob@d2.test"], listener="mailstage")
    assert mail == (553, b"5.7.1 <Alice@D1.test>: Sender address rejected: "
                         b"Sending from local domains requires authentication")
    assert replies == []
    postfix.wait_for_log(r"reject: MAIL from .*: 553 5\.7\.1 <Alice@D1\.test>: Sender address "
                         r"rejected: Sending from local domains requires authentication;")


@pytest.mark.parametrize("sender", [OUTSIDE, ""])
def test_mail_stage_outside_sender_passes_mail_rcpt_and_data(postfix, sender):
    # The policy is asked at MAIL (no recipient: sender rows only -> DUNNO), at RCPT, and at DATA
    # ("every other state gets DUNNO"; with two recipients the DATA request has no recipient).
    mail, replies, queue_id = session(postfix, sender, ["alias1@d1.test", "bob@d2.test"],
                                      listener="mailstage", data=True)
    assert mail == (250, b"2.1.0 Ok")
    assert replies == [(250, b"2.1.5 Ok"), (250, b"2.1.5 Ok")]
    delivered = deliveries(postfix, queue_id)
    assert sorted(delivered) == ["alice@d1.test", "bob@d2.test"]
    assert_sent(delivered["alice@d1.test"], "alias1@d1.test")


# --- socketmap through postmap -q -------------------------------------------------------------

@pytest.mark.parametrize("key, expected", [
    ("alias1@d1.test", "alice@d1.test"),
    ("sales@d2.test", "bob@d2.test"),
    ("Alias1+X@D1.Test", "alice+x@d1.test"),
])
def test_postmap_query_alias_found(postfix, key, expected):
    result = postfix.postmap_query(key)
    assert (result.returncode, result.stdout) == (0, expected + "\n"), result


@pytest.mark.parametrize("key", [
    "off@d1.test",               # disabled alias
    "old@d3.test",               # enabled alias of a disabled domain
    "someone@elsewhere.example", # not a local domain
    "alice@d1.test",             # a real user is never mapped away
    "d1.test",                   # a bare domain: never an alias domain
    "elsewhere.example",
])
def test_postmap_query_not_found(postfix, key):
    result = postfix.postmap_query(key)
    assert (result.returncode, result.stdout) == (1, ""), result
    assert "error" not in result.stderr, result


# --- nothing went wrong on either side ---------------------------------------------------------

def test_the_daemon_used_the_modules_store(postfix, e2e_daemon, e2e_go_site):
    assert f"database {e2e_go_site.location})" in e2e_daemon.log()


def test_no_errors_logged_by_postfix_or_the_daemon(postfix, e2e_daemon):
    maillog = postfix.maillog()
    for bad in ("problem talking to server", "socketmap server", "Temporary lookup failure",
                "Server configuration", "fatal:", "panic:", "warning:"):
        assert bad not in maillog, f"{bad!r} in maillog:\n{maillog}"
    assert "Traceback" not in e2e_daemon.log(), e2e_daemon.log()
