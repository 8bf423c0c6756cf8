"""Issue #9 through a real Postfix 3.7 that asks the policy service: distribution lists and a
catch-all in their own domain, with `check_policy_service` and `virtual_alias_maps =
socketmap:...:alias` (tests/e2e/postfix_instance.py's main.cf), SMTP AUTH through a real Dovecot
2.3 (XOAUTH2 for users, checked by the daemon against the Keycloak stand-in; PLAIN for apps,
through the shipped Lua passdb), once per store (SQLite, PostgreSQL: tests/e2e/conftest.py).

The daemon runs over the Go project's data brought to schema 2 by `mailcloakctl init`, with the
domain lists.test added by mailcloakctl (through the daemon's config, so on the daemon's store):

- team@lists.test -> alice, bob (send policy `members`);
- announce@lists.test -> alice, bob (`nobody`);
- board@lists.test -> alice, bob (`listed` dave);
- crew@lists.test -> gina, hank (only the IdP-outage test uses it);
- the catch-all @lists.test -> frank;
- the apps Expired (expired in 2001) and Fresh (expires in 2999), both allowed news@lists.test.

Keycloak users: alice, bob, dave, erin, frank, gina and hank, each <name>@lists.test. The d1.test
expectations of the other Postfix modules are left alone. Everything is delivered to discard(8),
so the maillog's `status=sent (virtual-delivered)` lines prove the deliveries. A list changed by
mailcloakctl while everything runs reaches Postfix; with the IdP down, list deliveries go on and
a catch-all address is deferred (never misdelivered).
"""

from __future__ import annotations

import re
import smtplib
import time

import pytest

from dovecot_instance import DovecotInstance
from postfix_instance import PostfixInstance, free_ports
from support import DaemonProcess, mailcloakctl, running, write_config
from test_dovecot import smtp_xoauth2
# One SMTP transaction and its deliveries, read from the maillog, as the native-maps module has them.
from test_postfix_native_maps import MESSAGE, SENT, deliveries, send

pytestmark = pytest.mark.e2e

DOMAIN = "lists.test"
USERS = ["alice", "bob", "dave", "erin", "frank", "gina", "hank"]
KC_CLIENT_ID = "mailcloak"
KC_CLIENT_SECRET = "kc-lists-e2e-secret"
EXPIRED_PASSWORD = "expired-app-secret"
FRESH_PASSWORD = "fresh-app-secret"
OUTSIDE = "someone@outside.test"
# The maillog warnings this module provokes on purpose.
IDP_OUTAGE_WARNINGS = (
    r"warning: socketmap:.*:alias socketmap server temporary error: identity provider unavailable$",
    r'warning: socketmap:.*:alias lookup error for "unseen@lists.test"$')
EXPIRED_AUTH_WARNING = r"warning: .*: SASL PLAIN authentication failed: .*, sasl_username=expired$"
NOT_OWNED = (553, b"5.7.1 <someone@outside.test>: Recipient address rejected: "
                  b"Sender not owned by authenticated user")


@pytest.fixture(scope="module")
def keycloak(postfix_dovecot_dir):
    from standins.keycloak import KeycloakStandIn

    server = KeycloakStandIn(realm="mail")
    server.add_client(KC_CLIENT_ID, KC_CLIENT_SECRET)
    for name in USERS:
        server.add_user(name, f"{name}@{DOMAIN}")
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def daemon(postfix_dovecot_dir, keycloak, e2e_go_site):
    daemon_dir = postfix_dovecot_dir / "daemon"
    daemon_dir.mkdir()
    daemon_dir.chmod(0o755)
    (port,) = free_ports(1)
    config = write_config(daemon_dir, http={"listen": f"127.0.0.1:{port}"}, idp={
        "provider": "keycloak",
        "keycloak": {"base_url": keycloak.url, "realm": "mail", "client_id": KC_CLIENT_ID,
                     "client_secret": KC_CLIENT_SECRET},
    }, **e2e_go_site.config_sections())
    for argv in (["init"],
                 ["domains", "add", DOMAIN],
                 ["aliases", "add", f"team@{DOMAIN}", "alice", "bob"],
                 ["aliases", "add", f"announce@{DOMAIN}", "alice", "bob"],
                 ["aliases", "senders", f"announce@{DOMAIN}", "nobody"],
                 ["aliases", "add", f"board@{DOMAIN}", "alice", "bob"],
                 ["aliases", "senders", f"board@{DOMAIN}", "listed", "dave"],
                 ["aliases", "add", f"crew@{DOMAIN}", "gina", "hank"],
                 ["aliases", "add", f"@{DOMAIN}", "frank"],
                 ["apps", "add", "Expired", EXPIRED_PASSWORD, "--expires", "2001-01-01"],
                 ["apps", "allow", "Expired", f"news@{DOMAIN}"],
                 ["apps", "add", "Fresh", FRESH_PASSWORD, "--expires", "2999-01-01"],
                 ["apps", "allow", "Fresh", f"news@{DOMAIN}"]):
        mailcloakctl(config, *argv)
    proc = DaemonProcess(config)
    proc.url = f"http://127.0.0.1:{port}"
    with running(proc):
        yield proc


