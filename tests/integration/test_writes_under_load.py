"""1000 alias changes through mailcloakctl while the daemon serves sustained policy load (issue 7).

Two writer threads run `mailcloak.ctl.main` in-process (the same code path as the executable, one
`asyncio.run` and one store connection per command), 500 changes each on their own pool of
aliases: `aliases add` (new or re-pointed), `disable`, `enable`, `del`, every one of which changes
what the socketmap answers for that alias. Meanwhile POLICY_THREADS clients send policy requests on
persistent connections and check every answer, and a verifier polls the socketmap for each change
until the daemon shows it. A writer never touches an alias whose last change is not yet seen, so
each observation belongs to exactly one change. The daemon's snapshot is one consistent read, so
seeing a change means every earlier commit is in too.

Asserted: no failed command, no wrong or failed policy answer, no "database is locked" or refresh
error in the daemon's log, and every change visible within 2 s (SPEC §5). Figures (changes/s,
policy requests served meanwhile, visibility delays) are printed as FIGURE lines (`pytest -rP`).
"""

from __future__ import annotations

import random
import statistics
import threading
import time

import pytest

from mailcloak import ctl
from support import DaemonProcess, PolicyClient, SocketmapClient, make_go_database, write_config
from wire_checks import figure, log_problems

CHANGES_PER_WRITER = 500
WRITERS = 2
POOL = 120                  # aliases per writer
POLICY_THREADS = 4
VISIBLE_WITHIN = 2.0        # SPEC §5
SEED = 7

POLICY_CASES = [
    (dict(protocol_state="RCPT", sender="x@outside.example", recipient="alice@d1.test"), "DUNNO"),
    (dict(protocol_state="RCPT", sender="x@outside.example", recipient="alias1@d1.test"), "DUNNO"),
    (dict(protocol_state="RCPT", sender="x@outside.example", recipient="ghost@d1.test"), "550 5.1.1 No such user"),
    (dict(protocol_state="MAIL", sasl_method="XOAUTH2", sasl_username="alice", sender="alias1@d1.test"), "DUNNO"),
    (dict(protocol_state="MAIL", sasl_method="PLAIN", sasl_username="Mailer", sender="noreply@d1.test"), "DUNNO"),
    (dict(protocol_state="MAIL", sasl_method="PLAIN", sasl_username="Mailer", sender="billing@d1.test"),
     "553 5.7.1 Sender not owned by authenticated user"),
]


class Shared:
    def __init__(self):
        self.lock = threading.Lock()
        self.pending: dict[str, tuple[str, float]] = {}   # alias -> (expected answer, commit time)
        self.delays: list[float] = []
        self.late: list[tuple[str, str, float]] = []
        self.failed_commands: list[tuple[list[str], int]] = []
        self.writes_done = threading.Event()
        self.stop = threading.Event()
        self.policy_served = 0
        self.policy_errors: list[str] = []


def writer(db: str, index: int, shared: Shared, timings: list[float]) -> None:
    rng = random.Random(f"{SEED}-{index}")
    domain = ("d1.test", "d2.test")[index % 2]
    aliases = [f"w{index}-{k}@{domain}" for k in range(POOL)]
    state: dict[str, tuple[str, str]] = {}                 # alias -> ("on"|"off", target)
    started = time.monotonic()
    for n in range(CHANGES_PER_WRITER):
        while True:
            with shared.lock:
                free = [a for a in aliases if a not in shared.pending]
            if free:
                break
            time.sleep(0.005)
        alias = rng.choice(free)
        current = state.get(alias)
        target = f"user{index}x{n}"
        if current is None:
            argv, after = ["aliases", "add", alias, target], ("on", target)
        elif current[0] == "on":
            op = rng.choices(["disable", "del", "add"], weights=[45, 35, 20])[0]
            if op == "add":
                argv, after = ["aliases", "add", alias, target], ("on", target)
            else:
                argv, after = ["aliases", op, alias], ("off", current[1]) if op == "disable" else None
        else:
            argv, after = ["aliases", "enable", alias], ("on", current[1])
        code = ctl.main(["--db", db, *argv])
        committed = time.monotonic()
        if code != 0:
            shared.failed_commands.append((argv, code))
            continue
        if after is None:
            state.pop(alias, None)
        else:
            state[alias] = after
        expected = f"OK {after[1]}@{domain}" if after and after[0] == "on" else "NOTFOUND "
        with shared.lock:
            shared.pending[alias] = (expected, committed)
    timings.append(time.monotonic() - started)


