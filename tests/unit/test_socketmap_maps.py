"""SPEC §7: the socketmap `alias` map as a pure function of the key and the snapshot."""

from __future__ import annotations

import pytest

from mailcloak.socketmap.maps import MAPS, MAX_KEY, NOTFOUND, Reply, alias_map
from mailcloak.config import StaticConfig
from mailcloak.idp.static import StaticProvider
from mailcloak.store.model import Alias, Domain, Rows, Snapshot

NO_IDP = StaticProvider(StaticConfig())  # these aliases need no IdP question

ROWS = Rows(
    domains=(Domain("d1.test", True, 0), Domain("d2.test", True, 0), Domain("d3.test", False, 0)),
    aliases=(
        Alias("alias1@d1.test", "alice", "d1.test", True, 0),
        Alias("off@d1.test", "alice", "d1.test", False, 0),
        Alias("sales@d2.test", "bob", "d2.test", True, 0),
        Alias("old@d3.test", "alice", "d3.test", True, 0),
        Alias("a-b@d1.test", "carol", "d1.test", True, 0),
        Alias("explicit+tag@d1.test", "dave", "d1.test", True, 0),
    ),
)
SNAPSHOT = Snapshot.from_rows(ROWS)


@pytest.mark.parametrize("key, delimiters, expected", [
    # an enabled alias in an enabled local domain → target_user@<alias domain>
    ("alias1@d1.test", "+", Reply("OK", "alice@d1.test")),
    ("sales@d2.test", "+", Reply("OK", "bob@d2.test")),
    # case folding (cleanup sends the client's case)
    ("Alias1@D1.Test", "+", Reply("OK", "alice@d1.test")),
    ("SALES@D2.TEST", "+", Reply("OK", "bob@d2.test")),
    (" alias1@d1.test ", "+", Reply("OK", "alice@d1.test")),
    # +ext stripped for the lookup and put back on the answer
    ("alias1+x@d1.test", "+", Reply("OK", "alice+x@d1.test")),
    ("Alias1+News@D1.test", "+", Reply("OK", "alice+news@d1.test")),
    ("alias1+x+y@d1.test", "+", Reply("OK", "alice+x+y@d1.test")),
    ("sales+q3@d2.test", "+", Reply("OK", "bob+q3@d2.test")),
    ("alias1-x@d1.test", "+-", Reply("OK", "alice-x@d1.test")),
    ("alias1+x@d1.test", "-+", Reply("OK", "alice+x@d1.test")),
    ("a-b@d1.test", "+-", Reply("OK", "carol@d1.test")),             # whole address first
    ("a-b+x@d1.test", "+", Reply("OK", "carol+x@d1.test")),
    ("explicit+tag@d1.test", "+", Reply("OK", "dave@d1.test")),     # an alias spelt with +tag
    # an extension that could split the answer is not copied
    ("alias1+a,b@d1.test", "+", Reply("OK", "alice@d1.test")),
    ("alias1+a b@d1.test", "+", Reply("OK", "alice@d1.test")),
    ("alias1+a\tb@d1.test", "+", Reply("OK", "alice@d1.test")),
    ("alias1+<x>@d1.test", "+", Reply("OK", "alice@d1.test")),
    ("alias1+a\"b@d1.test", "+", Reply("OK", "alice@d1.test")),
    # NOTFOUND
    ("off@d1.test", "+", NOTFOUND),                  # disabled alias
    ("off+x@d1.test", "+", NOTFOUND),
    ("old@d3.test", "+", NOTFOUND),                  # alias in a disabled domain
    ("old+x@d3.test", "+", NOTFOUND),
    ("alice@d1.test", "+", NOTFOUND),                # a real user: never mapped away
    ("alice+x@d1.test", "+", NOTFOUND),
    ("nobody@d1.test", "+", NOTFOUND),
    ("alias1@d2.test", "+", NOTFOUND),               # same local part, other domain
    ("alias1@elsewhere.example", "+", NOTFOUND),
    ("d1.test", "+", NOTFOUND),                      # bare domain
    ("D1.TEST", "+", NOTFOUND),
    ("alias1", "+", NOTFOUND),                       # key without @
    ("", "+", NOTFOUND),
    ("@d1.test", "+", NOTFOUND),
    ("+x@d1.test", "+", NOTFOUND),
    # empty delimiter turns sub-addressing off
    ("alias1+x@d1.test", "", NOTFOUND),
    ("alias1@d1.test", "", Reply("OK", "alice@d1.test")),
    ("explicit+tag@d1.test", "", Reply("OK", "dave@d1.test")),
    # a delimiter that is not configured does not split
    ("alias1-x@d1.test", "+", NOTFOUND),
])
def test_alias_map(key, delimiters, expected):
    assert alias_map(key, SNAPSHOT, delimiters, NO_IDP) == expected


def test_alias_in_domain_missing_from_table():
    snapshot = Snapshot.from_rows(Rows(aliases=(Alias("x@gone.test", "alice", "gone.test", True, 0),)))
    assert alias_map("x@gone.test", snapshot, "+", NO_IDP) == NOTFOUND


def test_legacy_extra_local_domain_counts_as_enabled():
    rows = Rows(aliases=(Alias("x@legacy.test", "alice", "legacy.test", True, 0),))
    snapshot = Snapshot.from_rows(rows, frozenset({"legacy.test"}))
    assert alias_map("X@Legacy.Test", snapshot, "+", NO_IDP) == Reply("OK", "alice@legacy.test")


def test_key_over_postfix_limit():
    long_key = "alias1+" + "x" * MAX_KEY + "@d1.test"
    assert alias_map(long_key, SNAPSHOT, "+", NO_IDP) == NOTFOUND


def test_empty_snapshot():
    assert alias_map("alias1@d1.test", Snapshot(), "+", NO_IDP) == NOTFOUND


@pytest.mark.parametrize("reply, wire", [
    (Reply("OK", "alice@d1.test"), b"OK alice@d1.test"),
    (NOTFOUND, b"NOTFOUND "),
    (Reply("TEMP", "database state unavailable"), b"TEMP database state unavailable"),
])
def test_reply_encoding(reply, wire):
    assert reply.encode() == wire


def test_maps_registry():
    assert MAPS["alias"] is alias_map
