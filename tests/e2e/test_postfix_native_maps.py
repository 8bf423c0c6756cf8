"""Issue #9 through a real Postfix 3.7 that has no policy service: distribution lists and a
catch-all on the `alias` map, and the native maps `domain` (virtual_mailbox_domains), `mailbox`
(virtual_mailbox_maps) and `sender_login` (smtpd_sender_login_maps with
reject_sender_login_mismatch), with SASL through a real Dovecot 2.3.

The module runs once per store (SQLite, PostgreSQL: tests/e2e/conftest.py). The daemon runs over
the Go project's data brought to schema 2 by `mailcloakctl init`, plus a list team@d1.test -> alice, bob, an alias ann@d1.test -> alice, and the catch-all @d2.test ->
carol. Static users: alice@d1.test, bob@d1.test, carol@d2.test, erin@d2.test, dave@d1.test
(disabled). Dovecot authenticates the app "Mailer" through the shipped Lua passdb and the users
alice and bob through a passwd-file (standing in for the IdP's XOAUTH2, which Postfix's
sender_login check does not care about: it compares the SASL login name only). Everything is
delivered to discard(8), so `status=sent (virtual-delivered)` lines prove the deliveries.
"""

from __future__ import annotations

import re
import smtplib

import pytest

from dovecot_instance import DovecotInstance
from postfix_instance import PostfixInstance, free_ports
from support import GO_APP_PASSWORD, DaemonProcess, mailcloakctl, running, write_config

pytestmark = pytest.mark.e2e

USERS = [
    {"username": "alice", "email": "alice@d1.test"},
    {"username": "bob", "email": "bob@d1.test"},
    {"username": "carol", "email": "carol@d2.test"},
    {"username": "erin", "email": "erin@d2.test"},
    {"username": "dave", "email": "dave@d1.test", "enabled": False},
]
PASSWORDS = {"alice": "alice-e2e-pass", "bob": "bob-e2e-pass"}
MESSAGE = b"From: e2e <someone@outside.test>\r\nSubject: e2e\r\n\r\nbody\r\n"
DELIVERY = re.compile(r"to=<(?P<to>[^>]*)>, (?:orig_to=<(?P<orig_to>[^>]*)>, )?.*status=(?P<status>\w+) "
                      r"\((?P<text>.*)\)$")


@pytest.fixture(scope="module")
def daemon(postfix_dovecot_dir, e2e_go_site):
    daemon_dir = postfix_dovecot_dir / "daemon"
    daemon_dir.mkdir()
    daemon_dir.chmod(0o755)
    (port,) = free_ports(1)
    config = write_config(daemon_dir, idp={"provider": "static", "static": {"users": USERS}},
                          http={"listen": f"127.0.0.1:{port}"}, **e2e_go_site.config_sections())
    for argv in (["init"],
                 ["aliases", "add", "team@d1.test", "alice", "bob"],
                 ["aliases", "add", "ann@d1.test", "alice"],
                 ["aliases", "add", "@d2.test", "carol"]):
        mailcloakctl(config, *argv)
    proc = DaemonProcess(config)
    proc.url = f"http://127.0.0.1:{port}"
    with running(proc):
        yield proc


@pytest.fixture(scope="module")
def dovecot(postfix_dovecot_dir, daemon):
    users = postfix_dovecot_dir / "dovecot-users"
    users.write_text("".join(f"{name}:{{PLAIN}}{secret}\n" for name, secret in PASSWORDS.items()))
    users.chmod(0o644)
    instance = DovecotInstance(postfix_dovecot_dir / "dovecot", daemon_url=daemon.url, imap=False, extra_conf=f"""
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
  mechanisms = plain login
}}
""")
    with running(instance):
        yield instance


@pytest.fixture(scope="module")
def postfix(postfix_dovecot_dir, daemon, dovecot):
    socketmap = f"socketmap:unix:{daemon.socketmap_socket}"
    instance = PostfixInstance(
        postfix_dovecot_dir / "postfix-instance",
        policy_socket=daemon.policy_socket,
        socketmap_socket=daemon.socketmap_socket,
        main_cf={
            # the lines README "Native Postfix maps" gives, and no check_policy_service
            "virtual_mailbox_domains": f"{socketmap}:domain",
            "virtual_mailbox_maps": f"{socketmap}:mailbox",
            "virtual_alias_maps": f"{socketmap}:alias",
            "smtpd_sender_login_maps": f"{socketmap}:sender_login",
            "smtpd_sender_restrictions": "reject_sender_login_mismatch",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(dovecot.auth_postfix_socket),
        },
    )
    with running(instance):
        yield instance
    instance.remove()


def send(postfix, recipients: list[str], sender: str = "someone@outside.test",
         login: tuple[str, str] | None = None) -> tuple[list[tuple[int, bytes]], str | None]:
    """One transaction: the RCPT replies, and the queue id when something was accepted."""
    client = postfix.smtp()
    try:
        if login:
            client.user, client.password = login
            client.auth("PLAIN", client.auth_plain)
        assert client.mail(sender)[0] == 250
        replies = [client.rcpt(r) for r in recipients]
        if not any(code == 250 for code, _ in replies):
            client.rset()
            return replies, None
        code, text = client.data(MESSAGE)
        assert code == 250, (code, text)
        return replies, re.search(rb"queued as (\w+)", text).group(1).decode()
    finally:
        client.quit()


def deliveries(postfix, queue_id: str) -> dict[str, tuple[str | None, str, str]]:
    """to -> (orig_to, status, text) of a message, once it left the queue."""
    result = {}
    for line in postfix.wait_for_delivery(queue_id):
        match = DELIVERY.search(line)
        assert match, line
        result[match["to"]] = (match["orig_to"], match["status"], match["text"])
    return result


