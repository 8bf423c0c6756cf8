"""POST /dovecot/passdb and POST /oauth2/introspect on the daemon as a real process (SPEC §8).

The daemon listens on 127.0.0.1:<free port> with a shared secret file, over the Go project's
database (app "Mailer", password support.GO_APP_PASSWORD) plus a disabled app "Paused".
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest

from support import REPO, GO_APP_PASSWORD, DaemonProcess, PolicyClient, go_hash, make_go_database, write_config

SECRET = "test-shared-secret-1"
PAUSED_PASSWORD = "paused-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_app(db, app_id: str, password: str, enabled: bool = True) -> None:
    con = sqlite3.connect(db)
    con.execute("INSERT INTO apps(app_id, secret_hash, enabled, updated_at) VALUES (?, ?, ?, 1700000000)",
                (app_id, go_hash(password), int(enabled)))
    con.commit()
    con.close()


def update_app(db, app_id: str, **columns) -> None:
    con = sqlite3.connect(db)
    sets = ", ".join(f"{k} = ?" for k in columns)
    con.execute(f"UPDATE apps SET {sets} WHERE app_id = ?", (*columns.values(), app_id))
    con.commit()
    con.close()


class HTTP:
    def __init__(self, port: int):
        self.port = port

    def post(self, path: str, body: bytes | str | dict, *, secret: str | None = SECRET,
             content_type: str = "application/x-www-form-urlencoded",
             headers: dict | None = None) -> tuple[int, str]:
        if isinstance(body, dict):
            body = urlencode(body)
        if isinstance(body, str):
            body = body.encode()
        all_headers = {"Content-Type": content_type, **(headers or {})}
        if secret is not None:
            all_headers["Authorization"] = f"Bearer {secret}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def passdb(self, user: str, password: str, service: str = "smtp", remote_ip: str = "127.0.0.1",
               **kwargs) -> tuple[int, dict[str, str]]:
        status, text = self.post("/dovecot/passdb", {"user": user, "password": password,
                                                     "service": service, "remote_ip": remote_ip},
                                 **kwargs)
        return status, parse_answer(text)

    def introspect(self, body, **kwargs) -> tuple[int, dict]:
        status, text = self.post("/oauth2/introspect", body, secret=None, **kwargs)
        return status, json.loads(text)


def parse_answer(text: str) -> dict[str, str]:
    """What dovecot/mailcloak.lua reads: key=value lines."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    db = make_go_database(tmp / "state.db")
    add_app(db, "Paused", PAUSED_PASSWORD, enabled=False)
    (tmp / "secret").write_text(SECRET + "\n")
    port = free_port()
    daemon = DaemonProcess(write_config(tmp, http={"listen": f"127.0.0.1:{port}",
                                                   "shared_secret_file": str(tmp / "secret")}))
    daemon.start()
    yield daemon, HTTP(port), db, tmp
    daemon.stop()


@pytest.fixture
def client(served):
    return served[1]


# --- decisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("user,password,service,expected", [
    ("Mailer", GO_APP_PASSWORD, "smtp", "ok"),
    ("mailer", GO_APP_PASSWORD, "submission", "ok"),          # Dovecot lower-cases logins
    ("mailer", "wrong-password", "smtp", "password_mismatch"),
    ("paused", PAUSED_PASSWORD, "smtp", "user_disabled"),
    ("paused", "wrong-password", "smtp", "user_disabled"),    # refused whatever the password
    ("nobody", "whatever", "smtp", "user_unknown"),
    ("alice", "whatever", "smtp", "user_unknown"),            # an IdP user is not an app
    ("mailer", GO_APP_PASSWORD, "imap", "user_disabled"),
    ("mailer", GO_APP_PASSWORD, "pop3", "user_disabled"),
    ("mailer", GO_APP_PASSWORD, "sieve", "user_disabled"),
    ("mailer", GO_APP_PASSWORD, "doveadm", "user_disabled"),
])
def test_passdb_decisions(client, user, password, service, expected):
    status, answer = client.passdb(user, password, service,
                                   remote_ip=f"192.0.2.{abs(hash((user, password))) % 250}")
    assert status == 200
    assert answer["result"] == expected, answer
    if expected == "ok":
        assert "reason" not in answer
    else:
        assert answer["reason"]


