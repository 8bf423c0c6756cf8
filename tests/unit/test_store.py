"""The store (SPEC §5, COMPAT.md "Database"). SQLite: real files in tmp_path. What a store means
(writes, triggers, change detection, the snapshot) runs against both stores (tests/stores.py);
opening, file faults and the Go schema as it is are SQLite's own."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from mailcloak.config import SQLiteConfig
from mailcloak.errors import InvalidInput, NotFound, StoreError, StoreMissing
from mailcloak.store.model import Alias, App, AppSender, Domain, Rows, Snapshot
from mailcloak.store.sqlite import SCHEMA_VERSION, SQLiteStore
from stores import SQLiteSite, both_store_kinds  # noqa: F401 - the fixture runs each test on both stores
from support import make_go_database

POLL = 0.02


def cfg(path: Path) -> SQLiteConfig:
    return SQLiteConfig(path=str(path), poll_interval_seconds=POLL, busy_timeout_seconds=2)


async def open_store(path: Path, create: bool = False) -> SQLiteStore:
    return await SQLiteStore.open(cfg(path), create=create)


def query(path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read as another process would: `path` is an SQLite file or a site of tests/stores.py."""
    return (SQLiteSite(path) if isinstance(path, Path) else path).query(sql, params)


def execute(path, sql: str, params: tuple = ()) -> None:
    """Write as another process would: `path` is an SQLite file or a site of tests/stores.py."""
    (SQLiteSite(path) if isinstance(path, Path) else path).execute(sql, params)


GO_COLUMNS = {
    "domains": "domain_name, enabled, updated_at",
    "aliases": "alias_email, target_user, alias_domain_name, enabled, updated_at",
    "apps": "app_id, secret_hash, enabled, updated_at",
    "app_from": "app_id, from_addr, enabled, updated_at",
}


def table_contents(path) -> dict[str, list[tuple]]:
    """The Go project's columns of its four tables (later versions only add columns)."""
    return {table: query(path, f"SELECT {columns} FROM {table} ORDER BY 1, 2")
            for table, columns in GO_COLUMNS.items()}



def schema(path: Path) -> list[tuple]:
    return query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY type, name")


@pytest.fixture(scope="module")
def go_db_template(tmp_path_factory):
    """One Go-project database per module (hashing its app secret takes a moment)."""
    return make_go_database(tmp_path_factory.mktemp("go") / "state.db")


@pytest.fixture
def go_db(go_db_template, tmp_path):
    """A fresh copy of the Go-project database for each test."""
    path = tmp_path / "state.db"
    shutil.copyfile(go_db_template, path)
    return path


@pytest.fixture
async def new_store(new_site):
    store = await new_site.open(create=True)
    yield store
    await store.close()


@pytest.fixture
async def go_store(go_site):
    store = await go_site.open()
    yield store
    await store.close()


# Opening -----------------------------------------------------------------------------------------


async def test_go_database_opens_as_it_is(go_db):
    before_schema, before_rows = schema(go_db), table_contents(go_db)
    store = await open_store(go_db)
    try:
        rows = await store.load()
    finally:
        await store.close()
    assert sorted(rows.domains, key=lambda d: d.name) == [
        Domain("d1.test", True, 1700000000), Domain("d2.test", True, 1700000000),
        Domain("d3.test", False, 1700000000)]
    assert sorted(rows.aliases, key=lambda a: a.address) == [
        Alias("alias1@d1.test", "alice", "d1.test", True, 1700000000),
        Alias("off@d1.test", "alice", "d1.test", False, 1700000000),
        Alias("old@d3.test", "alice", "d3.test", True, 1700000000),
        Alias("sales@d2.test", "bob", "d2.test", True, 1700000000)]
    (app,) = rows.apps
    assert (app.app_id, app.enabled, app.updated_at) == ("Mailer", True, 1700000000)
    assert app.secret_hash.startswith("{ARGON2ID}$argon2id$")
    assert app.senders == (AppSender("billing@d1.test", False), AppSender("noreply@d1.test", True))
    # The daemon never writes: the file is exactly as the Go project left it.
    assert schema(go_db) == before_schema
    assert table_contents(go_db) == before_rows
    assert query(go_db, "PRAGMA user_version") == [(0,)]


