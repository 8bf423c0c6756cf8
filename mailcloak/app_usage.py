"""When each app last logged in, recorded without slowing logins down.

A successful login only updates a dict in memory (`record`); a background task writes the batch
to the store's app_usage table every `passdb.last_use_flush_seconds` (30 s) and once more at shutdown, in one
transaction. A failed write (database locked, read-only, still the Go schema) keeps the batch
for the next turn, is logged once per distinct error, and never holds a login up. Memory is
bounded by the number of apps. The store writes through the connection it watches for changes,
so these writes never make the daemon reload its state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from mailcloak.errors import StoreError
from mailcloak.store.base import Store
from mailcloak.store.model import AppUsage

log = logging.getLogger(__name__)


class UsageRecorder:
    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._pending: dict[str, AppUsage] = {}
        self._last_error: str | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, app_id: str, remote_ip: str) -> None:
        """A successful login of `app_id` (its stored spelling) now; the hot path's only cost."""
        self._pending[app_id] = AppUsage(int(self._clock()), remote_ip)

    async def flush(self, store: Store) -> bool:
        """Write what was recorded since the last flush; False (batch kept) when the store fails."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        try:
            await store.record_app_usage(batch)
        except BaseException as exc:
            for app_id, use in batch.items():
                self._pending.setdefault(app_id, use)   # a newer login meanwhile wins
            if not isinstance(exc, StoreError):
                raise
            if str(exc) != self._last_error:
                log.warning("cannot record when apps were last used (will retry; logins are not "
                            "affected): %s", exc)
            self._last_error = str(exc)
            return False
        if self._last_error is not None:
            log.info("recording when apps were last used works again")
            self._last_error = None
        return True

    async def run(self, store: Store, interval: float) -> None:
        """Flush every `interval` seconds until cancelled (the caller flushes once more after)."""
        while True:
            await asyncio.sleep(interval)
            await self.flush(store)
