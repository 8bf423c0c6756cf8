"""StateCache reloads: unchanged rows are taken over, changed ones checked, unsafe ones dropped."""

from __future__ import annotations

import sqlite3

from mailcloak.config import SQLiteConfig
from mailcloak.state import StateCache
from mailcloak.store.sqlite import SQLiteStore


async def test_a_reload_keeps_unchanged_aliases_and_checks_changed_ones(tmp_path):
    path = tmp_path / "state.db"
    store = await SQLiteStore.open(SQLiteConfig(path=str(path)), create=True)
    try:
        await store.add_domain("d1.test")
        await store.add_alias("kept@d1.test", "alice")
        await store.add_alias("moved@d1.test", "alice")
        state = StateCache(store)
        await state.load()
        kept = state.snapshot.aliases["kept@d1.test"]
        with sqlite3.connect(path) as con:
            con.execute("UPDATE aliases SET target_user = 'bob' WHERE alias_email = 'moved@d1.test'")
            # written by hand, past the checks of mailcloakctl: a target that breaks a reply
            con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                        "VALUES ('bad@d1.test', 'x y', 'd1.test')")
            con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                        "VALUES ('New@D1.test', 'carol', 'D1.test')")
        await state.load()
    finally:
        await store.close()
    aliases = state.snapshot.aliases
    assert aliases["kept@d1.test"] is kept
    assert aliases["moved@d1.test"].target_user == "bob"
    assert "bad@d1.test" not in aliases
    assert aliases["new@d1.test"].target_user == "carol"
    assert set(aliases) == {"kept@d1.test", "moved@d1.test", "new@d1.test"}


# -- reloads that read only what the change log names (schema version 3) ----------------------

import contextlib  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from support import make_go_database  # noqa: E402


async def _open(path, create=True) -> SQLiteStore:
    return await SQLiteStore.open(SQLiteConfig(path=str(path)), create=create)


def _snapshot_view(snapshot):
    """What a snapshot answers from, as plain comparable values."""
    return (dict(snapshot.domains), dict(snapshot.aliases), dict(snapshot.apps))


async def _full_view(path):
    """The snapshot a fresh daemon would load from `path` now."""
    store = await _open(path, create=False)
    try:
        state = StateCache(store)
        await state.load()
        return _snapshot_view(state.snapshot)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _loaded_state(path, *aliases: str):
    """A new database with domain d1.test and `aliases` (to alice), and a StateCache loaded from it."""
    store = await _open(path)
    try:
        await store.add_domain("d1.test")
        for alias in aliases:
            await store.add_alias(alias, "alice")
        state = StateCache(store)
        await state.load()
        yield state
    finally:
        await store.close()


def _hand_edit(path, *statements: str) -> None:
    """Statements run by another connection, as the sqlite3 shell would, in one transaction."""
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA foreign_keys = ON")
        for statement in statements:
            con.execute(statement)


def _random_edit(con: sqlite3.Connection, rng: random.Random) -> None:
    """One write another process could make: through the tables, as a hand edit would."""
    address = f"{rng.choice(['a', 'b', 'c', 'd', 'e', 'f'])}@{rng.choice(['d1.test', 'd2.test'])}"
    domain = address.split("@")[1]
    kind = rng.randrange(9)
    if kind == 0:
        con.execute("INSERT OR REPLACE INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, ?, ?)",
                    (address, rng.choice(["alice", "bob", "x y"]), domain))
    elif kind == 1:
        con.execute("UPDATE aliases SET enabled = 1 - enabled WHERE alias_email = ?", (address,))
    elif kind == 2:
        con.execute("DELETE FROM aliases WHERE alias_email = ?", (address,))
    elif kind == 3:
        con.execute("INSERT OR IGNORE INTO alias_targets(alias_email, target_user, position) "
                    "SELECT alias_email, ?, 1 FROM aliases WHERE alias_email = ?", (rng.choice(["carol", "dave"]), address))
    elif kind == 4:
        con.execute("DELETE FROM alias_targets WHERE alias_email = ?", (address,))
    elif kind == 5:
        con.execute("UPDATE aliases SET send_policy = ? WHERE alias_email = ?",
                    (rng.choice(["members", "nobody", "listed"]), address))
        con.execute("INSERT OR IGNORE INTO alias_senders(alias_email, sender_user) "
                    "SELECT alias_email, 'erin' FROM aliases WHERE alias_email = ?", (address,))
    elif kind == 6:
        con.execute("UPDATE domains SET enabled = 1 - enabled WHERE domain_name = ?", (domain,))
    elif kind == 7:  # a domain deleted (its aliases go with it, by cascade) and added again
        con.execute("DELETE FROM domains WHERE domain_name = ?", (domain,))
        con.execute("INSERT INTO domains(domain_name) VALUES (?)", (domain,))
    else:
        con.execute("INSERT OR REPLACE INTO apps(app_id, secret_hash) VALUES (?, 'x')", (rng.choice(["app1", "app2"]),))


