"""App-password rules, the verification cache and the failure throttle (mailcloak.apps_auth).

Most tests use a fake verifier ("fake$<password>" hashes) that counts its calls, a fake clock and
a fake sleep, so they run in milliseconds and can tell whether argon2 would have run.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from mailcloak.apps_auth import (
    SENDING_SERVICES,
    AppAuthenticator,
    FailureThrottle,
    Result,
    VerificationCache,
)
from mailcloak.passwords import hash_secret, verify_secret
from mailcloak.store.model import App, AppSender, Rows, Snapshot

PASSWORD = "right-password"


class FakeVerifier:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, stored: str, password: str) -> bool:
        self.calls.append((stored, password))
        self.threads.append(threading.current_thread())
        return stored == "fake$" + password


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def app(app_id="Mailer", password=PASSWORD, enabled=True, updated_at=1700000000) -> App:
    return App(app_id, "fake$" + password, enabled, updated_at,
               (AppSender("noreply@d1.test", True),))


def snapshot(*apps: App) -> Snapshot:
    return Snapshot.from_rows(Rows(apps=apps))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def verifier():
    return FakeVerifier()


@pytest.fixture
def sleep():
    return FakeSleep()


@pytest.fixture
async def auth(verifier, clock, sleep):
    authenticator = AppAuthenticator(
        verify=verifier, cache=VerificationCache(ttl=60, clock=clock),
        throttle=FailureThrottle(clock=clock), sleep=sleep, dummy_hash="fake$dummy-never-matches")
    yield authenticator
    await authenticator.close()


# --- the rules table --------------------------------------------------------------------------

SERVICES = ["smtp", "submission", "SMTP", "Submission", "imap", "pop3", "sieve", "managesieve",
            "doveadm", "lmtp", "", "smtps"]


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("right_password", [True, False])
async def test_rules_table(auth, verifier, service, enabled, right_password):
    snap = snapshot(app(enabled=enabled))
    password = PASSWORD if right_password else "wrong"
    outcome = await auth.authenticate(snap, "mailer", password, service, "192.0.2.1")
    sending = service.lower() in SENDING_SERVICES
    refused = not enabled or not sending
    if refused:
        # Whatever the password: the answer cannot be used to probe it.
        expected = Result.USER_DISABLED
    elif not right_password:
        expected = Result.PASSWORD_MISMATCH
    else:
        expected = Result.OK
    assert outcome.result is expected, outcome
    # Every branch paid exactly one (fake) argon2 verification, whatever the answer; a refused
    # attempt never tried the app's own hash.
    assert len(verifier.calls) == 1
    assert (verifier.calls[0][0] == "fake$dummy-never-matches") is refused
    if expected is Result.OK:
        assert outcome.app_id == "Mailer"
    if expected is Result.USER_DISABLED and enabled:
        assert "sending" in outcome.reason


@pytest.mark.parametrize("service", ["smtp", "imap"])
async def test_unknown_login_costs_one_verification_against_the_dummy_hash(auth, verifier, service):
    outcome = await auth.authenticate(snapshot(app()), "stranger", PASSWORD, service, "192.0.2.1")
    assert outcome.result is Result.USER_UNKNOWN
    assert verifier.calls == [("fake$dummy-never-matches", PASSWORD)]


async def test_unknown_login_with_the_password_of_another_app_is_unknown(auth, verifier):
    outcome = await auth.authenticate(snapshot(app()), "mailer2", PASSWORD, "smtp")
    assert outcome.result is Result.USER_UNKNOWN


async def test_app_ids_match_case_insensitively(auth):
    for login in ("mailer", "MAILER", "Mailer", "mAiLeR"):
        outcome = await auth.authenticate(snapshot(app()), login, PASSWORD, "smtp")
        assert outcome.result is Result.OK
        assert outcome.app_id == "Mailer"


async def test_no_database_state_is_an_internal_failure(auth, verifier):
    outcome = await auth.authenticate(None, "mailer", PASSWORD, "smtp")
    assert outcome.result is Result.INTERNAL_FAILURE
    assert verifier.calls == []


async def test_verification_runs_off_the_event_loop_thread(auth, verifier):
    await auth.authenticate(snapshot(app()), "mailer", PASSWORD, "smtp")
    assert verifier.threads and verifier.threads[0] is not threading.main_thread()
    assert verifier.threads[0].name.startswith("argon2")


# --- the verification cache -------------------------------------------------------------------

async def test_cache_hit_skips_argon2(auth, verifier):
    snap = snapshot(app())
    first = await auth.authenticate(snap, "mailer", PASSWORD, "smtp")
    second = await auth.authenticate(snap, "MAILER", PASSWORD, "submission")
    third = await auth.authenticate(snap, "mailer", PASSWORD, "smtp")
    assert [o.result for o in (first, second, third)] == [Result.OK] * 3
    assert (first.cached, second.cached, third.cached) == (False, True, True)
    assert len(verifier.calls) == 1


async def test_a_cached_success_does_not_skip_the_service_rule(auth, verifier):
    snap = snapshot(app())
    await auth.authenticate(snap, "mailer", PASSWORD, "smtp")
    outcome = await auth.authenticate(snap, "mailer", PASSWORD, "imap")
    assert outcome.result is Result.USER_DISABLED
    assert not outcome.cached
    assert verifier.calls[1][0] == "fake$dummy-never-matches"


async def test_failures_are_never_cached(auth, verifier):
    snap = snapshot(app())
    for _ in range(3):
        outcome = await auth.authenticate(snap, "mailer", "wrong", "smtp", "192.0.2.9")
        assert outcome.result is Result.PASSWORD_MISMATCH
    assert len(verifier.calls) == 3


async def test_cache_expires_after_its_ttl(auth, verifier, clock):
    snap = snapshot(app())
    await auth.authenticate(snap, "mailer", PASSWORD, "smtp")
    clock.now += 59
    assert (await auth.authenticate(snap, "mailer", PASSWORD, "smtp")).cached
    clock.now += 2
    assert not (await auth.authenticate(snap, "mailer", PASSWORD, "smtp")).cached
    assert len(verifier.calls) == 2


@pytest.mark.parametrize("changed", [
    app(updated_at=1700000001),                   # row touched (any mailcloakctl change)
    app(enabled=False),                           # disabled
    app(password="new-password"),                 # re-keyed: the old password no longer matches
])
async def test_cache_entry_is_dropped_when_the_app_row_changes(auth, verifier, changed):
    await auth.authenticate(snapshot(app()), "mailer", PASSWORD, "smtp")
    outcome = await auth.authenticate(snapshot(changed), "mailer", PASSWORD, "smtp")
    assert not outcome.cached
    assert len(verifier.calls) == 2
    if not changed.enabled:
        assert outcome.result is Result.USER_DISABLED
    elif changed.secret_hash != app().secret_hash:
        assert outcome.result is Result.PASSWORD_MISMATCH
    else:
        assert outcome.result is Result.OK


async def test_cache_does_not_answer_for_a_deleted_app(auth, verifier):
    await auth.authenticate(snapshot(app()), "mailer", PASSWORD, "smtp")
    outcome = await auth.authenticate(snapshot(), "mailer", PASSWORD, "smtp")
    assert outcome.result is Result.USER_UNKNOWN


def test_cache_keys_do_not_reveal_the_password(clock):
    cache = VerificationCache(ttl=60, clock=clock)
    row = app()
    cache.remember(row, PASSWORD)
    keys = list(cache._cache.keys())
    assert len(keys) == 1 and isinstance(keys[0], bytes) and len(keys[0]) == 32
    assert PASSWORD.encode() not in keys[0]
    # Another process (another random key) cannot reproduce the key.
    other = VerificationCache(ttl=60, clock=clock)
    assert other._digest(row, PASSWORD) != keys[0]
    assert cache.hit(row, PASSWORD) and not cache.hit(row, "wrong")


def test_cache_can_be_turned_off(clock):
    cache = VerificationCache(ttl=0, clock=clock)
    cache.remember(app(), PASSWORD)
    assert not cache.hit(app(), PASSWORD)
    assert len(cache) == 0


def test_cache_is_bounded(clock):
    cache = VerificationCache(ttl=60, maxsize=5, clock=clock)
    for i in range(50):
        cache.remember(app(app_id=f"app{i}"), PASSWORD)
    assert len(cache) == 5


# --- the throttle ------------------------------------------------------------------------------

def test_throttle_delay_grows_and_is_capped(clock):
    throttle = FailureThrottle(free_failures=3, base_delay=0.5, max_delay=5.0, clock=clock)
    delays = []
    for _ in range(10):
        throttle.record_failure("Mailer", "192.0.2.1")
        delays.append(throttle.delay("mailer", "192.0.2.1"))
    assert delays == [0, 0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert throttle.delay("mailer", "192.0.2.2") == 0        # another IP is not affected
    assert throttle.delay("other", "192.0.2.1") == 0         # another login is not affected


def test_throttle_forgets_after_a_quiet_period(clock):
    throttle = FailureThrottle(forget_after=900, clock=clock)
    for _ in range(6):
        throttle.record_failure("mailer", "192.0.2.1")
    assert throttle.delay("mailer", "192.0.2.1") > 0
    clock.now += 901
    assert throttle.delay("mailer", "192.0.2.1") == 0
    assert len(throttle) == 0


def test_throttle_memory_is_bounded(clock):
    throttle = FailureThrottle(max_entries=100, clock=clock)
    for i in range(10_000):
        throttle.record_failure(f"guess{i}", "198.51.100.7")
    assert len(throttle) == 100
    assert throttle.failures("guess9999", "198.51.100.7") == 1   # the newest are kept
    assert throttle.failures("guess0", "198.51.100.7") == 0


async def test_repeated_failures_are_delayed_logged_and_reset_by_a_success(auth, sleep, caplog):
    snap = snapshot(app())
    caplog.set_level(logging.INFO, logger="mailcloak.apps_auth")
    for _ in range(7):
        outcome = await auth.authenticate(snap, "mailer", "wrong", "smtp", "203.0.113.5")
        assert outcome.result is Result.PASSWORD_MISMATCH
    assert sleep.delays == [0.5, 1.0, 2.0, 4.0]              # attempts 4..7 waited, growing
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "203.0.113.5" in warnings[-1].getMessage()
    assert "7 failures" in warnings[-1].getMessage()
    assert all("wrong" not in r.getMessage() for r in caplog.records)   # never the password

    outcome = await auth.authenticate(snap, "mailer", PASSWORD, "smtp", "203.0.113.5")
    assert outcome.result is Result.OK
    assert outcome.delayed == 5.0                             # the right password waited too
    await auth.authenticate(snap, "mailer", "wrong", "smtp", "203.0.113.5")
    assert sleep.delays[-1] == 5.0 and len(sleep.delays) == 5  # after the reset: no new wait


async def test_unknown_logins_are_throttled_too(auth, sleep):
    for _ in range(5):
        outcome = await auth.authenticate(snapshot(), "ghost", "x", "smtp", "203.0.113.6")
        assert outcome.result is Result.USER_UNKNOWN
    assert sleep.delays == [0.5, 1.0]


async def test_refusals_with_the_right_password_are_not_counted_as_guesses(auth, sleep):
    snap = snapshot(app())
    for _ in range(6):
        await auth.authenticate(snap, "mailer", PASSWORD, "imap", "203.0.113.7")
    assert sleep.delays == []


# --- overload ----------------------------------------------------------------------------------

async def test_too_many_pending_verifications_answer_a_temporary_failure(clock, sleep):
    release = threading.Event()

    def slow_verify(stored: str, password: str) -> bool:
        release.wait(10)
        return stored == "fake$" + password

    authenticator = AppAuthenticator(verify=slow_verify, cache=VerificationCache(clock=clock),
                                     throttle=FailureThrottle(clock=clock), sleep=sleep,
                                     max_pending=2, workers=2, dummy_hash="fake$x")
    snap = snapshot(app())
    try:
        waiting = [asyncio.ensure_future(authenticator.authenticate(snap, "mailer", PASSWORD, "smtp"))
                   for _ in range(2)]
        await asyncio.sleep(0.05)
        busy = await authenticator.authenticate(snap, "mailer", PASSWORD, "smtp")
        assert busy.result is Result.INTERNAL_FAILURE and busy.reason == "busy"
        release.set()
        assert [o.result for o in await asyncio.gather(*waiting)] == [Result.OK, Result.OK]
    finally:
        release.set()
        await authenticator.close()


# --- the dummy hash, made while the daemon gets ready ------------------------------------------

class SlowDummy:
    """A dummy hash made in a thread that waits to be released, counting its makings."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        self.started.set()
        assert self.release.wait(10)
        return "fake$slow-dummy"


