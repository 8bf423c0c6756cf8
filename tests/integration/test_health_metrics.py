"""GET /healthz and GET /metrics on the daemon's HTTP listener."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from support import DaemonProcess, PolicyClient, SocketmapClient, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


@pytest.fixture
def http_daemon(tmp_path, go_db):
    port = free_port()
    config = write_config(tmp_path, http={"listen": f"127.0.0.1:{port}"},
                          sqlite={"path": str(go_db), "poll_interval_seconds": 0.2,
                                  "busy_timeout_seconds": 0.5})
    proc = DaemonProcess(config).start()
    proc.port = port
    yield proc
    proc.stop()


def test_healthz_ok(http_daemon):
    status, body, ctype = get(http_daemon.port, "/healthz")
    assert status == 200 and ctype.startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["sockets"] == {"policy": True, "socketmap": True}
    assert health["database"]["ok"] is True and health["database"]["error"] is None
    assert health["idp"] == {"provider": "static", "ok": True}


def test_healthz_503_while_the_database_cannot_be_read_then_recovers(http_daemon, go_db):
    con = sqlite3.connect(go_db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    original = go_db.read_bytes()
    with open(go_db, "r+b") as f:  # every page after the header becomes garbage
        f.seek(100)
        f.write(b"\xff" * (len(original) - 100))
    try:
        http_daemon.signal(signal.SIGHUP)  # forces a reload, which fails
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body, _ = get(http_daemon.port, "/healthz")
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503
        health = json.loads(body)
        assert health["status"] == "fail"
        assert "corrupt" in health["database"]["error"], health
        # The Postfix-facing services keep answering from the last good state meanwhile.
        assert PolicyClient(http_daemon.policy_socket).ask(
            protocol_state="RCPT", sender="x@outside.example", recipient="alias1@d1.test") == "DUNNO"
    finally:
        go_db.write_bytes(original)
    deadline = time.monotonic() + 10  # the failed reload is retried by itself
    while time.monotonic() < deadline and get(http_daemon.port, "/healthz")[0] != 200:
        time.sleep(0.1)
    assert get(http_daemon.port, "/healthz")[0] == 200


def test_metrics_in_prometheus_format(http_daemon):
    policy = PolicyClient(http_daemon.policy_socket)
    for _ in range(3):
        policy.ask(protocol_state="RCPT", sender="x@outside.example", recipient="ghost@d1.test")
    sm = SocketmapClient(http_daemon.socketmap_socket)
    sm.ask("alias1@d1.test")
    status, body, ctype = get(http_daemon.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    assert 'mailcloak_open_connections{service="policy"} 1.0' in text
    assert 'mailcloak_open_connections{service="socketmap"} 1.0' in text
    assert "mailcloak_database_refresh_ok 1.0" in text
    assert 'mailcloak_policy_decisions_total{action="550",rule="2 local recipient does not exist"} 3.0' in text
    assert 'mailcloak_socketmap_answers_total{map="alias",status="OK"} 1.0' in text
    assert 'mailcloak_request_duration_seconds_count{service="policy"} 3.0' in text
    policy.close()
    sm.close()
