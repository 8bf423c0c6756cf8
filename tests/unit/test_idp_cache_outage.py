"""The lookup cache while the IdP is known to be failing and hangs (issue 7).

A stale positive answer must come back within STALE_WAIT_SECONDS, not after the IdP timeout (or
never, when the policy deadline is shorter than that timeout); the fetch goes on and its answer
lands in the cache once the IdP answers again.
"""

from __future__ import annotations

import asyncio

from mailcloak.idp import cache as cache_module
from mailcloak.idp.base import IdPUser
from mailcloak.idp.cache import LookupCache
from mailcloak.idp.http import IdPRequestError

ALICE = IdPUser("alice", "alice@d1.test")
NEW_ALICE = IdPUser("alice", "alice@new.test")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


async def test_stale_answer_at_once_while_the_idp_fails_and_hangs():
    clock = Clock()
    cache = LookupCache("test", ttl=120, negative_ttl=30, stale_if_error=600, max_entries=10, clock=clock)
    assert await cache.get("a", _answer(ALICE)) == ALICE
    clock.now += 121                                       # past its TTL
    try:
        await cache.get("b", _fail())                      # the IdP is now known to be failing
    except IdPRequestError:
        pass
    assert cache.failures.failing
    gate = asyncio.Event()
    calls = 0

    async def hanging():
        nonlocal calls
        calls += 1
        await gate.wait()
        return NEW_ALICE

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(cache_module.STALE_WAIT_SECONDS + 1):   # not the IdP's timeout
        assert await cache.get("a", hanging) == ALICE
    assert loop.time() - started < cache_module.STALE_WAIT_SECONDS + 0.5
    assert cache.counters["stale"] == 1
    # a second lookup joins the fetch in flight (one request) and is served stale too
    async with asyncio.timeout(cache_module.STALE_WAIT_SECONDS + 1):
        assert await cache.get("a", hanging) == ALICE
    assert calls == 1 and cache.in_flight() == 1
    gate.set()                                             # the IdP answers again
    for _ in range(100):
        if cache.in_flight() == 0:
            break
        await asyncio.sleep(0.001)
    assert not cache.failures.failing
    assert await cache.get("a", hanging) == NEW_ALICE      # fresh from the cache
    assert calls == 1


async def test_without_a_known_failure_a_stale_entry_waits_for_the_idp():
    """Before any failure is seen the IdP is tried as usual (it may answer; nothing is known)."""
    clock = Clock()
    cache = LookupCache("test", ttl=120, negative_ttl=30, stale_if_error=600, max_entries=10, clock=clock)
    await cache.get("a", _answer(ALICE))
    clock.now += 121

    async def slow():
        await asyncio.sleep(cache_module.STALE_WAIT_SECONDS + 0.1)
        return NEW_ALICE

    assert await cache.get("a", slow) == NEW_ALICE


def _answer(value):
    async def fetch():
        return value
    return fetch


def _fail():
    async def fetch():
        raise IdPRequestError("test", "timeout")
    return fetch