async def test_unknown_logins_before_the_dummy_hash_is_made_wait_for_it_and_verify_against_it(
        verifier, clock, sleep):
    dummy = SlowDummy()
    authenticator = AppAuthenticator(verify=verifier, cache=VerificationCache(ttl=60, clock=clock),
                                     throttle=FailureThrottle(clock=clock), sleep=sleep, make_dummy=dummy)
    try:
        authenticator.prepare()  # returns without waiting for the hash
        logins = [asyncio.ensure_future(authenticator.authenticate(snapshot(app()), "ghost", PASSWORD, "smtp"))
                  for _ in range(2)]
        assert await asyncio.to_thread(dummy.started.wait, 10)
        await asyncio.sleep(0)
        assert verifier.calls == [] and not any(login.done() for login in logins)
        dummy.release.set()
        outcomes = await asyncio.gather(*logins)
        assert [o.result for o in outcomes] == [Result.USER_UNKNOWN] * 2
        # one making, shared; each unknown login cost one verification against its hash
        assert dummy.made == 1
        assert verifier.calls == [("fake$slow-dummy", PASSWORD)] * 2
    finally:
        dummy.release.set()
        await authenticator.close()


async def test_no_dummy_hash_until_one_is_needed(verifier, clock, sleep):
    dummy = SlowDummy()
    dummy.release.set()
    authenticator = AppAuthenticator(verify=verifier, cache=VerificationCache(ttl=60, clock=clock),
                                     throttle=FailureThrottle(clock=clock), sleep=sleep, make_dummy=dummy)
    try:
        snap = snapshot(app())
        assert (await authenticator.authenticate(snap, "mailer", PASSWORD, "smtp")).result is Result.OK
        assert dummy.made == 0
        assert (await authenticator.authenticate(snap, "ghost", PASSWORD, "smtp")).result is Result.USER_UNKNOWN
        assert dummy.made == 1 and verifier.calls[-1] == ("fake$slow-dummy", PASSWORD)
    finally:
        await authenticator.close()


