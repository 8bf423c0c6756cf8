"""The policy service's memo of decisions (mailcloak.memo): the same answers as without it.

With a remote IdP a decision is kept until the earliest end of freshness of the IdP answers it
used, on the provider's clock (a fake one here, moved by the tests), and not at all when one of
them was stale or failed.
"""

from __future__ import annotations

import pytest

from mailcloak.config import load_config
from mailcloak.idp import build_provider
from mailcloak.idp.keycloak import KeycloakProvider
from mailcloak.metrics import Metrics
from mailcloak.policy import server as policy_server
from mailcloak.policy.decision import IDP_TEMPFAIL, MALFORMED, NO_SUCH_USER
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


@pytest.fixture
async def keycloak_policy(tmp_path, go_db, keycloak_standin, clock):
    """The policy service on the Keycloak provider (TTL 60 s, negative 30 s); provider and
    stand-in share a fake clock, which the test moves."""
    keycloak_standin.clock = clock
    config = load_config(write_config(tmp_path))
    store = await SQLiteStore.open(config.sqlite)
    state = StateCache(store)
    await state.load()
    idp = KeycloakProvider(config_for(keycloak_standin, cache_ttl_seconds=60, negative_cache_ttl_seconds=30),
                           clock=clock)
    yield PolicyService(RuntimeRef(Runtime(config, idp, state)), Metrics()), idp
    await idp.close()
    await store.close()


@pytest.fixture
def gathered(monkeypatch) -> list[tuple]:
    """The requests whose facts the policy gathers (none for an answer from the memo)."""
    calls: list[tuple] = []
    original = policy_server.gather_facts

    async def counting(request, *args):
        calls.append((request.sender, request.recipient))
        return await original(request, *args)

    monkeypatch.setattr(policy_server, "gather_facts", counting)
    return calls


DUNNO = b"action=DUNNO\n\n"
LOGIN = dict(protocol_state="RCPT", sasl_method="XOAUTH2", sasl_username="alice", sender="alice@d1.test",
             recipient="bob@d2.test")


async def test_a_remote_idp_answer_is_not_kept_past_its_ttl(keycloak_policy, keycloak_standin, clock):
    policy, _idp = keycloak_policy
    assert (await answer(policy, lines_of(**UNAUTH))) == DUNNO
    keycloak_standin.user("alice").enabled = False
    clock.advance(61)  # the IdP's answer has expired
    reply = await answer(policy, lines_of(**UNAUTH))
    assert reply == f"action={NO_SUCH_USER}\n\n".encode()


async def test_a_decision_on_a_keycloak_answer_is_kept_while_it_is_fresh_then_worked_out_again(
        keycloak_policy, keycloak_standin, clock, gathered):
    policy, idp = keycloak_policy
    cold = policy.respond(lines_of(**UNAUTH))          # alice@d1.test: a question for the IdP
    assert not isinstance(cold, bytes) and await cold == DUNNO
    assert len(gathered) == 2                          # tried at once, then in a task
    clock.advance(59)
    assert policy.respond(lines_of(**UNAUTH, queue_id="B2")) == DUNNO
    assert len(gathered) == 2                          # from the memo: no facts, no IdP question
    assert idp.cache.counters["hits"] == 0 and keycloak_standin.counts["users"] == 1
    clock.advance(2)                                   # past the answer's TTL
    again = policy.respond(lines_of(**UNAUTH, queue_id="C3"))
    assert not isinstance(again, bytes) and await again == DUNNO
    assert keycloak_standin.counts["users"] == 2 and len(gathered) == 4


async def test_a_decision_lasts_until_the_earliest_end_of_the_answers_it_used(keycloak_policy, keycloak_standin,
                                                                               clock, gathered):
    policy, idp = keycloak_policy
    await idp.user_by_address("bob@d2.test")            # fresh until now + 60
    clock.advance(30)
    assert await answer(policy, lines_of(**LOGIN)) == DUNNO   # alice's login: fresh until now + 60
    assert keycloak_standin.counts["users"] == 2
    clock.advance(29)
    asked = len(gathered)
    assert policy.respond(lines_of(**LOGIN, queue_id="B2")) == DUNNO
    assert len(gathered) == asked
    clock.advance(2)                                   # bob's answer is stale, alice's is not
    assert await answer(policy, lines_of(**LOGIN, queue_id="C3")) == DUNNO
    assert len(gathered) > asked and keycloak_standin.counts["users"] == 3


async def test_a_no_such_user_is_kept_for_the_negative_ttl(keycloak_policy, keycloak_standin, clock, gathered):
    policy, _idp = keycloak_policy
    request = lines_of(**{**UNAUTH, "recipient": "new@d1.test"})
    assert await answer(policy, request) == f"action={NO_SUCH_USER}\n\n".encode()
    keycloak_standin.add_user("new", "new@d1.test")
    clock.advance(29)
    asked = len(gathered)
    assert policy.respond(request) == f"action={NO_SUCH_USER}\n\n".encode()
    assert len(gathered) == asked
    clock.advance(2)
    assert await answer(policy, request) == DUNNO
    assert keycloak_standin.counts["users"] == 2


async def test_a_decision_made_from_a_stale_answer_during_an_outage_is_not_kept(keycloak_policy,
                                                                                 keycloak_standin, clock):
    """Alice's login answer is fresh, bob's (the recipient) is served stale: nothing to keep."""
    policy, idp = keycloak_policy
    await idp.user_by_address("bob@d2.test")
    clock.advance(40)
    await idp.user_by_username("alice")
    clock.advance(21)                                  # bob's answer past its TTL, alice's not
    keycloak_standin.set_fault("500", {"users"})
    assert await answer(policy, lines_of(**LOGIN)) == DUNNO  # stale-if-error
    assert idp.cache.counters["stale"] == 1
    assert len(policy._memo) == 0
    asked = keycloak_standin.counts["users"]
    assert await answer(policy, lines_of(**LOGIN, queue_id="B2")) == DUNNO
    assert keycloak_standin.counts["users"] == asked + 1   # the IdP is tried again, not the memo
    keycloak_standin.clear_fault()
    assert await answer(policy, lines_of(**LOGIN, queue_id="C3")) == DUNNO
    assert len(policy._memo) == 1                      # fresh again: kept again


async def test_a_tempfail_for_a_failing_idp_is_not_kept(keycloak_policy, keycloak_standin):
    """Alice's login answer is fresh, bob's (the recipient) cannot be had: nothing to keep."""
    policy, idp = keycloak_policy
    await idp.user_by_username("alice")
    keycloak_standin.set_fault("500", {"users"})
    assert await answer(policy, lines_of(**LOGIN)) == f"action={IDP_TEMPFAIL}\n\n".encode()
    assert len(policy._memo) == 0
    keycloak_standin.clear_fault()
    assert await answer(policy, lines_of(**LOGIN)) == DUNNO


async def test_a_warm_idp_cache_answers_at_once_a_cold_one_in_a_task(keycloak_policy, keycloak_standin):
    policy, _idp = keycloak_policy
    cold = policy.respond(lines_of(**UNAUTH))  # alice@d1.test: a question for the IdP
    assert not isinstance(cold, bytes)
    assert await cold == DUNNO
    # another decision on the same answer (another sender): the IdP cache answers without a wait
    assert policy.respond(lines_of(**{**UNAUTH, "sender": "y@outside.example"})) == DUNNO
    assert len(policy._memo) == 2
    assert keycloak_standin.counts["users"] == 1 and keycloak_standin.counts["token"] == 1


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
