"""A provider-independent lookup cache for IdP answers: bounded, coalescing, fault-tolerant.

- **Bounded**: at most `max_entries` answers (least recently used go first), each kept until its
  TTL (`ttl` for a user, the shorter `negative_ttl` for "no such user") plus the
  stale-if-error window, then dropped: lazily, when it is next asked for, or earlier by the
  least-recently-used eviction (the bound holds either way, and `len()` counts such entries
  until then).
- **Lean**: the scale target holds 100 000 answers, so an entry is one `(answer, fresh_until)`
  tuple in an `OrderedDict` kept in least-recently-used order (the stale window is the same for
  every answer of a kind, so it is worked out, not stored); no timer, heap item or per-key
  object besides it.
- **Coalesced**: concurrent lookups of one key share ONE request to the IdP. The shared fetch runs
  as its own task and every caller awaits it through `asyncio.shield`, so a caller cancelled by
  its own deadline (the policy's `asyncio.timeout_at`) does not cancel it for the others; its
  answer still lands in the cache for the next request.
- **Stale-if-error**: while the IdP fails, a *positive* answer that expired less than
  `stale_if_error` seconds ago is still returned. A cached "no such user" is not served stale by
  default: a user created during the outage would otherwise get mail bounced permanently (550)
  instead of deferred (451), and a deferral costs nothing.
  While the IdP is known to be failing (a failure seen and no success since), a lookup that
  has such a stale answer waits at most `STALE_WAIT_SECONDS` for the new fetch, then gets the
  stale answer while the fetch goes on: a hanging IdP must not hold every cached user's request
  for the whole IdP timeout, nor past a policy deadline shorter than that timeout (which would
  turn a known user into a 451).
- **Quiet logs**: one line per kind of IdP failure and one per recovery, one line when stale
  answers start being served (see `FailureLog`), never one per request.
- **Freshness noted**: each answer given is noted in the record of the decision asking, if any
  (`mailcloak.idp.freshness`): its end of freshness, or, for an answer served stale, an error,
  a wait cut short or an answer not kept, that there is none to vouch for.
- **Counters** in `counters` (and errors by kind in `errors`), plain dicts a metrics endpoint
  can read.

The clock is injectable (`clock`, seconds, monotonic) so tests move time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Awaitable, Callable, Hashable

from mailcloak.errors import IdPError
from mailcloak.idp.freshness import watching

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# While the IdP is failing, how long a lookup with a stale answer in hand waits for the IdP.
STALE_WAIT_SECONDS = 0.25


def error_kind(exc: BaseException) -> str:
    """The short, stable kind of an IdP failure ("timeout", "http 500", ...), for logs and counters."""
    return getattr(exc, "kind", "") or str(exc) or type(exc).__name__


class FailureLog:
    """Logs an IdP outage once: one line per new kind of failure, one at recovery.

    Shared by the caches of one provider, so a Keycloak that is down is reported once and not once
    per cache. An IdP that flaps (fails, answers, fails again) logs a kind of failure at most once
    per `quiet_seconds`, and a recovery only after a logged failure, so that a flapping IdP cannot
    turn these lines into one per request either.
    """

    def __init__(self, name: str, logger: logging.Logger | None = None, *,
                 clock: Clock = time.monotonic, quiet_seconds: float = 60):
        self.name = name
        self.kinds: dict[str, int] = {}     # kinds of failure seen in the current outage → count
        self._logged_at: dict[str, float] = {}
        self._outage_logged = False
        self._stale_logged = False
        self._clock = clock
        self._quiet = quiet_seconds
        self._log = logger or log

    @property
    def failing(self) -> bool:
        return bool(self.kinds)

    def failed(self, exc: BaseException) -> None:
        kind = error_kind(exc)
        if kind not in self.kinds:
            self.kinds[kind] = 0
            now = self._clock()
            last = self._logged_at.get(kind)
            if last is None or now - last >= self._quiet:
                self._logged_at[kind] = now
                self._outage_logged = True
                self._log.warning("%s: IdP lookups failing: %s", self.name, exc)
        self.kinds[kind] += 1

    def serving_stale(self, window: float) -> None:
        if not self._stale_logged:
            self._stale_logged = True
            self._log.warning("%s: answering from cached entries up to %gs past their TTL while the "
                              "IdP fails", self.name, window)

    def recovered(self) -> None:
        if self.kinds and self._outage_logged:
            summary = ", ".join(f"{kind} x{count}" for kind, count in self.kinds.items())
            self._log.warning("%s: IdP answers again (failures during the outage: %s)", self.name, summary)
        self.kinds = {}
        self._outage_logged = False
        self._stale_logged = False


_Entry = tuple[Any, float]  # (answer, fresh_until on the cache's clock)


class LookupCache:
    """Cache of one kind of IdP answer; `get(key, fetch)` is the only way in (`peek` only looks)."""

    def __init__(self, name: str, *, ttl: float, negative_ttl: float, stale_if_error: float,
                 max_entries: int, clock: Clock = time.monotonic,
                 failures: FailureLog | None = None, stale_negative: bool = False):
        self.name = name
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self.max_entries = max_entries
        self.stale_negative = stale_negative
        self._clock = clock
        self.failures = failures or FailureLog(name, clock=clock)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._inflight: dict[Hashable, asyncio.Future] = {}
        # requests: fetches sent to the IdP; hits: answered fresh from the cache; misses: not
        # fresh (coalesced counts the misses that joined a fetch already in flight); stale:
        # answers served past their TTL because the IdP failed; errors: failed fetches.
        self.counters: dict[str, int] = {
            "requests": 0, "hits": 0, "misses": 0, "coalesced": 0, "stale": 0, "errors": 0,
        }
        self.errors: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def peek(self, key: Hashable) -> Any:
        """The answer cached for `key` (None if none), fresh or not, without counting it as a use:
        for a provider that makes equal answers under two keys share one object."""
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def in_flight(self) -> int:
        return len(self._inflight)

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[Any]],
                  ttl_of: Callable[[Any], float | None] | None = None) -> Any:
        """The cached answer for `key`, or the result of `fetch()` (shared with concurrent callers).

        `fetch` returns the answer (None for "no such user") or raises IdPError. `ttl_of(answer)`
        may choose the TTL of one answer (None: the default for its kind).
        """
        freshness = watching()
        entry = self._entries.get(key)
        if entry is not None:
            now = self._clock()
            if now < entry[1]:
                self._entries.move_to_end(key)
                self.counters["hits"] += 1
                if freshness is not None:
                    freshness.answered(entry[1])
                return entry[0]
            if now >= self._stale_until(entry):
                del self._entries[key]
                entry = None
        self.counters["misses"] += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._refresh(key, fetch, ttl_of))
            self._inflight[key] = task
            task.add_done_callback(partial(self._settled, key))
        else:
            self.counters["coalesced"] += 1
        try:
            value, fresh_until, stale = await self._answer(task, entry)
        except BaseException:  # an error, or a wait cut short (a deadline, an abandoned attempt)
            if freshness is not None:
                freshness.spoil()
            raise
        if stale:
            self.counters["stale"] += 1
        if freshness is not None:
            if fresh_until is None:  # stale, or not kept: no end of freshness to vouch for
                freshness.spoil()
            else:
                freshness.answered(fresh_until)
        return value

    async def _answer(self, task: asyncio.Future, entry: _Entry | None) -> tuple[Any, float | None, bool]:
        """The shared fetch's (answer, end of freshness, served stale); while the IdP is known to
        fail, `entry`'s stale answer if the fetch takes longer than STALE_WAIT_SECONDS."""
        if entry is not None and self.failures.failing and self._usable_stale(entry):
            done, _pending = await asyncio.wait({task}, timeout=STALE_WAIT_SECONDS)
            if not done:  # the IdP is failing and slow: the stale answer now, the fetch goes on
                self.failures.serving_stale(self.stale_if_error)
                return entry[0], None, True
        return await asyncio.shield(task)

    def _settled(self, key: Hashable, task: asyncio.Future) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a fetch nobody awaits any more logs no warning

    async def _refresh(self, key: Hashable, fetch: Callable[[], Awaitable[Any]],
                       ttl_of: Callable[[Any], float | None] | None) -> tuple[Any, float | None, bool]:
        """(answer, end of its freshness or None, served stale): None for an answer served
        stale or not kept."""
        self.counters["requests"] += 1
        try:
            value = await fetch()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an IdPError for the caller
            if not isinstance(exc, IdPError):
                log.error("%s: unexpected error in an IdP lookup", self.name, exc_info=exc)
                failure = IdPError(f"{self.name}: internal error ({type(exc).__name__})")
                failure.kind = "internal error"  # type: ignore[attr-defined]
                exc = failure
            kind = error_kind(exc)
            self.counters["errors"] += 1
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.failures.failed(exc)
            entry = self._entries.get(key)
            if entry is not None and self._usable_stale(entry):
                self.failures.serving_stale(self.stale_if_error)
                return entry[0], None, True
            raise exc from None
        self.failures.recovered()
        return value, self._store(key, value, ttl_of), False

    def _stale_until(self, entry: _Entry) -> float:
        """Until when `entry` may answer while the IdP fails (its TTL's end if it may not)."""
        value, fresh_until = entry
        return fresh_until + self.stale_if_error if value is not None or self.stale_negative else fresh_until

    def _usable_stale(self, entry: _Entry) -> bool:
        """May `entry` answer while the IdP fails (within the window; negative only if allowed)?"""
        return self._clock() < self._stale_until(entry) and (entry[0] is not None or self.stale_negative)

    def _store(self, key: Hashable, value: Any,
               ttl_of: Callable[[Any], float | None] | None) -> float | None:
        """Keep `value` for its TTL; the end of its freshness, None when it is not kept."""
        entries = self._entries
        entries.pop(key, None)
        if self.max_entries <= 0:
            return None
        ttl = ttl_of(value) if ttl_of is not None else None
        if ttl is None:
            ttl = self.ttl if value is not None else self.negative_ttl
        if ttl <= 0:
            return None
        fresh_until = self._clock() + ttl
        entries[key] = (value, fresh_until)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
        return fresh_until