# --- with real argon2id -------------------------------------------------------------------------

async def test_real_argon2_hashes_and_the_prepared_dummy_hash():
    calls = []

    def counting_verify(stored: str, password: str) -> bool:
        calls.append(stored)
        return verify_secret(stored, password)

    authenticator = AppAuthenticator(verify=counting_verify)
    try:
        authenticator.prepare()
        row = App("Mailer", await asyncio.to_thread(hash_secret, PASSWORD), True, 1)
        snap = snapshot(row)
        assert (await authenticator.authenticate(snap, "mailer", PASSWORD, "smtp")).result is Result.OK
        assert (await authenticator.authenticate(snap, "mailer", "nope", "smtp")).result \
            is Result.PASSWORD_MISMATCH
        assert (await authenticator.authenticate(snap, "ghost", PASSWORD, "smtp")).result \
            is Result.USER_UNKNOWN
        # The unknown login was checked against a real argon2id hash, like a known app.
        assert len(calls) == 3
        assert calls[2].startswith("{ARGON2ID}$argon2id$") and calls[2] != row.secret_hash
    finally:
        await authenticator.close()


async def test_cached_logins_are_answered_even_when_the_queue_is_full(clock, sleep):
    release = threading.Event()

    def slow_verify(stored: str, password: str) -> bool:
        if password != PASSWORD:
            release.wait(10)
        return stored == "fake$" + password

    authenticator = AppAuthenticator(verify=slow_verify, cache=VerificationCache(clock=clock),
                                     throttle=FailureThrottle(clock=clock), sleep=sleep,
                                     max_pending=1, workers=1, dummy_hash="fake$x")
    snap = snapshot(app())
    try:
        assert (await authenticator.authenticate(snap, "mailer", PASSWORD, "smtp")).result is Result.OK
        stuck = asyncio.ensure_future(authenticator.authenticate(snap, "mailer", "guess", "smtp", "x"))
        await asyncio.sleep(0.05)
        assert (await authenticator.authenticate(snap, "mailer", "guess2", "smtp", "y")).reason == "busy"
        cached = await authenticator.authenticate(snap, "mailer", PASSWORD, "smtp")
        assert cached.result is Result.OK and cached.cached
        release.set()
        assert (await stuck).result is Result.PASSWORD_MISMATCH
    finally:
        release.set()
        await authenticator.close()