async def test_open_missing_file(tmp_path):
    path = tmp_path / "absent" / "state.db"
    with pytest.raises(StoreMissing) as info:
        await open_store(path)
    assert str(info.value) == f"sqlite db not found at {path}; create it with mailcloakctl init"
    assert not path.exists() and not path.parent.exists()


async def test_create_on_empty_path(tmp_path):
    path = tmp_path / "a" / "b" / "state.db"
    store = await open_store(path, create=True)
    try:
        assert await store.load() == Rows()
    finally:
        await store.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in query(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"domains", "aliases", "apps", "app_from"} <= tables
    # and the daemon (no create) opens what init made
    store = await open_store(path)
    await store.close()


async def test_create_twice_is_harmless(tmp_path):
    path = tmp_path / "state.db"
    for _ in range(2):
        store = await open_store(path, create=True)
        await store.add_domain("d1.test")
        await store.close()
    assert query(path, "SELECT domain_name FROM domains") == [("d1.test",)]
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_create_migrates_go_database_without_touching_rows(go_db):
    before = table_contents(go_db)
    store = await open_store(go_db, create=True)
    try:
        rows = await store.load()
    finally:
        await store.close()
    assert query(go_db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(go_db, "PRAGMA journal_mode") == [("wal",)]
    assert table_contents(go_db) == before
    assert len(rows.domains) == 3 and len(rows.aliases) == 4 and len(rows.apps) == 1
    # the added columns read as their defaults
    assert {(a.send_policy, a.extra_targets) for a in rows.aliases} == {("members", ())}
    assert {(a.description, a.expires_at, a.networks) for a in rows.apps} == {("", None, ())}


async def test_go_database_loads_without_migration(go_db):
    """The daemon opens a version 1 (Go) database as it is, with the version 2 fields defaulted."""
    store = await open_store(go_db)
    try:
        rows = await store.load()
    finally:
        await store.close()
    assert query(go_db, "PRAGMA user_version") == [(0,)]
    assert {a.send_policy for a in rows.aliases} == {"members"}
    assert {a.expires_at for a in rows.apps} == {None}


async def test_version_2_columns_load(new_site):
    path = new_site
    store = await new_site.open(create=True)
    try:
        await store.add_domain("d1.test")
        await store.add_alias("team@d1.test", "alice")
        await store.add_app("app1", "{ARGON2ID}x")
        execute(path, "UPDATE aliases SET send_policy = 'listed' WHERE alias_email = 'team@d1.test'")
        execute(path, "INSERT INTO alias_targets VALUES ('team@d1.test', 'carol', 2), "
                      "('team@d1.test', 'bob', 1)")
        execute(path, "INSERT INTO alias_senders VALUES ('team@d1.test', 'dave')")
        execute(path, "UPDATE apps SET description = 'printer', expires_at = 1900000000, "
                      "networks = '192.0.2.0/24 2001:db8::/32'")
        rows = await store.load()
    finally:
        await store.close()
    (alias,) = rows.aliases
    assert alias.targets == ("alice", "bob", "carol")
    assert (alias.send_policy, alias.listed_senders) == ("listed", ("dave",))
    (app,) = rows.apps
    assert (app.description, app.expires_at, app.networks) == (
        "printer", 1900000000, ("192.0.2.0/24", "2001:db8::/32"))


async def test_load_reuses_the_objects_of_unchanged_alias_rows(tmp_path):
    """What keeps a reload at 100 000 aliases from leaving 100 000 new objects to collect; a row
    that changed in any column (or gained list targets or listed senders) is read afresh."""
    path = tmp_path / "state.db"
    store = await open_store(path, create=True)
    try:
        await store.add_domain("d1.test")
        for name in ("same", "target", "off", "stamp", "policy", "list", "senders", "unlisted"):
            await store.add_alias(f"{name}@d1.test", "alice")
        execute(path, "INSERT INTO alias_targets VALUES ('unlisted@d1.test', 'bob', 1)")
        before = {a.address: a for a in (await store.load()).aliases}
        execute(path, "UPDATE aliases SET target_user = 'bob' WHERE alias_email = 'target@d1.test'")
        execute(path, "UPDATE aliases SET enabled = 0 WHERE alias_email = 'off@d1.test'")
        execute(path, "UPDATE aliases SET updated_at = 1 WHERE alias_email = 'stamp@d1.test'")
        execute(path, "UPDATE aliases SET send_policy = 'nobody' WHERE alias_email = 'policy@d1.test'")
        execute(path, "INSERT INTO alias_targets VALUES ('list@d1.test', 'carol', 1)")
        execute(path, "INSERT INTO alias_senders VALUES ('senders@d1.test', 'dave')")
        execute(path, "DELETE FROM alias_targets WHERE alias_email = 'unlisted@d1.test'")
        after = {a.address: a for a in (await store.load(reuse=before)).aliases}
    finally:
        await store.close()
    assert after["same@d1.test"] is before["same@d1.test"]
    fresh = {address for address in after if after[address] is not before[address]}
    assert fresh == set(after) - {"same@d1.test"}
    assert after["target@d1.test"].target_user == "bob"
    assert after["off@d1.test"].enabled is False
    assert after["stamp@d1.test"].updated_at == 1
    assert after["policy@d1.test"].send_policy == "nobody"
    assert after["list@d1.test"].targets == ("alice", "carol")
    assert after["senders@d1.test"].listed_senders == ("dave",)
    assert after["unlisted@d1.test"].targets == ("alice",)


@pytest.mark.parametrize("create", [False, True])
async def test_newer_schema_refused(go_db, create):
    execute(go_db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        await open_store(go_db, create=create)
    assert query(go_db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]


@pytest.mark.parametrize("create", [False, True])
async def test_not_a_database(tmp_path, create):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is a text file, not SQLite\n" * 200)
    with pytest.raises(StoreError) as info:
        await open_store(path, create=create)
    message = str(info.value)
    assert str(path) in message
    assert "not an SQLite database" in message
    assert "\n" not in message


async def test_empty_file_lacks_tables(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"")
    with pytest.raises(StoreError, match="lacks table"):
        await open_store(path)


async def test_database_missing_a_table(go_db):
    execute(go_db, "DROP TABLE app_from")
    with pytest.raises(StoreError, match="app_from"):
        await open_store(go_db)


# Triggers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", ["mailcloak", "go"])
async def test_alias_domain_trigger(go_site, new_site, make):
    path = go_site
    if make == "mailcloak":
        path = new_site
        store = await new_site.open(create=True)
        await store.add_domain("d1.test")
        await store.add_domain("d2.test")
        await store.close()
    with pytest.raises(path.integrity_error):
        execute(path, "INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                      "VALUES ('x@d1.test', 'alice', 'd2.test')")
    execute(path, "INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                  "VALUES ('y@d1.test', 'alice', 'd1.test')")
    with pytest.raises(path.integrity_error):
        execute(path, "UPDATE aliases SET alias_domain_name = 'd2.test' WHERE alias_email = 'y@d1.test'")
    assert query(path, "SELECT alias_domain_name FROM aliases WHERE alias_email = 'y@d1.test'") == [("d1.test",)]
    assert query(path, "SELECT count(*) FROM aliases WHERE alias_email = 'x@d1.test'") == [(0,)]


async def test_updated_at_trigger(new_store, new_site):
    path = new_site
    execute(path, "INSERT INTO domains(domain_name, enabled, updated_at) VALUES ('d1.test', 1, 1000)")
    execute(path, "INSERT INTO apps(app_id, secret_hash, updated_at) VALUES ('A', 'h', 1000)")
    execute(path, "INSERT INTO app_from(app_id, from_addr, updated_at) VALUES ('A', 'a@d1.test', 1000)")
    execute(path, "INSERT INTO aliases(alias_email, target_user, alias_domain_name, updated_at) "
                  "VALUES ('x@d1.test', 'alice', 'd1.test', 1000)")
    before = int(time.time())
    execute(path, "UPDATE domains SET enabled = 0")
    execute(path, "UPDATE apps SET enabled = 0")
    execute(path, "UPDATE app_from SET enabled = 0")
    execute(path, "UPDATE aliases SET target_user = 'bob'")
    for table in ("domains", "apps", "app_from", "aliases"):
        ((updated_at,),) = query(path, f"SELECT updated_at FROM {table}")
        assert updated_at >= before, table
    # an update that sets updated_at itself keeps its value
    execute(path, "UPDATE domains SET enabled = 1, updated_at = 42")
    assert query(path, "SELECT updated_at FROM domains") == [(42,)]


# Writes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias, error", [
    ("x@unknown.test", NotFound),
    ("x@d3.test", InvalidInput),   # domain disabled
])
async def test_add_alias_bad_domain_writes_nothing(go_store, go_site, alias, error):
    before = table_contents(go_site)
    with pytest.raises(error, match=alias.split("@")[1]):
        await go_store.add_alias(alias, "alice")
    assert table_contents(go_site) == before


async def test_add_alias_upsert_reenables(go_store):
    await go_store.add_alias("off@d1.test", "bob")
    await go_store.add_alias("new@d2.test", "alice")
    rows = await go_store.load()
    aliases = {a.address: a for a in rows.aliases}
    assert aliases["off@d1.test"].enabled and aliases["off@d1.test"].target_user == "bob"
    assert aliases["new@d2.test"] == Alias("new@d2.test", "alice", "d2.test", True,
                                           aliases["new@d2.test"].updated_at)


async def test_add_app_case_clash(go_store, go_site):
    before = table_contents(go_site)
    with pytest.raises(InvalidInput, match="case"):
        await go_store.add_app("mailer", "{ARGON2ID}other")
    with pytest.raises(InvalidInput):
        await go_store.add_app("MAILER", "{ARGON2ID}other")
    assert table_contents(go_site) == before


async def test_add_app_same_id_replaces_secret_and_reenables(go_store):
    await go_store.set_app_enabled("mailer", False)
    await go_store.add_app("Mailer", "{ARGON2ID}new")
    (app,) = (await go_store.load()).apps
    assert app.enabled and app.secret_hash == "{ARGON2ID}new"
    assert len(app.senders) == 2  # allowed senders kept


async def test_domain_writes(new_store):
    await new_store.add_domain("d1.test")
    await new_store.set_domain_enabled("d1.test", False)
    assert (await new_store.load()).domains[0].enabled is False
    await new_store.add_domain("d1.test")  # re-enables
    assert (await new_store.load()).domains[0].enabled is True
    with pytest.raises(NotFound):
        await new_store.set_domain_enabled("nope.test", True)
    with pytest.raises(NotFound):
        await new_store.delete_domain("nope.test")


async def test_delete_domain_cascades(go_store):
    await go_store.delete_domain("d1.test")
    rows = await go_store.load()
    assert {d.name for d in rows.domains} == {"d2.test", "d3.test"}
    assert {a.address for a in rows.aliases} == {"sales@d2.test", "old@d3.test"}


async def test_app_sender_writes(go_store):
    await go_store.allow_sender("MAILER", "billing@d1.test")  # re-enables, app id matched by case
    await go_store.disallow_sender("Mailer", "noreply@d1.test")
    (app,) = (await go_store.load()).apps
    assert app.senders == (AppSender("billing@d1.test", True),)
    with pytest.raises(NotFound):
        await go_store.disallow_sender("Mailer", "noreply@d1.test")
    with pytest.raises(NotFound):
        await go_store.allow_sender("ghost", "a@d1.test")
    await go_store.delete_app("mailer")
    assert (await go_store.load()).apps == ()


# Change detection --------------------------------------------------------------------------------


async def _not_done_after_polls(task: asyncio.Task, polls: int = 10) -> bool:
    for _ in range(polls):
        await asyncio.sleep(POLL)
    return not task.done()


async def test_wait_for_change_returns_after_other_commit_and_not_before(go_store, go_site):
    await go_store.load()
    task = asyncio.create_task(go_store.wait_for_change())
    try:
        assert await _not_done_after_polls(task)
        execute(go_site, "UPDATE domains SET enabled = 0 WHERE domain_name = 'd2.test'")
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    # and again: a second call waits for the next commit
    task = asyncio.create_task(go_store.wait_for_change())
    try:
        assert await _not_done_after_polls(task)
        execute(go_site, "INSERT INTO domains(domain_name) VALUES ('d9.test')")
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert "d9.test" in {d.name for d in (await go_store.load()).domains}


async def test_wait_for_change_ignores_own_reads(go_store):
    await go_store.load()
    task = asyncio.create_task(go_store.wait_for_change())
    try:
        await go_store.load()
        assert await _not_done_after_polls(task)
    finally:
        task.cancel()


async def test_commit_between_load_and_wait_is_not_lost(go_store, go_site):
    """The daemon loads, then starts waiting: a commit in between must still be seen."""
    rows = await go_store.load()
    assert "d9.test" not in {d.name for d in rows.domains}
    execute(go_site, "INSERT INTO domains(domain_name) VALUES ('d9.test')")
    await asyncio.wait_for(go_store.wait_for_change(), 10)


async def test_commit_while_loading_is_not_lost(go_store, go_site):
    await go_store.load()
    task = asyncio.create_task(go_store.wait_for_change())
    try:
        assert await _not_done_after_polls(task, 3)
        execute(go_site, "INSERT INTO domains(domain_name) VALUES ('d8.test')")
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    # a commit after the change was reported but before the next wait starts is seen too
    execute(go_site, "INSERT INTO domains(domain_name) VALUES ('d7.test')")
    await asyncio.wait_for(go_store.wait_for_change(), 10)


# Snapshot ----------------------------------------------------------------------------------------


async def test_snapshot_from_go_rows(go_store):
    snapshot = Snapshot.from_rows(await go_store.load(), frozenset({"legacy.test"}))
    assert snapshot.is_local("d1.test") and snapshot.is_local("d2.test")
    assert not snapshot.is_local("d3.test")          # disabled
    assert not snapshot.is_local("elsewhere.test")
    assert snapshot.is_local("legacy.test")          # legacy policy.domain
    assert snapshot.active_alias("alias1@d1.test").target_addresses == ("alice@d1.test",)
    assert snapshot.active_alias("sales@d2.test").target_user == "bob"
    assert snapshot.active_alias("off@d1.test") is None      # disabled alias
    assert snapshot.active_alias("old@d3.test") is None      # disabled domain
    assert snapshot.active_alias("nobody@d1.test") is None
    assert snapshot.app("Mailer").app_id == "Mailer"
    assert snapshot.app("mailer").app_id == "Mailer"
    assert snapshot.app("MAILER") is snapshot.app("Mailer")
    assert snapshot.app("ghost") is None


def test_snapshot_keys_lower_case_and_table_wins_over_legacy():
    rows = Rows(
        domains=(Domain("D1.Test", True, 0), Domain("legacy.test", False, 0)),
        aliases=(Alias("Mixed@D1.Test", "alice", "D1.Test", True, 0),),
        apps=(App("MyApp", "h", False, 0, (AppSender("a@d1.test", True),)),),
    )
    snapshot = Snapshot.from_rows(rows, frozenset({"legacy.test"}))
    assert snapshot.is_local("d1.test")
    assert not snapshot.is_local("legacy.test")   # the table says disabled
    assert snapshot.active_alias("mixed@d1.test") is not None
    app = snapshot.app("myapp")
    assert app is not None and not app.enabled
    assert app.may_send_as("a@d1.test") and not app.may_send_as("b@d1.test")


def test_app_may_send_as_only_enabled_senders():
    app = App("A", "h", True, 0, (AppSender("on@d1.test", True), AppSender("off@d1.test", False)))
    assert app.may_send_as("on@d1.test")
    assert not app.may_send_as("off@d1.test")
    assert not app.may_send_as("")


def test_empty_snapshot():
    snapshot = Snapshot()
    assert not snapshot.is_local("d1.test")
    assert snapshot.active_alias("a@d1.test") is None
    assert snapshot.app("a") is None
