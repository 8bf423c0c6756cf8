"""Profile the daemon under load with py-spy (`pip install py-spy`; not a project dependency).

    python bench/profile_daemon.py [policy|socketmap] [SECONDS] [--per-request] [--gil] [--uvloop]

Starts a static-provider daemon on the benchmark data, drives it with bench/loadgen.py and
samples it with `py-spy record --format raw` (`--gil`: only while it holds the GIL, which leaves
out time in system calls); prints the top functions by own and total samples.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import POLICY, SOCKETMAP, run_load  # noqa: E402
from run import daemon_server  # noqa: E402
from workload import make_database, policy_requests, socketmap_requests  # noqa: E402


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else POLICY
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    per_request = "--per-request" in sys.argv
    tmp = Path(tempfile.mkdtemp(prefix="mailcloak-profile-"))
    db = make_database(tmp / "state.db", 1000)
    server = daemon_server(tmp, "d", "daemon", db, 1000, uvloop="on" if "--uvloop" in sys.argv else "off").start()
    out = tmp / "stacks.txt"
    try:
        requests = policy_requests(1000) if kind == POLICY else socketmap_requests(1000)
        spy = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-d", str(int(seconds)),
                                "-r", "500", "-f", "raw", "-o", str(out), *(["--gil"] if "--gil" in sys.argv else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = run_load(server.socketmap_socket if kind == SOCKETMAP else server.policy_socket, kind,
                          requests, check=True, duration=seconds, warmup=0.5, per_request=per_request,
                          server_pid=server.pid)
        spy.wait()
        print(f"{result.throughput:,.0f} req/s, server CPU {result.server_cpu / result.completed * 1e6:.0f} µs/req")
    finally:
        server.stop()
    roots: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        roots[frames[0][:60] + " | " + (frames[1][:50] if len(frames) > 1 else "")] += n
        for frame in set(frames):
            total[frame] += n
    print(f"{samples} samples\n-- roots --")
    for frame, n in roots.most_common(8):
        print(f"{n / samples:6.1%}  {frame}")
    print("-- own --")
    for frame, n in own.most_common(30):
        print(f"{n / samples:6.1%}  {frame}")
    print("-- total --")
    for frame, n in total.most_common(45):
        print(f"{n / samples:6.1%}  {frame}")


if __name__ == "__main__":
    main()
