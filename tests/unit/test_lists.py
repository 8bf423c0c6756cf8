"""Issue #9 "distribution lists" and "catch-all per domain": store writes, mailcloakctl, the
snapshot's row checks, and the policy facts (SPEC §6 extended; README "Distribution lists")."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
from pathlib import Path
from types import MappingProxyType

import pytest

from mailcloak.config import SQLiteConfig, StaticConfig, StaticList, StaticUser
from mailcloak.ctl import main
from mailcloak.errors import InvalidInput, NotFound, SchemaOutdated
from mailcloak.idp.static import StaticProvider
from mailcloak.policy.codec import PolicyRequest
from mailcloak.policy.decision import DUNNO, IDP_TEMPFAIL, NO_SUCH_USER, NOT_OWNED, decide
from mailcloak.policy.facts import gather_facts
from mailcloak.state import _safe_rows
from mailcloak.store.model import Alias, Domain, Rows, Snapshot
from mailcloak.store.sqlite import SQLiteStore
from support import make_go_database


def rows_of(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture
def go_db(tmp_path) -> Path:
    return make_go_database(tmp_path / "state.db")


@pytest.fixture
def v2_db(go_db) -> Path:
    assert main(["--db", str(go_db), "init"]) == 0
    return go_db


@pytest.fixture
async def v2_store(v2_db):
    store = await SQLiteStore.open(SQLiteConfig(path=str(v2_db)))
    yield store
    await store.close()


@pytest.fixture
async def go_store(go_db):
    store = await SQLiteStore.open(SQLiteConfig(path=str(go_db)))
    yield store
    await store.close()


# Store ---------------------------------------------------------------------------------------


async def alias_of(store, address: str) -> Alias:
    return next(a for a in (await store.load()).aliases if a.address == address)


async def test_list_keeps_its_targets_in_order(v2_store):
    await v2_store.set_alias_targets("team@d1.test", ("carol", "alice", "Bob"))
    team = await alias_of(v2_store, "team@d1.test")
    assert team.targets == ("carol", "alice", "Bob")
    assert team.target_addresses == ("carol@d1.test", "alice@d1.test", "Bob@d1.test")
    assert team.enabled and team.send_policy == "members"


async def test_one_target_add_means_alias_to_that_user_alone(v2_store):
    await v2_store.set_alias_targets("team@d1.test", ("carol", "alice"))
    await v2_store.set_alias_senders("team@d1.test", "listed", ("dave",))
    await v2_store.set_alias_enabled("team@d1.test", False)
    await v2_store.add_alias("team@d1.test", "bob")
    team = await alias_of(v2_store, "team@d1.test")
    assert (team.targets, team.enabled) == (("bob",), True)
    # the sender rule is a separate setting and stays
    assert (team.send_policy, team.listed_senders) == ("listed", ("dave",))


async def test_members_join_and_leave_one_at_a_time(v2_store, v2_db):
    await v2_store.set_alias_targets("team@d1.test", ("alice", "bob"))
    await v2_store.set_alias_enabled("team@d1.test", False)
    await v2_store.add_alias_member("team@d1.test", "carol")
    await v2_store.add_alias_member("team@d1.test", "BOB")       # already in: nothing changes
    team = await alias_of(v2_store, "team@d1.test")
    assert (team.targets, team.enabled) == (("alice", "bob", "carol"), False)
    await v2_store.remove_alias_member("team@d1.test", "Alice")  # the first: the next takes its place
    assert (await alias_of(v2_store, "team@d1.test")).targets == ("bob", "carol")
    assert rows_of(v2_db, "SELECT target_user FROM aliases WHERE alias_email = 'team@d1.test'") == [("bob",)]
    with pytest.raises(NotFound, match="zed is not a target of team@d1.test"):
        await v2_store.remove_alias_member("team@d1.test", "zed")
    await v2_store.remove_alias_member("team@d1.test", "bob")
    with pytest.raises(InvalidInput, match="only target"):
        await v2_store.remove_alias_member("team@d1.test", "carol")
    assert (await alias_of(v2_store, "team@d1.test")).targets == ("carol",)
    with pytest.raises(NotFound, match="alias not found"):
        await v2_store.add_alias_member("nope@d1.test", "carol")


async def test_sender_rules(v2_store, v2_db):
    await v2_store.set_alias_targets("team@d1.test", ("carol", "alice"))
    await v2_store.set_alias_senders("team@d1.test", "listed", ("dave", "erin"))
    assert (await alias_of(v2_store, "team@d1.test")).sender_users == ("dave", "erin")
    await v2_store.set_alias_senders("team@d1.test", "nobody", ())
    team = await alias_of(v2_store, "team@d1.test")
    assert (team.sender_users, team.listed_senders) == ((), ())
    await v2_store.set_alias_senders("team@d1.test", "members", ())
    assert (await alias_of(v2_store, "team@d1.test")).sender_users == ("carol", "alice")
    assert rows_of(v2_db, "SELECT count(*) FROM alias_senders") == [(0,)]


@pytest.mark.parametrize("policy, users, error", [
    ("everyone", (), InvalidInput),
    ("listed", (), InvalidInput),
    ("nobody", ("dave",), InvalidInput),
])
async def test_bad_sender_rules_change_nothing(v2_store, v2_db, policy, users, error):
    before = rows_of(v2_db, "SELECT * FROM aliases ORDER BY 1")
    with pytest.raises(error):
        await v2_store.set_alias_senders("alias1@d1.test", policy, users)
    assert rows_of(v2_db, "SELECT * FROM aliases ORDER BY 1") == before


async def test_sender_rule_of_unknown_alias(v2_store):
    with pytest.raises(NotFound, match="alias not found: nope@d1.test"):
        await v2_store.set_alias_senders("nope@d1.test", "nobody", ())


async def test_list_in_unknown_domain_writes_nothing(v2_store, v2_db):
    with pytest.raises(NotFound, match="domain not found"):
        await v2_store.set_alias_targets("team@nowhere.test", ("a", "b"))
    assert rows_of(v2_db, "SELECT count(*) FROM alias_targets") == [(0,)]


async def test_duplicate_target_rolls_back_whole(v2_store, v2_db):
    before = rows_of(v2_db, "SELECT * FROM aliases ORDER BY 1")
    with pytest.raises(Exception):
        await v2_store.set_alias_targets("team@d1.test", ("alice", "bob", "bob"))
    assert rows_of(v2_db, "SELECT * FROM aliases ORDER BY 1") == before
    assert rows_of(v2_db, "SELECT count(*) FROM alias_targets") == [(0,)]


async def test_catch_all_row(v2_store):
    await v2_store.add_alias("@d1.test", "alice")
    catch_all = await alias_of(v2_store, "@d1.test")
    assert (catch_all.domain, catch_all.target_addresses) == ("d1.test", ("alice@d1.test",))


async def test_go_database_refuses_list_data_and_keeps_one_target_aliases(go_store, go_db):
    before = rows_of(go_db, "SELECT * FROM aliases ORDER BY 1")
    with pytest.raises(SchemaOutdated, match="run mailcloakctl init"):
        await go_store.set_alias_targets("team@d1.test", ("alice", "bob"))
    with pytest.raises(SchemaOutdated, match="run mailcloakctl init"):
        await go_store.set_alias_senders("alias1@d1.test", "nobody", ())
    with pytest.raises(SchemaOutdated, match="run mailcloakctl init"):
        await go_store.add_alias_member("alias1@d1.test", "bob")
    assert rows_of(go_db, "SELECT * FROM aliases ORDER BY 1") == before
    await go_store.add_alias("alias1@d1.test", "carol")  # the Go meaning, on the Go schema
    assert (await alias_of(go_store, "alias1@d1.test")).targets == ("carol",)
    assert rows_of(go_db, "SELECT count(*) FROM sqlite_master WHERE name = 'alias_targets'") == [(0,)]


# mailcloakctl --------------------------------------------------------------------------------


@pytest.fixture
def ctl(v2_db, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--db", str(v2_db), *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_ctl_list_one_line_per_target_sorted_by_user(ctl):
    assert ctl("aliases", "add", "team@d1.test", "carol", "alice")[0] == 0
    assert ctl("aliases", "add", "@D1.test", "zed")[0] == 0
    code, out, err = ctl("aliases", "list")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "alias1@d1.test\talice\tenabled",
        "off@d1.test\talice\tdisabled",
        "old@d3.test\talice\tenabled",
        "team@d1.test\talice\tenabled",
        "sales@d2.test\tbob\tenabled",
        "team@d1.test\tcarol\tenabled",
        "@d1.test\tzed\tenabled",
    ]
    assert ctl("aliases", "list", "--user", "CAROL")[1] == "team@d1.test\tcarol\tenabled\n"


def test_ctl_json_carries_the_whole_list(ctl):
    ctl("aliases", "add", "team@d1.test", "carol", "alice")
    ctl("aliases", "senders", "team@d1.test", "listed", "dave")
    code, out, _ = ctl("aliases", "list", "--json", "--user", "alice")
    team = next(a for a in json.loads(out) if a["alias"] == "team@d1.test")
    assert team == {"alias": "team@d1.test", "user": "carol", "domain": "d1.test", "enabled": True,
                    "updated_at": team["updated_at"], "targets": ["carol", "alice"],
                    "catch_all": False, "send_policy": "listed", "senders": ["dave"]}


@pytest.mark.parametrize("argv, message", [
    (["aliases", "add", "team@d1.test", "alice", "ALICE"], "user listed twice: ALICE"),
    (["aliases", "add", "team@d1.test", "alice", "b,c"], "invalid user"),
    (["aliases", "add", "@", "alice"], "invalid address: '@'"),
    (["aliases", "add", "@bad domain", "alice"], "invalid address"),
    (["aliases", "add", "@nowhere.test", "alice"], "domain not found: nowhere.test"),
    (["aliases", "senders", "alias1@d1.test", "everyone"], "invalid sender rule 'everyone'"),
    (["aliases", "senders", "alias1@d1.test", "listed"], "only with 'listed'"),
    (["aliases", "senders", "nope@d1.test", "nobody"], "alias not found: nope@d1.test"),
    (["aliases", "add-member", "alias1@d1.test", "a b"], "invalid user"),
    (["aliases", "del-member", "alias1@d1.test", "alice"], "only target of alias1@d1.test"),
    (["aliases", "del-member", "alias1@d1.test", "bob"], "bob is not a target of alias1@d1.test"),
])
def test_ctl_errors_are_one_line_and_change_nothing(ctl, v2_db, argv, message):
    before = {t: rows_of(v2_db, f"SELECT * FROM {t} ORDER BY 1")
              for t in ("aliases", "alias_targets", "alias_senders")}
    code, out, err = ctl(*argv)
    assert code == 1 and out == ""
    assert err.startswith("mailcloakctl: ") and message in err and err.count("\n") == 1
    assert {t: rows_of(v2_db, f"SELECT * FROM {t} ORDER BY 1") for t in before} == before


def test_ctl_on_go_database_says_to_run_init(go_db, capsys):
    code = main(["--db", str(go_db), "aliases", "add", "team@d1.test", "alice", "bob"])
    err = capsys.readouterr().err
    assert code == 1 and "run mailcloakctl init" in err and err.count("\n") == 1


# Snapshot row checks -------------------------------------------------------------------------


@pytest.mark.parametrize("alias", [
    Alias("team@d1.test", "alice", "d1.test", True, 0, extra_targets=("bob carol",)),
    Alias("team@d1.test", "alice", "d1.test", True, 0, extra_targets=("bob,carol",)),
    Alias("team@d1.test", "alice", "d1.test", True, 0, extra_targets=("bob@d2.test",)),
    Alias("team@d1.test", "alice", "d1.test", True, 0, send_policy="everyone"),
    Alias("team@d1.test", "alice", "d1.test", True, 0, send_policy="listed", listed_senders=("a b",)),
    Alias("@d1.test", "alice", "d2.test", True, 0),
    Alias("@", "alice", "", True, 0),
])
def test_unsafe_list_rows_are_left_out(alias, caplog):
    rows = Rows((Domain("d1.test", True, 0),), (alias, Alias("ok@d1.test", "bob", "d1.test", True, 0)))
    with caplog.at_level(logging.WARNING):
        kept = _safe_rows(rows)
    assert [a.address for a in kept.aliases] == ["ok@d1.test"]
    assert "ignoring 1 alias row" in caplog.text


def test_safe_list_and_catch_all_rows_are_kept():
    rows = Rows((Domain("d1.test", True, 0),), (
        Alias("team@d1.test", "alice", "d1.test", True, 0, ("bob",), "listed", ("carol",)),
        Alias("@d1.test", "alice", "d1.test", True, 0)))
    assert _safe_rows(rows) is rows


# Policy facts ---------------------------------------------------------------------------------

ALIASES = (
    Alias("team@d1.test", "alice", "d1.test", True, 0, ("bob",)),
    Alias("quiet@d1.test", "alice", "d1.test", True, 0, ("bob",), "nobody"),
    Alias("board@d1.test", "alice", "d1.test", True, 0, ("bob",), "listed", ("carol",)),
    Alias("@d2.test", "alice", "d2.test", True, 0),
    Alias("@d3.test", "alice", "d3.test", False, 0),
)
SNAPSHOT = Snapshot.from_rows(Rows(
    (Domain("d1.test", True, 0), Domain("d2.test", True, 0), Domain("d3.test", True, 0)), ALIASES))
USERS = (StaticUser("alice", "alice@d1.test"), StaticUser("bob", "bob@d1.test"),
         StaticUser("carol", "carol@d1.test"))
IDP = StaticProvider(StaticConfig(USERS, (
    StaticList("staff@d1.test", ("alice", "bob")),
    StaticList("news@d1.test", ("alice",), "listed", ("carol",)),
)))


async def policy(**attrs: str) -> str:
    request = PolicyRequest(MappingProxyType({"request": "smtpd_access_policy", **attrs}))
    deadline = asyncio.get_running_loop().time() + 5
    facts = await gather_facts(request, SNAPSHOT, IDP, "+", deadline)
    return decide(request, facts, IDP_TEMPFAIL).action


@pytest.mark.parametrize("recipient, expected", [
    ("team@d1.test", DUNNO),           # a static list
    ("team+x@d1.test", DUNNO),
    ("staff@d1.test", DUNNO),          # an IdP list
    ("anything@d2.test", DUNNO),       # the domain has a catch-all
    ("alice@d2.test", DUNNO),
    ("anything@d3.test", NO_SUCH_USER),  # its catch-all is disabled
    ("ghost@d1.test", NO_SUCH_USER),
])
async def test_recipient_exists(recipient, expected):
    assert await policy(protocol_state="RCPT", recipient=recipient, sender="x@example.org") == expected


@pytest.mark.parametrize("login, sender, expected", [
    ("alice", "team@d1.test", DUNNO),      # members: its targets
    ("bob", "team+tag@d1.test", DUNNO),
    ("carol", "team@d1.test", NOT_OWNED),
    ("alice", "quiet@d1.test", NOT_OWNED),  # nobody
    ("carol", "board@d1.test", DUNNO),      # listed
    ("alice", "board@d1.test", NOT_OWNED),
    ("bob", "staff@d1.test", DUNNO),        # IdP list, members
    ("carol", "staff@d1.test", NOT_OWNED),
    ("carol", "news@d1.test", DUNNO),       # IdP list, listed
    ("alice", "news@d1.test", NOT_OWNED),
    ("alice", "anything@d2.test", NOT_OWNED),  # a catch-all target owns nothing it receives
])
async def test_who_may_send_as_a_list(login, sender, expected):
    action = await policy(protocol_state="MAIL", sender=sender, sasl_method="XOAUTH2", sasl_username=login)
    assert action == expected


# Config ----------------------------------------------------------------------------------------


def static_config(tmp_path, lists) -> Path:
    import yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"idp": {"provider": "static", "static": {
        "users": [{"username": "alice", "email": "alice@d1.test"}], "lists": lists}}}))
    return path


@pytest.mark.parametrize("lists, message", [
    ([{"address": "team"}], "idp.static.lists[0].address must be an address"),
    ([{"address": "team@d1.test"}], "idp.static.lists[0].members must name at least one user"),
    ([{"address": "team@d1.test", "members": ["bob"]}], "'bob' is not in idp.static.users"),
    ([{"address": "team@d1.test", "members": ["alice"], "send_policy": "listed"}],
     "idp.static.lists[0].senders must be given"),
    ([{"address": "team@d1.test", "members": ["alice"], "send_policy": "all"}],
     "idp.static.lists[0].send_policy must be one of"),
    ([{"address": "team@d1.test", "members": ["alice"], "owner": "alice"}],
     "unknown key idp.static.lists[0].owner"),
])
def test_static_lists_config_errors_name_the_key(tmp_path, lists, message):
    from mailcloak.config import load_config
    from mailcloak.errors import ConfigError
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(static_config(tmp_path, lists))


def test_static_lists_config(tmp_path):
    from mailcloak.config import load_config
    config = load_config(static_config(tmp_path, [{"address": "Team@d1.test", "members": ["Alice"]}]))
    assert config.idp.static.lists == (StaticList("Team@d1.test", ("Alice",)),)
    idp = StaticProvider(config.idp.static)
    assert idp.lists_enabled
    assert asyncio.run(idp.list_by_address("team@D1.test")).members[0].username == "alice"


# A locked database -------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [
    lambda store: store.set_alias_targets("team@d1.test", ("alice", "bob")),
    lambda store: store.set_alias_senders("alias1@d1.test", "nobody", ()),
    lambda store: store.add_alias("@d1.test", "alice"),
])
async def test_locked_database_is_a_clear_error_and_writes_nothing(v2_db, write):
    from mailcloak.errors import StoreLocked
    store = await SQLiteStore.open(SQLiteConfig(path=str(v2_db), busy_timeout_seconds=0.2))
    holder = sqlite3.connect(v2_db, isolation_level=None)
    try:
        before = rows_of(v2_db, "SELECT * FROM aliases ORDER BY 1")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreLocked):
            await write(store)
        holder.execute("ROLLBACK")
        assert rows_of(v2_db, "SELECT * FROM aliases ORDER BY 1") == before
        assert rows_of(v2_db, "SELECT count(*) FROM alias_targets") == [(0,)]
    finally:
        holder.close()
        await store.close()
