"""App-password authentication for Dovecot (SPEC §8): the rules, a verification cache, a throttle.

No HTTP here: `mailcloak.http.passdb` turns a request into `AppAuthenticator.authenticate(...)`
and its `AuthOutcome` into the answer the Lua passdb script reads.

Rules, in this order (every branch that can be reached without the right password costs one
argon2id verification, so neither the answer nor its timing tells an app id apart from an
unknown login):

1. the (login, remote IP) pair is throttled after repeated failures: wait, then go on;
2. unknown login → verify against a dummy hash, answer `user_unknown`;
3. the app may not log in for this request, whatever the password (`refusal`, a pure function of
   the app row, the service, the remote IP and the time) → verify against the dummy hash, answer
   `user_disabled` with the reason: the app is disabled; it expired (`expires_at` passed); the
   remote IP is outside its `networks` (or absent, as for doveadm, or not an address: fail
   closed); the service is other than `smtp`/`submission` (IMAP, POP3, ManageSieve, doveadm, …:
   apps send mail, they never read it). The app's own hash is never tried, so a client refused
   by these rules (say, from another network) cannot use the answer to probe passwords; and
   they are checked on every attempt, a cached verification included, so an app that expires
   while cached is refused at once;
4. wrong password → `password_mismatch`;
5. otherwise `ok`, and the login is recorded as the app's last use (mailcloak.app_usage).

argon2id (~50-300 ms, 64 MiB, memory-bound) runs in a small dedicated thread pool, never on the
event loop. The queue in front of it is bounded: when the verifications already waiting would
take longer than `max_queue_seconds` (8 s, estimated from the measured duration of recent ones;
the Lua client gives up after 10 s), or `max_pending` are waiting, the answer is
`internal_failure` (Dovecot: temporary failure) at once rather than after Dovecot's own request
timeout. Logins answered from the cache never wait in that queue.

A successful verification is remembered for `passdb.verify_cache_seconds` (60 s; 0 turns the
cache off) under an HMAC-SHA256 (random per-process key) of the app's row (id, secret_hash, enabled, updated_at) and the password: the
password cannot be recovered from the cache, and any change to the row (new secret, disabled,
touched) makes the next login miss and verify again. Failures are never cached.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable

from cachetools import TTLCache

from mailcloak.app_fields import format_utc
from mailcloak.app_usage import UsageRecorder
from mailcloak.config import PassdbConfig
from mailcloak.passwords import hash_secret, verify_secret
from mailcloak.store.model import App, Snapshot

log = logging.getLogger(__name__)

# Services apps may authenticate for (Dovecot's `service`/`protocol` field, lower-cased).
SENDING_SERVICES = frozenset({"smtp", "submission"})

# The defaults of the settings below are the config's (passdb section): one place for them.
_DEFAULTS = PassdbConfig()


class Result(str, enum.Enum):
    """What the Lua script maps onto `dovecot.auth.PASSDB_RESULT_*`."""

    OK = "ok"
    PASSWORD_MISMATCH = "password_mismatch"
    USER_UNKNOWN = "user_unknown"
    USER_DISABLED = "user_disabled"
    INTERNAL_FAILURE = "internal_failure"


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    result: Result
    reason: str = ""
    app_id: str = ""          # the app's id as stored (case kept), when the login named one
    cached: bool = False      # the password check came from the verification cache
    delayed: float = 0.0      # seconds the throttle made this attempt wait


# --- the rules that do not depend on the password -------------------------------------------


def refusal(app: App, service: str, remote_ip: str, now: float) -> str | None:
    """Why `app` may not log in for this request whatever the password, or None when it may.
    `service` is lower-case; `now` is unix seconds."""
    refused = use_refusal(app, remote_ip, now)
    if refused:
        return refused
    if service not in SENDING_SERVICES:
        return (f"apps may authenticate only for sending (smtp, submission), "
                f"not {service or 'an unnamed service'}")
    return None


def use_refusal(app: App, remote_ip: str, now: float) -> str | None:
    """Why `app` may not be used at `now` (unix seconds) from `remote_ip`: disabled, expired, or
    outside its networks; None when it may. The one rule for both the passdb (`refusal`) and the
    policy's row 7, which applies it again when the app sends, because Dovecot's auth cache can
    keep a success for up to auth_cache_ttl after the app expired."""
    if not app.enabled:
        return "app disabled"
    if app.expires_at is not None and now >= app.expires_at:
        return f"app expired at {format_utc(app.expires_at)}"
    if app.networks:
        return _network_refusal(app.networks, remote_ip)
    return None


def _network_refusal(networks: tuple[str, ...], remote_ip: str) -> str | None:
    if not remote_ip.strip():
        return "no remote IP to check against the app's networks"
    try:
        address = ipaddress.ip_address(remote_ip.strip())
    except ValueError:
        return f"remote IP {remote_ip!r} is not an address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in parsed_networks(networks)):
        return None
    return f"remote IP {address} is outside the app's networks"


@functools.lru_cache(maxsize=4096)
def parsed_networks(networks: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """An app's CIDRs parsed once per distinct `networks` tuple rather than on every attempt
    (parsing 3 cost ~20 µs a login). Keyed by value, so an edited row gets its own entry; the
    bound only matters with thousands of distinct network lists. A CIDR that does not parse
    (mailcloakctl refuses them; one written by hand) is left out: it matches nothing."""
    parsed = []
    for text in networks:
        try:
            parsed.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            continue
    return tuple(parsed)


# --- throttle ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class FailureThrottle:
    """Growing delay for repeated failures from one (login, remote IP); bounded memory.

    The first `free_failures` failures cost nothing extra; after that each attempt from the pair
    waits `base_delay * 2**(failures - free_failures)` seconds, capped at `max_delay`, before it
    is even checked (so an attacker cannot cut the wait short on a wrong guess). A success, or
    `forget_after` seconds without a failure, clears the pair. At most `max_entries` pairs are
    tracked; the least recently failed one is dropped first.
    """

    def __init__(self, *, free_failures: int = _DEFAULTS.throttle_free_failures,
                 base_delay: float = _DEFAULTS.throttle_base_delay_seconds,
                 max_delay: float = _DEFAULTS.throttle_max_delay_seconds,
                 forget_after: float = _DEFAULTS.throttle_forget_after_seconds,
                 max_entries: int = _DEFAULTS.throttle_max_entries,
                 clock: Callable[[], float] = time.monotonic):
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(login: str, remote_ip: str) -> tuple[str, str]:
        return (login.lower(), remote_ip)

    def failures(self, login: str, remote_ip: str) -> int:
        entry = self._live(self.key(login, remote_ip))
        return entry.count if entry else 0

    def delay(self, login: str, remote_ip: str) -> float:
        """Seconds the next attempt of this pair must wait (0 when not throttled)."""
        return self.delay_for(self.failures(login, remote_ip))

    def delay_for(self, failures: int) -> float:
        over = failures - self.free_failures
        if over < 0:
            return 0.0
        return min(self.max_delay, self.base_delay * (2 ** min(over, 32)))

    def record_failure(self, login: str, remote_ip: str) -> int:
        """Count a failure; returns the pair's failure count."""
        key = self.key(login, remote_ip)
        now = self._clock()
        entry = self._live(key)
        if entry is None:
            entry = _Failures(0, now)
            self._entries[key] = entry
        entry.count += 1
        entry.last = now
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry.count

    def record_success(self, login: str, remote_ip: str) -> None:
        self._entries.pop(self.key(login, remote_ip), None)

    def _live(self, key: tuple[str, str]) -> _Failures | None:
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry.last > self.forget_after:
            del self._entries[key]
            return None
        return entry


