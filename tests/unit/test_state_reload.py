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
