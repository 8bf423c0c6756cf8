"""The IdP lookup cache: TTLs, bounds, coalescing, stale-if-error, quiet logs, counters, and the
end of freshness it notes for a decision watching its answers.

Time is a fake clock moved by hand; no test sleeps.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from mailcloak.errors import IdPError
from mailcloak.idp.base import IdPUser
from mailcloak.idp.cache import LookupCache
from mailcloak.idp.freshness import Freshness, unwatch, watch
from mailcloak.idp.http import IdPRequestError


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


ALICE = IdPUser("alice", "alice@d1.test")


class Backend:
    """A fake IdP: answers from `answers`, or raises `error`, counting calls."""

    def __init__(self, answers=None):
        self.answers = dict(answers or {})
        self.error: Exception | None = None
        self.calls = 0
        self.gate: asyncio.Event | None = None

    def fetcher(self, key):
        async def fetch():
            self.calls += 1
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            return self.answers.get(key)
        return fetch


def make_cache(clock, **overrides):
    options = dict(ttl=120, negative_ttl=30, stale_if_error=600, max_entries=100, clock=clock)
    options.update(overrides)
    return LookupCache("test", **options)


@pytest.fixture
def clock():
    return Clock()


async def test_positive_answer_kept_for_its_ttl(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    clock.now += 119
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    assert idp.calls == 1
    clock.now += 2
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    assert idp.calls == 2
    assert cache.counters["hits"] == 1 and cache.counters["misses"] == 2
    assert cache.counters["requests"] == 2


async def test_negative_answer_kept_for_the_shorter_ttl(clock):
    cache, idp = make_cache(clock), Backend()
    assert await cache.get("nobody", idp.fetcher("nobody")) is None
    clock.now += 29
    assert await cache.get("nobody", idp.fetcher("nobody")) is None
    assert idp.calls == 1
    clock.now += 2
    idp.answers["nobody"] = ALICE  # the user was created meanwhile
    assert await cache.get("nobody", idp.fetcher("nobody")) == ALICE
    assert idp.calls == 2


async def test_ttl_of_chooses_the_ttl_of_one_answer(clock):
    cache, idp = make_cache(clock), Backend({"t": ALICE})
    assert await cache.get("t", idp.fetcher("t"), ttl_of=lambda v: 5) == ALICE
    clock.now += 4
    await cache.get("t", idp.fetcher("t"), ttl_of=lambda v: 5)
    assert idp.calls == 1
    clock.now += 2
    await cache.get("t", idp.fetcher("t"), ttl_of=lambda v: 5)
    assert idp.calls == 2


async def test_cache_is_bounded_and_evicts_the_least_recently_used(clock):
    cache = make_cache(clock, max_entries=3)
    idp = Backend({k: IdPUser(k, f"{k}@d.test") for k in "abcde"})
    for key in "abc":
        await cache.get(key, idp.fetcher(key))
    await cache.get("a", idp.fetcher("a"))      # a is now the most recently used
    await cache.get("d", idp.fetcher("d"))      # evicts b
    await cache.get("e", idp.fetcher("e"))      # evicts c
    assert len(cache) == 3
    calls = idp.calls
    await cache.get("a", idp.fetcher("a"))
    assert idp.calls == calls                   # still cached
    await cache.get("b", idp.fetcher("b"))
    assert idp.calls == calls + 1               # evicted, asked again
    assert len(cache) == 3


async def test_eviction_follows_use_not_insertion_one_entry_at_a_time(clock):
    cache = make_cache(clock, max_entries=3)
    idp = Backend({k: IdPUser(k, f"{k}@d.test") for k in "abcd"})
    for key in "abc":
        await cache.get(key, idp.fetcher(key))
    await cache.get("b", idp.fetcher("b"))      # order of use: a, c, b
    await cache.get("a", idp.fetcher("a"))      # c, b, a
    await cache.get("d", idp.fetcher("d"))      # evicts c alone
    assert len(cache) == 3
    assert [cache.peek(k) is not None for k in "abcd"] == [True, True, False, True]


async def test_a_refreshed_entry_counts_as_just_used(clock):
    cache = make_cache(clock, max_entries=2)
    idp = Backend({k: IdPUser(k, f"{k}@d.test") for k in "abc"})
    await cache.get("a", idp.fetcher("a"))
    clock.now += 1
    await cache.get("b", idp.fetcher("b"))
    clock.now += 120                            # a is past its TTL, b is not
    await cache.get("a", idp.fetcher("a"))      # fetched again: now the most recently used
    await cache.get("c", idp.fetcher("c"))      # evicts b
    assert cache.peek("a") is not None and cache.peek("b") is None
    assert idp.calls == 4


async def test_an_entry_past_its_stale_window_is_dropped_when_next_asked(clock):
    cache, idp = make_cache(clock, ttl=120, stale_if_error=600), Backend({"a": ALICE})
    await cache.get("a", idp.fetcher("a"))
    await cache.get("nobody", idp.fetcher("nobody"))
    clock.now += 31                             # the negative answer has no stale window
    idp.error = IdPRequestError("test", "timeout")
    with pytest.raises(IdPError):
        await cache.get("nobody", idp.fetcher("nobody"))
    assert len(cache) == 1 and cache.peek("a") == ALICE
    clock.now += 120 + 600                      # the positive one is past TTL + stale window
    with pytest.raises(IdPError):
        await cache.get("a", idp.fetcher("a"))
    assert len(cache) == 0


async def test_the_bound_holds_whatever_the_entries_expiry(clock):
    cache = make_cache(clock, max_entries=10)
    idp = Backend({f"k{i}": ALICE for i in range(50)})
    for i in range(50):
        await cache.get(f"k{i}", idp.fetcher(f"k{i}"))
        clock.now += 100                        # each one past its TTL by the time of the next
        assert len(cache) <= 10
    assert [cache.peek(f"k{i}") is not None for i in (39, 40, 49)] == [False, True, True]


async def test_peek_neither_counts_nor_changes_the_order_of_use(clock):
    cache = make_cache(clock, max_entries=2)
    idp = Backend({k: IdPUser(k, f"{k}@d.test") for k in "abc"})
    await cache.get("a", idp.fetcher("a"))
    await cache.get("b", idp.fetcher("b"))
    counters = dict(cache.counters)
    assert cache.peek("a") == IdPUser("a", "a@d.test") and cache.peek("z") is None
    assert cache.counters == counters
    await cache.get("c", idp.fetcher("c"))      # a is still the least recently used
    assert cache.peek("a") is None and cache.peek("b") is not None


async def test_no_entries_means_no_caching_but_still_coalescing(clock):
    cache, idp = make_cache(clock, max_entries=0), Backend({"a": ALICE})
    idp.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(cache.get("a", idp.fetcher("a"))) for _ in range(10)]
    await asyncio.sleep(0)
    idp.gate.set()
    assert await asyncio.gather(*waiters) == [ALICE] * 10
    assert idp.calls == 1
    await cache.get("a", idp.fetcher("a"))
    assert idp.calls == 2 and len(cache) == 0


async def test_concurrent_lookups_of_one_key_share_one_request(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    idp.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(cache.get("a", idp.fetcher("a"))) for _ in range(200)]
    await asyncio.sleep(0)
    assert cache.in_flight() == 1
    idp.gate.set()
    assert await asyncio.gather(*waiters) == [ALICE] * 200
    assert idp.calls == 1
    assert cache.counters["requests"] == 1
    assert cache.counters["misses"] == 200 and cache.counters["coalesced"] == 199
    assert cache.in_flight() == 0


async def test_a_caller_cancelled_by_its_deadline_does_not_cancel_the_shared_fetch(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    idp.gate = asyncio.Event()
    impatient = asyncio.ensure_future(cache.get("a", idp.fetcher("a")))
    patient = asyncio.ensure_future(cache.get("a", idp.fetcher("a")))
    await asyncio.sleep(0)
    impatient.cancel()                            # what asyncio.timeout_at does at the deadline
    with pytest.raises(asyncio.CancelledError):
        await impatient
    idp.gate.set()
    assert await patient == ALICE
    assert idp.calls == 1
    # and the answer is cached for the next request even if every caller had given up
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    assert idp.calls == 1


async def test_an_abandoned_fetch_still_fills_the_cache(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    idp.gate = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await cache.get("a", idp.fetcher("a"))
    idp.gate.set()
    for _ in range(100):
        if cache.in_flight() == 0:
            break
        await asyncio.sleep(0.001)
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    assert idp.calls == 1 and cache.counters["hits"] == 1


async def test_stale_if_error_within_the_window_then_error(clock):
    cache, idp = make_cache(clock, ttl=120, stale_if_error=600), Backend({"a": ALICE})
    await cache.get("a", idp.fetcher("a"))
    idp.error = IdPRequestError("test", "timeout")
    clock.now += 120 + 599
    assert await cache.get("a", idp.fetcher("a")) == ALICE   # expired 599 s ago: still served
    assert cache.counters["stale"] == 1
    clock.now += 2                                            # 601 s past its TTL: gone
    with pytest.raises(IdPError):
        await cache.get("a", idp.fetcher("a"))
    assert cache.errors == {"timeout": 2}
    assert cache.counters["errors"] == 2


async def test_stale_answers_do_not_stop_asking_and_recovery_refreshes(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    await cache.get("a", idp.fetcher("a"))
    clock.now += 121
    idp.error = IdPRequestError("test", "http 500")
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    assert await cache.get("a", idp.fetcher("a")) == ALICE
    assert idp.calls == 3            # every stale answer tried the IdP first
    idp.error = None
    bob = IdPUser("alice", "alice@new.test")
    idp.answers["a"] = bob
    assert await cache.get("a", idp.fetcher("a")) == bob
    assert await cache.get("a", idp.fetcher("a")) == bob
    assert idp.calls == 4


async def test_negative_answers_are_not_served_stale_by_default(clock):
    cache, idp = make_cache(clock), Backend()
    assert await cache.get("nobody", idp.fetcher("nobody")) is None
    clock.now += 31
    idp.error = IdPRequestError("test", "unreachable")
    with pytest.raises(IdPError):
        await cache.get("nobody", idp.fetcher("nobody"))
    stale_negative = make_cache(clock, stale_negative=True)
    idp.error = None
    await stale_negative.get("nobody", idp.fetcher("nobody"))
    clock.now += 31
    idp.error = IdPRequestError("test", "unreachable")
    assert await stale_negative.get("nobody", idp.fetcher("nobody")) is None
    assert stale_negative.counters["stale"] == 1


async def test_coalesced_callers_all_get_the_error(clock):
    cache, idp = make_cache(clock), Backend()
    idp.gate = asyncio.Event()
    idp.error = IdPRequestError("test", "timeout")
    waiters = [asyncio.ensure_future(cache.get("a", idp.fetcher("a"))) for _ in range(5)]
    await asyncio.sleep(0)
    idp.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, IdPError) for r in results)
    assert idp.calls == 1 and cache.counters["errors"] == 1


async def test_failures_logged_once_per_kind_and_once_at_recovery(clock, caplog):
    caplog.set_level(logging.DEBUG, logger="mailcloak")
    cache, idp = make_cache(clock), Backend({"a": ALICE, "b": ALICE})
    await cache.get("a", idp.fetcher("a"))
    clock.now += 200
    idp.error = IdPRequestError("test", "timeout", "no answer within 3s")
    for _ in range(5):
        await cache.get("a", idp.fetcher("a"))            # stale
        with pytest.raises(IdPError):
            await cache.get("b", idp.fetcher("b"))
    idp.error = IdPRequestError("test", "http 500")
    for _ in range(3):
        with pytest.raises(IdPError):
            await cache.get("b", idp.fetcher("b"))
    records = [r.getMessage() for r in caplog.records if r.name == "mailcloak.idp.cache"]
    assert len([m for m in records if "failing" in m and "timeout" in m]) == 1
    assert len([m for m in records if "failing" in m and "http 500" in m]) == 1
    assert len([m for m in records if "past their TTL" in m]) == 1
    assert len(records) == 3
    idp.error = None
    for _ in range(3):
        await cache.get("b", idp.fetcher("b"))
    records = [r.getMessage() for r in caplog.records if r.name == "mailcloak.idp.cache"]
    recoveries = [m for m in records if "answers again" in m]
    assert len(recoveries) == 1 and "timeout x10" in recoveries[0] and "http 500 x3" in recoveries[0]
    # a new outage is logged again
    clock.now += 1000
    idp.error = IdPRequestError("test", "timeout")
    with pytest.raises(IdPError):
        await cache.get("b", idp.fetcher("b"))
    records = [r.getMessage() for r in caplog.records if r.name == "mailcloak.idp.cache"]
    assert len([m for m in records if "failing" in m and "timeout" in m]) == 2


async def test_a_flapping_idp_logs_at_most_once_a_minute(clock, caplog):
    caplog.set_level(logging.DEBUG, logger="mailcloak")
    cache, idp = make_cache(clock, max_entries=0), Backend({"a": ALICE})
    for _ in range(50):                       # fails, answers, fails... every second
        clock.now += 1
        idp.error = IdPRequestError("test", "http 502")
        with pytest.raises(IdPError):
            await cache.get("a", idp.fetcher("a"))
        idp.error = None
        await cache.get("a", idp.fetcher("a"))
    records = [r.getMessage() for r in caplog.records if r.name == "mailcloak.idp.cache"]
    assert len([m for m in records if "failing" in m]) == 1
    assert len([m for m in records if "answers again" in m]) == 1
    clock.now += 60
    idp.error = IdPRequestError("test", "http 502")
    with pytest.raises(IdPError):
        await cache.get("a", idp.fetcher("a"))
    records = [r.getMessage() for r in caplog.records if r.name == "mailcloak.idp.cache"]
    assert len([m for m in records if "failing" in m]) == 2


async def test_an_unexpected_exception_becomes_an_idp_error(clock, caplog):
    cache = make_cache(clock)

    async def broken():
        raise KeyError("bug")

    with pytest.raises(IdPError) as info:
        await cache.get("a", broken)
    assert cache.errors == {"internal error": 1}
    assert "internal error" in str(info.value)


async def test_counters_are_a_plain_dict(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    await cache.get("a", idp.fetcher("a"))
    await cache.get("a", idp.fetcher("a"))
    await cache.get("z", idp.fetcher("z"))
    assert cache.counters == {"requests": 2, "hits": 1, "misses": 2, "coalesced": 0,
                              "stale": 0, "errors": 0}
    assert cache.errors == {}


# -- the end of freshness noted for a watching decision (mailcloak.idp.freshness) ---------------

async def watched(*lookups) -> Freshness:
    """The record a decision gets from the lookups it awaits in turn (errors are its business)."""
    fresh = Freshness()
    token = watch(fresh)
    try:
        for lookup in lookups:
            try:
                await lookup()
            except IdPError:
                pass
    finally:
        unwatch(token)
    return fresh


async def test_answers_note_the_earliest_end_of_their_freshness(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    await cache.get("a", idp.fetcher("a"))                                   # fresh until 220
    clock.now += 100
    fresh = await watched(lambda: cache.get("a", idp.fetcher("a")),          # hit: 220
                          lambda: cache.get("nobody", idp.fetcher("nobody")))  # fetched: 200 + 30
    assert fresh.expiry() == 220.0 and not fresh.spoiled
    assert idp.calls == 2
    assert (await watched()).expiry() is None                               # nothing noted


async def test_an_answer_served_stale_spoils_the_record(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE, "b": ALICE})
    await cache.get("a", idp.fetcher("a"))
    clock.now += 121
    await cache.get("b", idp.fetcher("b"))
    idp.error = IdPRequestError("test", "timeout")
    fresh = await watched(lambda: cache.get("b", idp.fetcher("b")),
                          lambda: cache.get("a", idp.fetcher("a")))
    assert cache.counters["stale"] == 1
    assert fresh.spoiled and fresh.expiry() is None


async def test_a_failed_lookup_spoils_the_record(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    await cache.get("a", idp.fetcher("a"))
    idp.error = IdPRequestError("test", "http 500")
    fresh = await watched(lambda: cache.get("a", idp.fetcher("a")),
                          lambda: cache.get("z", idp.fetcher("z")))
    assert fresh.spoiled and cache.counters["errors"] == 1


async def test_a_lookup_cut_short_by_its_deadline_spoils_the_record(clock):
    cache, idp = make_cache(clock), Backend({"a": ALICE})
    idp.gate = asyncio.Event()
    fresh = Freshness()
    token = watch(fresh)
    try:
        waiting = asyncio.ensure_future(cache.get("a", idp.fetcher("a")))  # in the watched context
    finally:
        unwatch(token)
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert fresh.spoiled


async def test_an_answer_the_cache_does_not_keep_spoils_the_record(clock):
    cache, idp = make_cache(clock, max_entries=0), Backend({"a": ALICE})
    fresh = await watched(lambda: cache.get("a", idp.fetcher("a")))
    assert fresh.spoiled