@pytest.fixture(scope="module")
def dovecot(postfix_dovecot_dir, daemon):
    instance = DovecotInstance(postfix_dovecot_dir / "dovecot", daemon_url=daemon.url, imap=False)
    with running(instance):
        yield instance


@pytest.fixture(scope="module")
def postfix(postfix_dovecot_dir, daemon, dovecot):
    instance = PostfixInstance(
        postfix_dovecot_dir / "postfix-instance",
        policy_socket=daemon.policy_socket,
        socketmap_socket=daemon.socketmap_socket,
        main_cf={
            "virtual_mailbox_domains": f"d1.test d2.test {DOMAIN}",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(dovecot.auth_postfix_socket),
        },
    )
    with running(instance):
        yield instance
    instance.remove()


# --- receiving: the policy accepts, the alias map rewrites ----------------------------------------

@pytest.mark.parametrize("recipient", ["team@lists.test", "Team@Lists.Test", "announce@lists.test"])
def test_list_address_is_accepted_and_delivered_to_every_target(postfix, recipient):
    replies, queue_id = send(postfix, [recipient])
    assert replies == [(250, b"2.1.5 Ok")]
    assert deliveries(postfix, queue_id) == {"alice@lists.test": (recipient, *SENT),
                                             "bob@lists.test": (recipient, *SENT)}


def test_list_address_with_extension_keeps_it_on_every_target(postfix):
    _, queue_id = send(postfix, ["team+news@lists.test"])
    assert deliveries(postfix, queue_id) == {"alice+news@lists.test": ("team+news@lists.test", *SENT),
                                             "bob+news@lists.test": ("team+news@lists.test", *SENT)}


def test_unknown_local_part_goes_to_the_catch_all(postfix):
    replies, queue_id = send(postfix, ["whoever@lists.test"])
    assert replies == [(250, b"2.1.5 Ok")]
    assert deliveries(postfix, queue_id) == {"frank@lists.test": ("whoever@lists.test", *SENT)}


def test_real_users_of_the_catch_all_domain_are_not_rewritten(postfix):
    replies, queue_id = send(postfix, ["erin@lists.test", "frank@lists.test", "dave+x@lists.test"])
    assert [code for code, _ in replies] == [250, 250, 250]
    assert deliveries(postfix, queue_id) == {"erin@lists.test": (None, *SENT),
                                             "frank@lists.test": (None, *SENT),
                                             "dave+x@lists.test": (None, *SENT)}


def test_the_catch_all_covers_its_own_domain_only(postfix):
    replies, _ = send(postfix, ["whoever@d1.test"])
    assert replies == [(550, b"5.1.1 <whoever@d1.test>: Recipient address rejected: No such user")]


def test_one_message_to_a_list_a_catch_all_address_and_a_user(postfix):
    replies, queue_id = send(postfix, ["board@lists.test", "nosuch@lists.test", "erin@lists.test"])
    assert [code for code, _ in replies] == [250, 250, 250]
    assert deliveries(postfix, queue_id) == {"alice@lists.test": ("board@lists.test", *SENT),
                                             "bob@lists.test": ("board@lists.test", *SENT),
                                             "frank@lists.test": ("nosuch@lists.test", *SENT),
                                             "erin@lists.test": (None, *SENT)}


# --- sending as a list: its send policy, through XOAUTH2 logins (policy rows 6 and 8) ---------------

@pytest.mark.parametrize("user, sender, allowed", [
    ("alice", "team@lists.test", True),       # members: a target may
    ("bob", "Team+x@Lists.test", True),
    ("dave", "team@lists.test", False),       # members: not a target
    ("alice", "announce@lists.test", False),  # nobody: not even a target
    ("dave", "board@lists.test", True),       # listed: the listed user, not a target
    ("alice", "board@lists.test", False),     # listed: a target that is not listed
    ("alice", "whoever@lists.test", False),   # a catch-all gives no right to send
    ("frank", "whoever@lists.test", False),   # ... not even to its target
    ("frank", "frank@lists.test", True),      # the user's own address (the control)
])
def test_sending_as_a_list_follows_its_send_policy(postfix, keycloak, user, sender, allowed):
    client = smtp_xoauth2(postfix, user, keycloak.issue_user_token(user))
    try:
        assert client.mail(sender)[0] == 250
        reply = client.rcpt(OUTSIDE)
        assert reply == ((250, b"2.1.5 Ok") if allowed else NOT_OWNED)
        if allowed:
            code, text = client.data(MESSAGE)
            assert code == 250, (code, text)
            queue_id = re.search(rb"queued as (\w+)", text).group(1).decode()
    finally:
        client.quit()
    if allowed:
        assert deliveries(postfix, queue_id) == {OUTSIDE: (None, "sent", "outbound-delivered")}


