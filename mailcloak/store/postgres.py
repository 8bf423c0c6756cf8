"""PostgreSQL store (asyncpg): the shared store of a site with several mail hosts.

The statements and their meaning are mailcloak.store.sql's, the same as SQLite's; this module is
the backend part only: a small connection pool, transactions (`?` placeholders become `$n`),
driver errors as one-line StoreErrors, the schema and its numbered migrations, and change
detection.

- **Schema.** The same tables, keys, cascades, CHECKs and triggers as SQLite's versions 1 and 2,
  written in PostgreSQL's DDL; integer columns stay integers (unix seconds, enabled 0/1), so the
  same parameters work on both. PostgreSQL has no `user_version`: the version is the one row of
  `mailcloak_schema`. Only `mailcloakctl init` creates or migrates (each migration one
  transaction, under an advisory lock so two hosts running init at once do not collide).
- **Writers are serialised** by a transaction-level advisory lock, as SQLite's `BEGIN IMMEDIATE`
  serialises them, so a check-then-write (the case clash of app ids, an alias's domain) means the
  same on both. A writer that waits longer than `statement_timeout_seconds` gets StoreLocked.
- **Change detection** without polling the tables: a statement-level trigger on every table of the
  snapshot runs `pg_notify('mailcloak_changes', <table>)`; PostgreSQL delivers it at commit to
  each daemon's dedicated LISTEN connection. `app_usage` (written by the daemons themselves) has
  no such trigger, so recording a login never makes every daemon reload. A lost LISTEN connection
  is reported as a StoreError by `wait_for_change`: StateCache then keeps answering from the last
  good snapshot, reconnects and re-reads everything once the database answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

import asyncpg

from mailcloak.config import PostgresConfig
from mailcloak.errors import StoreError, StoreLocked
from mailcloak.store.sql import SQLStore, Transaction

CHANNEL = "mailcloak_changes"
# pg_advisory_xact_lock keys: one for writers, one for migrations (any two fixed 64-bit numbers).
_WRITE_LOCK = 0x6D61696C636C6B01
_MIGRATE_LOCK = 0x6D61696C636C6B02
_CHUNK = 500  # rows per fetch while loading, so the event loop is never held for long
# How often an idle LISTEN connection is checked, so a silently dropped one is noticed.
_LISTEN_CHECK_SECONDS = 10.0

_NOW = "(extract(epoch from now())::bigint)"

SCHEMA_V1 = f"""
CREATE TABLE IF NOT EXISTS domains (
  domain_name TEXT PRIMARY KEY,
  enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at  BIGINT NOT NULL DEFAULT {_NOW}
);
CREATE TABLE IF NOT EXISTS aliases (
  alias_email       TEXT PRIMARY KEY,
  target_user       TEXT NOT NULL,
  alias_domain_name TEXT NOT NULL REFERENCES domains(domain_name) ON DELETE CASCADE,
  enabled           INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at        BIGINT NOT NULL DEFAULT {_NOW}
);
CREATE INDEX IF NOT EXISTS idx_aliases_target_user ON aliases(target_user);
CREATE INDEX IF NOT EXISTS idx_aliases_domain ON aliases(alias_domain_name);
CREATE TABLE IF NOT EXISTS apps (
  app_id      TEXT PRIMARY KEY,
  secret_hash TEXT NOT NULL,
  enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at  BIGINT NOT NULL DEFAULT {_NOW}
);
CREATE TABLE IF NOT EXISTS app_from (
  app_id     TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
  from_addr  TEXT NOT NULL,
  enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  updated_at BIGINT NOT NULL DEFAULT {_NOW},
  PRIMARY KEY (app_id, from_addr)
);
CREATE INDEX IF NOT EXISTS idx_app_from_from_addr ON app_from(from_addr);

