"""Answers kept while the database snapshot and the runtime (config, IdP) they came from stay in force.

Postfix asks the same questions again and again (each recipient of a message, smtpd then cleanup,
each answer looked up again), and an answer that is a function of the request, the snapshot and
the runtime alone need not be worked out twice. The memo is emptied when either changes and when
it is full; it refers to the snapshot and runtime weakly, so an old snapshot is not kept alive by
it. An answer that also depends on something else (the clock, a remote IdP's answer with its own
TTL) must either have it in its key or not be kept.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Hashable

if TYPE_CHECKING:
    from mailcloak.runtime import Runtime
    from mailcloak.store.model import Snapshot


def _dead() -> None:
    return None


class SnapshotMemo:
    __slots__ = ("_size", "_entries", "_snapshot", "_runtime")

    def __init__(self, size: int):
        self._size = size
        self._entries: dict[Hashable, Any] = {}
        self._snapshot = self._runtime = _dead

    def entries_for(self, runtime: Runtime, snapshot: Snapshot | None) -> dict[Hashable, Any]:
        """The answers kept for this runtime and snapshot (emptied if they are not the memo's),
        with room for one more: an answer worked out without awaiting anything since may be
        stored in it directly, which is cheaper than `keep`."""
        if self._snapshot() is not snapshot or self._runtime() is not runtime:
            self._entries = {}
            self._snapshot = weakref.ref(snapshot) if snapshot is not None else _dead
            self._runtime = weakref.ref(runtime)
        elif len(self._entries) >= self._size:
            self._entries.clear()
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, runtime: Runtime, snapshot: Snapshot, key: Hashable, value: Any) -> None:
        """Remember `value` if runtime and snapshot are still the memo's (a request that waited
        for the IdP may end after a reload)."""
        if self._snapshot() is not snapshot or self._runtime() is not runtime:
            return
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = value
