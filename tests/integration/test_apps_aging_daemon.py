"""Apps that age, in the daemon as a real process: `mailcloakctl apps set` reaches the passdb
endpoint without a signal, refusals are logged with their reason, and last use is written to the
database when the daemon stops (issue #9)."""

from __future__ import annotations

import re
import socket
import sqlite3
import time
import urllib.request
from urllib.parse import urlencode

import pytest

from mailcloak import ctl
from mailcloak.policy.decision import NOT_OWNED
from support import GO_APP_PASSWORD, DaemonProcess, PolicyClient, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def passdb(port: int, remote_ip: str, user: str = "Mailer", password: str = GO_APP_PASSWORD) -> str:
    body = urlencode({"user": user, "password": password, "service": "smtp",
                      "remote_ip": remote_ip}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/dovecot/passdb", body, timeout=30) as reply:
        return reply.read().decode()


def until(predicate, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def usage(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT app_id, last_used_ip FROM app_usage").fetchall()
    finally:
        con.close()


@pytest.fixture
def served(tmp_path, go_db, capsys):
    """The daemon with its HTTP listener over the Go database; `migrated` runs init first."""

    def start(migrate: bool) -> tuple[DaemonProcess, int]:
        if migrate:
            assert ctl.main(["--db", str(go_db), "init"]) == 0
        port = free_port()
        proc = DaemonProcess(write_config(tmp_path, http={"listen": f"127.0.0.1:{port}"}))
        proc.db = go_db
        procs.append(proc)
        return proc.start(), port

    procs: list[DaemonProcess] = []
    yield start
    for proc in procs:
        proc.stop()


def test_networks_and_expiry_reach_the_running_daemon_and_refusals_say_why(served, go_db):
    daemon, port = served(migrate=True)
    assert passdb(port, "198.51.100.7").startswith("result=ok")
    assert ctl.main(["--db", str(go_db), "apps", "set", "Mailer", "--networks", "192.0.2.0/24"]) == 0
    answer = until(lambda: (a if "result=user_disabled" in (a := passdb(port, "198.51.100.7")) else None),
                   "the networks to take effect")
    assert "reason=remote IP 198.51.100.7 is outside the app's networks" in answer
    assert passdb(port, "192.0.2.7").startswith("result=ok")
    assert passdb(port, "").startswith("result=user_disabled")            # doveadm: fail closed
    assert ctl.main(["--db", str(go_db), "apps", "set", "Mailer", "--expires", "2001-01-01"]) == 0
    until(lambda: "app expired at 2001-01-01T00:00:00Z" in passdb(port, "192.0.2.7"), "the expiry")
    log = daemon.log()
    assert re.search(r"app auth refused \(remote IP 198\.51\.100\.7 is outside the app's networks\) "
                     r"login='Mailer' service=smtp rip=198\.51\.100\.7 app=Mailer", log)
    assert re.search(r"app auth refused \(app expired at 2001-01-01T00:00:00Z\) .*rip=192\.0\.2\.7 "
                     r"app=Mailer", log)
    assert GO_APP_PASSWORD not in log


def test_last_use_is_written_when_the_daemon_stops(served, go_db, capsys):
    daemon, port = served(migrate=True)
    assert passdb(port, "192.0.2.10").startswith("result=ok")
    assert passdb(port, "192.0.2.11").startswith("result=ok")               # cached; still recorded
    assert passdb(port, "192.0.2.12", password="wrong").startswith("result=password_mismatch")
    assert usage(go_db) == []              # not on the hot path
    assert daemon.stop() == 0
    assert usage(go_db) == [("Mailer", "192.0.2.11")]
    capsys.readouterr()
    assert ctl.main(["--db", str(go_db), "apps", "list"]) == 0
    assert re.search(r"\t\tlast used: \S+Z from 192\.0\.2\.11\n", capsys.readouterr().out)


def test_go_database_logins_work_and_last_use_is_skipped_with_one_warning(served, go_db):
    daemon, port = served(migrate=False)
    assert passdb(port, "192.0.2.10").startswith("result=ok")
    assert daemon.stop() == 0
    warnings = [line for line in daemon.log().splitlines() if "cannot record when apps were last used" in line]
    assert len(warnings) == 1 and "run mailcloakctl init" in warnings[0]
    assert "Traceback" not in daemon.log()


def test_policy_refuses_an_app_expired_or_sending_from_outside_its_networks(served, go_db):
    """Row 7 applies the passdb's rule again: a login Dovecot still has cached does not let an
    app send past its expiry or from another network."""
    daemon, _port = served(migrate=True)
    client = PolicyClient(daemon.policy_socket)

    def ask(client_address: str) -> str:
        return client.ask(protocol_state="RCPT", sasl_method="PLAIN", sasl_username="Mailer",
                          sender="noreply@d1.test", recipient="x@outside.example",
                          client_address=client_address)

    try:
        assert ask("198.51.100.7") == "DUNNO"
        assert ctl.main(["--db", str(go_db), "apps", "set", "Mailer", "--networks", "192.0.2.0/24"]) == 0
        until(lambda: ask("198.51.100.7") == NOT_OWNED, "the networks to take effect")
        assert ask("192.0.2.7") == "DUNNO"
        assert ask("") == NOT_OWNED
        assert ctl.main(["--db", str(go_db), "apps", "set", "Mailer", "--expires", "2001-01-01"]) == 0
        until(lambda: ask("192.0.2.7") == NOT_OWNED, "the expiry to take effect")
    finally:
        client.close()
