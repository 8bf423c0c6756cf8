"""SQLite store (aiosqlite), compatible with the Go project's `state.db`.

Schema version 1 is exactly the Go project's schema (COMPAT.md), written with `IF NOT EXISTS`, so
that a Go database already *is* version 1 and opens as it is. Later versions only add (columns,
tables, indexes). The daemon never writes: it checks the tables exist and refuses a database newer
than it knows. `mailcloakctl init` creates or migrates.

Change detection: `PRAGMA data_version` changes on a connection whenever another connection
commits, is answered from memory, and so costs nothing to poll twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from typing import Mapping
from pathlib import Path

import aiosqlite

from mailcloak.config import SQLiteConfig
from mailcloak.errors import InvalidInput, NotFound, StoreError, StoreLocked, StoreMissing
from mailcloak.store.base import Store
from mailcloak.store.model import Alias, App, AppSender, Domain, Rows

_TOUCH = """
CREATE TRIGGER IF NOT EXISTS {table}_touch_updated_at AFTER UPDATE ON {table}
FOR EACH ROW WHEN NEW.updated_at IS OLD.updated_at
BEGIN
  UPDATE {table} SET updated_at = CAST(strftime('%s','now') AS INTEGER) WHERE {where};
END;
"""

SCHEMA_V1 = (
    """
CREATE TABLE IF NOT EXISTS domains (
  domain_name TEXT PRIMARY KEY,
  enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at  INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER))
);
CREATE TABLE IF NOT EXISTS aliases (
  alias_email       TEXT PRIMARY KEY,
  target_user       TEXT NOT NULL,
  alias_domain_name TEXT NOT NULL REFERENCES domains(domain_name) ON DELETE CASCADE,
  enabled           INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at        INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER))
);
CREATE INDEX IF NOT EXISTS idx_aliases_target_user ON aliases(target_user);
CREATE INDEX IF NOT EXISTS idx_aliases_domain ON aliases(alias_domain_name);
CREATE TRIGGER IF NOT EXISTS aliases_domain_matches_insert BEFORE INSERT ON aliases
WHEN NEW.alias_domain_name IS NOT substr(NEW.alias_email, instr(NEW.alias_email, '@') + 1)
BEGIN
  SELECT RAISE(ABORT, 'alias_domain_name must equal the domain of alias_email');
END;
CREATE TRIGGER IF NOT EXISTS aliases_domain_matches_update BEFORE UPDATE ON aliases
WHEN NEW.alias_domain_name IS NOT substr(NEW.alias_email, instr(NEW.alias_email, '@') + 1)
BEGIN
  SELECT RAISE(ABORT, 'alias_domain_name must equal the domain of alias_email');
END;
CREATE TABLE IF NOT EXISTS apps (
  app_id      TEXT PRIMARY KEY,
  secret_hash TEXT NOT NULL,
  enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at  INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER))
);
CREATE TABLE IF NOT EXISTS app_from (
  app_id     TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
  from_addr  TEXT NOT NULL,
  enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER)),
  PRIMARY KEY (app_id, from_addr)
);
CREATE INDEX IF NOT EXISTS idx_app_from_from_addr ON app_from(from_addr);
"""
    + _TOUCH.format(table="domains", where="domain_name = NEW.domain_name")
    + _TOUCH.format(table="aliases", where="alias_email = NEW.alias_email")
    + _TOUCH.format(table="apps", where="app_id = NEW.app_id")
    + _TOUCH.format(table="app_from", where="app_id = NEW.app_id AND from_addr = NEW.from_addr")
)

# Version 2 (issue #9): distribution lists, app credentials that age.
# - A list alias keeps its first target in aliases.target_user (so a one-target alias is exactly
#   a Go row) and its further targets in alias_targets; who may send as it is aliases.send_policy
#   (members: its targets; nobody; listed: the users in alias_senders).
# - A catch-all is an alias row whose alias_email is "@domain"; it needs no new column.
# - apps gain a description, an optional expiry (unix seconds) and allowed client networks
#   (CIDRs separated by spaces; empty = any). Last use lives in its own table, app_usage, written
#   by the daemon: it is not part of the state the daemon answers from, so its writes never count
#   as a change to reload.
SCHEMA_V2 = (
    """