def test_imap_refusal_says_why(client):
    status, answer = client.passdb("mailer", GO_APP_PASSWORD, "imap")
    assert (status, answer["result"]) == (200, "user_disabled")
    assert "sending" in answer["reason"]


def test_passwords_with_any_characters_survive_the_form_encoding(served):
    daemon, client, db, tmp = served
    tricky = "p@ss word+&=%;\n\u00e9\u4e2d"
    add_app(db, "Tricky", tricky)
    deadline = time.monotonic() + 10
    while True:
        status, answer = client.passdb("tricky", tricky, "smtp")
        if answer.get("result") == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer["result"] == "ok"
    assert client.passdb("tricky", tricky[:-1], "smtp", remote_ip="192.0.2.77")[1]["result"] \
        == "password_mismatch"


# --- the shared secret -------------------------------------------------------------------------

@pytest.mark.parametrize("secret,headers", [
    (None, None),                                     # no Authorization header
    ("wrong-secret", None),
    (SECRET + "x", None),
    ("", None),
    (None, {"Authorization": f"Basic {SECRET}"}),     # another scheme
    (None, {"Authorization": SECRET}),                # the secret without a scheme
])
def test_missing_or_wrong_bearer_is_401(served, secret, headers):
    daemon, client, db, tmp = served
    status, answer = client.passdb("mailer", GO_APP_PASSWORD, secret=secret, headers=headers)
    assert status == 401
    assert answer["result"] == "internal_failure"
    assert "wrong-secret" not in daemon.log() and SECRET not in daemon.log()


def test_bearer_scheme_is_case_insensitive(client):
    status, answer = client.passdb("mailer", GO_APP_PASSWORD, secret=None,
                                   headers={"Authorization": f"bearer {SECRET}"})
    assert (status, answer["result"]) == (200, "ok")


# --- malformed and oversized requests ----------------------------------------------------------

@pytest.mark.parametrize("body,content_type,fragment", [
    ({"user": "mailer", "password": "x"}, None, "required"),                     # no service
    ({"password": "x", "service": "smtp"}, None, "required"),                    # no user
    ({"user": "", "password": "x", "service": "smtp"}, None, "required"),
    ({"user": "mailer", "service": "smtp"}, None, "required"),                   # no password
    ("user=mailer&user=other&password=x&service=smtp", None, "more than once"),
    (b"user=mailer&password=%FF%FE&service=smtp", None, "malformed"),            # not UTF-8
    (b"user=\xff&password=x&service=smtp", None, "malformed"),
    ('{"user": "mailer", "password": "x", "service": "smtp"}', "application/json", "Content-Type"),
    ("user=mailer&password=x&service=smtp", "text/plain", "Content-Type"),
])
def test_malformed_passdb_requests_are_400(client, body, content_type, fragment):
    kwargs = {"content_type": content_type} if content_type else {}
    status, text = client.post("/dovecot/passdb", body, **kwargs)
    assert status == 400, text
    answer = parse_answer(text)
    assert answer["result"] == "internal_failure"
    assert fragment in answer["reason"]


def test_oversized_body_is_413(client):
    status, text = client.post("/dovecot/passdb", {"user": "mailer", "password": "x" * 70_000,
                                                   "service": "smtp"})
    assert status == 413
    assert parse_answer(text)["result"] == "internal_failure"