CREATE OR REPLACE FUNCTION mailcloak_alias_domain_matches() RETURNS trigger AS $$
BEGIN
  IF NEW.alias_domain_name IS DISTINCT FROM
     substr(NEW.alias_email, strpos(NEW.alias_email, '@') + 1) THEN
    RAISE EXCEPTION 'alias_domain_name must equal the domain of alias_email';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER aliases_domain_matches BEFORE INSERT OR UPDATE ON aliases
  FOR EACH ROW EXECUTE FUNCTION mailcloak_alias_domain_matches();

-- SQLite's touch trigger: an update that leaves updated_at as it was sets it to now.
CREATE OR REPLACE FUNCTION mailcloak_touch_updated_at() RETURNS trigger AS $$
BEGIN
  IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
    NEW.updated_at := {_NOW};
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION mailcloak_notify() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
""" + "".join(
    f"""
CREATE TRIGGER {table}_touch_updated_at BEFORE UPDATE ON {table}
  FOR EACH ROW EXECUTE FUNCTION mailcloak_touch_updated_at();
CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
  FOR EACH STATEMENT EXECUTE FUNCTION mailcloak_notify();
"""
    for table in ("domains", "aliases", "apps", "app_from")
)

# Version 2: the meaning is SQLite's SCHEMA_V2 (mailcloak.store.sqlite), column for column.
SCHEMA_V2 = """
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
ALTER TABLE apps ADD COLUMN expires_at BIGINT;
ALTER TABLE apps ADD COLUMN networks TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS app_usage (
  app_id       TEXT PRIMARY KEY REFERENCES apps(app_id) ON DELETE CASCADE,
  last_used_at BIGINT NOT NULL,
  last_used_ip TEXT NOT NULL DEFAULT ''
);
""" + "".join(
    f"""
CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
  FOR EACH STATEMENT EXECUTE FUNCTION mailcloak_notify();