ALTER TABLE aliases ADD COLUMN send_policy TEXT NOT NULL DEFAULT 'members'
  CHECK (send_policy IN ('members', 'nobody', 'listed'));
CREATE TABLE IF NOT EXISTS alias_targets (
  alias_email TEXT NOT NULL REFERENCES aliases(alias_email) ON DELETE CASCADE,
  target_user TEXT NOT NULL,
  position    INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (alias_email, target_user)
);
CREATE INDEX IF NOT EXISTS idx_alias_targets_target_user ON alias_targets(target_user);
CREATE TABLE IF NOT EXISTS alias_senders (
  alias_email TEXT NOT NULL REFERENCES aliases(alias_email) ON DELETE CASCADE,
  sender_user TEXT NOT NULL,
  PRIMARY KEY (alias_email, sender_user)
);
ALTER TABLE apps ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE apps ADD COLUMN expires_at INTEGER;
ALTER TABLE apps ADD COLUMN networks TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS app_usage (
  app_id       TEXT PRIMARY KEY REFERENCES apps(app_id) ON DELETE CASCADE,
  last_used_at INTEGER NOT NULL,
  last_used_ip TEXT NOT NULL DEFAULT ''
);
"""
)

# Numbered migrations: index i holds the script that brings user_version i to i + 1. Add only.
MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2)
SCHEMA_VERSION = len(MIGRATIONS)
REQUIRED_TABLES = frozenset({"domains", "aliases", "apps", "app_from"})

_CHUNK = 500  # rows per fetch while loading, so the event loop is never held for long


def missing_message(path: str) -> str:
    return f"sqlite db not found at {path}; create it with mailcloakctl init"


class SQLiteStore(Store):
    def __init__(self, conn: aiosqlite.Connection, config: SQLiteConfig):
        self._conn = conn
        self._config = config
        self.location = config.path
        self._poll_interval = config.poll_interval_seconds
        self._data_version: int | None = None

    @classmethod
    async def open(cls, config: SQLiteConfig, *, create: bool = False) -> "SQLiteStore":
        path = config.path
        if create:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create folder for {path}: {exc.strerror}") from None
        elif not os.path.exists(path):
            raise StoreMissing(missing_message(path))
        conn = await _connect(config, create)
        store = cls(conn, config)
        try:
            if create:
                await store._migrate()
            else:
                await store._check_schema()
        except sqlite3.Error as exc:
            await conn.close()
            raise _store_error(exc, path) from None
        except StoreError:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        await self._conn.close()

    async def reconnect(self) -> None:
        """A new connection: SQLite keeps pages it read in its cache, so after the file was
        corrupted and repaired under it, only a new connection reads the repaired file."""
        if not os.path.exists(self.location):
            raise StoreMissing(missing_message(self.location))
        conn = await _connect(self._config, create=False)
        old, self._conn = self._conn, conn
        self._data_version = None
        with contextlib.suppress(Exception):
            await old.close()

    async def _user_version(self) -> int:
        async with self._conn.execute("PRAGMA user_version") as cur:
            (version,) = await cur.fetchone()
        return int(version)

    async def _check_schema(self) -> None:
        async with self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
            tables = {row[0] for row in await cur.fetchall()}
        missing = REQUIRED_TABLES - tables
        if missing:
            raise StoreError(
                f"database {self.location} lacks table(s) {', '.join(sorted(missing))}; "
                "run mailcloakctl init"
            )
        version = await self._user_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.location} has schema version {version}, newer than this "
                f"mailcloak knows ({SCHEMA_VERSION})"
            )

    async def _migrate(self) -> None:
        version = await self._user_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.location} has schema version {version}, newer than this "
                f"mailcloak knows ({SCHEMA_VERSION})"
            )
        async with self._conn.execute("PRAGMA journal_mode = WAL") as cur:
            await cur.fetchall()
        for target in range(version, SCHEMA_VERSION):
            # executescript commits first; the migration itself runs in one transaction.
            await self._conn.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[target]}\nPRAGMA user_version = {target + 1};\nCOMMIT;"
            )

    # Reads -------------------------------------------------------------------------------------

    async def load(self, reuse: Mapping[str, Alias] | None = None) -> Rows:
        try:
            await self._conn.execute("BEGIN")
            try:
                # What is loaded is the baseline of wait_for_change: a commit made after this
                # point (even before wait_for_change is first called) is reported as a change.
                async with self._conn.execute("PRAGMA data_version") as cur:
                    (self._data_version,) = await cur.fetchone()
                # _text/_int: a row written by hand may hold a BLOB or a stray type (SQLite
                # keeps what it is given); it must not stop the load (see _text).
                # A Go database (version 1) opens as it is: the version 2 columns read as their
                # defaults until mailcloakctl init adds them (possibly while the daemon runs).
                async with self._conn.execute("PRAGMA user_version") as cur:
                    (version,) = await cur.fetchone()
                v2 = version >= 2
                domains = [
                    Domain(_text(name), bool(enabled), _int(updated_at))
                    async for name, enabled, updated_at in self._rows(
                        "SELECT domain_name, enabled, updated_at FROM domains"
                    )
                ]
                extra_targets: dict[str, list[str]] = {}
                listed_senders: dict[str, list[str]] = {}
                if v2:
                    async for address, target in self._rows(
                        "SELECT alias_email, target_user FROM alias_targets "
                        "ORDER BY alias_email, position, target_user"
                    ):
                        extra_targets.setdefault(_text(address), []).append(_text(target))
                    async for address, sender in self._rows(
                        "SELECT alias_email, sender_user FROM alias_senders ORDER BY alias_email, sender_user"
                    ):
                        listed_senders.setdefault(_text(address), []).append(_text(sender))
                aliases = []
                known = reuse.get if reuse else {}.get
                async for chunk in self._chunks(
                    "SELECT alias_email, target_user, alias_domain_name, enabled, updated_at, "
                    + ("send_policy" if v2 else "'members'") + " FROM aliases"
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
                senders: dict[str, list[AppSender]] = {}
                async for app_id, address, enabled in self._rows(
                    "SELECT app_id, from_addr, enabled FROM app_from ORDER BY app_id, from_addr"
                ):
                    senders.setdefault(_text(app_id), []).append(AppSender(_text(address), bool(enabled)))
                apps = [
                    App(_text(app_id), _text(secret), bool(enabled), _int(updated_at),
                        tuple(senders.get(_text(app_id), ())), _text(description),
                        None if expires_at is None else _int(expires_at), tuple(_text(networks).split()))
                    async for app_id, secret, enabled, updated_at, description, expires_at, networks
                    in self._rows(
                        "SELECT app_id, secret_hash, enabled, updated_at, "
                        + ("description, expires_at, networks" if v2 else "'', NULL, ''")
                        + " FROM apps"
                    )
                ]
            finally:
                await self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _store_error(exc, self.location) from None
        return Rows(tuple(domains), tuple(aliases), tuple(apps))

    async def _rows(self, sql: str, params: tuple = ()):
        async for chunk in self._chunks(sql, params):
            for row in chunk:
                yield row

    async def _chunks(self, sql: str, params: tuple = ()):
        """The rows of `sql` in lists of _CHUNK, with the event loop served between them."""
        async with self._conn.execute(sql, params) as cur:
            while True:
                chunk = await cur.fetchmany(_CHUNK)
                if not chunk:
                    return
                yield chunk
                await asyncio.sleep(0)

    async def wait_for_change(self) -> None:
        while True:
            try:
                async with self._conn.execute("PRAGMA data_version") as cur:
                    (version,) = await cur.fetchone()
            except sqlite3.Error as exc:
                raise _store_error(exc, self.location) from None
            if self._data_version != version:
                first = self._data_version is None
                self._data_version = version
                if not first:
                    return
            await asyncio.sleep(self._poll_interval)

    # Writes ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self):
        """One IMMEDIATE transaction: committed whole, or rolled back whole on any error."""
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _store_error(exc, self.location) from None
        try:
            yield self._conn
        except BaseException as exc:
            await self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _store_error(exc, self.location) from None
            raise
        try:
            await self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._conn.execute("ROLLBACK")
            raise _store_error(exc, self.location) from None

    async def _write(self, sql: str, params: tuple) -> int:
        """Run one statement in its own transaction; return its rowcount."""
        async with self._transaction() as conn:
            async with conn.execute(sql, params) as cur:
                return cur.rowcount

    async def _one(self, sql: str, params: tuple):
        try:
            async with self._conn.execute(sql, params) as cur:
                return await cur.fetchone()
        except sqlite3.Error as exc:
            raise _store_error(exc, self.location) from None

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
        domain = alias.rpartition("@")[2]
        # The domain check and the upsert share one transaction, so nothing is half-written.
        async with self._transaction() as conn:
            async with conn.execute("SELECT enabled FROM domains WHERE domain_name = ?", (domain,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound(f"domain not found: {domain}")
            if not row[0]:
                raise InvalidInput(f"domain disabled: {domain}")
            await conn.execute(
                "INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled, updated_at) "
                "VALUES (?, ?, ?, 1, ?) ON CONFLICT(alias_email) DO UPDATE SET "
                "target_user = excluded.target_user, enabled = 1, updated_at = excluded.updated_at",
                (alias, target_user, domain, _now()),
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

    async def add_app(self, app_id: str, secret_hash: str) -> None:
        async with self._transaction() as conn:
            async with conn.execute(
                "SELECT app_id FROM apps WHERE lower(app_id) = lower(?) AND app_id <> ?",
                (app_id, app_id),
            ) as cur:
                clash = await cur.fetchone()
            if clash is not None:
                raise InvalidInput(f"app id {app_id!r} differs from existing app {clash[0]!r} only in case")
            await conn.execute(
                "INSERT INTO apps(app_id, secret_hash, enabled, updated_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(app_id) DO UPDATE SET secret_hash = excluded.secret_hash, "
                "enabled = 1, updated_at = excluded.updated_at",
                (app_id, secret_hash, _now()),
            )

    async def _app_id(self, app_id: str) -> str:
        """The stored spelling of an app id matched case-insensitively."""
        row = await self._one(
            "SELECT app_id FROM apps WHERE app_id = ? OR lower(app_id) = lower(?) "
            "ORDER BY app_id = ? DESC LIMIT 1",
            (app_id, app_id, app_id),
        )
        if row is None:
            raise NotFound(f"app not found: {app_id}")
        return row[0]

    async def set_app_enabled(self, app_id: str, enabled: bool) -> None:
        stored = await self._app_id(app_id)
        count = await self._write(
            "UPDATE apps SET enabled = ?, updated_at = ? WHERE app_id = ?",
            (int(enabled), _now(), stored),
        )
        if not count:
            raise NotFound(f"app not found: {app_id}")

    async def delete_app(self, app_id: str) -> None:
        stored = await self._app_id(app_id)
        count = await self._write("DELETE FROM apps WHERE app_id = ?", (stored,))
        if not count:
            raise NotFound(f"app not found: {app_id}")

    async def allow_sender(self, app_id: str, address: str) -> None:
        stored = await self._app_id(app_id)
        await self._write(
            "INSERT INTO app_from(app_id, from_addr, enabled, updated_at) VALUES (?, ?, 1, ?) "
            "ON CONFLICT(app_id, from_addr) DO UPDATE SET enabled = 1, updated_at = excluded.updated_at",
            (stored, address, _now()),
        )

    async def disallow_sender(self, app_id: str, address: str) -> None:
        stored = await self._app_id(app_id)
        count = await self._write(
            "DELETE FROM app_from WHERE app_id = ? AND from_addr = ?", (stored, address)
        )
        if not count:
            raise NotFound(f"app {stored} is not allowed to send as {address}")


async def _connect(config: SQLiteConfig, create: bool) -> aiosqlite.Connection:
    uri = f"file:{_quote(config.path)}?mode={'rwc' if create else 'rw'}"
    try:
        conn = await aiosqlite.connect(
            uri, uri=True, timeout=config.busy_timeout_seconds, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {config.path}: {exc}") from None
    try:
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        await conn.close()
        raise _store_error(exc, config.path) from None
    return conn


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


def _quote(path: str) -> str:
    """Escape the characters that mean something in an SQLite file: URI."""
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _store_error(exc: sqlite3.Error, path: str) -> StoreError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return StoreLocked(f"database {path} is locked by another writer; try again")
    if "not a database" in text or "malformed" in text:
        return StoreError(f"database {path} is corrupt or not an SQLite database ({text})")
    if "readonly" in text:
        return StoreError(f"database {path} is read-only for this user ({text})")
    if "unable to open" in text:
        return StoreError(f"cannot open database {path} ({text})")
    return StoreError(f"database {path}: {text}")
