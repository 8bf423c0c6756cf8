"""mailcloak benchmarks side by side with a plain-asyncio floor (`make bench`; bench/README.md).

Starts the servers once (warm caches), then runs every scenario against every server in
interleaved rounds (the server order rotates each round), so that load from other work on the
machine spreads over all of them alike; figures are medians over rounds with the spread.
Then the scale checks with 100 000 aliases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from loadgen import POLICY, SOCKETMAP, LoadResult, run_load  # noqa: E402
from support import PolicyClient, SocketmapClient, write_config  # noqa: E402
from workload import (DUNNO, make_database, policy_requests, recipient_requests,  # noqa: E402
                      socketmap_requests, socketmap_unique_requests, static_users)

KC_CLIENT, KC_SECRET = "mailcloak-bench", "bench-secret-7Hq"


# -- servers -----------------------------------------------------------------------------------

@dataclass
class Server:
    label: str
    argv: list[str]
    policy_socket: str
    socketmap_socket: str
    log_path: Path
    cwd: Path = REPO
    is_floor: bool = False
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    startup: float = 0.0
    idp: "KeycloakStandIn | None" = None

    def start(self, timeout: float = 30) -> "Server":
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, cwd=self.cwd,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited {self.proc.returncode}:\n{self.log()}")
            if "ready" in self.log():
                self.startup = time.monotonic() - t0
                return self
            time.sleep(0.005)
        raise RuntimeError(f"{self.label} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in kB (VmHWM: peak RSS; VmRSS: current)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class KeycloakStandIn:
    """bench/keycloak_server.py as a child process; `counts()` asks it for its counters."""

    def __init__(self, k: int):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "keycloak_server.py"), str(k), KC_CLIENT,
                                      KC_SECRET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"keycloak stand-in did not start: {line!r}")
        self.port = int(line.split()[1])

    def counts(self) -> dict[str, int]:
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def floor_server(tmp: Path, uvloop: bool = False) -> Server:
    d = tmp / ("floor-uvloop" if uvloop else "floor")
    d.mkdir()
    argv = [sys.executable, str(HERE / "floor.py"), str(d / "policy.sock"), str(d / "socketmap.sock")]
    if uvloop:
        argv.append("--uvloop")
    return Server("floor (uvloop)" if uvloop else "floor", argv, str(d / "policy.sock"),
                  str(d / "socketmap.sock"), d / "server.log", is_floor=True)


def daemon_server(tmp: Path, name: str, label: str, db: Path, k: int, *, cwd: Path = REPO,
                  uvloop: str | None = None, keycloak_port: int | None = None) -> Server:
    d = tmp / name
    d.mkdir()
    sections = dict(
        sqlite={"path": str(db), "poll_interval_seconds": 0.5},
        daemon={"user": "", "log_level": "info"},
    )
    if keycloak_port is None:
        sections["idp"] = {"provider": "static", "static": {"users": static_users(k)}}
    else:
        sections["idp"] = {"provider": "keycloak", "static": None, "keycloak": {
            "base_url": f"http://127.0.0.1:{keycloak_port}", "realm": "mail", "client_id": KC_CLIENT,
            "client_secret": KC_SECRET, "cache_ttl_seconds": 3600, "negative_cache_ttl_seconds": 3600}}
    config = write_config(d, **sections)
    if uvloop == "on":
        argv = [sys.executable, str(HERE / "uvloop_daemon.py"), "--config", str(config)]
    elif uvloop == "off":
        argv = [sys.executable, str(HERE / "asyncio_daemon.py"), "--config", str(config)]
    else:  # as installed: uvloop when importable
        argv = [sys.executable, "-m", "mailcloak", "--config", str(config)]
    return Server(label, argv, str(d / "policy.sock"), str(d / "socketmap.sock"), d / "daemon.log",
                  cwd=cwd, env={"PYTHONPATH": str(cwd)})


def warm(server: Server, policy_reqs, map_reqs) -> None:
    """Every request once, in order, on one connection of each kind (warm caches)."""
    policy, socketmap = PolicyClient(server.policy_socket), SocketmapClient(server.socketmap_socket)
    for request, _ in policy_reqs:
        policy.sock.sendall(request)
        policy.read_reply()
    for request, _ in map_reqs:
        socketmap.sock.sendall(request)
        socketmap.read_reply()
    policy.close()
    socketmap.close()


# -- scenarios ---------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    kind: str
    per_request: bool = False


SCENARIOS = [
    Scenario("policy, 16 persistent connections", POLICY),
    Scenario("policy, one connection per request", POLICY, per_request=True),
    Scenario("socketmap, 16 persistent connections", SOCKETMAP),
    Scenario("socketmap, 16 persistent connections, every key new", SOCKETMAP),
]


@dataclass
class Sample:
    result: LoadResult
    idp_requests: int | None


def measure(server: Server, scenario: Scenario, requests, args, during=None) -> Sample:
    path = server.policy_socket if scenario.kind == POLICY else server.socketmap_socket
    before = server.idp.counts() if server.idp else None
    result = run_load(path, scenario.kind, requests, check=not server.is_floor,
                      connections=args.connections, processes=args.processes, duration=args.duration,
                      warmup=args.warmup, per_request=scenario.per_request, server_pid=server.pid,
                      during=during)
    idp = None
    if server.idp:
        after = server.idp.counts()
        idp = sum(after.values()) - sum(before.values())
    if result.mismatches:
        print(f"  !! {server.label}: {result.mismatches} unexpected replies, e.g. {result.first_mismatch}",
              file=sys.stderr)
    return Sample(result, idp)


def spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) < 2:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def table(results: dict, servers: list[Server], args) -> str:
    lines = [
        "| scenario | server | req/s median (min–max) | × floor | p50 ms | p99 ms median (max) | "
        "server CPU µs/req | generator CPU µs/req | IdP requests | errors / wrong replies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        floor = results.get((scenario.name, "floor"))
        floor_tp = [s.result.throughput for s in floor] if floor else None
        for server in servers:
            samples = results.get((scenario.name, server.label))
            if not samples:
                continue
            tps = [s.result.throughput for s in samples]
            if floor_tp and not server.is_floor:
                ratios = [a / b for a, b in zip(tps, floor_tp)]
                ratio = spread(ratios, ".2f")
            else:
                ratio = "1" if server.label == "floor" else "—"
            p50 = statistics.median(s.result.percentile(50) * 1000 for s in samples)
            p99s = [s.result.percentile(99) * 1000 for s in samples]
            cpu = statistics.median(s.result.server_cpu / max(1, s.result.completed) * 1e6 for s in samples)
            gen = statistics.median(s.result.generator_cpu / max(1, s.result.completed) * 1e6 for s in samples)
            idp = "—" if samples[0].idp_requests is None else str(sum(s.idp_requests for s in samples))
            errors = sum(s.result.errors for s in samples)
            wrong = sum(s.result.mismatches for s in samples)
            lines.append(
                f"| {scenario.name} | {server.label} | {spread(tps, ',.0f')} | {ratio} | {p50:.2f} | "
                f"{statistics.median(p99s):.2f} ({max(p99s):.2f}) | {cpu:.0f} | {gen:.0f} | {idp} | "
                f"{errors} / {wrong} |")
    return "\n".join(lines)


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


# -- scale -------------------------------------------------------------------------------------

def connect(path: str) -> PolicyClient:
    """A policy connection; a full listen backlog (EAGAIN on a unix socket) is waited out."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return PolicyClient(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def ask_all(server: Server, requests: list[tuple[bytes, bytes]], order: list[int], connections: int) -> int:
    """requests[i] for each i of `order`, spread over `connections` connections at once, each
    waiting for its reply before the next request; the number of unexpected replies."""
    def drive(part: list[int]) -> int:
        client, wrong = PolicyClient(server.policy_socket), 0
        for i in part:
            request, expected = requests[i]
            client.sock.sendall(request)
            wrong += f"action={client.read_reply()}\n\n".encode() != expected
        client.close()
        return wrong

    with ThreadPoolExecutor(connections) as pool:
        return sum(pool.map(drive, [order[c::connections] for c in range(connections)]))


