"""SPEC §8 with a real Dovecot 2.3 (the shipped Lua script and 2.3 snippet), and the whole chain
with a real Postfix 3.7 using Dovecot SASL (SPEC §6 rows 7 and 8).

The daemon runs as a process over the Go project's data, once in SQLite and once in PostgreSQL (app "Mailer", password
GO_APP_PASSWORD, allowed to send as noreply@d1.test, billing@d1.test disabled) plus a disabled
app "Paused", with http.listen on 127.0.0.1:<free port> and a shared secret that the Lua script
reads from its settings file. Each failed Dovecot auth costs ~0.5 s (Dovecot 2.3 flushes failures
on a fixed timer), so failures are tested once each.
"""

from __future__ import annotations

import imaplib
import re
import shutil
import smtplib
import subprocess
import time

import pytest

from dovecot_instance import DovecotInstance, dovecot_unavailable_reason
from postfix_instance import PostfixInstance, free_ports, postfix_unavailable_reason, world_readable_tmpdir
from support import GO_APP_PASSWORD, DaemonProcess, go_hash, make_go_database, running, write_config

pytestmark = pytest.mark.e2e

SECRET = "e2e-dovecot-shared-secret"
PAUSED_PASSWORD = "paused-app-secret"
MESSAGE = b"From: app <noreply@d1.test>\r\nSubject: e2e\r\n\r\nbody\r\n"


def add_app(site, app_id: str, password: str, enabled: bool = True, senders=()) -> None:
    """An app written as the Go project's mailcloakctl writes it, into either store."""
    site.execute("INSERT INTO apps(app_id, secret_hash, enabled, updated_at) VALUES (?, ?, ?, 1700000000)",
                 (app_id, go_hash(password), int(enabled)))
    for sender in senders:
        site.execute("INSERT INTO app_from(app_id, from_addr, enabled) VALUES (?, ?, 1)", (app_id, sender))


def set_app_enabled(site, app_id: str, enabled: bool) -> None:
    site.execute("UPDATE apps SET enabled = ? WHERE app_id = ?", (int(enabled), app_id))


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def require_dovecot():
    reason = dovecot_unavailable_reason()
    if reason:
        pytest.skip("E2E SKIPPED, " + reason)