# --- verification cache -----------------------------------------------------------------------


class VerificationCache:
    """Successful (app row, password) verifications, for `ttl` seconds; nothing recoverable."""

    def __init__(self, ttl: float = _DEFAULTS.verify_cache_seconds,
                 maxsize: int = _DEFAULTS.verify_cache_entries,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._key = secrets.token_bytes(32)
        self._cache: TTLCache | None = TTLCache(maxsize, ttl, timer=clock) if ttl > 0 else None

    def __len__(self) -> int:
        return len(self._cache) if self._cache is not None else 0

    def _digest(self, app: App, password: str) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (app.app_id.lower(), app.secret_hash, "1" if app.enabled else "0",
                     str(app.updated_at)):
            data = part.encode("utf-8", "surrogatepass")
            mac.update(len(data).to_bytes(4, "big") + data)
        mac.update(password.encode("utf-8", "surrogatepass"))
        return mac.digest()

    def hit(self, app: App, password: str) -> bool:
        return self._cache is not None and self._digest(app, password) in self._cache

    def remember(self, app: App, password: str) -> None:
        if self._cache is not None:
            self._cache[self._digest(app, password)] = True

    def clear(self) -> None:
        if self._cache is not None:
            self._cache.clear()


# --- the authenticator ------------------------------------------------------------------------

Verifier = Callable[[str, str], bool]          # (stored hash, password) -> matches


def _new_dummy_hash() -> str:
    """An argon2id hash of a random secret nobody knows, to verify unknown logins against."""
    return hash_secret(secrets.token_urlsafe(24))


class AppAuthenticator:
    """Decides one PLAIN/LOGIN attempt against the apps table. One per daemon process."""

    def __init__(self, *, verify: Verifier = verify_secret, cache: VerificationCache | None = None,
                 throttle: FailureThrottle | None = None, workers: int | None = None,
                 max_pending: int = 64, max_queue_seconds: float = 8.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 dummy_hash: str | None = None, make_dummy: Callable[[], str] | None = None,
                 usage: UsageRecorder | None = None, wall_clock: Callable[[], float] = time.time):
        self._verify = verify
        self.cache = cache if cache is not None else VerificationCache()
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self._workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._executor: ThreadPoolExecutor | None = None
        self._max_pending = max_pending
        self._max_queue_seconds = max_queue_seconds
        self._pending = 0
        self._verify_seconds = 0.0       # moving average of one verification's wall time
        self._sleep = sleep
        self._dummy_hash = dummy_hash
        self._make_dummy = make_dummy or _new_dummy_hash
        self._dummy_making: asyncio.Future[str] | None = None
        self.usage = usage if usage is not None else UsageRecorder(wall_clock)
        self._wall_clock = wall_clock
        # Answers by result, plus "cached", "throttled" and "busy" (for metrics).
        self.counters: Counter[str] = Counter()

    @classmethod
    def from_config(cls, passdb: PassdbConfig) -> AppAuthenticator:
        """The daemon's authenticator, with the cache and throttle of the `passdb` section."""
        return cls(
            cache=VerificationCache(passdb.verify_cache_seconds, passdb.verify_cache_entries),
            throttle=FailureThrottle(
                free_failures=passdb.throttle_free_failures,
                base_delay=passdb.throttle_base_delay_seconds,
                max_delay=passdb.throttle_max_delay_seconds,
                forget_after=passdb.throttle_forget_after_seconds,
                max_entries=passdb.throttle_max_entries))

    def prepare(self) -> None:
        """Start making the dummy hash in a thread, without waiting for it (one argon2id: ~0.2 s,
        64 MiB at its peak): the daemon gets ready meanwhile, and an unknown login that comes
        before it is made waits for it."""
        self._dummy_task()

    async def close(self) -> None:
        if self._dummy_making is not None:
            self._dummy_making.cancel()  # its thread finishes the hash, which nobody waits for
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def _run_verify(self, stored: str, password: str) -> bool:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="argon2")
        loop = asyncio.get_running_loop()
        matches, spent = await loop.run_in_executor(self._executor, self._timed_verify, stored, password)
        self._verify_seconds = spent if not self._verify_seconds else \
            0.8 * self._verify_seconds + 0.2 * spent
        return matches

    def _timed_verify(self, stored: str, password: str) -> tuple[bool, float]:
        start = time.monotonic()
        matches = self._verify(stored, password)
        return matches, time.monotonic() - start

    def queue_seconds(self) -> float:
        """Estimated wait before a verification submitted now would finish."""
        return (self._pending + 1) * self._verify_seconds / self._workers

    async def _dummy(self) -> str:
        """A real argon2id hash of a random secret, made once, for unknown logins: an unknown
        login costs one verification against it, as a known one costs one against its own."""
        if self._dummy_hash is None:
            # shield: a login given up on while it waits does not cancel the one making
            self._dummy_hash = await asyncio.shield(self._dummy_task())
        return self._dummy_hash

    def _dummy_task(self) -> asyncio.Future[str]:
        """The one making of the dummy hash, started on first use (or again if it failed)."""
        making = self._dummy_making
        if making is None or (making.done() and (making.cancelled() or making.exception() is not None)):
            making = self._dummy_making = asyncio.ensure_future(self._timed_dummy())
        return making

    async def _timed_dummy(self) -> str:
        start = time.monotonic()
        dummy = await asyncio.to_thread(self._make_dummy)
        self._verify_seconds = self._verify_seconds or time.monotonic() - start
        return dummy

    async def authenticate(self, snapshot: Snapshot | None, login: str, password: str,
                           service: str, remote_ip: str = "") -> AuthOutcome:
        service = service.strip().lower()
        delay = self.throttle.delay(login, remote_ip)
        if delay > 0:
            self.counters["throttled"] += 1
            await self._sleep(delay)
        if snapshot is None:
            return AuthOutcome(Result.INTERNAL_FAILURE, "database state not loaded yet", delayed=delay)
        app = snapshot.app(login)
        refused = refusal(app, service, remote_ip, self._wall_clock()) if app is not None else None
        cached = False
        if app is not None and refused is None and self.cache.hit(app, password):
            matches = cached = True
        else:
            if self._pending >= self._max_pending or self.queue_seconds() > self._max_queue_seconds:
                log.warning("app auth: %d verifications already waiting (~%.1fs); answering a "
                            "temporary failure", self._pending, self.queue_seconds())
                self.counters["busy"] += 1
                self.counters[Result.INTERNAL_FAILURE.value] += 1
                return AuthOutcome(Result.INTERNAL_FAILURE, "busy", delayed=delay)
            self._pending += 1
            try:
                if app is None or refused is not None:
                    await self._run_verify(await self._dummy(), password)
                    matches = False
                else:
                    matches = await self._run_verify(app.secret_hash, password)
                    if matches:
                        self.cache.remember(app, password)
            finally:
                self._pending -= 1

        if app is None:
            outcome = AuthOutcome(Result.USER_UNKNOWN, "unknown app", delayed=delay)
        elif refused is not None:
            outcome = AuthOutcome(Result.USER_DISABLED, refused, app.app_id, delayed=delay)
        elif not matches:
            outcome = AuthOutcome(Result.PASSWORD_MISMATCH, "password mismatch", app.app_id,
                                  delayed=delay)
        else:
            outcome = AuthOutcome(Result.OK, "", app.app_id, cached, delay)
            self.usage.record(app.app_id, remote_ip)

        self._account(outcome, login, service, remote_ip)
        return outcome

    def _account(self, outcome: AuthOutcome, login: str, service: str, remote_ip: str) -> None:
        self.counters[outcome.result.value] += 1
        if outcome.cached:
            self.counters["cached"] += 1
        where = f"login={login!r} service={service or '-'} rip={remote_ip or '-'}"
        if outcome.result in (Result.PASSWORD_MISMATCH, Result.USER_UNKNOWN):
            count = self.throttle.record_failure(login, remote_ip)
            next_delay = self.throttle.delay_for(count)
            if next_delay > 0:
                log.warning("app auth failed (%s) %s: %d failures in a row, next attempt waits %.1fs",
                            outcome.reason, where, count, next_delay)
            else:
                log.info("app auth failed (%s) %s", outcome.reason, where)
        elif outcome.result is Result.OK:
            self.throttle.record_success(login, remote_ip)
            log.debug("app auth ok app=%s service=%s rip=%s%s", outcome.app_id, service,
                      remote_ip or "-", " (cached)" if outcome.cached else "")
        elif outcome.result is Result.USER_DISABLED:
            log.info("app auth refused (%s) %s app=%s", outcome.reason, where, outcome.app_id)
