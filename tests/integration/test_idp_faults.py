"""Every IdP fault, through the daemon as a process, against the Keycloak stand-in (issue 7).

test_keycloak.py shows a hanging Keycloak answered in time and recovered from. Here each fault the
stand-in can play — connection refused, HTTP 500, a hang, an answer slower than the IdP timeout,
malformed JSON, a 50 MB body — is put to one daemon whose policy deadline (1 s) is shorter than
its IdP request timeout (2 s), the configuration where the deadline, not the IdP client, bounds
the answer. For each fault:

- every policy request for an uncached local recipient is answered `451 4.3.0 ...` (tempfail
  mode) before the client's timeout, the deadline plus a margin; they come in a concurrent burst
  and then one by one;
- a user answered before the fault and now past its cache TTL is still answered (stale-if-error);
- once the stand-in is healthy again the daemon answers correctly by itself (same process); a
  key whose IdP fetch was sent during the fault may wait for that fetch (at most the IdP
  timeout) before it is answered from the healthy IdP: the recovery figure includes that.

The answer latencies (max over the requests) and the daemon's RSS after the 50 MB body are
printed as FIGURE lines (`pytest -rP`). One case runs the `dunno` failure mode.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailcloak.policy.decision import IDP_TEMPFAIL
from standins.keycloak import KeycloakStandIn
from support import DaemonProcess, PolicyClient, make_go_database, write_config
from wire_checks import figure, log_problems, rss_kb

CLIENT_ID, CLIENT_SECRET = "mailcloak", "kc-secret-faults-9Qe"
DEADLINE = 1.0          # policy.request_deadline_seconds
IDP_TIMEOUT = 2.0       # idp.keycloak.request_timeout_seconds
CACHE_TTL = 1.0         # idp.keycloak.cache_ttl_seconds
MARGIN = 0.5            # what the client allows beyond the deadline
BURST = 8               # concurrent requests for uncached recipients
SERIAL = 2              # then one by one
FAULTS = ["refused", "500", "hang", "slow", "malformed", "huge"]
RCPT = dict(protocol_state="RCPT", sender="x@outside.example")
LOGIN = dict(protocol_state="MAIL", sasl_method="XOAUTH2", sasl_username="alice", sender="alice@d1.test")

_unique = itertools.count()


def fresh(domain: str = "d1.test") -> str:
    """A recipient nobody asked before: never in the daemon's cache."""
    return f"u{next(_unique)}-{time.monotonic_ns()}@{domain}"


@pytest.fixture(scope="module")
def standin():
    server = KeycloakStandIn(realm="mail")
    server.add_client(CLIENT_ID, CLIENT_SECRET)
    server.add_user("alice", "alice@d1.test")
    server.add_user("bob", "bob@d2.test")
    server.start()
    yield server
    server.close()


def daemon_config(tmp, standin, mode: str = "tempfail"):
    make_go_database(tmp / "state.db")
    return write_config(
        tmp,
        idp={"provider": "keycloak", "keycloak": {
            "base_url": standin.url, "realm": "mail", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "request_timeout_seconds": IDP_TIMEOUT,
            "connect_timeout_seconds": 0.5, "cache_ttl_seconds": CACHE_TTL}},
        policy={"idp_failure_mode": mode, "request_deadline_seconds": DEADLINE},
        daemon={"user": "", "log_level": "info", "shutdown_grace_seconds": 2},
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, standin):
    proc = DaemonProcess(daemon_config(tmp_path_factory.mktemp("faults"), standin)).start()
    yield proc
    proc.stop()
    assert not log_problems(proc.log()), log_problems(proc.log())
    assert CLIENT_SECRET not in proc.log()


def apply(standin, fault: str | None) -> None:
    if fault == "refused":
        standin.stop()
    elif fault is None:
        standin.clear_fault()
        if standin._runner is None:
            standin.start()
    elif fault == "slow":
        standin.set_fault("slow", delay=IDP_TIMEOUT + 1.0)
    else:
        standin.set_fault(fault)


def timed_ask(path: str, **attributes) -> tuple[str, float]:
    client = PolicyClient(path, timeout=DEADLINE + MARGIN)   # an answer past this fails the test
    try:
        started = time.monotonic()
        answer = client.ask(**attributes)
        return answer, time.monotonic() - started
    finally:
        client.close()