@pytest.fixture(scope="module")
def work_dir(require_dovecot):
    path = world_readable_tmpdir("mailcloak-dovecot-e2e-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def store_dir(work_dir, e2e_store_kind):
    """The folder of one store's daemon, Dovecot and Postfix (the module runs once per store)."""
    path = work_dir / e2e_store_kind
    path.mkdir()
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def http_daemon(store_dir, e2e_go_site):
    """The daemon with its HTTP listener, policy and socketmap sockets in a 0755 directory, over
    the Go project's data in either store."""
    daemon_dir = store_dir / "daemon"
    daemon_dir.mkdir()
    daemon_dir.chmod(0o755)
    add_app(e2e_go_site, "Paused", PAUSED_PASSWORD, enabled=False, senders=["paused@d1.test"])
    secret = daemon_dir / "dovecot-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    (port,) = free_ports(1)
    proc = DaemonProcess(write_config(daemon_dir, http={"listen": f"127.0.0.1:{port}",
                                                        "shared_secret_file": str(secret)},
                                      **e2e_go_site.config_sections()))
    proc.url = f"http://127.0.0.1:{port}"
    proc.site = e2e_go_site
    proc.secret_file = str(secret)
    with running(proc):
        yield proc


@pytest.fixture(scope="module")
def dovecot(store_dir, http_daemon):
    instance = DovecotInstance(store_dir / "dovecot", daemon_url=http_daemon.url,
                               secret_file=http_daemon.secret_file)
    with running(instance):
        yield instance


@pytest.fixture
def flushed(dovecot):
    """Dovecot's auth cache emptied before the test (the tests share one instance)."""
    dovecot.flush_auth_cache()
    return dovecot


def auth_ok(result) -> bool:
    return result.returncode == 0 and "auth succeeded" in result.stdout


def assert_refused(result, code: str | None = None) -> None:
    """doveadm exit 77 = the passdb said no; a temporary failure would say code=temp_fail."""
    assert result.returncode == 77, (result.returncode, result.stdout, result.stderr)
    assert "auth failed" in result.stdout
    assert "temp_fail" not in result.stdout, result.stdout
    if code:
        assert f"code={code}" in result.stdout, result.stdout


def wait_for_daemon_log(daemon, pattern: str, timeout: float = 10) -> None:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while not regex.search(daemon.log()):
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon log lacks {pattern!r}:\n{daemon.log()[-3000:]}")
        time.sleep(0.05)


# --- doveadm auth test -------------------------------------------------------------------------

def test_good_app_password_for_smtp_succeeds(flushed, http_daemon):
    result = flushed.auth_test("Mailer", GO_APP_PASSWORD, service="smtp", rip="192.0.2.10")
    assert auth_ok(result), (result.stdout, result.stderr, flushed.log()[-3000:])
    wait_for_daemon_log(http_daemon, r"app auth ok app=Mailer service=smtp rip=192\.0\.2\.10")


def test_good_app_password_for_submission_succeeds(flushed):
    assert auth_ok(flushed.auth_test("mailer", GO_APP_PASSWORD, service="submission"))


def test_wrong_password_fails(flushed, http_daemon):
    assert_refused(flushed.auth_test("mailer", "not-the-password", service="smtp", rip="192.0.2.11"))
    wait_for_daemon_log(http_daemon, r"app auth failed \(password mismatch\) login='mailer' "
                                     r"service=smtp rip=192\.0\.2\.11")


def test_disabled_app_fails(flushed, http_daemon):
    assert_refused(flushed.auth_test("paused", PAUSED_PASSWORD, service="smtp", rip="192.0.2.12"),
                   code="user_disabled")
    wait_for_daemon_log(http_daemon, r"app auth refused \(app disabled\) login='paused'")


def test_unknown_app_fails(flushed, http_daemon):
    assert_refused(flushed.auth_test("nosuchapp", GO_APP_PASSWORD, service="smtp", rip="192.0.2.13"))
    wait_for_daemon_log(http_daemon, r"app auth failed \(unknown app\) login='nosuchapp'")


@pytest.mark.parametrize("service", ["imap", "pop3", "sieve"])
def test_app_cannot_authenticate_for_reading_mail(flushed, service):
    assert_refused(flushed.auth_test("mailer", GO_APP_PASSWORD, service=service), code="user_disabled")


def test_cached_smtp_success_does_not_open_imap(flushed):
    """The auth cache key includes the service (cache_key=%u%s%r in the 2.3 snippet)."""
    assert auth_ok(flushed.auth_test("mailer", GO_APP_PASSWORD, service="smtp"))
    assert auth_ok(flushed.auth_test("mailer", GO_APP_PASSWORD, service="smtp"))   # cache hit
    assert "cache hit" in flushed.log()
    assert_refused(flushed.auth_test("mailer", GO_APP_PASSWORD, service="imap"), code="user_disabled")


def test_right_password_after_a_cached_failure_succeeds(flushed):
    assert_refused(flushed.auth_test("mailer", "typo", service="smtp", rip="192.0.2.14"))
    assert auth_ok(flushed.auth_test("mailer", GO_APP_PASSWORD, service="smtp", rip="192.0.2.14"))


def test_disabled_app_stops_working_once_dovecots_cache_entry_expires(flushed, http_daemon):
    """Disabling an app reaches the daemon within 2 s; Dovecot's cached success lives at most
    auth_cache_ttl (60 s in the snippet): the flush below stands in for that expiry."""
    add_app(http_daemon.site, "Revoked", "revoked-secret", senders=["revoked@d1.test"])
    deadline = time.monotonic() + 10
    while not auth_ok(flushed.auth_test("revoked", "revoked-secret", service="smtp")):
        assert time.monotonic() < deadline, flushed.log()[-3000:]
        time.sleep(0.3)
        flushed.flush_auth_cache()
    assert auth_ok(flushed.auth_test("revoked", "revoked-secret", service="smtp"))   # cached now
    set_app_enabled(http_daemon.site, "Revoked", False)
    deadline = time.monotonic() + 10
    while True:
        flushed.flush_auth_cache()
        result = flushed.auth_test("revoked", "revoked-secret", service="smtp")
        if not auth_ok(result) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert_refused(result, code="user_disabled")


def test_snippet_cache_settings_bound_revocation_to_a_minute(dovecot):
    def setting(name: str) -> str:
        return subprocess.run(["/usr/bin/doveconf", "-c", str(dovecot.conf_path), "-h", name],
                              capture_output=True, text=True, check=True).stdout.strip()

    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"(\d+)\s*([a-z]*)", value).groups()
        return int(number) * {"": 1, "s": 1, "secs": 1, "sec": 1, "m": 60, "min": 60, "mins": 60}[unit]

    assert setting("auth_cache_size") not in ("0", "")
    assert 0 < seconds(setting("auth_cache_ttl")) <= 60
    assert 0 < seconds(setting("auth_cache_negative_ttl")) <= 60