async def test_a_refresh_reads_only_changed_aliases_and_equals_a_full_load(tmp_path):
    """Random writes by another connection (inserts, updates, deletes, list targets and senders,
    domain deletes that cascade, apps): after each batch the refreshed snapshot is exactly what a
    full load gives, and no refresh read everything."""
    path = tmp_path / "state.db"
    store = await _open(path)
    rng = random.Random(6)
    try:
        for domain in ("d1.test", "d2.test"):
            await store.add_domain(domain)
        state = StateCache(store)
        await state.load()
        with sqlite3.connect(path) as con:
            con.execute("PRAGMA foreign_keys = ON")
            for _ in range(60):
                for _ in range(rng.randrange(1, 5)):
                    _random_edit(con, rng)
                con.commit()
                await state.refresh()
                assert _snapshot_view(state.snapshot) == await _full_view(path)
    finally:
        await store.close()
    assert state.reloads == {"full": 1, "changes": 60}


async def test_a_refresh_takes_over_the_aliases_that_did_not_change(tmp_path):
    async with _loaded_state(tmp_path / "state.db", "kept@d1.test") as state:
        kept = state.snapshot.aliases["kept@d1.test"]
        _hand_edit(tmp_path / "state.db", "INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                                          "VALUES ('new@d1.test', 'bob', 'd1.test')")
        await state.refresh()
    assert state.snapshot.aliases["kept@d1.test"] is kept
    assert state.snapshot.aliases["new@d1.test"].target_user == "bob"
    assert state.reloads == {"full": 1, "changes": 1}


async def test_a_refresh_drops_an_alias_made_unsafe_by_hand_and_takes_it_back_once_fixed(tmp_path):
    async with _loaded_state(tmp_path / "state.db", "a@d1.test") as state:
        _hand_edit(tmp_path / "state.db", "UPDATE aliases SET target_user = 'x y' WHERE alias_email = 'a@d1.test'")
        await state.refresh()
        assert "a@d1.test" not in state.snapshot.aliases
        _hand_edit(tmp_path / "state.db", "UPDATE aliases SET target_user = 'bob' WHERE alias_email = 'a@d1.test'")
        await state.refresh()
        assert state.snapshot.aliases["a@d1.test"].target_user == "bob"
    assert state.reloads == {"full": 1, "changes": 2}


async def test_a_log_with_entries_missing_makes_a_refresh_read_everything(tmp_path):
    """The log keeps its last entries only, and may be emptied by hand: a refresh that cannot
    account for every change since its position reads every row, and misses nothing."""
    async with _loaded_state(tmp_path / "state.db", "gone@d1.test") as state:
        _hand_edit(tmp_path / "state.db",
                   "DELETE FROM aliases WHERE alias_email = 'gone@d1.test'",
                   "INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES ('new@d1.test', 'bob', 'd1.test')",
                   "DELETE FROM alias_changes WHERE alias_email = 'gone@d1.test'")
        await state.refresh()
    assert set(state.snapshot.aliases) == {"new@d1.test"}
    assert state.reloads == {"full": 2, "changes": 0}


async def test_a_database_replaced_by_one_with_a_shorter_log_is_read_whole(tmp_path):
    async with _loaded_state(tmp_path / "state.db", "a0@d1.test", "a1@d1.test", "a2@d1.test") as state:
        _hand_edit(tmp_path / "state.db",  # as a restored backup would: its log is behind
                   "DELETE FROM aliases",
                   "UPDATE sqlite_sequence SET seq = 1 WHERE name = 'alias_changes'",
                   "DELETE FROM alias_changes")
        await state.refresh()
    assert dict(state.snapshot.aliases) == {}
    assert state.reloads == {"full": 2, "changes": 0}


async def test_the_log_keeps_its_last_entries_only(tmp_path):
    from mailcloak.store.sqlite import CHANGE_LOG_KEEP

    path = tmp_path / "state.db"
    async with _loaded_state(path):
        pass
    with sqlite3.connect(path) as con:
        con.executemany("INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, 'u', 'd1.test')",
                        [(f"a{n}@d1.test",) for n in range(CHANGE_LOG_KEEP + 5)])
        assert con.execute("SELECT count(*), min(seq), max(seq) FROM alias_changes").fetchone() == (
            CHANGE_LOG_KEEP, 6, CHANGE_LOG_KEEP + 5)


@pytest.mark.parametrize("schema", ["go", "capitals"])
async def test_reloads_read_everything_without_a_usable_log(tmp_path, schema):
    """A Go database has no change log; an address stored with capitals may share its lower-case
    key with another row, which only a full read settles. Both are read whole, and right."""
    path = tmp_path / "state.db"
    if schema == "go":
        make_go_database(path)
    else:
        async with _loaded_state(path):
            pass
        _hand_edit(path, "INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                         "VALUES ('Mixed@d1.test', 'alice', 'd1.test')")
    store = await _open(path, create=False)
    try:
        state = StateCache(store)
        await state.load()
        _hand_edit(path, "INSERT OR IGNORE INTO domains(domain_name) VALUES ('d1.test')",
                   "INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES ('added@d1.test', 'bob', 'd1.test')")
        await state.refresh()
        assert state.snapshot.aliases["added@d1.test"].target_user == "bob"
        assert _snapshot_view(state.snapshot) == await _full_view(path)
    finally:
        await store.close()
    assert state.reloads == {"full": 2, "changes": 0}