def verifier(path: str, shared: Shared) -> None:
    client = SocketmapClient(path, timeout=10)
    try:
        while not (shared.writes_done.is_set() and not shared.pending):
            with shared.lock:
                pending = list(shared.pending.items())
            if not pending:
                time.sleep(0.002)
                continue
            for alias, (expected, committed) in pending:
                answer = client.ask(alias)
                now = time.monotonic()
                if answer == expected:
                    with shared.lock:
                        del shared.pending[alias]
                    shared.delays.append(now - committed)
                elif now - committed > VISIBLE_WITHIN:
                    with shared.lock:
                        del shared.pending[alias]
                    shared.late.append((alias, expected, now - committed))
    finally:
        client.close()


def policy_load(path: str, shared: Shared, seed: int) -> None:
    rng = random.Random(seed)
    try:
        client = PolicyClient(path, timeout=10)
        while not shared.stop.is_set():
            request, expected = rng.choice(POLICY_CASES)
            answer = client.ask(**request)
            if answer != expected:
                shared.policy_errors.append(f"{request} -> {answer!r}, expected {expected!r}")
                return
            with shared.lock:
                shared.policy_served += 1
        client.close()
    except Exception as exc:  # noqa: BLE001 - reported by the test
        shared.policy_errors.append(repr(exc))


@pytest.fixture
def ctl_parser_once_per_thread(monkeypatch):
    """ctl.main builds its argparse tree on every call (~10 ms, most of a command's time in
    process): each writer thread builds it once. Parsing and everything after are unchanged."""
    build = ctl.build_parser
    local = threading.local()

    def cached():
        if not hasattr(local, "parser"):
            local.parser = build()
        return local.parser

    monkeypatch.setattr(ctl, "build_parser", cached)


def test_1000_alias_changes_under_policy_load(tmp_path, ctl_parser_once_per_thread):
    db = str(make_go_database(tmp_path / "state.db"))
    daemon = DaemonProcess(write_config(tmp_path, daemon={"user": "", "log_level": "info",
                                                          "shutdown_grace_seconds": 2})).start()
    shared = Shared()
    timings: list[float] = []
    try:
        load = [threading.Thread(target=policy_load, args=(daemon.policy_socket, shared, i), daemon=True)
                for i in range(POLICY_THREADS)]
        check = threading.Thread(target=verifier, args=(daemon.socketmap_socket, shared), daemon=True)
        writers = [threading.Thread(target=writer, args=(db, i, shared, timings), daemon=True)
                   for i in range(WRITERS)]
        for t in load:
            t.start()
        time.sleep(0.3)
        served_before = shared.policy_served
        check.start()
        started = time.monotonic()
        for t in writers:
            t.start()
        for t in writers:
            t.join(120)
        write_seconds = time.monotonic() - started
        served_during = shared.policy_served - served_before
        shared.writes_done.set()
        check.join(VISIBLE_WITHIN + 10)
        shared.stop.set()
        for t in load:
            t.join(10)
        assert not any(t.is_alive() for t in writers + load + [check])
    finally:
        daemon.stop()

    changes = WRITERS * CHANGES_PER_WRITER
    delays = sorted(shared.delays)
    figure("writes under load: changes / seconds / changes per second",
           f"{changes} / {write_seconds:.1f} s / {changes / write_seconds:.0f} per s")
    figure("writes under load: policy requests served meanwhile (threads)",
           f"{served_during} ({served_during / write_seconds:.0f} per s, {POLICY_THREADS} threads)")
    if delays:
        figure("writes under load: visibility delay median / p99 / max",
               f"{statistics.median(delays) * 1000:.0f} ms / {delays[int(len(delays) * 0.99) - 1] * 1000:.0f} ms"
               f" / {delays[-1] * 1000:.0f} ms over {len(delays)} changes")
    assert not shared.failed_commands, shared.failed_commands[:5]
    assert not shared.policy_errors, shared.policy_errors[:5]
    assert not shared.late, shared.late[:5]
    assert len(delays) == changes                     # every change was seen
    assert delays[-1] < VISIBLE_WITHIN
    assert served_during > 0
    log = daemon.log()
    assert "locked" not in log and "cannot refresh" not in log, log[-2000:]
    assert not log_problems(log), log_problems(log)
