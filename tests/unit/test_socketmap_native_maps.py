"""Issue #9: the socketmap's lists and catch-all (`alias`), and the native maps `domain`,
`mailbox` and `sender_login`, through their one entry point `maps.lookup`."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from mailcloak.config import StaticConfig, StaticList, StaticUser
from mailcloak.errors import IdPError
from mailcloak.idp.base import IdentityProvider
from mailcloak.idp.static import StaticProvider
from mailcloak.socketmap.maps import IDP_FAILED, IDP_SLOW, MAX_KEY, NOTFOUND, Reply, lookup
from mailcloak.store.model import Alias, App, AppSender, Domain, Rows, Snapshot

ROWS = Rows(
    domains=(Domain("d1.test", True, 0), Domain("d2.test", True, 0), Domain("off.test", False, 0)),
    aliases=(
        Alias("alias1@d1.test", "alice", "d1.test", True, 0),
        Alias("team@d1.test", "alice", "d1.test", True, 0, ("bob", "carol")),
        Alias("quiet@d1.test", "alice", "d1.test", True, 0, ("bob",), "nobody"),
        Alias("board@d1.test", "alice", "d1.test", True, 0, (), "listed", ("carol", "ghost")),
        Alias("typo@d1.test", "nosuchuser", "d1.test", True, 0),
        Alias("@d1.test", "catcher", "d1.test", True, 0),
        Alias("@d2.test", "alice", "d2.test", False, 0),   # disabled catch-all
        Alias("x@off.test", "alice", "off.test", True, 0),
        Alias("@off.test", "alice", "off.test", True, 0),  # catch-all of a disabled domain
    ),
    apps=(
        App("Mailer", "{ARGON2ID}x", True, 0, (AppSender("alias1@d1.test", True),
                                               AppSender("noreply@elsewhere.example", True),
                                               AppSender("team@d1.test", False))),
        App("Stopped", "{ARGON2ID}x", False, 0, (AppSender("alias1@d1.test", True),)),
    ),
)
SNAPSHOT = Snapshot.from_rows(ROWS)
USERS = (StaticUser("alice", "alice@d1.test"), StaticUser("Bob", "bob@d1.test"),
         StaticUser("carol", "carol@d1.test"), StaticUser("catcher", "catcher@d1.test"),
         StaticUser("dora", "dora@d2.test"), StaticUser("eve", "eve@elsewhere.example"),
         StaticUser("odd", "a/b@d1.test"), StaticUser("old", "old@d1.test", enabled=False))
STATIC = StaticProvider(StaticConfig(USERS))
WITH_LISTS = StaticProvider(StaticConfig(USERS, (
    StaticList("staff@d1.test", ("alice", "Bob")),
    StaticList("news@d2.test", ("carol",), "listed", ("dora",)),
    StaticList("empty@d1.test", ("old",)),
)))


async def ask(name: str, key: str, idp: IdentityProvider = STATIC, delimiters: str = "+",
              snapshot: Snapshot = SNAPSHOT) -> Reply:
    answer = lookup(name, key, snapshot, idp, delimiters, timeout=5)
    return answer if isinstance(answer, Reply) else await answer


@pytest.mark.parametrize("key, expected", [
    # a list: every target, comma-separated, in order; +ext on each
    ("team@d1.test", "OK alice@d1.test,bob@d1.test,carol@d1.test"),
    ("Team+x@D1.test", "OK alice+x@d1.test,bob+x@d1.test,carol+x@d1.test"),
    # catch-all: unknown local parts, with the extension kept
    ("nobody@d1.test", "OK catcher@d1.test"),
    ("nobody+x@d1.test", "OK catcher+x@d1.test"),
    # never a real user's address, in any case or with an extension
    ("alice@d1.test", "NOTFOUND "),
    ("ALICE+x@d1.test", "NOTFOUND "),
    ("catcher@d1.test", "NOTFOUND "),
    # a disabled user is no user: the catch-all takes it
    ("old@d1.test", "OK catcher@d1.test"),
    # an alias target that is no user must not fall into the catch-all (Postfix asks again)
    ("nosuchuser@d1.test", "NOTFOUND "),
    ("nosuchuser+x@d1.test", "NOTFOUND "),
    # aliases before the catch-all
    ("alias1@d1.test", "OK alice@d1.test"),
    # disabled catch-all, catch-all of a disabled domain, foreign domain
    ("nobody@d2.test", "NOTFOUND "),
    ("nobody@off.test", "NOTFOUND "),
    ("nobody@elsewhere.example", "NOTFOUND "),
    # never a key Postfix does not send
    ("@d1.test", "NOTFOUND "),
    ("d1.test", "NOTFOUND "),
])
async def test_alias_lists_and_catch_all(key, expected):
    assert (await ask("alias", key)).encode().decode() == expected


@pytest.mark.parametrize("key, expected", [
    ("staff@d1.test", "OK alice@d1.test,bob@d1.test"),
    ("staff+x@d1.test", "OK alice+x@d1.test,bob+x@d1.test"),
    ("news@d2.test", "OK carol@d1.test"),
    ("empty@d1.test", "OK catcher@d1.test"),   # a list without enabled members receives nothing
    ("bob@d1.test", "NOTFOUND "),
    ("ghost@d2.test", "NOTFOUND "),
    ("team@d1.test", "OK alice@d1.test,bob@d1.test,carol@d1.test"),  # the database first
])
async def test_alias_idp_lists(key, expected):
    assert (await ask("alias", key, WITH_LISTS)).encode().decode() == expected


async def test_answers_from_the_snapshot_alone_come_at_once():
    """The fast path: no IdP question, no coroutine, when nothing in the IdP could change it."""
    for name, key in [("alias", "alias1@d1.test"), ("alias", "team+x@d1.test"),
                      ("alias", "x@d2.test"), ("alias", "x@elsewhere.example"),
                      ("domain", "d1.test"), ("mailbox", "x@elsewhere.example"),
                      ("sender_login", "x@elsewhere.example"), ("nope", "x")]:
        assert isinstance(lookup(name, key, SNAPSHOT, STATIC, "+", 5), Reply), (name, key)
    answer = lookup("alias", "x@d1.test", SNAPSHOT, STATIC, "+", 5)
    assert inspect.isawaitable(answer)
    assert await answer == Reply("OK", "catcher@d1.test")


@pytest.mark.parametrize("key, expected", [
    ("d1.test", "OK d1.test"),
    ("D1.Test", "OK d1.test"),
    ("d2.test", "OK d2.test"),
    ("off.test", "NOTFOUND "),
    ("elsewhere.example", "NOTFOUND "),
    ("alice@d1.test", "NOTFOUND "),
    (".d1.test", "NOTFOUND "),
    ("", "NOTFOUND "),
])
async def test_domain_map(key, expected):
    assert (await ask("domain", key)).encode().decode() == expected


@pytest.mark.parametrize("key, delimiters, expected", [
    ("alice@d1.test", "+", "OK d1.test/alice/"),
    ("Alice@D1.test", "+", "OK d1.test/alice/"),
    ("alice+news@d1.test", "+", "OK d1.test/alice/"),
    ("alice+news@d1.test", "", "NOTFOUND "),
    ("dora@d2.test", "+", "OK d2.test/dora/"),
    ("alias1@d1.test", "+", "NOTFOUND "),    # aliases, lists and catch-alls have no mailbox
    ("team@d1.test", "+", "NOTFOUND "),
    ("nobody@d1.test", "+", "NOTFOUND "),
    ("old@d1.test", "+", "NOTFOUND "),       # disabled user
    ("eve@elsewhere.example", "+", "NOTFOUND "),  # not a local domain
    ("a/b@d1.test", "+", "NOTFOUND "),       # would leave virtual_mailbox_base
    ("d1.test", "+", "NOTFOUND "),
])
async def test_mailbox_map(key, delimiters, expected):
    assert (await ask("mailbox", key, delimiters=delimiters)).encode().decode() == expected


@pytest.mark.parametrize("key, idp, expected", [
    ("alice@d1.test", STATIC, "OK alice,alice@d1.test"),
    ("alice+tag@d1.test", STATIC, "OK alice,alice@d1.test"),
    ("bob@d1.test", STATIC, "OK Bob,bob@d1.test"),
    # an alias: the owner of the address and its targets, then apps allowed to send as it
    ("alias1@d1.test", STATIC, "OK alice,alice@d1.test,Mailer"),
    ("alias1+x@d1.test", STATIC, "OK alice,alice@d1.test,Mailer"),
    ("team@d1.test", STATIC, "OK alice,alice@d1.test,Bob,bob@d1.test,carol,carol@d1.test"),
    ("quiet@d1.test", STATIC, "NOTFOUND "),                         # nobody
    ("board@d1.test", STATIC, "OK carol,carol@d1.test"),            # listed; ghost is no user
    ("nobody@d1.test", STATIC, "NOTFOUND "),                        # catch-all: no one
    ("noreply@elsewhere.example", STATIC, "OK Mailer"),             # an app, any domain
    ("eve@elsewhere.example", STATIC, "NOTFOUND "),                 # users: local domains only
    ("old@d1.test", STATIC, "NOTFOUND "),
    ("staff@d1.test", WITH_LISTS, "OK alice,alice@d1.test,Bob,bob@d1.test"),
    ("news@d2.test", WITH_LISTS, "OK dora,dora@d2.test"),
])
async def test_sender_login_map(key, idp, expected):
    assert (await ask("sender_login", key, idp)).encode().decode() == expected


class TroubledIdP(IdentityProvider):
    name = "troubled"
    lists_enabled = True

    def __init__(self, mode: str):
        self.mode = mode

    async def _trouble(self):
        if self.mode == "fail":
            raise IdPError("down")
        await asyncio.Event().wait()

    async def user_by_address(self, address):
        await self._trouble()

    async def user_by_username(self, username):
        await self._trouble()

    async def list_by_address(self, address):
        await self._trouble()


@pytest.mark.parametrize("mode, expected", [("fail", IDP_FAILED), ("hang", IDP_SLOW)])
@pytest.mark.parametrize("name, key", [("alias", "nobody@d1.test"), ("alias", "x@d2.test"),
                                       ("mailbox", "alice@d1.test"),
                                       ("sender_login", "alice@d1.test")])
async def test_idp_trouble_is_temp_never_a_guess(mode, expected, name, key):
    answer = lookup(name, key, SNAPSHOT, TroubledIdP(mode), "+", timeout=0.05)
    assert await answer == expected
    assert expected.status == "TEMP"


async def test_snapshot_answers_still_come_when_the_idp_is_down():
    assert lookup("alias", "team@d1.test", SNAPSHOT, TroubledIdP("fail"), "+", 5) == \
        Reply("OK", "alice@d1.test,bob@d1.test,carol@d1.test")
    assert lookup("domain", "d1.test", SNAPSHOT, TroubledIdP("fail"), "+", 5) == Reply("OK", "d1.test")


@pytest.mark.parametrize("name", ["alias", "domain", "mailbox", "sender_login"])
async def test_key_over_postfix_limit(name):
    assert await ask(name, "a" * MAX_KEY + "@d1.test") == NOTFOUND


async def test_unknown_map():
    assert (await ask("virtual", "alice@d1.test")).status == "PERM"


async def test_idp_values_that_would_split_a_reply_are_left_out():
    """A Keycloak email or an app id with a comma or space must not add a target or a login."""
    from mailcloak.idp.base import IdPList, IdPUser

    class OddIdP(IdentityProvider):
        name = "odd"
        lists_enabled = True

        async def user_by_address(self, address):
            return None

        async def user_by_username(self, username):
            return IdPUser(username, "x y@d1.test") if username == "odd" else None

        async def list_by_address(self, address):
            return IdPList(address, (IdPUser("a", "a@d1.test"), IdPUser("odd", "evil@x.test,b@d1.test"),
                                     IdPUser("sp", "s p@d1.test")), "listed", ("odd",))

    snapshot = Snapshot.from_rows(Rows(ROWS.domains, (), (
        App("a,b", "{ARGON2ID}x", True, 0, (AppSender("list@d1.test", True),)),)))
    assert await ask("alias", "list@d1.test", OddIdP(), snapshot=snapshot) == Reply("OK", "a@d1.test")
    assert await ask("sender_login", "list@d1.test", OddIdP(), snapshot=snapshot) == Reply("OK", "odd")
