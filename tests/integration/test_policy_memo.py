"""The policy service's memo of decisions (mailcloak.memo): the same answers as without it."""

from __future__ import annotations

import asyncio

import pytest

from mailcloak.config import load_config
from mailcloak.idp import build_provider
from mailcloak.idp.keycloak import KeycloakProvider
from mailcloak.metrics import Metrics
from mailcloak.policy.decision import MALFORMED, NO_SUCH_USER
from mailcloak.policy.server import PolicyService, memo_key
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.state import StateCache
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


def test_memo_key_leaves_out_only_clean_per_message_attributes():
    plain = memo_key(lines_of(**UNAUTH, instance="1a.2b", queue_id="4XyZ1", client_port="4000"))
    assert plain == memo_key(lines_of(**UNAUTH, instance="9f.00", queue_id="", client_port="4001"))
    assert plain != memo_key(lines_of(**UNAUTH, instance="1a.2b\x00", queue_id="4XyZ1", client_port="4000"))
    assert plain != memo_key(lines_of(**{**UNAUTH, "sender": "y@outside.example"}))


async def test_one_decision_per_key_within_a_snapshot(service):
    policy, _state = service
    now = asyncio.get_running_loop().time()
    first = await policy.answer_lines(lines_of(**UNAUTH, queue_id="A1"), now)
    again = await policy.answer_lines(lines_of(**UNAUTH, queue_id="B2"), now)
    assert first[:3] == again[:3] and first[0] == b"action=DUNNO\n\n"
    assert first[3] is not None and again[3] is None      # the second came from the memo
    later = await policy.answer_lines(lines_of(**UNAUTH, queue_id="C3"), now + 1.5)
    assert later[3] is not None                           # the memo's lifetime is over


async def test_a_malformed_request_is_refused_even_when_its_key_was_answered(service):
    policy, _state = service
    now = asyncio.get_running_loop().time()
    await policy.answer_lines(lines_of(**UNAUTH, queue_id="A1"), now)
    reply = await policy.answer_lines(lines_of(**UNAUTH, queue_id="A\x001"), now)
    assert reply[0] == f"action={MALFORMED}\n\n".encode()


async def test_a_database_change_is_answered_at_once(service):
    policy, state = service
    request = lines_of(protocol_state="RCPT", sender="x@outside.example", recipient="new@d1.test")
    now = asyncio.get_running_loop().time()
    assert (await policy.answer_lines(request, now))[0] == f"action={NO_SUCH_USER}\n\n".encode()
    await state.store.add_alias("new@d1.test", "alice")
    await state.load()
    assert (await policy.answer_lines(request, now))[0] == b"action=DUNNO\n\n"


async def test_a_remote_idp_answer_is_not_kept_past_its_ttl(tmp_path, go_db, keycloak_standin, clock):
    keycloak_standin.clock = clock
    config = load_config(write_config(tmp_path))
    store = await SQLiteStore.open(config.sqlite)
    state = StateCache(store)
    await state.load()
    idp = KeycloakProvider(config_for(keycloak_standin, cache_ttl_seconds=60), clock=clock)
    try:
        policy = PolicyService(RuntimeRef(Runtime(config, idp, state)), Metrics())
        now = asyncio.get_running_loop().time()
        assert (await policy.answer_lines(lines_of(**UNAUTH), now))[0] == b"action=DUNNO\n\n"
        keycloak_standin.user("alice").enabled = False
        clock.advance(61)  # the IdP's answer has expired; the memo's own second has not
        reply = await policy.answer_lines(lines_of(**UNAUTH), now)
        assert reply[0] == f"action={NO_SUCH_USER}\n\n".encode()
    finally:
        await idp.close()
        await store.close()