def recover(path: str, timeout: float = 15) -> float:
    """Seconds until the daemon answers from a healthy IdP again: an unknown recipient, a user
    never asked, and alice, whose lookups may still wait for a fetch sent during the fault (it
    ends at the latest with the IdP timeout)."""
    started = time.monotonic()
    while True:
        client = PolicyClient(path, timeout=DEADLINE + MARGIN)
        try:
            answers = (client.ask(**RCPT, recipient=fresh()), client.ask(**RCPT, recipient="bob@d2.test"),
                       client.ask(**RCPT, recipient="alice@d1.test"), client.ask(**LOGIN))
        finally:
            client.close()
        if answers[0].startswith("550 5.1.1") and answers[1:] == ("DUNNO",) * 3:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"no recovery: {answers}"
        time.sleep(0.1)


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_answered_in_time_stale_users_served_then_recovered(daemon, standin, fault):
    path = daemon.policy_socket
    apply(standin, None)
    recover(path)
    # alice cached by address (a recipient) and by username (a XOAUTH2 login) ...
    assert timed_ask(path, **RCPT, recipient="alice@d1.test")[0] == "DUNNO"
    assert timed_ask(path, **LOGIN)[0] == "DUNNO"
    time.sleep(CACHE_TTL + 0.2)                                # ... and both past their TTL
    rss_before = rss_kb(daemon.proc.pid)

    apply(standin, fault)
    try:
        with ThreadPoolExecutor(BURST) as pool:
            burst = list(pool.map(lambda _: timed_ask(path, **RCPT, recipient=fresh()), range(BURST)))
        serial = [timed_ask(path, **RCPT, recipient=fresh()) for _ in range(SERIAL)]
        stale = timed_ask(path, **RCPT, recipient="alice@d1.test")
        also_stale = timed_ask(path, **LOGIN)
        rss_during = rss_kb(daemon.proc.pid)
        if fault == "huge":  # one at a time, so that what is kept per request shows
            serial_before = rss_kb(daemon.proc.pid)
            for _ in range(10):
                assert timed_ask(path, **RCPT, recipient=fresh())[0] == IDP_TEMPFAIL
            serial_after = rss_kb(daemon.proc.pid)
    finally:
        apply(standin, None)
    seconds = recover(path)

    answers = burst + serial
    assert [a for a, _ in answers] == [IDP_TEMPFAIL] * len(answers)
    latency = max(t for _, t in answers)
    assert latency < DEADLINE + MARGIN
    assert stale[0] == "DUNNO", stale            # stale-if-error: a known user is still a user
    assert also_stale[0] == "DUNNO", also_stale
    figure(f"idp fault {fault}: max latency of {len(answers)} uncached-recipient answers (451)",
           f"{latency * 1000:.0f} ms")
    figure(f"idp fault {fault}: latency of a stale cached user (DUNNO)",
           f"{max(stale[1], also_stale[1]) * 1000:.0f} ms")
    figure(f"idp fault {fault}: recovery after the stand-in was healthy again", f"{seconds * 1000:.0f} ms")
    if fault == "huge":
        figure(f"daemon RSS before / after {len(answers)} answers of 50 MB ({BURST} at once)",
               f"{rss_before / 1024:.1f} MiB / {rss_during / 1024:.1f} MiB")
        figure("daemon RSS before / after 10 more 50 MB answers one at a time",
               f"{serial_before / 1024:.1f} MiB / {serial_after / 1024:.1f} MiB")
        # bodies are read up to 4 MiB, never whole, and not kept once refused
        assert rss_during - rss_before < 30 * 1024
        assert serial_after - serial_before < 16 * 1024
    assert daemon.proc.poll() is None


def test_dunno_mode_answers_dunno_in_time(tmp_path, standin):
    daemon = DaemonProcess(daemon_config(tmp_path, standin, mode="dunno")).start()
    try:
        apply(standin, "500")
        try:
            answer, latency = timed_ask(daemon.policy_socket, **RCPT, recipient=fresh())
            assert answer == "DUNNO"
            # dunno never lifts the sender rules: an unauthenticated local sender is still refused
            answer2, _ = timed_ask(daemon.policy_socket, protocol_state="RCPT", sender="alice@d1.test",
                                   recipient=fresh())
            assert answer2 == "553 5.7.1 Sending from local domains requires authentication"
            apply(standin, "hang")
            answer3, latency3 = timed_ask(daemon.policy_socket, **RCPT, recipient=fresh())
            assert answer3 == "DUNNO"
        finally:
            apply(standin, None)
        figure("idp_failure_mode dunno: latency under 500 / under hang",
               f"{latency * 1000:.0f} ms / {latency3 * 1000:.0f} ms")
        recover(daemon.policy_socket)
    finally:
        daemon.stop()
    assert not log_problems(daemon.log())