async def test_queue_is_bounded_by_the_estimated_wait(clock, sleep):
    release = threading.Event()

    def verify(stored: str, password: str) -> bool:
        release.wait(10)
        return stored == "fake$" + password

    authenticator = AppAuthenticator(verify=verify, cache=VerificationCache(clock=clock),
                                     throttle=FailureThrottle(clock=clock), sleep=sleep,
                                     workers=2, max_pending=1000, max_queue_seconds=5.0,
                                     dummy_hash="fake$x")
    authenticator._verify_seconds = 1.0      # as if each verification took 1 s here
    snap = snapshot(app())
    try:
        waiting = [asyncio.ensure_future(authenticator.authenticate(snap, "mailer", PASSWORD, "smtp"))
                   for _ in range(10)]
        await asyncio.sleep(0.05)
        # 10 waiting on 2 workers at 1 s each: an 11th would finish after ~5.5 s.
        assert authenticator.queue_seconds() == pytest.approx(5.5)
        extra = await authenticator.authenticate(snap, "other", PASSWORD, "smtp")
        assert extra.result is Result.INTERNAL_FAILURE and extra.reason == "busy"
        release.set()
        await asyncio.gather(*waiting)
    finally:
        release.set()
        await authenticator.close()


async def test_counters_for_metrics(auth, sleep):
    snap = snapshot(app())
    await auth.authenticate(snap, "mailer", PASSWORD, "smtp")
    await auth.authenticate(snap, "mailer", PASSWORD, "smtp")
    await auth.authenticate(snap, "ghost", PASSWORD, "smtp")
    await auth.authenticate(snap, "mailer", PASSWORD, "imap")
    assert auth.counters == {"ok": 2, "cached": 1, "user_unknown": 1, "user_disabled": 1}
