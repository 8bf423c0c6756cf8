"""The daemon's in-memory copy of the database, refreshed when another process commits.

Requests read `StateCache.snapshot` and never touch the database. A background task waits for
the store to report a change (SQLite: `PRAGMA data_version`, polled twice a second) and swaps in
a new snapshot built off the hot path. Where the store keeps an alias change log (SQLite from
schema version 3), a change costs what it changed: domains and apps (small) are read whole, and
of the aliases only those the log names; the rest of the alias index is taken over. Everything is
read again at start, on SIGHUP, after a failed refresh, when the log cannot tell (pruned, or a
Go / version 2 database), and while any alias address is stored with capitals (two rows may then
share one lower-case key, and only a whole read decides which answers). If a refresh fails (locked past the wait, file gone,
corrupt), the last good snapshot keeps answering, the failure is logged once, and the refresh is
retried; answers only become TEMP/451 when no snapshot was ever loaded.

Rows that could break a protocol reply (an alias target or listed sender with a space, comma or
control character, an unknown send_policy, or an alias_domain_name other than the alias's domain,
written into the database by hand) are left out of the snapshot with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mailcloak.addresses import check_alias_address, domain_of, is_safe_token
from mailcloak.errors import InvalidInput, StoreError
from mailcloak.store.base import Store
from mailcloak.store.model import SEND_POLICIES, Rows, Snapshot

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


class StateCache:
    def __init__(self, store: Store, extra_local_domains: frozenset[str] = frozenset()):
        self._store = store
        self._extra = extra_local_domains
        self.snapshot: Snapshot | None = None
        self.loaded_at: float = 0.0
        self.last_error: str | None = None
        # Reloads by kind ("full": every row read; "changes": only what the change log names).
        self.reloads: dict[str, int] = {"full": 0, "changes": 0}
        # The change log position of the snapshot; None when a change must read everything.
        self._log_position: int | None = None
        self._forced = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def store(self) -> Store:
        return self._store

    async def load(self) -> None:
        """Read everything now; raises StoreError (used at start-up, where failing is right)."""
        previous = self.snapshot
        rows = await self._store.load(reuse=previous.aliases if previous is not None else None)
        rows, index, lower_case = await _checked_rows(rows, previous)
        self.snapshot = Snapshot.from_rows(rows, self._extra, index)
        self._log_position = rows.log_position if lower_case else None
        self._loaded("full")

    async def refresh(self) -> None:
        """Take in what changed since the snapshot: only the changed aliases when the store's
        change log tells them, else everything (`load`)."""
        previous = self.snapshot
        if previous is None or self._log_position is None:
            return await self.load()
        changes = await self._store.load_changes(self._log_position)
        if changes is None or any(address != address.lower() for address in changes.removed) \
                or any(alias.address != alias.address.lower() for alias in changes.aliases):
            return await self.load()
        aliases = previous.aliases.copy()  # the proxied dict's copy: dict(proxy) goes key by key
        for address in changes.removed:
            aliases.pop(address, None)
        safe = _safe_rows(Rows(aliases=changes.aliases)).aliases
        for alias in changes.aliases:
            aliases.pop(alias.address, None)  # an unsafe row is left out, as a full load would
        for alias in safe:
            aliases[alias.address] = alias
        self.snapshot = Snapshot.from_rows(Rows(changes.domains, (), changes.apps), self._extra, aliases)
        self._log_position = changes.log_position
        self._loaded("changes")

    def _loaded(self, kind: str) -> None:
        self.loaded_at = time.monotonic()
        self.last_error = None
        self.reloads[kind] += 1

    def set_extra_local_domains(self, domains: frozenset[str]) -> None:
        self._extra = domains

    def request_reload(self) -> None:
        """Read everything at once (SIGHUP), whatever the change detection says."""
        self._forced.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="state-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_forever(self) -> None:
        while True:
            try:
                if await self._wait_for_change_or_force():
                    await self.load()
                else:
                    await self.refresh()
                log.debug("database state reloaded")
            except StoreError as exc:
                if self.last_error != str(exc):
                    log.error("cannot refresh database state (answering from the last good state): %s", exc)
                self.last_error = str(exc)
                await asyncio.sleep(RETRY_SECONDS)
                with contextlib.suppress(StoreError):
                    await self._store.reconnect()  # a connection that saw a broken file stays broken
                self._forced.set()  # retry the load itself (all of it), not only the change check

    async def _wait_for_change_or_force(self) -> bool:
        """Wait for a change or a forced reload; True when forced."""
        if self._forced.is_set():
            self._forced.clear()
            return True
        change = asyncio.ensure_future(self._store.wait_for_change())
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            await asyncio.wait({change, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
            forced.cancel()
            results = await asyncio.gather(change, forced, return_exceptions=True)
        was_forced = self._forced.is_set()
        self._forced.clear()
        if isinstance(results[0], StoreError):
            raise results[0]
        return was_forced


# Aliases handled between two turns of the event loop while a snapshot is built, so that requests
# are not held up by a reload of a large database.
SLICE = 500


async def _checked_rows(rows: Rows, previous: Snapshot | None) -> tuple[Rows, dict, bool]:
    """`_safe_rows(rows)`, its aliases by lower-case address (as `Snapshot.from_rows` makes it),
    and whether every address is stored in lower case, in one pass and in slices. Only aliases
    that changed since the `previous` snapshot are checked: the checks are a function of the row
    alone, and an unchanged row (the store gives its object of the previous load again) passed
    them already."""
    known = previous.aliases if previous is not None else {}
    index = {}
    changed = []
    lower_case = True
    for n, alias in enumerate(rows.aliases, 1):
        address = alias.address
        if known.get(address) is not alias:
            changed.append(alias)
        if not address.islower():
            address = address.lower()
            lower_case = lower_case and address == alias.address
        index[address] = alias
        if n % SLICE == 0:
            await asyncio.sleep(0)
    checked = _safe_rows(Rows(rows.domains, tuple(changed), rows.apps))
    if len(checked.aliases) == len(changed):
        return rows, index, lower_case
    unsafe = set(map(id, changed)).difference(map(id, checked.aliases))
    rows = Rows(rows.domains, tuple(a for a in rows.aliases if id(a) not in unsafe), rows.apps, rows.log_position)
    return rows, {a.address.lower(): a for a in rows.aliases}, lower_case


def _safe_rows(rows: Rows) -> Rows:
    aliases = []
    dropped = 0
    for alias in rows.aliases:
        try:
            address = check_alias_address(alias.address)
            ok = all(is_safe_token(user) and "@" not in user
                     for user in (*alias.targets, *alias.listed_senders))
            ok = ok and alias.send_policy in SEND_POLICIES
            # The answer is target_user@alias_domain_name: that column must be the address's
            # domain (a trigger says so, but a database edited by hand may lack it).
            ok = ok and alias.domain.lower() == domain_of(address)
        except InvalidInput:
            ok = False
        if ok:
            aliases.append(alias)
        else:
            dropped += 1
    if dropped:
        log.warning("ignoring %d alias row(s) whose address or target_user cannot be used safely "
                    "in a Postfix reply; fix them with mailcloakctl", dropped)
        return Rows(rows.domains, tuple(aliases), rows.apps)
    return rows
