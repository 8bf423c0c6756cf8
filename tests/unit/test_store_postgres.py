"""What is PostgreSQL's own (issue #10): config, placeholders, DSN masking, schema versions and
migrations, which tables notify, locks, timeouts and an unreachable server. The store's meaning is
tested on both stores in test_store.py and test_ctl.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mailcloak.config import PostgresConfig, mask_dsn, parse_config
from mailcloak.errors import ConfigError, StoreError, StoreLocked
from pg_cluster import SUPERUSER_PASSWORD

# Config ------------------------------------------------------------------------------------------

STATIC = "idp: {provider: static, static: {users: []}}\n"


def test_postgres_backend_config():
    config = parse_config(STATIC + "store: {backend: postgres}\n"
                          "postgres: {dsn: 'postgresql://mc:pw@db/mail', pool_size: 2}\n")
    assert config.store.backend == "postgres"
    assert config.postgres.pool_size == 2
    assert config.store_location == "postgresql://mc:***@db/mail"


def test_sqlite_is_the_default_store():
    config = parse_config(STATIC)
    assert (config.store.backend, config.postgres) == ("sqlite", None)
    assert config.store_location == config.sqlite.path


@pytest.mark.parametrize("text, message", [
    ("store: {backend: postgres}\n", "store.backend is postgres but postgres.dsn is not set"),
    ("store: {backend: postgres}\npostgres: {dsn: ''}\n", "postgres.dsn is not set"),
    ("postgres: {dsn: 'postgresql://db/mail'}\n", "postgres.dsn is set but store.backend is sqlite"),
    ("store: {backend: mysql}\n", "store.backend must be one of sqlite, postgres"),
    ("store: {backend: postgres}\npostgres: {dsn: x, pool_size: 0}\n", "postgres.pool_size must be at least 1"),
    ("store: {backend: postgres}\npostgres: {dsn: x, statement_timeout_seconds: 0}\n",
     "postgres.statement_timeout_seconds must be positive"),
    ("store: {backend: postgres}\npostgres: {dsn: x, bogus: 1}\n", "unknown key postgres.bogus"),
    ("store: {backend: postgres}\npostgres: {pool_size: 2}\n", "missing key postgres.dsn"),
    ("store: {path: x}\n", "unknown key store.path"),
])
def test_store_config_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(STATIC + text)


def test_an_empty_dsn_with_sqlite_is_the_sample_config_s_unused_section():
    config = parse_config(STATIC + "postgres: {dsn: ''}\n")
    assert config.store.backend == "sqlite"


def test_password_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert PostgresConfig(dsn="x", password_file=str(secret)).password() == "s3cret"
    assert PostgresConfig(dsn="x").password() is None
    with pytest.raises(ConfigError, match="postgres.password_file: cannot read"):
        PostgresConfig(dsn="x", password_file=str(tmp_path / "absent")).password()


@pytest.mark.parametrize("dsn, masked", [
    ("postgresql://mc:s3cr%40t@db.example:5432/mail?sslmode=require",
     "postgresql://mc:***@db.example:5432/mail?sslmode=require"),
    ("postgres://mc@db/mail?sslmode=require&password=s3cret", "postgres://mc@db/mail?sslmode=require&password=***"),
    ("postgresql://db/mail", "postgresql://db/mail"),
    ("host=db user=mc password=s3cret dbname=mail", "host=db user=mc password=*** dbname=mail"),
    ("host=db password='s3 cr\\'et' dbname=mail", "host=db password=*** dbname=mail"),
])
def test_mask_dsn(dsn, masked):
    assert mask_dsn(dsn) == masked


# Placeholders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql, expected", [
    ("SELECT 1", "SELECT 1"),
    ("UPDATE t SET a = ?, b = ? WHERE c = ?", "UPDATE t SET a = $1, b = $2 WHERE c = $3"),
    ("SELECT '?' FROM t WHERE a = ?", "SELECT '?' FROM t WHERE a = $1"),
    ("SELECT \"od?d\" FROM t WHERE a = ? AND b = 'it''s?'", "SELECT \"od?d\" FROM t WHERE a = $1 AND b = 'it''s?'"),
])
def test_placeholders(sql, expected):
    from mailcloak.store.postgres import placeholders

    assert placeholders(sql) == expected


# Against the cluster -----------------------------------------------------------------------------


@pytest.fixture
def pg_site(pg_cluster, request):
    from stores import PostgresSite

    site = PostgresSite(pg_cluster, pg_cluster.create_database())
    yield site
    pg_cluster.drop_database(site.database)


def config_of(site, **changes) -> PostgresConfig:
    return dataclasses.replace(site.postgres_config(), **changes)


async def open_pg(config: PostgresConfig, create: bool = False):
    from mailcloak.store.postgres import PostgresStore

    return await PostgresStore.open(config, create=create)


async def test_init_creates_the_current_schema_and_twice_is_harmless(pg_site):
    from mailcloak.store.postgres import SCHEMA_VERSION

    with pytest.raises(StoreError, match="lacks table.*run mailcloakctl init"):
        await open_pg(config_of(pg_site))
    for _ in range(2):
        store = await open_pg(config_of(pg_site), create=True)
        await store.close()
    assert pg_site.query("SELECT version FROM mailcloak_schema") == [(SCHEMA_VERSION,)]
    store = await open_pg(config_of(pg_site))
    assert (await store.load()).domains == ()
    await store.close()


@pytest.mark.parametrize("create", [False, True])
async def test_newer_schema_refused(pg_site, create):
    store = await open_pg(config_of(pg_site), create=True)
    await store.close()
    pg_site.execute("UPDATE mailcloak_schema SET version = 99")
    with pytest.raises(StoreError, match="schema version 99, newer"):
        await open_pg(config_of(pg_site), create=create)
    assert pg_site.query("SELECT version FROM mailcloak_schema") == [(99,)]


async def test_version_1_database_loads_and_init_migrates_it_keeping_rows(pg_site):
    from mailcloak.store.postgres import MIGRATIONS

    pg_site.execute("CREATE TABLE mailcloak_schema (version INTEGER NOT NULL)")
    pg_site.execute("INSERT INTO mailcloak_schema VALUES (1)")
    pg_site.execute(MIGRATIONS[0])
    pg_site.execute("INSERT INTO domains VALUES ('d1.test', 1, 1700000000)")
    pg_site.execute("INSERT INTO aliases VALUES ('a@d1.test', 'alice', 'd1.test', 1, 1700000000)")
    pg_site.execute("INSERT INTO apps VALUES ('App', 'h', 1, 1700000000)")
    store = await open_pg(config_of(pg_site))
    (alias,) = (await store.load()).aliases
    (app,) = (await store.load()).apps
    assert (alias.send_policy, app.expires_at, app.description) == ("members", None, "")
    await store.close()
    store = await open_pg(config_of(pg_site), create=True)
    await store.close()
    assert pg_site.query("SELECT version FROM mailcloak_schema") == [(2,)]
    assert pg_site.query("SELECT alias_email, target_user, updated_at, send_policy FROM aliases") == [
        ("a@d1.test", "alice", 1700000000, "members")]


async def test_daemon_written_app_usage_does_not_wake_waiters_but_snapshot_tables_do(pg_site):
    store = await open_pg(config_of(pg_site), create=True)
    try:
        await store.add_domain("d1.test")
        await store.add_alias("list@d1.test", "alice")
        await store.add_app("App", "h")
        await store.load()
        waiter = asyncio.create_task(store.wait_for_change())
        pg_site.execute("INSERT INTO app_usage VALUES ('App', 1700000000, '192.0.2.1')")
        pg_site.execute("UPDATE app_usage SET last_used_at = 1700000001")
        await asyncio.sleep(0.5)
        assert not waiter.done()
        pg_site.execute("INSERT INTO alias_targets VALUES ('list@d1.test', 'bob', 1)")
        await asyncio.wait_for(waiter, 10)
        for sql in ("INSERT INTO alias_senders VALUES ('list@d1.test', 'carol')",
                    "UPDATE apps SET description = 'x'",
                    "INSERT INTO app_from VALUES ('App', 'a@d1.test', 1, 1)"):
            waiter = asyncio.create_task(store.wait_for_change())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            pg_site.execute(sql)
            await asyncio.wait_for(waiter, 10)
    finally:
        await store.close()


async def test_a_writer_waiting_too_long_for_another_gets_store_locked(pg_site, pg_cluster):
    from mailcloak.store.postgres import _WRITE_LOCK

    store = await open_pg(config_of(pg_site, statement_timeout_seconds=0.3), create=True)
    holder = await _connect(pg_cluster.dsn(pg_site.database))
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
        with pytest.raises(StoreLocked, match="locked by another writer; try again"):
            await store.add_domain("d1.test")
        await holder.execute("ROLLBACK")
        await store.add_domain("d1.test")  # the lock released: the same write succeeds
        assert [d.name for d in (await store.load()).domains] == ["d1.test"]
    finally:
        await holder.close()
        await store.close()


async def test_a_slow_statement_is_cancelled_with_one_line(pg_site):
    store = await open_pg(config_of(pg_site, statement_timeout_seconds=0.2), create=True)
    try:
        with pytest.raises(StoreError) as info:
            async with store._transaction(write=False) as tx:
                await tx.fetchone("SELECT pg_sleep(5)")
        assert str(info.value).endswith("statement timed out after 0.2 s")
        await store.load()  # the connection is usable again
    finally:
        await store.close()


async def test_unreachable_server_and_wrong_password_are_one_line_without_the_password(
        pg_site, pg_cluster, tmp_path):
    closed = pg_site.dsn.replace(f":{pg_cluster.port}/", ":1/")
    with pytest.raises(StoreError) as info:
        await open_pg(dataclasses.replace(config_of(pg_site), dsn=closed))
    message = str(info.value)
    assert message.startswith("database postgresql://postgres:***@127.0.0.1:1/")
    assert "unreachable" in message and "\n" not in message
    assert SUPERUSER_PASSWORD not in message
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    with pytest.raises(StoreError) as info:
        await open_pg(config_of(pg_site, password_file=str(wrong)))
    assert "cannot log in" in str(info.value) and SUPERUSER_PASSWORD not in str(info.value)
    # the right password from the file replaces the DSN's
    right = tmp_path / "right"
    right.write_text(SUPERUSER_PASSWORD + "\n")
    no_password = pg_site.dsn.replace(f":{SUPERUSER_PASSWORD}@", "@")
    store = await open_pg(config_of(pg_site, dsn=no_password, password_file=str(right)), create=True)
    await store.close()


async def _connect(dsn: str):
    import asyncpg

    return await asyncpg.connect(dsn)

