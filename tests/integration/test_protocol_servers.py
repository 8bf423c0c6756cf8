"""Policy and socketmap servers over real unix sockets: reuse, concurrency, bad input, slow peers."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from stores import both_store_kinds  # noqa: F401 - the `daemon` tests run on both stores
from support import DaemonProcess, PolicyClient, SocketmapClient, policy_request, write_config

RCPT_OK = dict(protocol_state="RCPT", sender="x@outside.example", recipient="alice@d1.test")
RCPT_UNKNOWN = dict(protocol_state="RCPT", sender="x@outside.example", recipient="ghost@d1.test")


def raw(path: str, timeout: float = 5) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_many_requests_on_one_policy_connection(daemon):
    client = PolicyClient(daemon.policy_socket)
    for i in range(500):
        expected = "DUNNO" if i % 2 else "550 5.1.1 No such user"
        assert client.ask(**(RCPT_OK if i % 2 else RCPT_UNKNOWN)) == expected
    client.close()


def test_pipelined_policy_requests_answered_in_order(daemon):
    sock = raw(daemon.policy_socket)
    sock.sendall(policy_request(**RCPT_UNKNOWN) + policy_request(**RCPT_OK) + policy_request(**RCPT_UNKNOWN))
    data = b""
    while data.count(b"\n\n") < 3:
        data += sock.recv(4096)
    assert data == (b"action=550 5.1.1 No such user\n\naction=DUNNO\n\n"
                    b"action=550 5.1.1 No such user\n\n")
    sock.close()


def test_many_concurrent_connections(daemon):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            policy = PolicyClient(daemon.policy_socket)
            sm = SocketmapClient(daemon.socketmap_socket)
            for _ in range(50):
                assert policy.ask(**RCPT_OK) == "DUNNO"
                assert sm.ask(f"Alias1+w{n}@d1.test") == f"OK alice+w{n}@d1.test"
            policy.close()
            sm.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


@pytest.mark.parametrize("payload, expect", [
    (b"no equals sign here\n\n", b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy request\n\n"),
    (b"request=something_else\nprotocol_state=RCPT\n\n",
     b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy request\n\n"),
    (b"request=smtpd_access_policy\nsender=\xff\xfe@x\n\n",
     b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy request\n\n"),
    (b"request=smtpd_access_policy\nsender=a\x00b@x\n\n",
     b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy request\n\n"),
])
def test_malformed_policy_request_answered_and_connection_kept(daemon, payload, expect):
    sock = raw(daemon.policy_socket)
    sock.sendall(payload)
    data = b""
    while not data.endswith(b"\n\n"):
        data += sock.recv(4096)
    assert data == expect
    sock.sendall(policy_request(**RCPT_OK))
    assert sock.recv(4096) == b"action=DUNNO\n\n"
    sock.close()


@pytest.mark.parametrize("payload", [
    b"request=smtpd_access_policy\nsender=" + b"a" * 1_000_000 + b"\n\n",   # a 1 MB line
    b"".join(b"x%d=y\n" % i for i in range(100_000)) + b"\n",            # 100 000 attributes
    b"request=smtpd_access_policy\nsender=x@y",                           # truncated, then EOF
])
def test_oversized_or_truncated_policy_input_closes_only_that_connection(daemon, payload):
    good = PolicyClient(daemon.policy_socket)
    bad = raw(daemon.policy_socket)
    try:
        bad.sendall(payload)
        bad.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon hung up mid-send: that is the expected outcome too
    try:
        assert b"action=" not in read_until_closed(bad)
    except ConnectionResetError:
        pass
    bad.close()
    assert good.ask(**RCPT_OK) == "DUNNO"
    good.close()
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("payload", [
    b"1000000000000:alias x,",   # a length of 10^12
    b"12x:alias x@y,",           # non-digit length
    b"5:alias;",                 # missing comma
    b"05:alias,",                # leading zero
    b"abc",                      # no length at all
])
def test_malformed_netstrings_close_only_that_connection(daemon, payload):
    good = SocketmapClient(daemon.socketmap_socket)
    bad = raw(daemon.socketmap_socket)
    bad.sendall(payload)
    assert read_until_closed(bad) == b""
    bad.close()
    assert good.ask("alias1@d1.test") == "OK alice@d1.test"
    good.close()


def test_socketmap_unknown_map_and_binary_keys(daemon):
    sm = SocketmapClient(daemon.socketmap_socket)
    assert sm.ask("alias1@d1.test", map_name="nosuchmap").startswith("PERM ")
    key = b"alias \xff\xfe@d1.test"  # not UTF-8
    sm.sock.sendall(b"%d:%s," % (len(key), key))
    assert sm.read_reply() == "NOTFOUND "
    assert sm.ask("alias1@d1.test") == "OK alice@d1.test"
    sm.close()


def test_socketmap_many_requests_in_one_write(daemon):
    sock = raw(daemon.socketmap_socket)
    keys = [b"alias alias1@d1.test", b"alias off@d1.test", b"alias d1.test", b"alias sales@d2.test"]
    sock.sendall(b"".join(b"%d:%s," % (len(k), k) for k in keys))
    expected = [b"OK alice@d1.test", b"NOTFOUND ", b"NOTFOUND ", b"OK bob@d2.test"]
    want = b"".join(b"%d:%s," % (len(e), e) for e in expected)
    data = b""
    while len(data) < len(want):
        data += sock.recv(4096)
    assert data == want
    sock.close()


@pytest.fixture
def impatient_daemon(tmp_path, go_db):
    config = write_config(tmp_path, sockets={"idle_timeout_seconds": 1, "request_timeout_seconds": 1,
                                             "max_connections": 4})
    proc = DaemonProcess(config).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("which", ["policy", "socketmap"])
def test_idle_connection_closed_after_idle_timeout(impatient_daemon, which):
    sock = raw(getattr(impatient_daemon, f"{which}_socket"), timeout=10)
    assert read_until_closed(sock) == b""  # closed by the daemon, without a byte sent
    sock.close()


@pytest.mark.parametrize("which, first", [("policy", b"request=smtpd_access_policy\n"),
                                          ("socketmap", b"20:alias ")])
def test_byte_a_second_client_cut_off(impatient_daemon, which, first):
    sock = raw(getattr(impatient_daemon, f"{which}_socket"), timeout=10)
    sock.sendall(first)
    closed = False
    for _ in range(8):  # trickle well past the 1 s request timeout
        time.sleep(0.4)
        try:
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    if not closed:
        sock.settimeout(5)
        assert read_until_closed(sock) == b""
    sock.close()


def test_connection_cap_refuses_extra_connections_and_logs_once(impatient_daemon):
    held = [PolicyClient(impatient_daemon.policy_socket) for _ in range(4)]
    for client in held:
        assert client.ask(**RCPT_OK) == "DUNNO"
    extra = [raw(impatient_daemon.policy_socket) for _ in range(3)]
    for sock in extra:
        assert read_until_closed(sock) == b""
        sock.close()
    assert impatient_daemon.log().count("max_connections cap") == 1
    held.pop().close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert PolicyClient(impatient_daemon.policy_socket).ask(**RCPT_OK) == "DUNNO"
            break
        except (ConnectionError, AssertionError):
            time.sleep(0.1)
    else:
        pytest.fail("no connection accepted after one closed")
    for client in held:
        client.close()