def test_oversized_body_is_refused_before_it_is_sent_with_expect_100_continue(client):
    """Dovecot 2.3 always sends `Expect: 100-continue`: the refusal comes instead of `100`."""
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as s:
        s.sendall(b"POST /dovecot/passdb HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
                  b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head


def test_wrong_bearer_is_refused_before_the_body_with_expect_100_continue(client):
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as s:
        s.sendall(b"POST /dovecot/passdb HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Authorization: Bearer nope\r\n"
                  b"Content-Length: 40\r\nExpect: 100-continue\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 401"), head


def test_expect_100_continue_then_body_is_answered(client):
    body = urlencode({"user": "mailer", "password": GO_APP_PASSWORD, "service": "smtp"}).encode()
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as s:
        s.sendall(b"POST /dovecot/passdb HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        reply = b""
        while b"result=" not in reply:
            reply += s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200") and b"result=ok" in reply


def test_get_is_not_allowed(client):
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    conn.request("GET", "/dovecot/passdb")
    assert conn.getresponse().status == 405
    conn.close()


# --- the introspection endpoint ----------------------------------------------------------------

@pytest.mark.parametrize("body,content_type", [
    ({"token": "some-token", "client_id": "", "client_secret": ""}, None),   # as Dovecot 2.3 sends it
    ({"token": GO_APP_PASSWORD}, None),                # an app password is never a token
    ({"token": "Mailer:" + GO_APP_PASSWORD}, None),
    ({"token": ""}, None),
    ({}, None),
    (b"token=%FF", None),
    ("not a form", "text/plain"),
    ('{"token": "x"}', "application/json"),
    ("token=a&token=b", None),
])
def test_introspect_answers_inactive_for_anything_it_does_not_accept(client, body, content_type):
    kwargs = {"content_type": content_type} if content_type else {}
    status, answer = client.introspect(body, **kwargs)
    assert status == 200
    assert answer == {"active": False}


def test_introspect_oversized_body_is_inactive(client):
    status, answer = client.introspect({"token": "x" * 70_000})
    assert (status, answer) == (200, {"active": False})


# --- the verification cache as seen from outside -----------------------------------------------

def test_changed_app_row_is_not_answered_from_the_cache(served):
    daemon, client, db, tmp = served
    add_app(db, "Rotating", "first-secret")
    deadline = time.monotonic() + 10
    while client.passdb("rotating", "first-secret")[1]["result"] != "ok":
        assert time.monotonic() < deadline, "new app never became visible"
        time.sleep(0.2)
    assert client.passdb("rotating", "first-secret")[1]["result"] == "ok"      # now cached
    update_app(db, "Rotating", secret_hash=go_hash("second-secret"))
    deadline = time.monotonic() + 10
    while client.passdb("rotating", "first-secret", remote_ip="192.0.2.201")[1]["result"] == "ok":
        assert time.monotonic() < deadline, "old secret still accepted"
        time.sleep(0.2)
    assert client.passdb("rotating", "second-secret")[1]["result"] == "ok"
    update_app(db, "Rotating", enabled=0)
    deadline = time.monotonic() + 10
    while client.passdb("rotating", "second-secret")[1]["result"] == "ok":
        assert time.monotonic() < deadline, "disabled app still accepted"
        time.sleep(0.2)
    assert client.passdb("rotating", "second-secret")[1]["result"] == "user_disabled"


# --- the event loop stays free while argon2 runs ----------------------------------------------

def test_policy_answers_while_eight_verifications_run(served):
    """Measured, not asserted: policy round trips during 8 concurrent uncached verifications."""
    daemon, client, db, tmp = served
    policy = PolicyClient(daemon.policy_socket)

    def policy_round_trip() -> float:
        start = time.perf_counter()
        answer = policy.ask(protocol_state="RCPT", sender="x@outside.example",
                            recipient="nobody@d1.test")
        assert answer.startswith("550 5.1.1")
        return time.perf_counter() - start

    idle = [policy_round_trip() for _ in range(20)]
    done = threading.Event()
    results: list[str] = []

    def verify(i: int) -> None:
        # Distinct wrong passwords from distinct IPs: no cache, no throttle; 8 argon2 runs.
        results.append(client.passdb("mailer", f"wrong-{i}-{time.time()}",
                                     remote_ip=f"198.51.100.{i + 1}")[1]["result"])

    busy: list[float] = []
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        futures = [pool.submit(verify, i) for i in range(8)]
        pool.submit(lambda: ([f.result() for f in futures], done.set()))
        while not done.is_set():
            busy.append(policy_round_trip())
        verify_wall = time.perf_counter() - start
    policy.close()
    assert results == ["password_mismatch"] * 8
    assert busy, "no policy request was made while the verifications ran"
    print(f"\n[measured] 8 argon2 verifications took {verify_wall * 1000:.0f} ms wall; "
          f"policy round trip idle median {statistics.median(idle) * 1000:.2f} ms, "
          f"during verifications median {statistics.median(busy) * 1000:.2f} ms, "
          f"max {max(busy) * 1000:.2f} ms over {len(busy)} requests")


# --- the shared secret is re-read on SIGHUP ----------------------------------------------------

def test_sighup_rereads_the_shared_secret(tmp_path, go_db):
    (tmp_path / "secret").write_text("old-secret\n")
    port = free_port()
    daemon = DaemonProcess(write_config(tmp_path, http={"listen": f"127.0.0.1:{port}",
                                                        "shared_secret_file": str(tmp_path / "secret")}))
    daemon.start()
    try:
        client = HTTP(port)
        assert client.passdb("mailer", GO_APP_PASSWORD, secret="old-secret")[0] == 200
        (tmp_path / "secret").write_text("new-secret\n")
        assert client.passdb("mailer", GO_APP_PASSWORD, secret="old-secret")[0] == 200
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while client.passdb("mailer", GO_APP_PASSWORD, secret="new-secret")[0] != 200:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        assert client.passdb("mailer", GO_APP_PASSWORD, secret="old-secret")[0] == 401
        assert "new-secret" not in daemon.log() and "old-secret" not in daemon.log()
    finally:
        daemon.stop()


def test_without_a_shared_secret_no_authorization_is_needed(tmp_path, go_db):
    port = free_port()
    daemon = DaemonProcess(write_config(tmp_path, http={"listen": f"127.0.0.1:{port}"})).start()
    try:
        status, answer = HTTP(port).passdb("mailer", GO_APP_PASSWORD, secret=None)
        assert (status, answer["result"]) == (200, "ok")
    finally:
        daemon.stop()


# --- refused at start, with one clear line -----------------------------------------------------

def run_daemon_expecting_failure(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.mark.parametrize("listen", ["0.0.0.0:8425", "192.0.2.10:8425", "[::]:8425", "example.org:8425"])
def test_non_loopback_listen_is_refused_at_start(tmp_path, go_db, listen):
    result = run_daemon_expecting_failure(write_config(tmp_path, http={"listen": listen}))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailcloak: ") and "http.listen" in lines[0]
    assert "loopback" in lines[0]


@pytest.mark.parametrize("content,fragment", [(None, "not found"), ("", "empty"),
                                              ("two words", "one token")])
def test_bad_shared_secret_file_is_refused_at_start(tmp_path, go_db, content, fragment):
    secret = tmp_path / "secret"
    if content is not None:
        secret.write_text(content)
    config = write_config(tmp_path, http={"listen": f"127.0.0.1:{free_port()}",
                                          "shared_secret_file": str(secret)})
    result = run_daemon_expecting_failure(config)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("mailcloak: ")]
    assert len(lines) == 1, result.stderr
    assert "http.shared_secret_file" in lines[0] and fragment in lines[0]


# --- introspection against the Keycloak provider (stand-in) ------------------------------------

def test_introspect_with_keycloak_active_inactive_and_outage(tmp_path, go_db):
    from standins.keycloak import KeycloakStandIn

    keycloak = KeycloakStandIn(realm="mail")
    keycloak.add_client("mailcloak", "kc-secret")
    keycloak.add_user("alice", "Alice@D1.test")
    keycloak.add_user("carol", "carol@d1.test", enabled=False)
    keycloak.start()
    port = free_port()
    daemon = DaemonProcess(write_config(tmp_path, http={"listen": f"127.0.0.1:{port}"}, idp={
        "provider": "keycloak",
        "keycloak": {"base_url": keycloak.url, "realm": "mail", "client_id": "mailcloak",
                     "client_secret": "kc-secret", "request_timeout_seconds": 1},
    }))
    try:
        daemon.start()
        client = HTTP(port)
        token = keycloak.issue_user_token("alice")
        assert client.introspect({"token": token, "client_id": "", "client_secret": ""}) == \
            (200, {"active": True, "username": "alice", "email": "alice@d1.test"})
        assert client.introspect({"token": keycloak.issue_user_token("carol")}) == (200, {"active": False})
        assert client.introspect({"token": "eyJunknown"}) == (200, {"active": False})
        assert client.introspect({"token": GO_APP_PASSWORD}) == (200, {"active": False})
        keycloak.set_fault("500", {"introspect"})
        # SPEC §8: always 200; an IdP that cannot answer accepts no token.
        assert client.introspect({"token": keycloak.issue_user_token("alice")}) == (200, {"active": False})
        assert "identity provider cannot answer" in daemon.log()
        assert keycloak.counts["introspect"] >= 5
        assert token not in daemon.log()
    finally:
        daemon.stop()
        keycloak.close()


# --- passdb settings from the config -----------------------------------------------------------

@pytest.mark.parametrize("passdb, cached", [({}, True), ({"verify_cache_seconds": 0}, False)])
def test_verification_cache_follows_the_config(tmp_path, go_db, passdb, cached):
    """With the cache off, every login verifies argon2 again (the daemon logs each cached one)."""
    port = free_port()
    daemon = DaemonProcess(write_config(tmp_path, http={"listen": f"127.0.0.1:{port}"}, passdb=passdb))
    daemon.start()
    try:
        client = HTTP(port)
        for _ in range(3):
            assert client.passdb("mailer", GO_APP_PASSWORD, secret=None)[1]["result"] == "ok"
    finally:
        daemon.stop()
    log = daemon.log()
    assert log.count("app auth ok app=Mailer") == 3
    assert log.count("(cached)") == (2 if cached else 0)


def last_use(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT app_id FROM app_usage").fetchall()
    finally:
        con.close()


def test_throttle_and_last_use_flush_follow_the_config(tmp_path, go_db):
    from mailcloak import ctl
    assert ctl.main(["--db", str(go_db), "init"]) == 0          # app_usage needs schema 2
    port = free_port()
    daemon = DaemonProcess(write_config(
        tmp_path, http={"listen": f"127.0.0.1:{port}"},
        passdb={"throttle_free_failures": 0, "throttle_base_delay_seconds": 0.5,
                "throttle_max_delay_seconds": 0.5, "last_use_flush_seconds": 1}))
    daemon.start()
    try:
        client = HTTP(port)
        assert client.passdb("mailer", "wrong", secret=None)[1]["result"] == "password_mismatch"
        assert client.passdb("mailer", GO_APP_PASSWORD, secret=None)[1]["result"] == "ok"
        deadline = time.monotonic() + 10          # the default (30 s) would not write in time
        while not last_use(go_db):
            assert time.monotonic() < deadline, "last use not written while the daemon runs"
            time.sleep(0.1)
    finally:
        daemon.stop()
    # The default lets 3 failures through without a wait; here the first one already counts.
    assert "1 failures in a row, next attempt waits 0.5s" in daemon.log()