def idp_requests(tmp: Path, args) -> str:
    """The IdP targets against a fresh daemon and stand-in (cold caches): N policy requests over
    K-1 distinct recipient addresses from 16 connections at once must cost K-1 users requests and
    one token request; then 200 connections asking at the same moment about one address not yet
    asked must cost one users request."""
    k, n = args.k, 20 * args.k
    db = make_database(tmp / "idp.db", k)
    idp = KeycloakStandIn(k)
    server = daemon_server(tmp, "idp-counts", "daemon, keycloak stand-in (cold)", db, k,
                           keycloak_port=idp.port, uvloop="off")
    try:
        server.start()

        order = [n_ % (k - 1) for n_ in range(n)]
        random.Random(4).shuffle(order)
        wrong = ask_all(server, recipient_requests(range(k - 1)), order, args.connections)
        first = idp.counts()
        clients = [connect(server.policy_socket) for _ in range(200)]
        ((request, _),) = recipient_requests(range(k - 1, k))
        for client in clients:  # every request sent before any reply is read
            client.sock.sendall(request)
        wrong_at_once = sum(client.read_reply() != DUNNO for client in clients)
        for client in clients:
            client.close()
        second = idp.counts()
    finally:
        server.stop()
        idp.stop()
    same = second.get("users", 0) - first.get("users", 0)
    return "\n".join([
        "IdP requests (Keycloak stand-in, cold caches; 16 connections, then 200 at once):",
        "",
        "| requests | distinct addresses | users requests | token requests | wrong replies | target |",
        "|---|---|---|---|---|---|",
        f"| {n:,} policy requests | {k - 1} | {first.get('users', 0)} | {first.get('token', 0)} | {wrong} | "
        f"{k - 1} users, 1 token |",
        f"| 200 concurrent, one uncached address | 1 | {same} | {second.get('token', 0) - first.get('token', 0)} | "
        f"{wrong_at_once} | 1 users, 0 token |",
    ])


