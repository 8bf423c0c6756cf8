"""Load generator: closed-loop clients in several processes, each driving its connections with epoll.

Every connection has at most one request in flight (as Postfix's smtpd and cleanup do): it sends,
waits for the whole reply, records the latency, checks the reply against the expected bytes
(when asked), and sends the next one. `per_request=True` opens a new connection for each request
and closes it after the reply (Postfix never does that for the policy service, but a misconfigured
`max_use`/`max_idle` comes close).

Timing uses CLOCK_MONOTONIC, which all processes share, so the parent can sample the server's CPU
time at the same instants (`t_warm`, `t_end`) the workers count between.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import socket
import time
from array import array
from dataclasses import dataclass, field

POLICY = "policy"
SOCKETMAP = "socketmap"


@dataclass
class WorkerResult:
    completed: int = 0          # replies received in the measured window
    errors: int = 0             # connections closed by the server, connect failures
    mismatches: int = 0         # replies other than the expected ones (daemon runs only)
    first_mismatch: str = ""
    latencies: array = field(default_factory=lambda: array("d"))  # seconds, measured window
    cpu_seconds: float = 0.0    # this worker's own CPU time during the measured window


def _reply_complete(kind: str, buf: bytes) -> bool:
    if kind == POLICY:
        return buf.endswith(b"\n\n")
    colon = buf.find(b":")
    return colon > 0 and len(buf) >= colon + int(buf[:colon]) + 2


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    return sock


def _worker(path: str, kind: str, requests: list[tuple[bytes, bytes]], check: bool, nconn: int,
            offset: int, per_request: bool, t_start: float, t_warm: float, t_end: float,
            conn) -> None:
    result = WorkerResult()
    lat = result.latencies
    n = len(requests)
    ep = select.epoll()
    # fd -> [sock, buffer, sent_at, request index]
    state: dict[int, list] = {}
    while time.monotonic() < t_start:
        time.sleep(0.001)

    def send(slot: list) -> None:
        slot[3] = (slot[3] + 1) % n
        slot[1] = b""
        slot[2] = time.monotonic()
        slot[0].sendall(requests[slot[3]][0])

    def open_slot(index: int) -> list | None:
        try:
            sock = _connect(path)
        except OSError:
            result.errors += 1
            return None
        slot = [sock, b"", 0.0, index]
        state[sock.fileno()] = slot
        ep.register(sock.fileno(), select.EPOLLIN)
        return slot

    for c in range(nconn):
        slot = open_slot((offset + c * 7919) % n)
        if slot is not None:
            send(slot)
    cpu_warm = None
    warm = False
    while True:
        now = time.monotonic()
        if not warm and now >= t_warm:
            warm = True
            cpu_warm = time.process_time()
        if now >= t_end:
            break
        for fd, _ in ep.poll(0.05):
            slot = state[fd]
            sock = slot[0]
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                result.errors += 1
                ep.unregister(fd)
                del state[fd]
                sock.close()
                slot = open_slot(slot[3])
                if slot is not None:
                    send(slot)
                continue
            buf = slot[1] + data
            if not _reply_complete(kind, buf):
                slot[1] = buf
                continue
            done = time.monotonic()
            if slot[2] >= t_warm and done <= t_end:
                result.completed += 1
                lat.append(done - slot[2])
            if check and buf != requests[slot[3]][1]:
                result.mismatches += 1
                if not result.first_mismatch:
                    result.first_mismatch = f"sent {requests[slot[3]][0]!r} got {buf!r} " \
                                            f"expected {requests[slot[3]][1]!r}"
            if per_request:
                ep.unregister(fd)
                del state[fd]
                sock.close()
                slot = open_slot(slot[3])
                if slot is None:
                    continue
            send(slot)
    result.cpu_seconds = time.process_time() - (cpu_warm if cpu_warm is not None else 0.0)
    for slot in state.values():
        slot[0].close()
    conn.send(result)
    conn.close()


@dataclass
class LoadResult:
    completed: int
    window: float
    errors: int
    mismatches: int
    first_mismatch: str
    latencies: list[float]
    generator_cpu: float
    server_cpu: float

    @property
    def throughput(self) -> float:
        return self.completed / self.window

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        index = min(len(self.latencies) - 1, int(round(p / 100 * (len(self.latencies) - 1))))
        return self.latencies[index]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(path: str, kind: str, requests: list[tuple[bytes, bytes]], *, check: bool,
             connections: int = 16, processes: int = 2, duration: float = 3.0, warmup: float = 0.7,
             per_request: bool = False, server_pid: int | None = None,
             during=None) -> LoadResult:
    """Drive `path` for warmup + duration seconds; `during(t_warm, t_end)` runs in the parent
    (for example to change the database while the load runs)."""
    ctx = mp.get_context("fork")
    t_start = time.monotonic() + 0.3
    t_warm = t_start + warmup
    t_end = t_warm + duration
    workers = []
    per_proc = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    for i, nconn in enumerate(per_proc):
        if nconn == 0:
            continue
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(path, kind, requests, check, nconn, i * 104729, per_request,
                                              t_start, t_warm, t_end, child_end), daemon=True)
        p.start()
        child_end.close()
        workers.append((p, parent_end))
    while time.monotonic() < t_warm:
        time.sleep(0.002)
    cpu0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    if during is not None:
        during(t_warm, t_end)
    while time.monotonic() < t_end:
        time.sleep(0.002)
    cpu1 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    results = []
    for p, parent_end in workers:
        results.append(parent_end.recv())
        p.join(10)
    latencies = sorted(x for r in results for x in r.latencies)
    first = next((r.first_mismatch for r in results if r.first_mismatch), "")
    return LoadResult(
        completed=sum(r.completed for r in results), window=t_end - t_warm,
        errors=sum(r.errors for r in results), mismatches=sum(r.mismatches for r in results),
        first_mismatch=first, latencies=latencies,
        generator_cpu=sum(r.cpu_seconds for r in results), server_cpu=cpu1 - cpu0,
    )