"""
    for table in ("alias_targets", "alias_senders")
)

# Numbered migrations: index i holds the script that brings version i to i + 1. Add only.
MIGRATIONS: tuple[str, ...] = (SCHEMA_V1, SCHEMA_V2)
SCHEMA_VERSION = len(MIGRATIONS)
REQUIRED_TABLES = ("domains", "aliases", "apps", "app_from", "mailcloak_schema")


class PostgresStore(SQLStore):
    def __init__(self, pool: asyncpg.Pool, config: PostgresConfig, password: str | None):
        self._pool = pool
        self._config = config
        self._password = password
        self.location = config.location
        self._listener: asyncpg.Connection | None = None
        self._changed = asyncio.Event()
        self._listener_lost = False

    @classmethod
    async def open(cls, config: PostgresConfig, *, create: bool = False) -> "PostgresStore":
        password = config.password()
        location = config.location
        try:
            # No floor of idle connections (min_size 0): the daemon reads only to reload, and a
            # pool that keeps a floor retries it in the background, logging tracebacks while the
            # server is down. Opening still fails clearly: it reads the schema version first.
            pool = await asyncpg.create_pool(
                **_connect_args(config, password), min_size=0, max_size=config.pool_size,
            )
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, one clear line
            raise _store_error(exc, location, config) from None
        store = cls(pool, config, password)
        try:
            if create:
                await store._migrate()
            else:
                await store._check_schema()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._drop_listener()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), self._config.connect_timeout_seconds)
        self._pool.terminate()

    async def reconnect(self) -> None:
        """Open fresh connections: after the server restarted, pooled ones are dead."""
        await self._drop_listener()
        with contextlib.suppress(Exception):
            await self._pool.expire_connections()

    # Schema ------------------------------------------------------------------------------------

    async def _check_schema(self) -> None:
        async with self._transaction(write=False) as tx:
            missing = [t for t in REQUIRED_TABLES
                       if (await tx.fetchone("SELECT to_regclass(?)", (t,)))[0] is None]
            if missing:
                raise StoreError(
                    f"database {self.location} lacks table(s) {', '.join(missing)}; "
                    "run mailcloakctl init"
                )
            version = await self._schema_version(tx)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.location} has schema version {version}, newer than this "
                f"mailcloak knows ({SCHEMA_VERSION})"
            )

    async def _migrate(self) -> None:
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS mailcloak_schema (version INTEGER NOT NULL)"
                    )
                    version = await conn.fetchval("SELECT max(version) FROM mailcloak_schema")
                    if version is None:
                        await conn.execute("INSERT INTO mailcloak_schema(version) VALUES (0)")
                        version = 0
            except Exception as exc:  # noqa: BLE001
                raise _store_error(exc, self.location, self._config) from None
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.location} has schema version {version}, newer than this "
                    f"mailcloak knows ({SCHEMA_VERSION})"
                )
            for target in range(version, SCHEMA_VERSION):
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
                        current = await conn.fetchval("SELECT max(version) FROM mailcloak_schema")
                        if current != target:
                            continue  # another init migrated it meanwhile
                        await conn.execute(MIGRATIONS[target])
                        await conn.execute("UPDATE mailcloak_schema SET version = $1", target + 1)
                except Exception as exc:  # noqa: BLE001
                    raise _store_error(exc, self.location, self._config) from None

    # The backend's part of SQLStore --------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self):
        """A pooled connection; failing to get one (server down) is a StoreError."""
        try:
            conn = await self._pool.acquire(timeout=self._config.connect_timeout_seconds)
        except Exception as exc:  # noqa: BLE001
            raise _store_error(exc, self.location, self._config) from None
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=self._config.connect_timeout_seconds)

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool):
        """A write holds the writers' lock for the transaction (SQLite's BEGIN IMMEDIATE); a read
        is REPEATABLE READ, one consistent snapshot. Committed whole or rolled back whole."""
        async with self._connection() as conn:
            tx = conn.transaction(isolation="read_committed" if write else "repeatable_read",
                                  readonly=not write)
            try:
                await tx.start()
                if write:
                    try:
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                    except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError):
                        raise StoreLocked(
                            f"database {self.location} is locked by another writer; try again"
                        ) from None
            except StoreError:
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise
            except Exception as exc:  # noqa: BLE001
                raise _store_error(exc, self.location, self._config) from None
            try:
                yield _Transaction(conn)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await tx.rollback()
                if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                                    asyncio.TimeoutError)):
                    raise _store_error(exc, self.location, self._config) from None
                raise
            try:
                await tx.commit()
            except Exception as exc:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise _store_error(exc, self.location, self._config) from None

    async def _schema_version(self, tx: Transaction) -> int:
        row = await tx.fetchone("SELECT max(version) FROM mailcloak_schema")
        return int(row[0] or 0)

    async def _load_started(self, tx: Transaction) -> None:
        # Listen before the load's snapshot is taken (its first statement comes next): a commit
        # after that point is then always notified.
        await self._ensure_listener()
        self._changed.clear()

    async def wait_for_change(self) -> None:
        await self._ensure_listener()
        while True:
            if self._listener_lost:
                await self._drop_listener()
                raise StoreError(f"database {self.location}: lost the connection that listens "
                                 "for changes")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), _LISTEN_CHECK_SECONDS)
                if not self._listener_lost:
                    self._changed.clear()
                    return
                continue
            await self._check_listener()

    # LISTEN ------------------------------------------------------------------------------------

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed() and not self._listener_lost:
            return
        await self._drop_listener()
        try:
            conn = await asyncpg.connect(**_connect_args(self._config, self._password))
        except Exception as exc:  # noqa: BLE001
            raise _store_error(exc, self.location, self._config) from None
        self._listener_lost = False
        try:
            conn.add_termination_listener(self._on_listener_lost)
            await conn.add_listener(CHANNEL, self._on_notify)
        except Exception as exc:  # noqa: BLE001
            conn.terminate()
            raise _store_error(exc, self.location, self._config) from None
        self._listener = conn

    async def _check_listener(self) -> None:
        """A round trip on an idle LISTEN connection: a dead one raises here, not never."""
        try:
            await self._listener.fetchval("SELECT 1", timeout=self._config.connect_timeout_seconds)
        except Exception:  # noqa: BLE001 - any failure means the same: listen again
            self._listener_lost = True

    async def _drop_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            conn.remove_termination_listener(self._on_listener_lost)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self._config.connect_timeout_seconds)
            conn.terminate()

    def _on_notify(self, conn, pid, channel, payload) -> None:
        self._changed.set()

    def _on_listener_lost(self, conn) -> None:
        self._listener_lost = True
        self._changed.set()


class _Transaction:
    """sql.Transaction over an asyncpg connection inside a transaction."""

    def __init__(self, conn: asyncpg.Connection):
        self._conn = conn

    async def execute(self, sql: str, params: tuple = ()) -> int:
        status = await self._conn.execute(placeholders(sql), *params)
        count = status.rpartition(" ")[2]
        return int(count) if count.isdigit() else 0

    async def execute_many(self, sql: str, rows: list[tuple]) -> None:
        await self._conn.executemany(placeholders(sql), rows)

    async def fetchone(self, sql: str, params: tuple = ()) -> tuple | None:
        row = await self._conn.fetchrow(placeholders(sql), *params)
        return None if row is None else tuple(row)

    async def chunks(self, sql: str, params: tuple = ()):
        cursor = await self._conn.cursor(placeholders(sql), *params)
        while True:
            chunk = await cursor.fetch(_CHUNK)
            if not chunk:
                return
            yield [tuple(row) for row in chunk]
            await asyncio.sleep(0)

    async def rows(self, sql: str, params: tuple = ()):
        async for chunk in self.chunks(sql, params):
            for row in chunk:
                yield row


@functools.lru_cache(maxsize=512)
def placeholders(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...`; a `?` inside a quoted string or
    identifier stays as it is."""
    out = []
    n = 0
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in ("'", '"'):
            quote = char
        elif char == "?":
            n += 1
            out.append(f"${n}")
            continue
        out.append(char)
    return "".join(out)


