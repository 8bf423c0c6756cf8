"""The version 2 writes (lists, app settings, last use, import) mean the same on both stores: the
statements are mailcloak.store.sql's, run once through each backend."""

from __future__ import annotations

import pytest

from mailcloak.store.model import Alias, App, AppSender, AppSettings, AppUsage, Domain, Rows
from tests.stores import both_store_kinds  # noqa: F401 - the store_kind fixture, both values


@pytest.fixture
async def store(new_site):
    store = await new_site.open(create=True)
    yield store
    await store.close()


async def test_app_settings_and_last_use(store):
    await store.add_app("Mailer", "{ARGON2ID}x", AppSettings(description="invoices", networks=("192.0.2.0/24",)))
    await store.set_app_settings("mailer", AppSettings(expires_at=1900000000))
    await store.record_app_usage({"Mailer": AppUsage(1800000000, "192.0.2.7")})
    await store.record_app_usage({"Mailer": AppUsage(1700000000, "192.0.2.8")})  # older: skipped
    (app,) = (await store.load()).apps
    assert (app.app_id, app.description, app.expires_at, app.networks) == (
        "Mailer", "invoices", 1900000000, ("192.0.2.0/24",))
    assert await store.app_usage() == {"Mailer": AppUsage(1800000000, "192.0.2.7")}


async def test_import_rows_replace(store):
    await store.add_domain("old.test")
    rows = Rows(
        domains=(Domain("d1.test", True, 0),),
        aliases=(Alias("team@d1.test", "alice", "d1.test", True, 0, ("bob", "carol"), "listed", ("dave",)),
                 Alias("@d1.test", "alice", "d1.test", True, 0)),
        apps=(App("printer", "", True, 0, (AppSender("scan@d1.test", True),), "scanner", None, ()),),
    )
    await store.import_rows(rows, replace=True)
    loaded = await store.load()
    assert [d.name for d in loaded.domains] == ["d1.test"]
    by_address = {a.address: a for a in loaded.aliases}
    assert by_address["team@d1.test"].targets == ("alice", "bob", "carol")
    assert (by_address["team@d1.test"].send_policy, by_address["team@d1.test"].listed_senders) == (
        "listed", ("dave",))
    assert by_address["@d1.test"].targets == ("alice",)
    (app,) = loaded.apps
    assert (app.app_id, app.description, [s.address for s in app.senders]) == (
        "printer", "scanner", ["scan@d1.test"])


async def test_list_writes(store):
    await store.add_domain("d1.test")
    await store.set_alias_targets("team@d1.test", ("alice", "bob"))
    await store.add_alias_member("team@d1.test", "carol")
    await store.remove_alias_member("team@d1.test", "alice")
    await store.set_alias_senders("team@d1.test", "listed", ("dave",))
    await store.add_alias("@d1.test", "alice")
    by_address = {a.address: a for a in (await store.load()).aliases}
    team = by_address["team@d1.test"]
    assert (team.targets, team.send_policy, team.listed_senders) == (("bob", "carol"), "listed", ("dave",))
    # aliases add A U means "A -> U alone", and keeps the sender rule
    await store.add_alias("team@d1.test", "erin")
    team = {a.address: a for a in (await store.load()).aliases}["team@d1.test"]
    assert (team.targets, team.send_policy) == (("erin",), "listed")
    assert by_address["@d1.test"].targets == ("alice",)