# --- a list changed with mailcloakctl while everything runs --------------------------------------

def wait_for_alias_answer(postfix, daemon, key: str, expected: str, timeout: float = 15) -> None:
    """Until Postfix's own socketmap client reads `expected` for `key` (the daemon reloads when
    its store reports the commit)."""
    deadline = time.monotonic() + timeout
    while True:
        result = postfix.postmap_query(key, f"socketmap:unix:{daemon.socketmap_socket}:alias")
        if result.stdout.strip() == expected:
            return
        assert time.monotonic() < deadline, (key, expected, result)
        time.sleep(0.1)


def test_member_added_with_mailcloakctl_receives_and_may_send(postfix, daemon, keycloak):
    config = daemon.config_path
    mailcloakctl(config, "aliases", "add-member", "team@lists.test", "dave")
    try:
        wait_for_alias_answer(postfix, daemon, "team@lists.test",
                              "alice@lists.test,bob@lists.test,dave@lists.test")
        _, queue_id = send(postfix, ["team@lists.test"])
        assert sorted(deliveries(postfix, queue_id)) == ["alice@lists.test", "bob@lists.test",
                                                         "dave@lists.test"]
        client = smtp_xoauth2(postfix, "dave", keycloak.issue_user_token("dave"))
        try:
            assert client.mail("team@lists.test")[0] == 250
            assert client.rcpt(OUTSIDE) == (250, b"2.1.5 Ok")
        finally:
            client.quit()
    finally:
        mailcloakctl(config, "aliases", "del-member", "team@lists.test", "dave")
    wait_for_alias_answer(postfix, daemon, "team@lists.test", "alice@lists.test,bob@lists.test")


# --- the IdP down: answers from the database stand, the rest is deferred ---------------------------

def test_idp_outage_defers_the_catch_all_but_delivers_a_list(postfix, keycloak):
    """crew@lists.test -> gina, hank: addresses nothing else in the module looks up, so no cached
    IdP answer stands in for the IdP. The list comes from the database and its targets are never
    caught (the loop guard needs no IdP); whether unseen@ is a user needs the IdP, so Postfix
    defers it rather than giving it to the catch-all."""
    keycloak.set_fault("500", {"users"})
    try:
        replies, queue_id = send(postfix, ["crew@lists.test", "unseen@lists.test"])
        delivered = deliveries(postfix, queue_id)
    finally:
        keycloak.clear_fault()
    assert replies == [(250, b"2.1.5 Ok"),
                       (451, b"4.3.0 <unseen@lists.test>: Temporary lookup failure")]
    assert delivered == {"gina@lists.test": ("crew@lists.test", *SENT),
                         "hank@lists.test": ("crew@lists.test", *SENT)}
    postfix.wait_for_log(IDP_OUTAGE_WARNINGS[0])


# --- an app that has expired: Dovecot refuses the login itself -------------------------------------

def login_plain(postfix, user: str, password: str) -> smtplib.SMTP:
    client = postfix.smtp()
    client.user, client.password = user, password
    try:
        client.auth("PLAIN", client.auth_plain)
    except BaseException:
        client.close()
        raise
    return client




def test_expired_app_is_refused_at_auth(postfix, dovecot, daemon):
    dovecot.flush_auth_cache()
    with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
        login_plain(postfix, "Expired", EXPIRED_PASSWORD).quit()
    assert failure.value.smtp_code == 535
    assert failure.value.smtp_error.startswith(b"5.7.8"), failure.value.smtp_error
    assert "app auth refused (app expired at 2001-01-01T00:00:00Z) login='expired' service=smtp" \
        in daemon.log()
    postfix.wait_for_log(EXPIRED_AUTH_WARNING)


def test_app_not_expired_sends_as_its_address(postfix, dovecot):
    """The control of the test above: the same settings, a future expiry."""
    dovecot.flush_auth_cache()
    client = login_plain(postfix, "Fresh", FRESH_PASSWORD)
    try:
        assert client.mail("news@lists.test")[0] == 250
        assert client.rcpt(OUTSIDE) == (250, b"2.1.5 Ok")
    finally:
        client.quit()


# --- nothing went wrong -------------------------------------------------------------------------

def test_the_daemon_used_the_modules_store(postfix, daemon, e2e_go_site):
    assert f"database {e2e_go_site.location})" in daemon.log()


def test_no_errors_logged(daemon, postfix, dovecot):
    bad = [line for line in daemon.log().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, "\n".join(bad)
    unexpected = [line for line in postfix.maillog().splitlines()
                  if re.search(r"(warning|error|fatal|panic):", line)
                  and not any(re.search(expected, line)
                              for expected in (EXPIRED_AUTH_WARNING, *IDP_OUTAGE_WARNINGS))]
    assert not unexpected, "\n".join(unexpected)
    assert not re.search(r"\b(Error|Fatal|Panic):", dovecot.log()), dovecot.log()