def _connect_args(config: PostgresConfig, password: str | None) -> dict:
    timeout_ms = str(int(config.statement_timeout_seconds * 1000))
    args = dict(
        dsn=config.dsn,
        timeout=config.connect_timeout_seconds,
        # The server cancels a slow statement; the client gives up a moment later if the
        # server cannot even say so (a stopped host).
        command_timeout=config.statement_timeout_seconds + config.connect_timeout_seconds,
        server_settings={"statement_timeout": timeout_ms, "lock_timeout": timeout_ms,
                         "application_name": "mailcloak"},
    )
    if password is not None:
        args["password"] = password
    return args


def _store_error(exc: BaseException, location: str, config: PostgresConfig) -> StoreError:
    """A driver error as one line that names the (masked) database and never the password."""
    if isinstance(exc, StoreError):
        return exc
    text = _first_line(str(exc)) or type(exc).__name__
    if config.dsn and config.dsn in text:
        text = text.replace(config.dsn, location)
    if isinstance(exc, (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError,
                        asyncpg.SerializationError)):
        return StoreLocked(f"database {location} is locked by another writer; try again")
    if isinstance(exc, asyncpg.QueryCanceledError):
        return StoreError(f"database {location}: statement timed out after "
                          f"{config.statement_timeout_seconds:g} s")
    if isinstance(exc, asyncpg.UndefinedTableError):
        return StoreError(f"database {location}: {text}; run mailcloakctl init")
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return StoreError(f"cannot log in to database {location}: {text}")
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, (asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError)
    ):
        return StoreError(f"database {location}: {text}")
    if isinstance(exc, asyncio.TimeoutError):
        text = f"no answer within {config.connect_timeout_seconds:g} s"
    return StoreError(f"database {location} unreachable ({text})")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