# --- a real IMAP login ---------------------------------------------------------------------------

def test_app_imap_login_is_refused(flushed):
    client = imaplib.IMAP4("127.0.0.1", flushed.imap_port, timeout=30)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED|Authentication failed"):
            client.login("Mailer", GO_APP_PASSWORD)
    finally:
        client.shutdown()


# --- the daemon unreachable or refusing Dovecot: temporary failures ----------------------------

@pytest.mark.parametrize("case", ["daemon down", "wrong shared secret"])
def test_unusable_daemon_is_a_temporary_failure_not_a_rejection(store_dir, http_daemon, case):
    if case == "daemon down":
        (port,) = free_ports(1)
        url, secret_file = f"http://127.0.0.1:{port}", http_daemon.secret_file
    else:
        wrong = store_dir / "wrong-secret"
        wrong.write_text("not-the-secret\n")
        url, secret_file = http_daemon.url, str(wrong)
    instance = DovecotInstance(store_dir / f"dovecot-{case.replace(' ', '-')}", daemon_url=url,
                               secret_file=secret_file, imap=False)
    try:
        instance.start()
        result = instance.auth_test("mailer", GO_APP_PASSWORD, service="smtp")
        assert result.returncode == 77
        assert "code=temp_fail" in result.stdout, result.stdout
        expected = "Connection refused" if case == "daemon down" else "HTTP status 401"
        assert expected in instance.log()
    finally:
        instance.stop()


# --- the whole chain: Postfix -> Dovecot SASL -> Lua -> daemon; policy rows 7 and 8 -------------

@pytest.fixture(scope="module")
def postfix_sasl(store_dir, http_daemon, dovecot):
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip("E2E SKIPPED, " + reason)
    instance = PostfixInstance(
        store_dir / "postfix-instance",
        policy_socket=http_daemon.policy_socket,
        socketmap_socket=http_daemon.socketmap_socket,
        main_cf={
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(dovecot.auth_postfix_socket),
        },
    )
    with running(instance):
        yield instance
    instance.remove()


def login(postfix, user: str, password: str, mechanism: str = "PLAIN") -> smtplib.SMTP:
    client = postfix.smtp()
    client.user, client.password = user, password
    auth = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
    client.auth(mechanism, auth)
    return client


