"""What a cached IdP answer costs (the scale target: 100 000 of them within the RSS bound).

Users are looked up through `KeycloakProvider` as the policy asks, its HTTP exchange answered
in-process with the Keycloak stand-in's representation of the user; tracemalloc counts what stays.
Before the lean entry (a cachetools TLRUCache of dataclass entries, a frozenset per user, the
address parsed twice) this was about 800 bytes per answer; now about 400.
"""

from __future__ import annotations

import gc
import json
import tracemalloc

from mailcloak.config import KeycloakConfig
from mailcloak.idp.base import NO_ADDRESSES
from mailcloak.idp.keycloak import KeycloakProvider
from standins.keycloak import User

USERS = 4000
TOKEN = json.dumps({"access_token": "t", "expires_in": 3600}).encode()


def answered_in_process(**config) -> KeycloakProvider:
    idp = KeycloakProvider(KeycloakConfig(base_url="http://127.0.0.1:1", realm="mail", client_id="c",
                                          client_secret="s", **config))

    async def request(label, method, url, *, params=None, data=None, headers=None):
        if label == "token":
            return 200, TOKEN
        asked = params.get("email") or f"{params['username']}@d1.test"
        user = User(asked.split("@")[0], asked)
        return 200, json.dumps([user.representation(brief=False)]).encode()

    idp._http.request = request
    return idp


async def test_a_cached_answer_costs_under_500_bytes():
    idp = answered_in_process()
    await idp.user_by_address("warm@d1.test")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(USERS):
            assert await idp.user_by_address(f"u{i}@d1.test") is not None
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(idp.cache) == USERS + 1
    assert kept / USERS < 500


async def test_users_share_the_empty_address_set_and_one_object_for_both_lookups():
    idp = answered_in_process()
    by_address = await idp.user_by_address("u1@d1.test")
    by_username = await idp.user_by_username("U1")
    assert by_username is by_address
    assert by_address.addresses is NO_ADDRESSES
    first_by_username = await idp.user_by_username("u2")
    assert await idp.user_by_address("u2@d1.test") is first_by_username
