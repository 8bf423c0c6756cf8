"""The daemon as a real process: sockets, signals, privilege drop, change pickup."""

from __future__ import annotations

import os
import pwd
import grp
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from support import REPO, DaemonProcess, PolicyClient, SocketmapClient, make_go_database, write_config


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def run_daemon_once(config_path: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_sigterm_removes_sockets_and_exits_zero(daemon):
    assert os.path.exists(daemon.policy_socket) and os.path.exists(daemon.socketmap_socket)
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.policy_socket)
    assert not os.path.exists(daemon.socketmap_socket)


def test_sigterm_lets_an_idle_persistent_connection_go(daemon):
    client = PolicyClient(daemon.policy_socket)
    assert client.ask(protocol_state="CONNECT") == "DUNNO"
    assert daemon.stop() == 0
    assert client.sock.recv(10) == b""  # closed by the daemon, not left hanging
    client.close()


def test_socket_mode_applied(daemon):
    for path in (daemon.policy_socket, daemon.socketmap_socket):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o666


def test_stale_socket_file_is_replaced(tmp_path, go_db):
    config = write_config(tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "policy.sock"))
    stale.close()  # the file stays, nobody listens: what a crash leaves
    proc = DaemonProcess(config).start()
    try:
        assert PolicyClient(proc.policy_socket).ask(protocol_state="EHLO") == "DUNNO"
    finally:
        proc.stop()


def test_refuses_to_start_when_a_live_daemon_answers(daemon, tmp_path):
    second = run_daemon_once(daemon.config_path)
    assert second.returncode == 1
    assert "already listening on" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    # The first daemon still answers.
    assert PolicyClient(daemon.policy_socket).ask(protocol_state="EHLO") == "DUNNO"


def test_refuses_a_path_that_is_not_a_socket(tmp_path, go_db):
    config = write_config(tmp_path)
    (tmp_path / "socketmap.sock").write_text("precious")
    result = run_daemon_once(config)
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert (tmp_path / "socketmap.sock").read_text() == "precious"
    assert not (tmp_path / "policy.sock").exists()  # what was bound is cleaned up


@pytest.mark.parametrize("problem, expected", [
    ("missing database", "sqlite db not found at"),
    ("bad config key", "unknown key sockets.sokcet_mode"),
    ("socket folder missing", "cannot create socket"),
])
def test_start_failures_are_one_clear_line(tmp_path, problem, expected):
    if problem == "missing database":
        config = write_config(tmp_path)
    elif problem == "bad config key":
        make_go_database(tmp_path / "state.db")
        config = write_config(tmp_path, sockets={"sokcet_mode": "0660"})
    else:
        make_go_database(tmp_path / "state.db")
        config = write_config(tmp_path, sockets={"policy_socket": str(tmp_path / "nope" / "p.sock")})
    result = run_daemon_once(config)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_change_by_another_process_seen_within_two_seconds(daemon, go_db):
    sm = SocketmapClient(daemon.socketmap_socket)
    assert sm.ask("new@d1.test") == "NOTFOUND "
    con = sqlite3.connect(go_db)
    con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, ?, ?)",
                ("new@d1.test", "alice", "d1.test"))
    con.commit()
    written = time.monotonic()
    assert wait_for(lambda: sm.ask("new@d1.test") == "OK alice@d1.test", timeout=2.0)
    assert time.monotonic() - written < 2.0
    con.execute("UPDATE aliases SET enabled = 0 WHERE alias_email = 'new@d1.test'")
    con.commit()
    assert wait_for(lambda: sm.ask("new@d1.test") == "NOTFOUND ", timeout=2.0)
    con.close()
    sm.close()


def test_sighup_reloads_config_without_dropping_connections(daemon):
    client = PolicyClient(daemon.policy_socket)
    request = dict(protocol_state="RCPT", sender="x@outside.example", recipient="dave@d1.test")
    assert client.ask(**request).startswith("550 5.1.1")
    config = yaml.safe_load(daemon.config_path.read_text())
    config["idp"]["static"]["users"].append({"username": "dave", "email": "dave@d1.test"})
    daemon.config_path.write_text(yaml.safe_dump(config))
    daemon.signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration reloaded" in daemon.log())
    assert client.ask(**request) == "DUNNO"  # same connection, new config
    client.close()


def test_sighup_with_a_broken_config_keeps_running(daemon):
    client = PolicyClient(daemon.policy_socket)
    daemon.config_path.write_text("idp: [unclosed\n")
    daemon.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload refused" in daemon.log())
    assert client.ask(protocol_state="RCPT", sender="x@outside.example",
                      recipient="alice@d1.test") == "DUNNO"
    client.close()


def test_database_locked_by_a_long_writer_does_not_stop_answers(daemon, go_db):
    client = PolicyClient(daemon.policy_socket)
    con = sqlite3.connect(go_db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    con.execute("INSERT INTO domains(domain_name) VALUES ('locked.test')")
    try:
        for _ in range(20):
            assert client.ask(protocol_state="RCPT", sender="x@outside.example",
                              recipient="alias1@d1.test") == "DUNNO"
    finally:
        con.execute("COMMIT")
        con.close()
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_privilege_drop_and_socket_owner():
    tmp = Path(tempfile.mkdtemp(prefix="mailcloak-priv-"))
    try:
        os.chmod(tmp, 0o755)
        make_go_database(tmp / "state.db")
        nobody = pwd.getpwnam("nobody")
        group = grp.getgrgid(nobody.pw_gid).gr_name
        config = write_config(tmp, daemon={"user": "nobody", "log_level": "info"},
                              sockets={"socket_owner_user": "nobody", "socket_owner_group": group,
                                       "socket_mode": "0660"})
        os.chmod(config, 0o644)
        proc = DaemonProcess(config, log_path=tmp / "daemon.log").start()
        try:
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
            assert set(map(int, uids)) == {nobody.pw_uid}
            assert set(map(int, gids)) == {nobody.pw_gid}
            for path in (proc.policy_socket, proc.socketmap_socket):
                st = os.stat(path)
                assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o660)
            # After the drop the daemon still reads the database and re-reads its config.
            assert PolicyClient(proc.policy_socket).ask(
                protocol_state="RCPT", sender="x@outside.example", recipient="nobody@d1.test"
            ).startswith("550 5.1.1")
            proc.signal(signal.SIGHUP)
            assert wait_for(lambda: "configuration reloaded" in proc.log())
        finally:
            assert proc.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_check_config_reports_and_exits(tmp_path, go_db):
    config = write_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(config), "--check-config"],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy socket: " + str(tmp_path / "policy.sock") in result.stdout
    assert "database: " in result.stdout and "3 domains, 4 aliases, 1 apps" in result.stdout
    os.unlink(go_db)
    result = subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(config), "--check-config"],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1
    assert "sqlite db not found at" in result.stdout
