"""SQLite store (aiosqlite), compatible with the Go project's `state.db`.

The statements and their meaning are mailcloak.store.sql's; this module is the connection, the
schema and its migrations, and change detection.

Schema version 1 is exactly the Go project's schema (COMPAT.md), written with `IF NOT EXISTS`, so
that a Go database already *is* version 1 and opens as it is. Later versions only add (columns,
tables, indexes). The daemon never writes: it checks the tables exist and refuses a database newer
than it knows. `mailcloakctl init` creates or migrates. Its one write is last use (app_usage),
through the connection it polls with: `PRAGMA data_version` does not change for a connection's
own commits, so that write never makes it reload its state.

Change detection: `PRAGMA data_version` changes on a connection whenever another connection
commits, is answered from memory, and so costs nothing to poll twice a second. What changed:
from version 3 on, the alias change log (`alias_changes`, SCHEMA_V3) lets a reload read only the
aliases that changed (`load_changes`); a Go or version 2 database is read whole each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import aiosqlite

from mailcloak.config import SQLiteConfig
from mailcloak.errors import StoreError, StoreLocked, StoreMissing
from mailcloak.store.sql import SQLStore, Transaction

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

# Version 3 (issue 6): a log of changed alias addresses, so that a running daemon re-reads only
# the aliases that changed instead of every row (mailcloak.state). Triggers write it, so every
# writer is logged: mailcloakctl, the Go project's tools, a hand edit in the sqlite3 shell, and
# deletes cascaded from a domain. `seq` is AUTOINCREMENT, so numbers are never reused (the last
# one issued stays in sqlite_sequence even when rows are deleted) and, SQLite having one writer
# at a time, they follow commit order. The log keeps the last CHANGE_LOG_KEEP entries; a reader
# further behind (or one that finds a number missing) reads everything.
CHANGE_LOG_KEEP = 10_000
_LOG_ALIAS = "INSERT INTO alias_changes(alias_email) VALUES ({row}.alias_email);"
SCHEMA_V3 = (
    f"""
CREATE TABLE IF NOT EXISTS alias_changes (
  seq         INTEGER PRIMARY KEY AUTOINCREMENT,
  alias_email TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS alias_changes_prune AFTER INSERT ON alias_changes
BEGIN
  DELETE FROM alias_changes WHERE seq <= NEW.seq - {CHANGE_LOG_KEEP};
END;
"""
    + "".join(
        f"""
CREATE TRIGGER IF NOT EXISTS {table}_log_insert AFTER INSERT ON {table}
BEGIN
  {_LOG_ALIAS.format(row="NEW")}
END;
CREATE TRIGGER IF NOT EXISTS {table}_log_update AFTER UPDATE ON {table}
BEGIN
  {_LOG_ALIAS.format(row="OLD")}
  {_LOG_ALIAS.format(row="NEW")}
END;
CREATE TRIGGER IF NOT EXISTS {table}_log_delete AFTER DELETE ON {table}
BEGIN
  {_LOG_ALIAS.format(row="OLD")}
END;
"""
        for table in ("aliases", "alias_targets", "alias_senders")
    )
)

# Numbered migrations: index i holds the script that brings user_version i to i + 1. Add only.
MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3)
SCHEMA_VERSION = len(MIGRATIONS)
REQUIRED_TABLES = frozenset({"domains", "aliases", "apps", "app_from"})

_CHUNK = 500  # rows per fetch while loading, so the event loop is never held for long


def missing_message(path: str) -> str:
    return f"sqlite db not found at {path}; create it with mailcloakctl init"


class SQLiteStore(SQLStore):
    def __init__(self, conn: aiosqlite.Connection, config: SQLiteConfig):
        self._conn = conn
        self._config = config
        self.location = config.path
        self._poll_interval = config.poll_interval_seconds
        self._data_version: int | None = None
        # One transaction at a time on the one connection: the daemon's state refresh and its
        # last-use writes are separate tasks.
        self._tx_lock = asyncio.Lock()

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

    # The backend's part of SQLStore -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool):
        """IMMEDIATE for a write (the write lock is taken at once, waiting up to busy_timeout),
        deferred for a read; committed whole, or rolled back whole on any error."""
        async with self._tx_lock:
            async with self._transaction_unlocked(write=write) as tx:
                yield tx

    @contextlib.asynccontextmanager
    async def _transaction_unlocked(self, *, write: bool):
        try:
            await self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise _store_error(exc, self.location) from None
        try:
            yield _Transaction(self._conn)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _store_error(exc, self.location) from None
            raise
        try:
            await self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("ROLLBACK")
            raise _store_error(exc, self.location) from None

    async def _schema_version(self, tx: Transaction) -> int:
        (version,) = await tx.fetchone("PRAGMA user_version")
        return int(version)

    async def _change_log_position(self, tx: Transaction) -> int | None:
        if await self._schema_version(tx) < 3:
            return None
        row = await tx.fetchone("SELECT seq FROM sqlite_sequence WHERE name = 'alias_changes'")
        return 0 if row is None else int(row[0])

    async def _load_started(self, tx: Transaction) -> None:
        # What is loaded is the baseline of wait_for_change: a commit made after this point
        # (even before wait_for_change is first called) is reported as a change.
        (self._data_version,) = await tx.fetchone("PRAGMA data_version")

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


class _Transaction:
    """sql.Transaction over an aiosqlite connection inside BEGIN ... COMMIT."""

    def __init__(self, conn: aiosqlite.Connection):
        self._conn = conn

    async def execute(self, sql: str, params: tuple = ()) -> int:
        async with self._conn.execute(sql, params) as cur:
            return cur.rowcount

    async def execute_many(self, sql: str, rows: list[tuple]) -> None:
        await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: tuple = ()) -> tuple | None:
        async with self._conn.execute(sql, params) as cur:
            return await cur.fetchone()

    async def chunks(self, sql: str, params: tuple = ()):
        async with self._conn.execute(sql, params) as cur:
            while True:
                chunk = await cur.fetchmany(_CHUNK)
                if not chunk:
                    return
                yield chunk
                await asyncio.sleep(0)

    async def rows(self, sql: str, params: tuple = ()):
        async for chunk in self.chunks(sql, params):
            for row in chunk:
                yield row


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
