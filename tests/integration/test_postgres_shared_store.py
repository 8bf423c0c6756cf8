"""PostgreSQL as the shared store of several daemons (issue #10): one database, two daemons, a
mailcloakctl change seen by both; the server restarted under load (no wrong answer, answers from
the last good state, recovery by itself); mailcloakctl failing clearly while it is down.

The restart test stops the server, so this module runs its own throwaway cluster.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from pg_cluster import PostgresCluster, unavailable_reason
from stores import PostgresSite
from support import REPO, DaemonProcess, PolicyClient, SocketmapClient, write_config

DEADLINE = 15.0  # generous: "seen" is what is asserted; the time it took is printed


@pytest.fixture(scope="module")
def own_cluster():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def site(own_cluster, tmp_path_factory):
    """The Go data in a fresh database of the module's cluster, copied by migrate-store."""
    from support import make_go_database

    go = make_go_database(tmp_path_factory.mktemp("go") / "state.db")
    site = PostgresSite(own_cluster, own_cluster.create_database())
    result = run_ctl("migrate-store", "--from", f"sqlite:{go}", "--to", site.spec())
    assert result.returncode == 0, result.stderr
    yield site
    if own_cluster_is_up(own_cluster):
        own_cluster.drop_database(site.database)


def own_cluster_is_up(cluster) -> bool:
    try:
        cluster.admin("SELECT 1")
        return True
    except Exception:  # noqa: BLE001
        return False


def run_ctl(*argv: str, config=None) -> subprocess.CompletedProcess:
    prefix = ["--config", str(config)] if config is not None else []
    return subprocess.run([sys.executable, str(REPO / "mailcloakctl"), *prefix, *argv],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=REPO)


def start_daemon(base, site) -> DaemonProcess:
    base.mkdir(parents=True, exist_ok=True)
    return DaemonProcess(write_config(base, **site.config_sections())).start()


def wait_for(client: SocketmapClient, key: str, expected: str) -> float:
    """Seconds until the socketmap answers `expected` for `key` (fails after DEADLINE)."""
    start = time.monotonic()
    while (answer := client.ask(key)) != expected:
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"socketmap {key}: still {answer!r}, expected {expected!r}")
        time.sleep(0.005)
    return time.monotonic() - start


def test_two_daemons_on_one_database_see_a_cli_change(tmp_path, site):
    first, second = start_daemon(tmp_path / "host1", site), start_daemon(tmp_path / "host2", site)
    clients = [SocketmapClient(first.socketmap_socket), SocketmapClient(second.socketmap_socket)]
    config = first.config_path
    try:
        for client in clients:
            assert client.ask("shared@d1.test") == "NOTFOUND "
        timings = []
        for target in ("alice", "bob"):
            result = run_ctl("aliases", "add", "shared@d1.test", target, config=config)
            assert (result.returncode, result.stderr) == (0, "")
            timings += [wait_for(c, "shared@d1.test", f"OK {target}@d1.test") for c in clients]
        result = run_ctl("domains", "disable", "d1.test", config=config)
        assert (result.returncode, result.stderr) == (0, "")
        timings += [wait_for(c, "shared@d1.test", "NOTFOUND ") for c in clients]
        print(f"\nchange seen by both daemons after at most {max(timings) * 1000:.0f} ms "
              f"(median {sorted(timings)[len(timings) // 2] * 1000:.0f} ms)")
    finally:
        for client in clients:
            client.close()
        first.stop()
        second.stop()
    for daemon in (first, second):
        assert "Traceback" not in daemon.log()
        assert site.dsn not in daemon.log()  # the DSN's password is never logged
        assert "postgres:***@" in daemon.log()


class Traffic(threading.Thread):
    """Policy and socketmap requests in a loop; every answer must be right, whatever the store."""

    CHECKS = [
        ("policy", {"protocol_state": "RCPT", "sender": "x@outside.example",
                    "recipient": "alias1@d1.test"}, "DUNNO"),
        ("policy", {"protocol_state": "RCPT", "sender": "x@outside.example",
                    "recipient": "nobody@d1.test"}, "550 5.1.1 No such user"),
        ("policy", {"protocol_state": "RCPT", "sasl_method": "PLAIN", "sasl_username": "mailer",
                    "sender": "noreply@d1.test", "recipient": "x@outside.example"}, "DUNNO"),
        ("socketmap", "sales@d2.test", "OK bob@d2.test"),
        ("socketmap", "off@d1.test", "NOTFOUND "),
    ]

    def __init__(self, daemon: DaemonProcess):
        super().__init__(daemon=True)
        self.policy = PolicyClient(daemon.policy_socket)
        self.socketmap = SocketmapClient(daemon.socketmap_socket)
        self.stop_event = threading.Event()
        self.sent = 0
        self.problems: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                kind, request, expected = self.CHECKS[self.sent % len(self.CHECKS)]
                if kind == "policy":
                    answer = self.policy.ask(**request)
                else:
                    answer = self.socketmap.ask(request)
                self.sent += 1
                if answer != expected:
                    self.problems.append(f"{request}: {answer!r} (expected {expected!r})")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.problems.append(f"client failed: {exc!r}")
        finally:
            self.policy.close()
            self.socketmap.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


def test_database_restarted_under_load(tmp_path, own_cluster, site):
    daemon = start_daemon(tmp_path, site)
    config = daemon.config_path
    traffic = Traffic(daemon)
    traffic.start()
    probe = SocketmapClient(daemon.socketmap_socket)
    try:
        time.sleep(0.3)
        own_cluster.stop_server()
        sent_before_down = traffic.sent
        # While the database is down: answers keep coming from the last good state...
        deadline = time.monotonic() + DEADLINE
        while traffic.sent < sent_before_down + 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert traffic.sent >= sent_before_down + 200, "no answers while the database was down"
        assert probe.ask("alias1@d1.test") == "OK alice@d1.test"
        # ...and mailcloakctl says clearly that it cannot write, in one line, no password.
        result = run_ctl("aliases", "add", "back@d1.test", "alice", config=config)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("mailcloakctl: database postgresql://postgres:***@")
        assert "unreachable" in result.stderr
        own_cluster.start_server()
        # Recovery by itself: a change made after the restart reaches the daemon.
        result = run_ctl("aliases", "add", "back@d1.test", "alice", config=config)
        assert (result.returncode, result.stderr) == (0, "")
        seconds = wait_for(probe, "back@d1.test", "OK alice@d1.test")
        print(f"\nchange after the restart seen after {seconds * 1000:.0f} ms")
    finally:
        probe.close()
        traffic.stop()
        if not own_cluster_is_up(own_cluster):
            own_cluster.start_server()
        daemon.stop()
    assert traffic.problems == []
    log = daemon.log()
    assert "answering from the last good state" in log
    assert "Traceback" not in log
    assert site.dsn not in log


def test_daemon_refuses_to_start_on_an_unreachable_database_with_one_clear_line(tmp_path, site):
    unreachable = site.dsn.replace(f":{site.cluster.port}/", ":1/")
    sections = site.config_sections()
    sections["postgres"]["dsn"] = unreachable
    config = write_config(tmp_path, **sections)
    for extra in ([], ["--check-config"]):
        result = subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(config), *extra],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "database postgresql://postgres:***@127.0.0.1:1/" in output and "unreachable" in output
        assert "Traceback" not in output
        assert unreachable not in output
