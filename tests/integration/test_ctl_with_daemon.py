"""mailcloakctl writing while a running daemon serves: no lock errors, every change seen within 2 s."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mailcloak import ctl
from stores import both_store_kinds  # noqa: F401 - every test here runs on both stores
from support import REPO, DaemonProcess, PolicyClient, SocketmapClient, write_config

VISIBLE_WITHIN = 2.0  # SPEC §5: changes take effect in a running daemon within 2 seconds


@pytest.fixture
def fast_daemon(tmp_path, go_site):
    """The daemon over the Go data; with SQLite, polling for changes often so the loop stays
    short (PostgreSQL is told of each commit by NOTIFY)."""
    sections = go_site.config_sections()
    if go_site.kind == "sqlite":
        sections["sqlite"]["poll_interval_seconds"] = 0.02
    config = write_config(tmp_path, **sections)
    proc = DaemonProcess(config).start()
    yield proc
    proc.stop()


def wait_for_answer(client: SocketmapClient, key: str, expected: str) -> None:
    deadline = time.monotonic() + VISIBLE_WITHIN
    answer = client.ask(key)
    while answer != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"socketmap {key}: still {answer!r}, expected {expected!r} after {VISIBLE_WITHIN}s")
        time.sleep(0.005)
        answer = client.ask(key)


class PolicyTraffic(threading.Thread):
    """Sends policy requests over one connection until stopped; records anything unexpected."""

    def __init__(self, socket_path: str):
        super().__init__(daemon=True)
        self.client = PolicyClient(socket_path)
        self.stop_event = threading.Event()
        self.sent = 0
        self.problems: list[str] = []

    def run(self) -> None:
        checks = [
            ({"protocol_state": "RCPT", "sender": "x@outside.example", "recipient": "alias1@d1.test"}, "DUNNO"),
            ({"protocol_state": "RCPT", "sender": "x@outside.example", "recipient": "nobody@d1.test"},
             "550 5.1.1 No such user"),
            ({"protocol_state": "RCPT", "sasl_method": "PLAIN", "sasl_username": "mailer",
              "sender": "noreply@d1.test", "recipient": "x@outside.example"}, "DUNNO"),
        ]
        try:
            while not self.stop_event.is_set():
                attributes, expected = checks[self.sent % len(checks)]
                answer = self.client.ask(**attributes)
                self.sent += 1
                if answer != expected:
                    self.problems.append(f"{attributes}: {answer!r} (expected {expected!r})")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.problems.append(f"policy client failed: {exc!r}")
        finally:
            self.client.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def test_cli_writes_while_the_daemon_serves(fast_daemon, tmp_path, capsys):
    config = str(fast_daemon.config_path)
    traffic = PolicyTraffic(fast_daemon.policy_socket)
    traffic.start()
    socketmap = SocketmapClient(fast_daemon.socketmap_socket)
    operations = 0

    def cli(*argv: str, real_executable: bool = False) -> None:
        nonlocal operations
        operations += 1
        if real_executable:
            result = subprocess.run([sys.executable, str(REPO / "mailcloakctl"), "--config", config, *argv],
                                    capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            code, err = result.returncode, result.stderr
        else:
            code = ctl.main(["--config", config, *argv])
            err = capsys.readouterr().err
        assert (code, err) == (0, ""), f"mailcloakctl {' '.join(argv)}: {err}"

    try:
        for i in range(40):
            alias = f"Churn{i}@D1.test"
            key = alias.lower()
            real = i % 10 == 0  # a few through the real executable, the rest in-process
            cli("aliases", "add", alias, "alice", real_executable=real)
            wait_for_answer(socketmap, key, "OK alice@d1.test")
            cli("aliases", "add", alias, "bob")  # upsert: new target
            wait_for_answer(socketmap, key, "OK bob@d1.test")
            cli("aliases", "disable", alias)
            wait_for_answer(socketmap, key, "NOTFOUND ")
            cli("aliases", "enable", alias)
            wait_for_answer(socketmap, key, "OK bob@d1.test")
            cli("aliases", "del", alias, real_executable=real)
            wait_for_answer(socketmap, key, "NOTFOUND ")
        # A domain switch reaches the daemon too (d2.test: the policy traffic stays on d1.test).
        cli("domains", "disable", "d2.test")
        wait_for_answer(socketmap, "sales@d2.test", "NOTFOUND ")
        cli("domains", "enable", "d2.test", real_executable=True)
        wait_for_answer(socketmap, "sales@d2.test", "OK bob@d2.test")
    finally:
        socketmap.close()
        traffic.stop()

    assert operations == 202
    assert traffic.sent > 0
    assert traffic.problems == []
    log = fast_daemon.log()
    assert "locked" not in log
    assert "cannot refresh" not in log
    assert "Traceback" not in log


def test_concurrent_cli_writers_do_not_lock_each_other_out(fast_daemon, tmp_path):
    """Four mailcloakctl processes writing at once while the daemon reloads: all succeed."""
    config = str(fast_daemon.config_path)
    script = (
        "import sys\n"
        "from mailcloak.ctl import main\n"
        "base, config = sys.argv[1], sys.argv[2]\n"
        "for i in range(25):\n"
        "    alias = f'{base}{i}@d2.test'\n"
        "    steps = [['aliases', 'add', alias, 'bob']] + ([['aliases', 'disable', alias]] if i < 24 else [])\n"
        "    for argv in steps:\n"
        "        code = main(['--config', config, *argv])\n"
        "        if code:\n"
        "            sys.exit(code)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"w{n}-", config], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [(p.returncode, err) for p, (_out, err) in zip(procs, outputs)] == [(0, "")] * 4
    socketmap = SocketmapClient(fast_daemon.socketmap_socket)
    try:
        for n in range(4):
            wait_for_answer(socketmap, f"w{n}-24@d2.test", "OK bob@d2.test")
            assert socketmap.ask(f"w{n}-23@d2.test") == "NOTFOUND "
    finally:
        socketmap.close()
    assert "locked" not in fast_daemon.log()
