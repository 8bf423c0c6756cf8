"""How many logins per second POST /dovecot/passdb sustains, with and without the verification cache.

Starts the daemon as a process (static IdP, a Go-project database with app "Mailer") on a free
loopback port with a shared secret, then keeps `--concurrency` keep-alive connections busy for
`--seconds` (Dovecot's auth-workers are such clients: one request at a time each), counting
answers. Modes:

- cached:   the right password every time; after the first, answers come from the cache;
- uncached: the same, with the cache turned off (`passdb.verify_cache_seconds: 0`):
            one argon2id verification per login;
- wrong:    a different wrong password per login from a different IP (never cached, never
            throttled): what a password-guessing client costs.
- policy:   policy latency (4 persistent connections, one request in flight each) on its own, then
            while 8 uncached logins (8 argon2id verifications at a time) run: the issue's "while 8
            argon2 verifications run, policy p99 ≤ 10 ms".

Usage: .venv/bin/python bench/passdb_logins.py [--seconds 10] [--concurrency 16] [--log-level info]
       [--modes cached,uncached,wrong,policy]
The client runs on the same machine and takes CPU from the daemon: read the figures as a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import GO_APP_PASSWORD, make_go_database, policy_request, write_config  # noqa: E402

SECRET = "bench-secret"

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(tmp: Path, cache: bool, log_level: str) -> tuple[subprocess.Popen, int]:
    db_dir = tmp / ("cache" if cache else "nocache")
    db_dir.mkdir()
    make_go_database(db_dir / "state.db")
    (db_dir / "secret").write_text(SECRET)
    port = free_port()
    config = write_config(db_dir, http={"listen": f"127.0.0.1:{port}",
                                        "shared_secret_file": str(db_dir / "secret")},
                          passdb={"verify_cache_seconds": 60 if cache else 0})
    log = open(db_dir / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mailcloak",
                             "--config", str(config), "--log-level", log_level],
                            stdout=log, stderr=log, cwd=REPO)
    import socket
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError((db_dir / "daemon.log").read_text())
        time.sleep(0.05)


async def load(port: int, mode: str, seconds: float, concurrency: int) -> tuple[int, list[float], dict]:
    url = f"http://127.0.0.1:{port}/dovecot/passdb"
    headers = {"Authorization": f"Bearer {SECRET}"}
    latencies: list[float] = []
    results: dict[str, int] = {}
    counter = [0]
    stop_at = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            counter[0] += 1
            n = counter[0]
            if mode == "wrong":
                form = {"user": "mailer", "password": f"wrong-{n}", "service": "smtp",
                        "remote_ip": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"}
            else:
                form = {"user": "mailer", "password": GO_APP_PASSWORD, "service": "smtp",
                        "remote_ip": "10.0.0.1"}
            start = time.perf_counter()
            async with session.post(url, data=form, headers=headers) as response:
                text = await response.text()
            latencies.append(time.perf_counter() - start)
            result = text.split("\n", 1)[0]
            results[result] = results.get(result, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # warm-up: one login (fills the cache in "cached" mode)
        async with session.post(url, data={"user": "mailer", "password": GO_APP_PASSWORD,
                                           "service": "smtp"}, headers=headers) as response:
            await response.text()
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return len(latencies), latencies, {"elapsed": elapsed, **results}


POLICY_REQUESTS = [  # rows 5, 2, 3 and 7 of SPEC §6 on the Go-project database
    policy_request(protocol_state="RCPT", sender="x@outside.example", recipient="alice@d1.test"),
    policy_request(protocol_state="RCPT", sender="x@outside.example", recipient="ghost@d1.test"),
    policy_request(protocol_state="RCPT", sender="x@outside.example", recipient="y@elsewhere.example"),
    policy_request(protocol_state="RCPT", sasl_method="PLAIN", sasl_username="Mailer",
                   sender="noreply@d1.test", recipient="y@elsewhere.example"),
]


async def policy_load(socket_path: str, seconds: float, connections: int = 4) -> list[float]:
    """Latencies of policy requests, closed loop on `connections` persistent connections."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        while time.monotonic() < stop_at:
            n += 1
            start = time.perf_counter()
            writer.write(POLICY_REQUESTS[n % len(POLICY_REQUESTS)])
            await reader.readuntil(b"\n\n")
            latencies.append(time.perf_counter() - start)
        writer.close()

    await asyncio.gather(*(worker(n) for n in range(connections)))
    return latencies


def percentiles(latencies: list[float]) -> str:
    latencies = sorted(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0
    return (f"p50 {statistics.median(latencies) * 1000:.2f} ms, p99 {p99:.2f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms ({len(latencies)} requests)")


async def policy_with_argon2(tmp: Path, port: int, seconds: float) -> None:
    socket_path = str(tmp / "nocache" / "policy.sock")
    alone = await policy_load(socket_path, seconds)
    logins = asyncio.ensure_future(load(port, "uncached", seconds + 1, 8))
    await asyncio.sleep(0.5)  # the 8 verifications under way
    during = await policy_load(socket_path, seconds)
    count, _latencies, info = await logins
    print(f"policy alone:                    {percentiles(alone)}")
    print(f"policy while 8 argon2 logins run: {percentiles(during)}; "
          f"{count / info['elapsed']:.1f} logins/s meanwhile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--modes", default="cached,uncached,wrong")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, concurrency {args.concurrency}, {args.seconds:.0f} s per mode, "
          f"daemon log level {args.log_level}")
    with tempfile.TemporaryDirectory(prefix="mailcloak-passdb-bench-") as tmp:
        for mode in args.modes.split(","):
            mode_dir = Path(tmp) / mode
            mode_dir.mkdir()
            proc, port = start_daemon(mode_dir, cache=(mode == "cached"), log_level=args.log_level)
            if mode == "policy":
                try:
                    asyncio.run(policy_with_argon2(mode_dir, port, args.seconds))
                finally:
                    proc.terminate()
                    proc.wait(10)
                continue
            try:
                count, latencies, info = asyncio.run(load(port, mode, args.seconds, args.concurrency))
            finally:
                proc.terminate()
                proc.wait(10)
            elapsed = info.pop("elapsed")
            latencies.sort()
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0
            decided = count - info.get("result=internal_failure", 0)
            print(f"{mode:9s} {decided / elapsed:8.1f} logins/s decided  ({count} answers in "
                  f"{elapsed:.1f} s; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; answers {info})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