SENT = ("sent", "virtual-delivered")


# --- the maps, as Postfix's own client reads them ----------------------------------------------

@pytest.mark.parametrize("map_name, key, value", [
    ("domain", "d1.test", "d1.test"),
    ("domain", "D2.Test", "d2.test"),
    ("domain", "d3.test", None),            # disabled
    ("mailbox", "alice@d1.test", "d1.test/alice/"),
    ("mailbox", "alice+news@d1.test", "d1.test/alice/"),
    ("mailbox", "team@d1.test", None),
    ("mailbox", "dave@d1.test", None),      # disabled user
    ("alias", "team@d1.test", "alice@d1.test,bob@d1.test"),
    ("alias", "whatever@d2.test", "carol@d2.test"),
    ("alias", "erin@d2.test", None),        # a real user: not caught
    ("sender_login", "alice@d1.test", "alice,alice@d1.test"),
    ("sender_login", "team@d1.test", "alice,alice@d1.test,bob,bob@d1.test"),
    ("sender_login", "noreply@d1.test", "Mailer"),
    ("sender_login", "whatever@d2.test", None),
])
def test_postmap_reads_each_map(postfix, daemon, map_name, key, value):
    result = postfix.postmap_query(key, f"socketmap:unix:{daemon.socketmap_socket}:{map_name}")
    if value is None:
        assert (result.returncode, result.stdout) == (1, ""), result
    else:
        assert (result.returncode, result.stdout.strip()) == (0, value), result


# --- recipients: Postfix itself refuses what has no mailbox, alias or list -----------------------

def test_unknown_recipient_refused_by_postfix_without_a_policy(postfix):
    replies, _ = send(postfix, ["ghost@d1.test", "dave@d1.test"])
    for code, text in replies:
        assert code == 550 and b"User unknown in virtual mailbox table" in text, (code, text)


def test_disabled_domain_is_not_local(postfix):
    (reply,), _ = send(postfix, ["alice@d3.test"])
    assert reply[0] == 554 and b"Relay access denied" in reply[1], reply


def test_list_delivers_to_every_target(postfix):
    replies, queue_id = send(postfix, ["team@d1.test"])
    assert replies == [(250, b"2.1.5 Ok")]
    assert deliveries(postfix, queue_id) == {"alice@d1.test": ("team@d1.test", *SENT),
                                             "bob@d1.test": ("team@d1.test", *SENT)}


def test_list_with_extension_delivers_to_every_target(postfix):
    _, queue_id = send(postfix, ["team+news@d1.test"])
    assert deliveries(postfix, queue_id) == {"alice+news@d1.test": ("team+news@d1.test", *SENT),
                                             "bob+news@d1.test": ("team+news@d1.test", *SENT)}


def test_catch_all_takes_unknown_local_parts_but_not_real_users(postfix):
    replies, queue_id = send(postfix, ["whoever@d2.test", "erin@d2.test"])
    assert [code for code, _ in replies] == [250, 250]
    assert deliveries(postfix, queue_id) == {"carol@d2.test": ("whoever@d2.test", *SENT),
                                             "erin@d2.test": (None, *SENT)}


def test_catch_all_is_per_domain(postfix):
    (reply,), _ = send(postfix, ["whoever@d1.test"])
    assert reply[0] == 550, reply


# --- senders: smtpd_sender_login_maps with reject_sender_login_mismatch ---------------------------

@pytest.mark.parametrize("login, sender", [
    (("alice", PASSWORDS["alice"]), "alice@d1.test"),
    (("alice", PASSWORDS["alice"]), "alice+tag@d1.test"),
    (("alice", PASSWORDS["alice"]), "ann@d1.test"),        # her alias
    (("bob", PASSWORDS["bob"]), "team@d1.test"),           # a list he is in
    (("Mailer", GO_APP_PASSWORD), "noreply@d1.test"),      # an app's allowed address
])
def test_login_may_send_as_what_it_owns(postfix, dovecot, login, sender):
    dovecot.flush_auth_cache()
    (reply,), queue_id = send(postfix, ["someone@outside.test"], sender=sender, login=login)
    assert reply[0] == 250, reply
    assert queue_id


@pytest.mark.parametrize("login, sender", [
    (("alice", PASSWORDS["alice"]), "bob@d1.test"),        # another user's address
    (("bob", PASSWORDS["bob"]), "ann@d1.test"),            # another user's alias
    (("alice", PASSWORDS["alice"]), "whoever@d2.test"),    # covered by a catch-all only
    (("Mailer", GO_APP_PASSWORD), "alice@d1.test"),
])
def test_login_may_not_send_as_another(postfix, dovecot, login, sender):
    dovecot.flush_auth_cache()
    (reply,), _ = send(postfix, ["someone@outside.test"], sender=sender, login=login)
    code, text = reply
    assert code == 553, reply
    # Dovecot lower-cases login names (the map says "Mailer": Postfix compares ignoring case)
    assert f"<{sender}>: Sender address rejected: not owned by user {login[0].lower()}".encode() in text, reply


def test_unauthenticated_client_may_not_use_an_owned_address(postfix):
    (reply,), _ = send(postfix, ["alice@d1.test"], sender="bob@d1.test")
    assert reply[0] == 553 and b"Sender address rejected: not logged in" in reply[1], reply


def test_the_daemon_used_the_modules_store(postfix, daemon, e2e_go_site):
    assert f"database {e2e_go_site.location})" in daemon.log()


def test_no_errors_logged(daemon, postfix):
    assert " ERROR " not in daemon.log() and "Traceback" not in daemon.log()
    assert not re.search(r"(warning|error|fatal|panic):", postfix.maillog()), postfix.maillog()
