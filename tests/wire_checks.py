"""Byte-level checks of what the daemon writes on its sockets, and process figures (RSS).

Used by the hardening tests (fuzzing, reply injection, IdP faults, writes under load): they look
at raw reply bytes, never at a client's decoded view of them, so that an extra line, a stray CR or
a netstring whose declared length lies cannot hide behind a lenient parser.
"""

from __future__ import annotations

import re
import socket
import time

# One policy reply frame: `action=<text>` and the empty line; the text has no CR, LF or NUL and is
# never empty (an empty action is a permit to Postfix).
POLICY_FRAME = re.compile(rb"action=([^\r\n\x00]+)\n\n")
SOCKETMAP_STATUSES = (b"OK", b"NOTFOUND", b"TEMP", b"TIMEOUT", b"PERM")


class WireError(AssertionError):
    pass


def unix_socket(path: str, timeout: float = 5) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)        # blocking: a full accept backlog waits instead of failing (EAGAIN)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (ConnectionResetError counts as closed)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise WireError(f"peer sent more than {limit} bytes")


def split_policy_frames(data: bytes) -> list[bytes]:
    """The actions of a byte stream of policy replies; WireError unless it is frames and nothing
    else (no extra line, no partial frame, no CR/NUL)."""
    actions = []
    pos = 0
    while pos < len(data):
        match = POLICY_FRAME.match(data, pos)
        if match is None:
            raise WireError(f"not a clean policy frame at byte {pos}: {data[pos:pos + 80]!r}")
        actions.append(match.group(1))
        pos = match.end()
    return actions


def read_policy_frame(sock: socket.socket, buffer: bytearray) -> bytes:
    """One reply frame from `sock` (bytes beyond it stay in `buffer`); returns the action."""
    while b"\n\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"policy server closed the connection (pending {bytes(buffer)!r})")
        buffer += chunk
    end = buffer.index(b"\n\n") + 2
    frame = bytes(buffer[:end])
    del buffer[:end]
    actions = split_policy_frames(frame)
    if len(actions) != 1:
        raise WireError(f"expected one frame, got {frame!r}")
    return actions[0]


def parse_netstrings(data: bytes, *, complete: bool = True) -> tuple[list[bytes], bytes]:
    """Payloads of a byte stream of netstrings, checked strictly; the unparsed tail.

    WireError on anything that is not `<digits>:<payload>,` with the declared length, on a payload
    with CR, LF or NUL, and on a trailing partial netstring when `complete`.
    """
    payloads = []
    pos = 0
    while pos < len(data):
        colon = data.find(b":", pos)
        if colon < 0:
            break
        digits = data[pos:colon]
        if not digits.isdigit() or (len(digits) > 1 and digits.startswith(b"0")) or len(digits) > 7:
            raise WireError(f"bad netstring length at byte {pos}: {data[pos:pos + 40]!r}")
        length = int(digits)
        end = colon + 1 + length
        if end >= len(data):
            break
        if data[end:end + 1] != b",":
            raise WireError(f"netstring at byte {pos} does not end where its length says: "
                            f"{data[pos:end + 1][:120]!r}")
        payload = data[colon + 1:end]
        check_socketmap_payload(payload)
        payloads.append(payload)
        pos = end + 1
    tail = data[pos:]
    if complete and tail:
        raise WireError(f"trailing bytes after the last netstring: {tail[:80]!r}")
    return payloads, tail


def check_socketmap_payload(payload: bytes) -> None:
    for bad in (b"\r", b"\n", b"\x00"):
        if bad in payload:
            raise WireError(f"socketmap reply holds {bad!r}: {payload!r}")
    status, sep, data = payload.partition(b" ")
    if status not in SOCKETMAP_STATUSES or not sep:
        raise WireError(f"unknown socketmap status: {payload!r}")
    if status == b"OK":
        # one address: a comma or a space would make Postfix read several results
        if not data or b"," in data or b" " in data or b"\t" in data:
            raise WireError(f"OK answer is not exactly one address: {payload!r}")
        payload.decode("utf-8")  # Postfix logs and re-looks-up the answer: must be text


def read_netstring(sock: socket.socket, buffer: bytearray) -> bytes:
    """One reply from `sock`, checked; bytes beyond it stay in `buffer`."""
    while True:
        payloads, tail = parse_netstrings(bytes(buffer), complete=False)
        if payloads:
            first = payloads[0]
            consumed = len(b"%d:" % len(first)) + len(first) + 1
            del buffer[:consumed]
            return first
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"socketmap server closed the connection (pending {bytes(buffer)!r})")
        buffer += chunk


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line")


def log_problems(log: str) -> list[str]:
    """Lines of a daemon log that betray a crash or an unhandled error."""
    return [line for line in log.splitlines()
            if "Traceback" in line or "unexpected error" in line or "Task exception was never retrieved" in line
            or "Unhandled exception" in line or "Exception in callback" in line]


def figure(name: str, value) -> None:
    """Print a measured figure in one greppable line (`pytest -rP` shows it)."""
    print(f"FIGURE {name}: {value}", flush=True)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)
