"""App credentials that age (issue #9): expiry and client networks in the passdb rules, and the
last-use recorder (mailcloak.apps_auth.refusal, AppAuthenticator, mailcloak.app_usage)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from mailcloak.apps_auth import AppAuthenticator, FailureThrottle, Result, VerificationCache, parsed_networks, refusal
from mailcloak.store.model import App, AppSender, Rows, Snapshot

PASSWORD = "right-password"
DUMMY = "fake$dummy-never-matches"
NOW = 1_800_000_000


def app(enabled=True, expires_at=None, networks=(), updated_at=1700000000) -> App:
    return App("Mailer", "fake$" + PASSWORD, enabled, updated_at, (AppSender("noreply@d1.test", True),),
               "invoices", expires_at, tuple(networks))


def snapshot(*apps: App) -> Snapshot:
    return Snapshot.from_rows(Rows(apps=apps))


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Verifier:
    def __init__(self):
        self.hashes: list[str] = []

    def __call__(self, stored: str, password: str) -> bool:
        self.hashes.append(stored)
        return stored == "fake$" + password


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
def wall():
    return Clock(NOW)


@pytest.fixture
def verifier():
    return Verifier()


@pytest.fixture
async def auth(verifier, wall):
    monotonic = Clock(1000.0)
    authenticator = AppAuthenticator(
        verify=verifier, cache=VerificationCache(ttl=60, clock=monotonic),
        throttle=FailureThrottle(clock=monotonic), sleep=no_sleep, dummy_hash=DUMMY, wall_clock=wall)
    yield authenticator
    await authenticator.close()


# --- refusal, a pure function: the table ---------------------------------------------------------

NETS = ("192.0.2.0/24", "2001:db8::/32")


@pytest.mark.parametrize("row,service,rip,expected", [
    (app(), "smtp", "", None),
    (app(expires_at=NOW + 1), "smtp", "", None),
    (app(expires_at=NOW), "smtp", "", "app expired at 2027-01-15T08:00:00Z"),
    (app(expires_at=NOW - 86400), "submission", "192.0.2.1", "app expired at 2027-01-14T08:00:00Z"),
    (app(networks=NETS), "smtp", "192.0.2.77", None),
    (app(networks=NETS), "smtp", "2001:db8:5::1", None),
    (app(networks=NETS), "smtp", "::ffff:192.0.2.5", None),
    (app(networks=NETS), "smtp", "198.51.100.7", "remote IP 198.51.100.7 is outside the app's networks"),
    (app(networks=NETS), "smtp", "2001:db9::1", "remote IP 2001:db9::1 is outside the app's networks"),
    (app(networks=NETS), "smtp", "", "no remote IP to check against the app's networks"),
    (app(networks=NETS), "smtp", "not-an-ip", "remote IP 'not-an-ip' is not an address"),
    (app(networks=("garbage", "192.0.2.0/24")), "smtp", "192.0.2.1", None),
    (app(networks=("garbage",)), "smtp", "192.0.2.1", "remote IP 192.0.2.1 is outside the app's networks"),
    (app(enabled=False, expires_at=NOW - 1, networks=NETS), "smtp", "198.51.100.7", "app disabled"),
    (app(expires_at=NOW - 1, networks=NETS), "smtp", "198.51.100.7", "app expired at 2027-01-15T07:59:59Z"),
    (app(networks=NETS), "imap", "192.0.2.1",
     "apps may authenticate only for sending (smtp, submission), not imap"),
])
def test_refusal_table(row, service, rip, expected):
    assert refusal(row, service, rip, NOW) == expected


def test_networks_are_parsed_once_per_distinct_list(monkeypatch):
    """refusal() runs on every login; parsing the CIDRs each time cost ~20 µs (3 networks)."""
    calls = []
    real = ipaddress.ip_network

    def counting(text, strict=True):
        calls.append(text)
        return real(text, strict=strict)

    networks = ("203.0.113.0/24", "2001:db8:77::/48", "garbage")
    parsed_networks.cache_clear()
    monkeypatch.setattr(ipaddress, "ip_network", counting)
    for rip in ("203.0.113.9", "198.51.100.1", "2001:db8:77::1"):
        refusal(app(networks=networks), "smtp", rip, NOW)
    assert calls == list(networks)
    edited = networks[:2]                       # an edited row is parsed afresh
    assert refusal(app(networks=edited), "smtp", "198.51.100.1", NOW) is not None
    assert calls == [*networks, *edited]


# --- the authenticator ---------------------------------------------------------------------------

@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
@pytest.mark.parametrize("row,rip", [(app(expires_at=NOW - 1), "192.0.2.1"),
                                     (app(networks=NETS), "198.51.100.7"),
                                     (app(networks=NETS), "")])
async def test_expired_or_outside_is_refused_whatever_the_password(auth, verifier, row, rip, password):
    outcome = await auth.authenticate(snapshot(row), "mailer", password, "smtp", rip)
    assert outcome.result is Result.USER_DISABLED
    assert outcome.app_id == "Mailer"
    assert verifier.hashes == [DUMMY]    # one verification's cost, never against the app's hash
    assert len(auth.usage) == 0


async def test_app_inside_its_networks_logs_in_and_its_use_is_recorded(auth, verifier):
    outcome = await auth.authenticate(snapshot(app(networks=NETS, expires_at=NOW + 60)), "mailer",
                                      PASSWORD, "smtp", "192.0.2.9")
    assert outcome.result is Result.OK
    assert len(auth.usage) == 1


async def test_an_app_that_expires_while_cached_is_refused(auth, wall, verifier):
    snap = snapshot(app(expires_at=NOW + 30))
    assert (await auth.authenticate(snap, "mailer", PASSWORD, "smtp", "192.0.2.1")).result is Result.OK
    assert (await auth.authenticate(snap, "mailer", PASSWORD, "smtp", "192.0.2.1")).cached
    wall.now = NOW + 30
    outcome = await auth.authenticate(snap, "mailer", PASSWORD, "smtp", "192.0.2.1")
    assert (outcome.result, outcome.cached) == (Result.USER_DISABLED, False)
    assert outcome.reason.startswith("app expired at")


async def test_a_cached_login_from_another_network_is_refused(auth):
    snap = snapshot(app(networks=NETS))
    assert (await auth.authenticate(snap, "mailer", PASSWORD, "smtp", "192.0.2.1")).result is Result.OK
    outcome = await auth.authenticate(snap, "mailer", PASSWORD, "smtp", "203.0.113.1")
    assert outcome.result is Result.USER_DISABLED


async def test_refusals_do_not_feed_the_throttle(auth):
    snap = snapshot(app(networks=NETS))
    for _ in range(8):
        await auth.authenticate(snap, "mailer", "wrong", "smtp", "203.0.113.1")
    assert auth.throttle.failures("mailer", "203.0.113.1") == 0


async def test_refusal_is_one_log_line_with_app_reason_and_ip_never_the_password(auth, caplog):
    caplog.set_level(logging.DEBUG, logger="mailcloak")
    await auth.authenticate(snapshot(app(networks=NETS)), "mailer", "s3cret-pass", "smtp", "203.0.113.1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["app auth refused (remote IP 203.0.113.1 is outside the app's networks) "
                     "login='mailer' service=smtp rip=203.0.113.1 app=Mailer"]
    assert "s3cret-pass" not in caplog.text
