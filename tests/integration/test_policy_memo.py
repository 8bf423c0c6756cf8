"""The policy service's memo of decisions (mailcloak.memo): the same answers as without it."""

from __future__ import annotations

import pytest

from mailcloak.config import load_config
from mailcloak.idp import build_provider
from mailcloak.idp.keycloak import KeycloakProvider
from mailcloak.metrics import Metrics
from mailcloak.policy.decision import MALFORMED, NO_SUCH_USER
from mailcloak.policy.codec import DECIDING, deciding, parse_request
from mailcloak.policy.server import PolicyService
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.state import StateCache
from mailcloak.store.model import AppSettings
from mailcloak.store.sqlite import SQLiteStore
from standins.fixtures import clock, keycloak_standin  # noqa: F401
from support import policy_request, write_config
from test_keycloak import config_for


def lines_of(**attributes: str) -> list[bytes]:
    return policy_request(**attributes)[:-2].split(b"\n")


UNAUTH = dict(protocol_state="RCPT", sender="x@outside.example", recipient="alice@d1.test")


@pytest.fixture
async def service(tmp_path, go_db):
    config = load_config(write_config(tmp_path))
    store = await SQLiteStore.open(config.sqlite)
    state = StateCache(store)
    await state.load()
    idp = build_provider(config)
    yield PolicyService(RuntimeRef(Runtime(config, idp, state)), Metrics()), state
    await store.close()


async def answer(policy: PolicyService, lines: list[bytes]) -> bytes:
    reply = policy.respond(lines)
    return reply if isinstance(reply, bytes) else await reply


def key_of(**attributes: str) -> tuple:
    return parse_request(lines_of(**attributes)).decision_key()


def test_decision_key_holds_the_deciding_attributes_normalised_and_nothing_else():
    plain = key_of(**UNAUTH, instance="1a.2b", queue_id="4XyZ1", client_port="4000", helo_name="a.example",
                   client_address="192.0.2.1")
    assert plain == key_of(**UNAUTH, instance="9f.00", queue_id="", client_port="4001", helo_name="b.example",
                           client_address="198.51.100.7")
    assert plain == key_of(**{**UNAUTH, "sender": "X@Outside.Example", "protocol_state": "rcpt"})
    assert plain != key_of(**{**UNAUTH, "sender": "y@outside.example"})
    assert key_of(**UNAUTH, sasl_username="Bob") != key_of(**UNAUTH, sasl_username="bob")


async def test_the_decision_sees_only_the_deciding_attributes(service):
    """What makes the memo correct by construction: facts and decision get `deciding(key)`."""
    policy, _state = service
    full = parse_request(lines_of(**UNAUTH, client_address="192.0.2.1", helo_name="x.example"))
    seen = deciding(full.decision_key())
    assert set(seen.attributes) == set(DECIDING)
    assert await policy.evaluate(full) == await policy.evaluate(seen)


async def test_one_decision_per_key_within_a_snapshot(service):
    policy, _state = service
    first = await answer(policy, lines_of(**UNAUTH, queue_id="A1", client_address="192.0.2.1"))
    assert len(policy._memo) == 1
    again = await answer(policy, lines_of(**UNAUTH, queue_id="B2", client_address="192.0.2.2"))
    assert first == again == b"action=DUNNO\n\n"
    assert len(policy._memo) == 1                        # the second came from the memo


async def test_a_malformed_request_is_refused_even_when_its_key_was_answered(service):
    policy, _state = service
    await answer(policy, lines_of(**UNAUTH, queue_id="A1"))
    reply = await answer(policy, lines_of(**UNAUTH, queue_id="A\x001"))
    assert reply == f"action={MALFORMED}\n\n".encode()


async def test_a_database_change_is_answered_at_once(service):
    policy, state = service
    request = lines_of(protocol_state="RCPT", sender="x@outside.example", recipient="new@d1.test")
    assert (await answer(policy, request)) == f"action={NO_SUCH_USER}\n\n".encode()
    await state.store.add_alias("new@d1.test", "alice")
    await state.load()
    assert (await answer(policy, request)) == b"action=DUNNO\n\n"


async def test_a_remote_idp_answer_is_not_kept_past_its_ttl(tmp_path, go_db, keycloak_standin, clock):
    keycloak_standin.clock = clock
    config = load_config(write_config(tmp_path))
    store = await SQLiteStore.open(config.sqlite)
    state = StateCache(store)
    await state.load()
    idp = KeycloakProvider(config_for(keycloak_standin, cache_ttl_seconds=60), clock=clock)
    try:
        policy = PolicyService(RuntimeRef(Runtime(config, idp, state)), Metrics())
        assert (await answer(policy, lines_of(**UNAUTH))) == b"action=DUNNO\n\n"
        keycloak_standin.user("alice").enabled = False
        clock.advance(61)  # the IdP's answer has expired
        reply = await answer(policy, lines_of(**UNAUTH))
        assert reply == f"action={NO_SUCH_USER}\n\n".encode()
    finally:
        await idp.close()
        await store.close()


async def test_a_warm_idp_cache_answers_at_once_a_cold_one_in_a_task(tmp_path, go_db, keycloak_standin):
    config = load_config(write_config(tmp_path))
    store = await SQLiteStore.open(config.sqlite)
    state = StateCache(store)
    await state.load()
    idp = KeycloakProvider(config_for(keycloak_standin, cache_ttl_seconds=60))
    try:
        policy = PolicyService(RuntimeRef(Runtime(config, idp, state)), Metrics())
        cold = policy.respond(lines_of(**UNAUTH))  # alice@d1.test: a question for the IdP
        assert not isinstance(cold, bytes)
        assert await cold == b"action=DUNNO\n\n"
        # not memoised (it asked the IdP), but the IdP cache answers it without a wait
        assert policy.respond(lines_of(**UNAUTH, client_address="192.0.2.9")) == b"action=DUNNO\n\n"
        assert len(policy._memo) == 0
        assert keycloak_standin.counts["users"] == 1 and keycloak_standin.counts["token"] == 1
    finally:
        await idp.close()
        await store.close()


APP_LOGIN = dict(protocol_state="RCPT", sasl_method="PLAIN", sasl_username="Mailer",
                 sender="noreply@d1.test", recipient="x@outside.example")


def test_an_app_login_key_holds_the_client_address_others_do_not():
    """Rows 7/8 check an app's networks against client_address: it is part of an app login's key."""
    assert key_of(**APP_LOGIN, client_address="192.0.2.1") != key_of(**APP_LOGIN, client_address="192.0.2.2")
    assert deciding(key_of(**APP_LOGIN, client_address="192.0.2.1")).get("client_address") == "192.0.2.1"
    assert key_of(**UNAUTH, client_address="192.0.2.1") == key_of(**UNAUTH, client_address="192.0.2.2")


async def test_a_decision_on_an_app_that_expires_is_not_kept(service, tmp_path):
    """Such a decision depends on the time: kept, it would outlive the app's expiry."""
    policy, state = service
    request = lines_of(**APP_LOGIN, client_address="192.0.2.7")
    assert await answer(policy, request) == b"action=DUNNO\n\n"
    assert len(policy._memo) == 1
    writer = await SQLiteStore.open(load_config(write_config(tmp_path)).sqlite, create=True)  # to version 2
    try:
        await writer.set_app_settings("Mailer", AppSettings(expires_at=4_102_444_800))  # 2100-01-01
    finally:
        await writer.close()
    await state.load()
    assert await answer(policy, request) == b"action=DUNNO\n\n"
    assert len(policy._memo) == 0
