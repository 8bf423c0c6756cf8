"""No secret ever reaches a log or a command's output (issue 7).

Every secret here carries a unique marker: the Keycloak client secret (`kc-SECRET-…`), app
passwords created with mailcloakctl (`appPW-MARK-…`, as an argument and on stdin), the HTTP shared
secret (`http-SECRET-…`), wrong passwords, wrong bearer secrets and bogus tokens sent on purpose,
plus every access token the Keycloak stand-in issued (service-account tokens and a user's token).
The daemon runs at log level debug and is made to look users up, fetch tokens, retry after a 401,
introspect tokens, check app passwords on the Dovecot passdb endpoint, reload on SIGHUP, and fail
(HTTP 500, malformed answers, refused client credentials). mailcloakctl and --check-config run
too. Then all captured output is scanned for every marker.

Also: the daemon warns, in one line, when the config file holding secrets is readable by others.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from urllib.parse import urlencode

import pytest

from standins.keycloak import KeycloakStandIn
from support import REPO, DaemonProcess, PolicyClient, make_go_database, write_config
from wire_checks import log_problems, wait_for

MARK = uuid.uuid4().hex[:10]
KC_SECRET = f"kc-SECRET-{MARK}"
KC_WRONG_SECRET = f"kc-WRONG-SECRET-{MARK}"
APP_PW = f"appPW-MARK-arg-{MARK}"
APP_PW_STDIN = f"appPW-MARK-stdin-{MARK}"
WRONG_PW = f"wrongPW-MARK-{MARK}"
HTTP_SECRET = f"http-SECRET-{MARK}"
WRONG_BEARER = f"wrong-BEARER-{MARK}"
BOGUS_TOKEN = f"bogus-TOKEN-{MARK}"
CLIENT_ID = "mailcloak"
WARNING_TEXT = "holds secrets and is readable by every user"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "mailcloakctl"), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(path), "--check-config"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


class HTTP:
    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, form: dict | None = None, bearer: str | None = None):
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=urlencode(form).encode() if form is not None else None,
                         headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def passdb(self, user: str, password: str, bearer: str = HTTP_SECRET) -> tuple[int, str]:
        return self.request("POST", "/dovecot/passdb", {"user": user, "password": password,
                                                        "service": "smtp", "remote_ip": "192.0.2.10"},
                            bearer=bearer)


@pytest.fixture
def standin():
    server = KeycloakStandIn(realm="mail")
    server.add_client(CLIENT_ID, KC_SECRET)
    server.add_user("alice", "alice@d1.test")
    server.add_user("bob", "bob@d2.test")
    server.issued = []                       # every token, also those revoke_tokens() forgets
    issue = server._issue

    def recording_issue(*args, **kwargs):
        token = issue(*args, **kwargs)
        server.issued.append(token)
        return token

    server._issue = recording_issue
    server.start()
    yield server
    server.close()


def keycloak_config(tmp_path, standin, secret: str = KC_SECRET, **sections):
    return write_config(
        tmp_path,
        idp={"provider": "keycloak", "keycloak": {
            "base_url": standin.url, "realm": "mail", "client_id": CLIENT_ID, "client_secret": secret,
            "request_timeout_seconds": 2, "cache_ttl_seconds": 0.5, "negative_cache_ttl_seconds": 0.5}},
        policy={"idp_failure_mode": "tempfail", "request_deadline_seconds": 3},
        **sections,
    )


def test_no_marker_in_any_output(tmp_path, standin):
    make_go_database(tmp_path / "state.db")
    (tmp_path / "http.secret").write_text(HTTP_SECRET + "\n")
    port = free_port()
    config = keycloak_config(tmp_path, standin, http={"listen": f"127.0.0.1:{port}",
                                                      "shared_secret_file": str(tmp_path / "http.secret")})
    os.chmod(config, 0o640)
    outputs: dict[str, str] = {}

    def keep(name: str, done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        outputs[name] = f"{done.stdout}\n{done.stderr}"
        return done

    # mailcloakctl: apps with marked passwords, as an argument and on stdin; lists; check.
    assert keep("ctl apps add (argument)", ctl("--config", str(config), "apps", "add", "app1", APP_PW)).returncode == 0
    assert keep("ctl apps add (stdin)", ctl("--config", str(config), "apps", "add", "app2", "--password-stdin",
                                            stdin=APP_PW_STDIN + "\n")).returncode == 0
    assert keep("ctl apps add (clash)", ctl("--config", str(config), "apps", "add", "APP1", WRONG_PW)).returncode == 1
    keep("ctl apps add (no source)", ctl("--config", str(config), "apps", "add", "app3", stdin=""))
    assert keep("ctl apps allow", ctl("--config", str(config), "apps", "allow", "app1", "noreply@d1.test")).returncode == 0
    assert keep("ctl apps list", ctl("--config", str(config), "apps", "list")).returncode == 0
    assert keep("ctl apps list --json", ctl("--config", str(config), "apps", "list", "--json")).returncode == 0
    assert keep("ctl check", ctl("--config", str(config), "check", "--sasl-method", "XOAUTH2", "--sasl-user",
                                 "alice", "--sender", "alice@d1.test", "--recipient", "bob@d2.test")).returncode == 0
    assert "action: DUNNO" in outputs["ctl check"]
    assert keep("check-config", check_config(config)).returncode == 0

    daemon = DaemonProcess(config).start()
    client = HTTP(port)
    try:
        policy = PolicyClient(daemon.policy_socket, timeout=10)
        rcpt = dict(protocol_state="RCPT", sender="x@outside.example")
        assert policy.ask(**rcpt, recipient="alice@d1.test") == "DUNNO"           # token + users
        assert policy.ask(protocol_state="MAIL", sasl_method="XOAUTH2", sasl_username="alice",
                          sender="alice@d1.test") == "DUNNO"
        standin.revoke_tokens()                                                  # 401, new token, retry
        assert policy.ask(**rcpt, recipient="bob@d2.test") == "DUNNO"
        assert "refused the token (401)" in daemon.log()
        assert standin.counts["token"] >= 2

        # Dovecot endpoints: app passwords right and wrong, a wrong bearer secret, introspection.
        status, body = client.passdb("app1", APP_PW)
        assert (status, body.splitlines()[0]) == (200, "result=ok"), body
        assert client.passdb("app2", APP_PW_STDIN)[1].startswith("result=ok")
        assert client.passdb("app1", WRONG_PW)[1].startswith("result=password_mismatch")
        assert client.passdb("nosuchapp", WRONG_PW)[1].startswith("result=user_unknown")
        assert client.passdb("app1", APP_PW, bearer=WRONG_BEARER)[0] == 401
        user_token = standin.issue_user_token("alice")
        status, body = client.request("POST", "/oauth2/introspect", {"token": user_token})
        assert status == 200 and '"active": true' in body, body
        status, body = client.request("POST", "/oauth2/introspect", {"token": BOGUS_TOKEN})
        assert status == 200 and '"active": false' in body, body
        for path in ("/healthz", "/metrics"):
            status, body = client.request("GET", path)
            outputs[f"GET {path} ({status})"] = body

        # Failures: 500, malformed answers, then the client credentials refused.
        for fault in ("500", "malformed"):
            standin.set_fault(fault)
            time.sleep(0.6)                                                      # cache entries expire
            assert policy.ask(**rcpt, recipient=f"nobody-{fault}@d1.test").startswith("451")
            status, body = client.request("POST", "/oauth2/introspect", {"token": standin.issue_user_token("bob")})
            assert status in (200, 503) and '"active": false' in body, (status, body)
            standin.clear_fault()
        standin.clients[CLIENT_ID].secret = "rotated-elsewhere"
        standin.revoke_tokens()
        time.sleep(0.6)
        assert policy.ask(**rcpt, recipient="someone@d1.test").startswith("451")
        wait_for(lambda: "bad credentials" in daemon.log(), 5, what="bad credentials logged")
        standin.clients[CLIENT_ID].secret = KC_SECRET
        daemon.signal(signal.SIGHUP)                                              # reload: re-reads everything
        wait_for(lambda: "configuration reloaded" in daemon.log(), 5, what="reload")
        wait_for(lambda: policy.ask(**rcpt, recipient="alice@d1.test") == "DUNNO", 10, what="recovery")
        policy.close()
    finally:
        daemon.stop()
    outputs["daemon log"] = daemon.log()

    # --check-config with a wrong secret and a stand-in that refuses it.
    (tmp_path / "wrong").mkdir()
    make_go_database(tmp_path / "wrong" / "state.db")
    wrong = keycloak_config(tmp_path / "wrong", standin, secret=KC_WRONG_SECRET)
    done = keep("check-config (wrong secret)", check_config(wrong))
    assert done.returncode == 1 and "bad credentials" in done.stdout

    markers = [KC_SECRET, KC_WRONG_SECRET, APP_PW, APP_PW_STDIN, WRONG_PW, HTTP_SECRET, WRONG_BEARER,
               BOGUS_TOKEN, user_token, *standin.issued]
    assert len(standin.issued) >= 5          # service-account tokens (several) and users' tokens
    assert "DEBUG" in outputs["daemon log"]                     # the daemon did log at debug
    for name, text in outputs.items():
        for marker in markers:
            assert marker not in text, f"secret {marker[:14]}... in {name}"
        assert MARK not in text, f"a marked value in {name}"
    assert not log_problems(outputs["daemon log"]), log_problems(outputs["daemon log"])


@pytest.mark.parametrize("mode, warns", [(0o644, True), (0o640, False)])
def test_warning_when_the_config_with_secrets_is_world_readable(tmp_path, standin, mode, warns):
    make_go_database(tmp_path / "state.db")
    config = keycloak_config(tmp_path, standin)
    os.chmod(config, mode)
    daemon = DaemonProcess(config).start()
    daemon.stop()
    lines = [line for line in daemon.log().splitlines() if WARNING_TEXT in line]
    assert len(lines) == (1 if warns else 0), daemon.log()
    checked = check_config(config)
    assert (WARNING_TEXT in checked.stdout) is warns
    assert checked.stdout.count(WARNING_TEXT) <= 1
    assert KC_SECRET not in daemon.log() + checked.stdout + checked.stderr