def test_postfix_advertises_dovecots_mechanisms(postfix_sasl):
    client = postfix_sasl.smtp()
    try:
        assert set(client.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN", "XOAUTH2",
                                                                      "OAUTHBEARER"}
    finally:
        client.quit()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_app_sends_from_its_allowed_address(postfix_sasl, flushed, mechanism):
    client = login(postfix_sasl, "Mailer", GO_APP_PASSWORD, mechanism)
    try:
        assert client.mail("noreply@d1.test")[0] == 250
        assert client.rcpt("someone@outside.test")[0] == 250
        assert client.rcpt("alice@d1.test")[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
        queue_id = re.search(rb"queued as (\w+)", text).group(1).decode()
    finally:
        client.quit()
    postfix_sasl.wait_for_log(rf"{queue_id}: client=.*sasl_method={mechanism}, sasl_username=[Mm]ailer")
    lines = postfix_sasl.wait_for_delivery(queue_id)
    assert any("to=<someone@outside.test>" in line and "status=sent" in line for line in lines), lines
    assert any("to=<alice@d1.test>" in line and "status=sent" in line for line in lines), lines


@pytest.mark.parametrize("sender", ["other@d1.test", "billing@d1.test", "alice@d1.test",
                                    "someone@outside.test"])
def test_app_sending_from_another_address_is_553(postfix_sasl, flushed, sender):
    client = login(postfix_sasl, "mailer", GO_APP_PASSWORD)
    try:
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt("someone@outside.test")
        assert (code, text) == (553, b"5.7.1 <someone@outside.test>: Recipient address rejected: "
                                     b"Sender not owned by authenticated user")
    finally:
        client.quit()


@pytest.mark.parametrize("user,password", [("mailer", "wrong-password"), ("paused", PAUSED_PASSWORD),
                                           ("nosuchapp", "whatever")])
def test_smtp_auth_refused(postfix_sasl, flushed, user, password):
    client = postfix_sasl.smtp()
    try:
        client.user, client.password = user, password
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            client.auth("PLAIN", client.auth_plain)
        assert failure.value.smtp_code == 535
        assert failure.value.smtp_error.startswith(b"5.7.8")
    finally:
        client.quit()


def test_no_errors_logged_by_the_daemon(http_daemon, postfix_sasl):
    bad = [line for line in http_daemon.log().splitlines()
           if " ERROR " in line or "Traceback" in line]
    assert not bad, "\n".join(bad)


def test_no_errors_logged_by_dovecot(dovecot, postfix_sasl):
    bad = [line for line in dovecot.log().splitlines()
           if re.search(r"\b(Error|Fatal|Panic):", line)]
    assert not bad, "\n".join(bad)


# --- XOAUTH2/OAUTHBEARER: Dovecot's oauth2 passdb -> the daemon's introspection -> Keycloak ------
#
# A second chain (daemon with the keycloak provider against the stand-in, its own Dovecot and
# Postfix), so that the chain above does not depend on the Keycloak provider.

KC_CLIENT_ID = "mailcloak"
KC_CLIENT_SECRET = "kc-e2e-secret"


@pytest.fixture(scope="module")
def keycloak(require_dovecot):
    try:
        from standins.keycloak import KeycloakStandIn
    except ImportError as exc:   # pragma: no cover - the stand-in ships with the tests
        pytest.skip(f"E2E SKIPPED, Keycloak stand-in unavailable: {exc}")
    server = KeycloakStandIn(realm="mail")
    server.add_client(KC_CLIENT_ID, KC_CLIENT_SECRET)
    server.add_user("alice", "Alice@D1.test")
    server.add_user("bob", "bob@d2.test")
    server.add_user("carol", "carol@d1.test", enabled=False)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def oauth_chain(work_dir, keycloak):
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip("E2E SKIPPED, " + reason)
    root = work_dir / "oauth"
    root.mkdir()
    root.chmod(0o755)
    daemon_dir = root / "daemon"
    daemon_dir.mkdir()
    daemon_dir.chmod(0o755)
    make_go_database(daemon_dir / "state.db")
    (port,) = free_ports(1)
    daemon = DaemonProcess(write_config(daemon_dir, http={"listen": f"127.0.0.1:{port}"}, idp={
        "provider": "keycloak",
        "keycloak": {"base_url": keycloak.url, "realm": "mail", "client_id": KC_CLIENT_ID,
                     "client_secret": KC_CLIENT_SECRET},
    }))
    dovecot_instance = DovecotInstance(root / "dovecot", daemon_url=f"http://127.0.0.1:{port}")
    postfix_instance = None
    try:
        daemon.start()
        dovecot_instance.start()
        postfix_instance = PostfixInstance(
            root / "postfix-instance", policy_socket=daemon.policy_socket,
            socketmap_socket=daemon.socketmap_socket,
            main_cf={"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
                     "smtpd_sasl_path": str(dovecot_instance.auth_postfix_socket)})
        postfix_instance.start()
        yield daemon, dovecot_instance, postfix_instance
    finally:
        if postfix_instance is not None:
            postfix_instance.stop()
        dovecot_instance.stop()
        daemon.stop()


def xoauth2(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def smtp_xoauth2(postfix, user: str, token: str) -> smtplib.SMTP:
    client = postfix.smtp()
    first = [True]

    def respond(challenge=None):
        if first[0]:
            first[0] = False
            return xoauth2(user, token)
        return ""      # after the error challenge, an empty line ends the exchange (RFC 7628)

    try:
        client.auth("XOAUTH2", respond)
    except BaseException:
        client.close()
        raise
    return client


def test_xoauth2_user_sends_as_herself_and_her_alias(oauth_chain, keycloak):
    daemon, dovecot_instance, postfix = oauth_chain
    token = keycloak.issue_user_token("alice")
    client = smtp_xoauth2(postfix, "alice", token)
    try:
        assert client.mail("alice@d1.test")[0] == 250
        assert client.rcpt("someone@outside.test")[0] == 250           # row 6
        client.rset()
        assert client.mail("alias1@d1.test")[0] == 250
        assert client.rcpt("someone@outside.test")[0] == 250           # row 6, an alias of alice
        client.rset()
        assert client.mail("bob@d2.test")[0] == 250
        assert client.rcpt("someone@outside.test") == (                # row 8
            553, b"5.7.1 <someone@outside.test>: Recipient address rejected: "
                 b"Sender not owned by authenticated user")
    finally:
        client.quit()
    postfix.wait_for_log(r"sasl_method=XOAUTH2, sasl_username=alice")


@pytest.mark.parametrize("case", ["unknown token", "app password as token", "token of another user",
                                  "disabled user"])
def test_xoauth2_refused(oauth_chain, keycloak, case):
    daemon, dovecot_instance, postfix = oauth_chain
    user, token = {
        "unknown token": ("alice", "eyJnot-a-token"),
        "app password as token": ("mailer", GO_APP_PASSWORD),
        "token of another user": ("alice", keycloak.issue_user_token("bob")),
        "disabled user": ("carol", keycloak.issue_user_token("carol")),
    }[case]
    with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
        smtp_xoauth2(postfix, user, token).quit()
    assert failure.value.smtp_code == 535


def test_user_token_as_plain_password_is_refused(oauth_chain, keycloak):
    """PLAIN with a user's token as password reaches only the Lua passdb, which knows no such app."""
    daemon, dovecot_instance, postfix = oauth_chain
    result = dovecot_instance.auth_test("alice", keycloak.issue_user_token("alice"), service="smtp")
    assert_refused(result)


def test_xoauth2_imap_login_of_a_user(oauth_chain, keycloak):
    daemon, dovecot_instance, postfix = oauth_chain
    token = keycloak.issue_user_token("alice")
    client = imaplib.IMAP4("127.0.0.1", dovecot_instance.imap_port, timeout=30)
    try:
        typ, _ = client.authenticate("XOAUTH2", lambda _: xoauth2("alice", token).encode())
        assert typ == "OK"
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_idp_outage_refuses_xoauth2_login(oauth_chain, keycloak):
    """SPEC §8: always 200 {"active": false}; while Keycloak cannot answer, no token is accepted."""
    daemon, dovecot_instance, postfix = oauth_chain
    token = keycloak.issue_user_token("bob")        # never introspected yet: not in any cache
    keycloak.set_fault("500", {"introspect"})
    try:
        client = imaplib.IMAP4("127.0.0.1", dovecot_instance.imap_port, timeout=30)
        try:
            with pytest.raises(imaplib.IMAP4.error):
                client.authenticate("XOAUTH2", lambda _: xoauth2("bob", token).encode())
            assert "identity provider cannot answer" in daemon.log()
        finally:
            client.shutdown()
    finally:
        keycloak.clear_fault()
