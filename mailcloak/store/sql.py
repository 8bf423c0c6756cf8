"""The queries of every SQL store, and what they mean, written once.

SQLite and PostgreSQL understand the same statements here (`INSERT ... ON CONFLICT ... DO UPDATE`,
`excluded.`, `lower()`), written with `?` placeholders; a backend supplies only the connection:
a transaction that runs them (translating placeholders and mapping its driver's errors to
StoreError), the schema version, and how it notices other writers. So the meaning of a write
(upserts re-enable, aliases need an enabled domain, app ids match case-insensitively) cannot
drift between backends.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator, Mapping, Protocol

from mailcloak.errors import InvalidInput, NotFound, SchemaOutdated
from mailcloak.passwords import NO_SECRET
from mailcloak.store.base import Store
from mailcloak.store.model import (SEND_POLICIES, Alias, AliasChanges, App, AppSender, AppSettings, AppUsage,
                                   Domain, Rows)


# Addresses per `IN (...)` when the changed aliases are read (SQLite's old limit of host
# parameters is 999).
_IN_BATCH = 500


class Transaction(Protocol):
    """One open transaction of a backend. SQL uses `?` placeholders."""

    async def execute(self, sql: str, params: tuple = ()) -> int:
        """Run a statement; return the number of rows it changed."""

    async def execute_many(self, sql: str, rows: list[tuple]) -> None:
        """Run a statement once per parameter tuple (bulk copy)."""

    async def fetchone(self, sql: str, params: tuple = ()) -> tuple | None: ...

    def rows(self, sql: str, params: tuple = ()) -> AsyncIterator[tuple]:
        """Every row, fetched in chunks that give the event loop a turn in between."""

    def chunks(self, sql: str, params: tuple = ()) -> AsyncIterator[list[tuple]]:
        """Every row, as the lists of rows fetched at a time, with a turn of the event loop in
        between (for loops over many rows, where a step per row costs)."""


class SQLStore(Store):
    """A Store whose reads and writes are the statements below."""

    @abstractmethod
    def _transaction(self, *, write: bool) -> AbstractAsyncContextManager[Transaction]:
        """A transaction committed whole or rolled back whole; `write=False` for a consistent
        read. Driver errors leave it as StoreError (StoreLocked when another writer holds it)."""

    @abstractmethod
    async def _schema_version(self, tx: Transaction) -> int: ...

    async def _load_started(self, tx: Transaction) -> None:
        """Called first inside `load()`'s transaction: the point after which another writer's
        commit must be reported by wait_for_change."""

    # Reads -------------------------------------------------------------------------------------

    async def _change_log_position(self, tx: Transaction) -> int | None:
        """The number of the last entry of the alias change log, or None when this backend or
        this database has none (every reload then reads everything)."""
        return None

    async def load(self, reuse: Mapping[str, Alias] | None = None) -> Rows:
        async with self._transaction(write=False) as tx:
            await self._load_started(tx)
            log_position = await self._change_log_position(tx)
            # A Go database (version 1) opens as it is: the version 2 columns read as their
            # defaults until mailcloakctl init adds them (possibly while the daemon runs).
            v2 = await self._schema_version(tx) >= 2
            domains = await self._domains(tx)
            aliases = await self._aliases(tx, v2, reuse)
            apps = await self._apps(tx, v2)
        return Rows(domains, aliases, apps, log_position)

    async def load_changes(self, log_position: int) -> AliasChanges | None:
        async with self._transaction(write=False) as tx:
            await self._load_started(tx)
            now_at = await self._change_log_position(tx)
            if now_at is None or now_at < log_position:
                return None  # no log, or not the database of that position (replaced, restored)
            addresses: set[str] = set()
            entries = 0
            async for (address,) in tx.rows("SELECT alias_email FROM alias_changes WHERE seq > ?",
                                            (log_position,)):
                addresses.add(_text(address))
                entries += 1
            if entries != now_at - log_position:
                return None  # entries pruned or deleted: what changed cannot be told
            v2 = await self._schema_version(tx) >= 2
            domains = await self._domains(tx)
            aliases = []
            ordered = sorted(addresses)
            for start in range(0, len(ordered), _IN_BATCH):
                aliases.extend(await self._aliases(tx, v2, None, tuple(ordered[start:start + _IN_BATCH])))
            apps = await self._apps(tx, v2)
        present = {alias.address for alias in aliases}
        return AliasChanges(domains, tuple(aliases), apps, tuple(sorted(addresses - present)), now_at)

    # _text/_int: a row written by hand may hold a BLOB or a stray type (SQLite keeps what it is
    # given); it must not stop the load (see _text).

    @staticmethod
    async def _domains(tx: Transaction) -> tuple[Domain, ...]:
        return tuple([
            Domain(_text(name), bool(enabled), _int(updated_at))
            async for name, enabled, updated_at in tx.rows(
                "SELECT domain_name, enabled, updated_at FROM domains"
            )
        ])

    @staticmethod
    async def _aliases(tx: Transaction, v2: bool, reuse: Mapping[str, Alias] | None,
                       only: tuple[str, ...] | None = None) -> tuple[Alias, ...]:
        """Every alias, or those whose addresses are `only` (as stored)."""
        where, params = "", ()
        if only is not None:
            where, params = f" WHERE alias_email IN ({', '.join('?' * len(only))})", only
        extra_targets: dict[str, list[str]] = {}
        listed_senders: dict[str, list[str]] = {}
        if v2:
            async for address, target in tx.rows(
                "SELECT alias_email, target_user FROM alias_targets" + where
                + " ORDER BY alias_email, position, target_user", params
            ):
                extra_targets.setdefault(_text(address), []).append(_text(target))
            async for address, sender in tx.rows(
                "SELECT alias_email, sender_user FROM alias_senders" + where
                + " ORDER BY alias_email, sender_user", params
            ):
                listed_senders.setdefault(_text(address), []).append(_text(sender))
        aliases = []
        known = reuse.get if reuse else {}.get
        async for chunk in tx.chunks(
            "SELECT alias_email, target_user, alias_domain_name, enabled, updated_at, "
            + ("send_policy" if v2 else "'members'") + " FROM aliases" + where, params
        ):
            for row in chunk:
                # An unchanged row gives the object of the previous load again: at 100 000
                # aliases, a reload then leaves few new objects for the collector to scan.
                kept = known(row[0])
                if (kept is not None and row == (kept.address, kept.target_user, kept.domain,
                                                 kept.enabled, kept.updated_at, kept.send_policy)
                        and not kept.extra_targets and not kept.listed_senders
                        and row[0] not in extra_targets and row[0] not in listed_senders):
                    aliases.append(kept)
                    continue
                address, target, domain, enabled, updated_at, policy = row
                aliases.append(Alias(
                    _text(address), _text(target), _text(domain), bool(enabled), _int(updated_at),
                    tuple(extra_targets.get(_text(address), ())), _text(policy) or "members",
                    tuple(listed_senders.get(_text(address), ()))))
        return tuple(aliases)

    @staticmethod
    async def _apps(tx: Transaction, v2: bool) -> tuple[App, ...]:
        senders: dict[str, list[AppSender]] = {}
        async for app_id, address, enabled in tx.rows(
            "SELECT app_id, from_addr, enabled FROM app_from ORDER BY app_id, from_addr"
        ):
            senders.setdefault(_text(app_id), []).append(AppSender(_text(address), bool(enabled)))
        return tuple([
            App(_text(app_id), _text(secret), bool(enabled), _int(updated_at),
                tuple(senders.get(_text(app_id), ())), _text(description),
                None if expires_at is None else _int(expires_at), tuple(_text(networks).split()))
            async for app_id, secret, enabled, updated_at, description, expires_at, networks
            in tx.rows(
                "SELECT app_id, secret_hash, enabled, updated_at, "
                + ("description, expires_at, networks" if v2 else "'', NULL, ''")
                + " FROM apps"
            )
        ])

    # Writes ------------------------------------------------------------------------------------

    async def _write(self, sql: str, params: tuple) -> int:
        """Run one statement in its own transaction; return its row count."""
        async with self._transaction(write=True) as tx:
            return await tx.execute(sql, params)

    async def add_domain(self, domain: str) -> None:
        await self._write(
            "INSERT INTO domains(domain_name, enabled, updated_at) VALUES (?, 1, ?) "
            "ON CONFLICT(domain_name) DO UPDATE SET enabled = 1, updated_at = excluded.updated_at",
            (domain, _now()),
        )

    async def set_domain_enabled(self, domain: str, enabled: bool) -> None:
        count = await self._write(
            "UPDATE domains SET enabled = ?, updated_at = ? WHERE domain_name = ?",
            (int(enabled), _now(), domain),
        )
        if not count:
            raise NotFound(f"domain not found: {domain}")

    async def delete_domain(self, domain: str) -> None:
        count = await self._write("DELETE FROM domains WHERE domain_name = ?", (domain,))
        if not count:
            raise NotFound(f"domain not found: {domain}")

    async def add_alias(self, alias: str, target_user: str) -> None:
        await self.set_alias_targets(alias, (target_user,))

    async def set_alias_targets(self, alias: str, targets: tuple[str, ...]) -> None:
        if not targets:
            raise InvalidInput(f"alias {alias} needs at least one target")
        domain = alias.rpartition("@")[2]
        # The domain check, the upsert and the list share one transaction: nothing is half-written.
        async with self._transaction(write=True) as tx:
            v2 = await self._schema_version(tx) >= 2
            if len(targets) > 1:
                await self._require_v2(tx, "lists (aliases with several targets)")
            row = await tx.fetchone("SELECT enabled FROM domains WHERE domain_name = ?", (domain,))
            if row is None:
                raise NotFound(f"domain not found: {domain}")
            if not row[0]:
                raise InvalidInput(f"domain disabled: {domain}")
            await tx.execute(
                "INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled, updated_at) "
                "VALUES (?, ?, ?, 1, ?) ON CONFLICT(alias_email) DO UPDATE SET "
                "target_user = excluded.target_user, enabled = 1, updated_at = excluded.updated_at",
                (alias, targets[0], domain, _now()),
            )
            if v2:
                await self._write_extra_targets(tx, alias, targets[1:])

    @staticmethod
    async def _write_extra_targets(tx: Transaction, alias: str, extra: tuple[str, ...]) -> None:
        await tx.execute("DELETE FROM alias_targets WHERE alias_email = ?", (alias,))
        for position, target in enumerate(extra, 1):
            await tx.execute(
                "INSERT INTO alias_targets(alias_email, target_user, position) VALUES (?, ?, ?)",
                (alias, target, position),
            )

    async def _change_members(self, alias: str, change) -> None:
        """Read an alias's targets, apply `change` (targets → new targets), write them back, in
        one transaction; its enabled state is kept."""
        async with self._transaction(write=True) as tx:
            await self._require_v2(tx, "lists (aliases with several targets)")
            row = await tx.fetchone("SELECT target_user FROM aliases WHERE alias_email = ?", (alias,))
            if row is None:
                raise NotFound(f"alias not found: {alias}")
            targets = (row[0], *[target async for (target,) in tx.rows(
                "SELECT target_user FROM alias_targets WHERE alias_email = ? "
                "ORDER BY position, target_user", (alias,))])
            new = change(targets)
            if new == targets:
                return
            await tx.execute("UPDATE aliases SET target_user = ?, updated_at = ? WHERE alias_email = ?",
                             (new[0], _now(), alias))
            await self._write_extra_targets(tx, alias, new[1:])

    async def add_alias_member(self, alias: str, user: str) -> None:
        def change(targets: tuple[str, ...]) -> tuple[str, ...]:
            if any(t.lower() == user.lower() for t in targets):
                return targets
            return (*targets, user)
        await self._change_members(alias, change)

    async def remove_alias_member(self, alias: str, user: str) -> None:
        def change(targets: tuple[str, ...]) -> tuple[str, ...]:
            kept = tuple(t for t in targets if t.lower() != user.lower())
            if len(kept) == len(targets):
                raise NotFound(f"{user} is not a target of {alias}")
            if not kept:
                raise InvalidInput(f"{user} is the only target of {alias}: delete the alias instead")
            return kept
        await self._change_members(alias, change)

    async def set_alias_senders(self, alias: str, policy: str, users: tuple[str, ...]) -> None:
        if policy not in SEND_POLICIES:
            raise InvalidInput(f"invalid sender rule {policy!r} (choose members, nobody or listed)")
        if (policy == "listed") != bool(users):
            raise InvalidInput("give users with 'listed', and only with 'listed'")
        async with self._transaction(write=True) as tx:
            await self._require_v2(tx, "sender rules of aliases")
            count = await tx.execute(
                "UPDATE aliases SET send_policy = ?, updated_at = ? WHERE alias_email = ?",
                (policy, _now(), alias),
            )
            if not count:
                raise NotFound(f"alias not found: {alias}")
            await tx.execute("DELETE FROM alias_senders WHERE alias_email = ?", (alias,))
            for user in users:
                await tx.execute(
                    "INSERT INTO alias_senders(alias_email, sender_user) VALUES (?, ?)", (alias, user)
                )

    async def set_alias_enabled(self, alias: str, enabled: bool) -> None:
        count = await self._write(
            "UPDATE aliases SET enabled = ?, updated_at = ? WHERE alias_email = ?",
            (int(enabled), _now(), alias),
        )
        if not count:
            raise NotFound(f"alias not found: {alias}")

    async def delete_alias(self, alias: str) -> None:
        count = await self._write("DELETE FROM aliases WHERE alias_email = ?", (alias,))
        if not count:
            raise NotFound(f"alias not found: {alias}")

    async def add_app(self, app_id: str, secret_hash: str, settings: AppSettings = AppSettings()) -> None:
        async with self._transaction(write=True) as tx:
            clash = await tx.fetchone(
                "SELECT app_id FROM apps WHERE lower(app_id) = lower(?) AND app_id <> ?",
                (app_id, app_id),
            )
            if clash is not None:
                raise InvalidInput(f"app id {app_id!r} differs from existing app {clash[0]!r} only in case")
            await tx.execute(
                "INSERT INTO apps(app_id, secret_hash, enabled, updated_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(app_id) DO UPDATE SET secret_hash = excluded.secret_hash, "
                "enabled = 1, updated_at = excluded.updated_at",
                (app_id, secret_hash, _now()),
            )
            await self._write_app_settings(tx, app_id, settings)

    @staticmethod
    async def _app_id(tx: Transaction, app_id: str) -> str:
        """The stored spelling of an app id matched case-insensitively, read in the transaction
        that then writes with it."""
        row = await tx.fetchone(
            "SELECT app_id FROM apps WHERE app_id = ? OR lower(app_id) = lower(?) "
            "ORDER BY app_id = ? DESC LIMIT 1",
            (app_id, app_id, app_id),
        )
        if row is None:
            raise NotFound(f"app not found: {app_id}")
        return row[0]

    async def set_app_enabled(self, app_id: str, enabled: bool) -> None:
        async with self._transaction(write=True) as tx:
            stored = await self._app_id(tx, app_id)
            await tx.execute(
                "UPDATE apps SET enabled = ?, updated_at = ? WHERE app_id = ?",
                (int(enabled), _now(), stored),
            )

    async def delete_app(self, app_id: str) -> None:
        async with self._transaction(write=True) as tx:
            stored = await self._app_id(tx, app_id)
            await tx.execute("DELETE FROM apps WHERE app_id = ?", (stored,))

    async def allow_sender(self, app_id: str, address: str) -> None:
        async with self._transaction(write=True) as tx:
            stored = await self._app_id(tx, app_id)
            await tx.execute(
                "INSERT INTO app_from(app_id, from_addr, enabled, updated_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(app_id, from_addr) DO UPDATE SET enabled = 1, updated_at = excluded.updated_at",
                (stored, address, _now()),
            )

    async def disallow_sender(self, app_id: str, address: str) -> None:
        async with self._transaction(write=True) as tx:
            stored = await self._app_id(tx, app_id)
            count = await tx.execute(
                "DELETE FROM app_from WHERE app_id = ? AND from_addr = ?", (stored, address)
            )
            if not count:
                raise NotFound(f"app {stored} is not allowed to send as {address}")

    # Version 2 writes ------------------------------------------------------------------------

    async def _require_v2(self, tx: Transaction, what: str) -> None:
        """SchemaOutdated, one line that says what to do, instead of an SQL error about a
        missing column on a Go (version 1) database."""
        if await self._schema_version(tx) < 2:
            raise SchemaOutdated(
                f"database {self.location} has the Go project's schema (version 1); to use "
                f"{what}, run mailcloakctl init (it only adds columns and tables)"
            )

    async def _write_app_settings(self, tx: Transaction, stored_id: str, settings: AppSettings) -> None:
        changes = settings.changes()
        if not changes:
            return
        await self._require_v2(tx, "app descriptions, expiry and networks")
        # Column names come from AppSettings.changes(), a fixed set; values are parameters.
        assignments = ", ".join(f"{column} = ?" for column in changes)
        await tx.execute(
            f"UPDATE apps SET {assignments}, updated_at = ? WHERE app_id = ?",
            (*changes.values(), _now(), stored_id),
        )

    async def set_app_settings(self, app_id: str, settings: AppSettings) -> None:
        async with self._transaction(write=True) as tx:
            await self._require_v2(tx, "app descriptions, expiry and networks")
            await self._write_app_settings(tx, await self._app_id(tx, app_id), settings)

    async def record_app_usage(self, usage) -> None:
        if not usage:
            return
        async with self._transaction(write=True) as tx:
            await self._require_v2(tx, "last-use recording")
            for app_id, use in usage.items():
                # INSERT ... SELECT skips an app deleted since the login (no foreign-key error
                # for the whole batch); the WHERE keeps a later use recorded meanwhile. The
                # CASTs give the select list's parameters a type (PostgreSQL asks for one).
                await tx.execute(
                    "INSERT INTO app_usage(app_id, last_used_at, last_used_ip) "
                    "SELECT app_id, CAST(? AS BIGINT), CAST(? AS TEXT) FROM apps WHERE app_id = ? "
                    "ON CONFLICT(app_id) DO UPDATE SET last_used_at = excluded.last_used_at, "
                    "last_used_ip = excluded.last_used_ip "
                    "WHERE excluded.last_used_at >= app_usage.last_used_at",
                    (use.last_used_at, use.last_used_ip, app_id),
                )

    async def app_usage(self) -> dict[str, AppUsage]:
        async with self._transaction(write=False) as tx:
            if await self._schema_version(tx) < 2:
                return {}
            return {
                _text(app_id): AppUsage(_int(used_at), _text(ip))
                async for app_id, used_at, ip in tx.rows(
                    "SELECT app_id, last_used_at, last_used_ip FROM app_usage"
                )
            }

    async def import_rows(self, rows: Rows, *, replace: bool) -> tuple[str, ...]:
        now = _now()
        created: list[str] = []
        async with self._transaction(write=True) as tx:
            await self._require_v2(tx, "import")
            if replace:
                await self._delete_absent(tx, "apps", "app_id", {a.app_id.lower() for a in rows.apps},
                                          fold_case=True)
                await self._delete_absent(tx, "aliases", "alias_email", {a.address for a in rows.aliases})
                await self._delete_absent(tx, "domains", "domain_name", {d.name for d in rows.domains})
            for domain in rows.domains:
                await tx.execute(
                    "INSERT INTO domains(domain_name, enabled, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(domain_name) DO UPDATE SET enabled = excluded.enabled, "
                    "updated_at = excluded.updated_at",
                    (domain.name, int(domain.enabled), now),
                )
            for alias in rows.aliases:
                await self._import_alias(tx, alias, now)
            for app in rows.apps:
                if await self._import_app(tx, app, now):
                    created.append(app.app_id)
        return tuple(created)

    @staticmethod
    async def _delete_absent(tx: Transaction, table: str, key: str, wanted: set[str], *,
                             fold_case: bool = False) -> None:
        """Delete the rows of `table` whose `key` is not in `wanted` (table and key are fixed
        names given by import_rows)."""
        existing = [row[0] async for row in tx.rows(f"SELECT {key} FROM {table}")]
        for value in existing:
            if (_text(value).lower() if fold_case else _text(value)) not in wanted:
                await tx.execute(f"DELETE FROM {table} WHERE {key} = ?", (value,))

    @staticmethod
    async def _import_alias(tx: Transaction, alias: Alias, now: int) -> None:
        if await tx.fetchone("SELECT 1 FROM domains WHERE domain_name = ?", (alias.domain,)) is None:
            raise NotFound(f"domain not found: {alias.domain} (alias {alias.address})")
        await tx.execute(
            "INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled, send_policy, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(alias_email) DO UPDATE SET "
            "target_user = excluded.target_user, enabled = excluded.enabled, "
            "send_policy = excluded.send_policy, updated_at = excluded.updated_at",
            (alias.address, alias.target_user, alias.domain, int(alias.enabled), alias.send_policy, now),
        )
        await tx.execute("DELETE FROM alias_targets WHERE alias_email = ?", (alias.address,))
        for position, target in enumerate(alias.extra_targets, 1):
            await tx.execute(
                "INSERT INTO alias_targets(alias_email, target_user, position) VALUES (?, ?, ?)",
                (alias.address, target, position),
            )
        await tx.execute("DELETE FROM alias_senders WHERE alias_email = ?", (alias.address,))
        for sender in alias.listed_senders:
            await tx.execute(
                "INSERT INTO alias_senders(alias_email, sender_user) VALUES (?, ?)",
                (alias.address, sender),
            )

    async def _import_app(self, tx: Transaction, app: App, now: int) -> bool:
        """Write one app as `app` says (an existing one keeps its secret); True if created."""
        try:
            stored = await self._app_id(tx, app.app_id)
        except NotFound:
            stored = None
        settings = (app.description, app.expires_at, " ".join(app.networks))
        created = stored is None
        if created:
            stored = app.app_id
            await tx.execute(
                "INSERT INTO apps(app_id, secret_hash, enabled, description, expires_at, networks, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stored, NO_SECRET, int(app.enabled), *settings, now),
            )
        else:
            await tx.execute(
                "UPDATE apps SET enabled = ?, description = ?, expires_at = ?, networks = ?, "
                "updated_at = ? WHERE app_id = ?",
                (int(app.enabled), *settings, now, stored),
            )
        await tx.execute("DELETE FROM app_from WHERE app_id = ?", (stored,))
        for sender in app.senders:
            await tx.execute(
                "INSERT INTO app_from(app_id, from_addr, enabled, updated_at) VALUES (?, ?, ?, ?)",
                (stored, sender.address, int(sender.enabled), now),
            )
        return created


def _now() -> int:
    return int(time.time())


def _text(value) -> str:
    """A TEXT column as str. SQLite stores whatever a hand-written row gives it: a BLOB is read as
    the UTF-8 text it holds (Go's database/sql does the same), undecodable bytes as U+FFFD, NULL
    as "" (then refused by the row checks of mailcloak.state), a number as its digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _int(value) -> int:
    """An INTEGER column such as updated_at; 0 when a hand-written row holds something else."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