def idp_cache_scale(tmp: Path, args) -> str:
    """The scale target's other half: the daemon with `--aliases` aliases in its database and as
    many IdP answers in its cache (the Keycloak stand-in seeded with that many users, each asked
    once), then the policy over that warm cache: RSS, and no IdP request in the measured runs."""
    n = args.aliases
    db = make_database(tmp / "idp-scale.db", args.k, extra_aliases=n - args.k)
    idp = KeycloakStandIn(n)
    server = daemon_server(tmp, "idp-scale", "daemon, keycloak stand-in, full cache", db, args.k,
                           keycloak_port=idp.port, uvloop="off")
    try:
        server.start()
        requests = recipient_requests(range(n))
        t0 = time.monotonic()
        wrong = ask_all(server, requests, list(range(n)), args.connections)
        filling = time.monotonic() - t0
        filled = idp.counts()
        rss_filled = server.status("VmRSS")
        server.idp = idp
        samples = [measure(server, SCENARIOS[0], requests, args) for _ in range(args.rounds)]
        peak = server.status("VmHWM")
    finally:
        server.stop()
        idp.stop()
    tps = [s.result.throughput for s in samples]
    p99s = [s.result.percentile(99) * 1000 for s in samples]
    cpu = statistics.median(s.result.server_cpu / max(1, s.result.completed) * 1e6 for s in samples)
    return "\n".join([
        f"IdP cache at scale: {n:,} aliases in the database and {n:,} users asked once through the policy "
        f"(Keycloak stand-in; filled in {filling:.0f} s, {filled.get('users', 0):,} users and "
        f"{filled.get('token', 0)} token requests, {wrong} unexpected replies).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| RSS with the cache filled | {rss_filled / 1024:.0f} MB | |",
        f"| peak RSS (VmHWM) after the runs below | {peak / 1024:.0f} MB | ≤ 150 MB |",
        f"| policy over the {n:,} cached addresses, 16 connections: req/s | {spread(tps, ',.0f')} | |",
        f"| p99 ms median (max) | {statistics.median(p99s):.2f} ({max(p99s):.2f}) | ≤ 5 ms |",
        f"| server CPU µs/req | {cpu:.0f} | |",
        f"| IdP requests in these runs | {sum(s.idp_requests or 0 for s in samples)} | 0 |",
    ])


