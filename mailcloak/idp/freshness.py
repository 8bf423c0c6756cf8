"""Until when the IdP answers behind one decision stay fresh, so that what is derived from them
(the policy's memoised decisions) is kept no longer than they are.

The answers come from `LookupCache.get`, deep inside a provider's methods. Rather than add an
argument to every provider method, the record (`Freshness`) travels with the decision in a
context variable (`watch`/`unwatch`): the cache notes in it the end of freshness (on its clock,
the provider's `clock`) of each answer it gives, and spoils it for an answer whose end it cannot
vouch for: served stale while the IdP fails, an error, a wait cut short, an answer it does not
keep. `asyncio.gather` copies the context into the tasks it makes, so questions asked
concurrently note in the same record.
"""

from __future__ import annotations

import math
from contextvars import ContextVar, Token
from typing import Callable


class Freshness:
    """The earliest end of freshness of the answers noted, unless one of them spoiled it."""

    __slots__ = ("until", "spoiled")

    def __init__(self) -> None:
        self.until = math.inf
        self.spoiled = False

    def answered(self, fresh_until: float) -> None:
        if fresh_until < self.until:
            self.until = fresh_until

    def spoil(self) -> None:
        self.spoiled = True

    def expiry(self) -> float | None:
        """When what rests on the noted answers stops being right; None if it cannot be told
        (an answer spoiled it, or none was noted)."""
        return None if self.spoiled or self.until == math.inf else self.until


_watching: ContextVar[Freshness | None] = ContextVar("mailcloak.idp.freshness", default=None)

# The context variable's own methods, bound: no Python call on the IdP cache's hot path.
watching: Callable[[], Freshness | None] = _watching.get  # the current decision's record, if any
watch: Callable[[Freshness], Token] = _watching.set       # note answers given from here on in it
unwatch: Callable[[Token], None] = _watching.reset        # back to what was noted in before