def scale(tmp: Path, args) -> str:
    k = args.k
    db = make_database(tmp / "scale.db", k, extra_aliases=args.aliases - k)
    if args.scale_schema == "current":  # as `mailcloakctl init` leaves it: with the alias change log
        subprocess.run([sys.executable, "-m", "mailcloak.ctl", "--db", str(db), "init"], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
    with sqlite3.connect(db) as con:
        total = con.execute("SELECT count(*) FROM aliases").fetchone()[0]
    startups = []
    server = None
    for n in range(args.startups):
        server = daemon_server(tmp, f"scale{n}", "daemon (100k aliases)", db, k,
                               uvloop="on" if args.scale_uvloop else "off")
        server.start()
        startups.append(server.startup)
        rss_start = server.status("VmRSS")
        if n < args.startups - 1:
            server.stop()
    assert server is not None
    policy_reqs = policy_requests(k)
    map_reqs = socketmap_requests(k)
    visible: list[float] = []
    counter = iter(range(10**6))

    def changes(t_warm: float, t_end: float) -> None:
        """An alias change each second of the window; each one timed until the socketmap shows it."""
        client = SocketmapClient(server.socketmap_socket)
        at = t_warm + 0.3
        while at < t_end - 0.2:
            while time.monotonic() < at:
                time.sleep(0.005)
            n = next(counter)
            address = f"new{n}@d1.test"
            with sqlite3.connect(db) as con:
                con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, ?, ?)",
                            (address, "u1", "d1.test"))
            t0 = time.monotonic()
            while client.ask(address) != "OK u1@d1.test":
                if time.monotonic() - t0 > 10:
                    break
                time.sleep(0.01)
            visible.append(time.monotonic() - t0)
            at += 1.0
        client.close()

    rows: dict[tuple[str, str], list[Sample]] = {}
    for r in range(args.rounds):
        for scenario in (SCENARIOS[0], SCENARIOS[2]):
            requests = policy_reqs if scenario.kind == POLICY else map_reqs
            order = [("steady", None), ("alias change each second", changes)]
            if r % 2:
                order.reverse()
            for label, during in order:
                rows.setdefault((scenario.name, label), []).append(measure(server, scenario, requests, args, during))
    peak = server.status("VmHWM")
    server.stop()
    lines = [
        f"Scale: {total:,} aliases, {k} static users, static provider, "
        f"{'schema as mailcloakctl init leaves it' if args.scale_schema == 'current' else 'the Go schema'}.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| start-up to \"ready\" ({args.startups} starts) | {spread(startups, '.2f')} s | ≤ 2 s |",
        f"| RSS after start | {rss_start / 1024:.0f} MB | |",
        f"| peak RSS (VmHWM) after the load and {len(visible)} reloads | {peak / 1024:.0f} MB | ≤ 150 MB |",
        f"| alias change visible in the socketmap ({len(visible)} changes, under load) | "
        f"{spread(visible, '.2f')} s | ≤ 2 s |",
        "",
        "| scenario | database | req/s median (min–max) | p50 ms | p99 ms median (max) | server CPU µs/req |",
        "|---|---|---|---|---|---|",
    ]
    for (name, label), samples in rows.items():
        tps = [s.result.throughput for s in samples]
        p50 = statistics.median(s.result.percentile(50) * 1000 for s in samples)
        p99s = [s.result.percentile(99) * 1000 for s in samples]
        cpu = statistics.median(s.result.server_cpu / max(1, s.result.completed) * 1e6 for s in samples)
        lines.append(f"| {name} | {label} | {spread(tps, ',.0f')} | {p50:.2f} | "
                     f"{statistics.median(p99s):.2f} ({max(p99s):.2f}) | {cpu:.0f} |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.7, help="unmeasured seconds before each run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--k", type=int, default=1000, help="distinct users/addresses")
    parser.add_argument("--aliases", type=int, default=100_000, help="aliases in the scale database")
    parser.add_argument("--startups", type=int, default=3)
    parser.add_argument("--before", metavar="DIR", help="also run the daemon from DIR/mailcloak (a copy "
                        "of the package before a change), labelled 'before'")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                        help="leave out the rows on uvloop (run when uvloop is installed)")
    parser.add_argument("--no-keycloak", action="store_true", help="skip the Keycloak stand-in daemon")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--scale-only", action="store_true")
    parser.add_argument("--scale-uvloop", action="store_true", help="run the scale checks on uvloop")
    parser.add_argument("--scale-schema", choices=["current", "go"], default="current",
                        help="the scale database migrated by mailcloakctl init (reloads read only changed "
                             "aliases), or left with the Go schema (each reload reads every row)")
    parser.add_argument("--scenarios", default="", help="comma-separated indexes of SCENARIOS to run")
    args = parser.parse_args()

    print(f"# mailcloak bench, {time.strftime('%Y-%m-%d')}; {machine()}")
    print(f"# {args.rounds} rounds × {args.duration:g} s measured (+{args.warmup:g} s warm-up), "
          f"{args.connections} connections from {args.processes} generator processes, K={args.k}\n")
    tmp = Path(tempfile.mkdtemp(prefix="mailcloak-bench-"))
    os.chmod(tmp, 0o755)
    servers: list[Server] = []
    notes: list[str] = []
    try:
        if not args.scale_only:
            db = make_database(tmp / "state.db", args.k)
            servers.append(floor_server(tmp))
            servers.append(daemon_server(tmp, "static", "daemon, static", db, args.k, uvloop="off"))
            if args.before:
                servers.append(daemon_server(tmp, "before", "daemon, static, before", db, args.k,
                                             cwd=Path(args.before).resolve(), uvloop="off"))
            if args.uvloop:
                try:
                    import uvloop  # noqa: F401
                except ImportError:
                    notes.append("uvloop not installed (pip install 'mailcloak[perf]'): no uvloop rows")
                    args.uvloop = False
            if args.uvloop:
                servers.append(floor_server(tmp, uvloop=True))
                servers.append(daemon_server(tmp, "static-uvloop", "daemon, static, uvloop", db, args.k,
                                             uvloop="on"))
            if not args.no_keycloak:
                try:
                    idp = KeycloakStandIn(args.k)
                    server = daemon_server(tmp, "keycloak", "daemon, keycloak stand-in", db, args.k,
                                           keycloak_port=idp.port, uvloop="off")
                    server.idp = idp
                    servers.append(server)
                except Exception as exc:  # noqa: BLE001 - reported, the rest runs
                    notes.append(f"Keycloak stand-in not run: {exc}")
            for server in servers:
                server.start()
            policy_reqs = policy_requests(args.k)
            map_reqs = socketmap_requests(args.k)
            unique_reqs = socketmap_unique_requests(args.k)
            scenarios = SCENARIOS
            if args.scenarios:
                scenarios = [SCENARIOS[int(i)] for i in args.scenarios.split(",")]
            # One unmeasured pass over the whole request set: every IdP answer cached.
            for server in servers:
                warm(server, policy_reqs, map_reqs)
            results: dict[tuple[str, str], list[Sample]] = {}
            for r in range(args.rounds):
                order = servers[r % len(servers):] + servers[:r % len(servers)]
                for scenario in scenarios:
                    reqs = (policy_reqs if scenario.kind == POLICY else
                            unique_reqs if "new" in scenario.name else map_reqs)
                    for server in order:
                        sample = measure(server, scenario, reqs, args)
                        results.setdefault((scenario.name, server.label), []).append(sample)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
            print(table(results, servers, args))
            print()
            print("| server | start-up to ready | peak RSS (VmHWM) |")
            print("|---|---|---|")
            for server in servers:
                print(f"| {server.label} | {server.startup:.2f} s | {server.status('VmHWM') / 1024:.0f} MB |")
            for note in notes:
                print(f"\nNote: {note}")
            print()
        if not args.scale_only and not args.no_keycloak:
            print(idp_requests(tmp, args))
            print()
        if not args.no_scale:
            print(scale(tmp, args))
            if not args.no_keycloak:
                print()
                print(idp_cache_scale(tmp, args))
    finally:
        for server in servers:
            server.stop()
            if server.idp:
                server.idp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
