"""The Authentik provider against the Authentik stand-in, and through the daemon."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import pytest
import yaml

from mailcloak.config import AuthentikConfig
from mailcloak.errors import IdPError
from mailcloak.idp import authentik as ak
from mailcloak.idp.authentik import AuthentikProvider
from mailcloak.idp.base import IdPUser
from mailcloak.policy.decision import IDP_TEMPFAIL
from standins.fixtures import AUTHENTIK_TOKEN, authentik_standin, clock  # noqa: F401
from support import REPO, DaemonProcess, PolicyClient, write_config

ALICE = IdPUser("alice", "alice@d1.test")
BOB = IdPUser("Bob", "bob@d2.test")


def config_for(server, **overrides) -> AuthentikConfig:
    options = dict(base_url=server.url, api_token=AUTHENTIK_TOKEN, request_timeout_seconds=2,
                   connect_timeout_seconds=1)
    options.update(overrides)
    return AuthentikConfig(**options)


@pytest.fixture
async def provider(authentik_standin):
    idp = AuthentikProvider(config_for(authentik_standin))
    yield idp
    await idp.close()


async def test_lookups_by_address_and_username(provider, authentik_standin):
    assert await provider.user_by_address("alice@d1.test") == ALICE
    assert await provider.user_by_address("ALICE@d1.TEST") == ALICE     # cached: same key
    assert await provider.user_by_username("alice") == ALICE
    assert authentik_standin.counts["users"] == 2


async def test_one_user_object_for_the_lookups_by_address_and_by_username(provider):
    """The cache holds 100 000 answers at scale: a user asked both ways is kept once."""
    assert await provider.user_by_username("alice") is await provider.user_by_address("alice@d1.test")


async def test_entries_stored_with_other_case_are_found(provider, authentik_standin):
    # Authentik holds "Bob@D2.test" / "Bob": the exact filter misses, the search fallback finds
    assert await provider.user_by_address("bob@d2.test") == BOB
    assert authentik_standin.counts["users"] == 2
    assert await provider.user_by_username("bob") == BOB
    assert await provider.user_by_username("Bob") == BOB                  # same cache entry
    assert authentik_standin.counts["users"] == 4


async def test_unknown_and_inactive_users_do_not_exist(provider, authentik_standin):
    assert await provider.user_by_address("nobody@d1.test") is None
    assert await provider.user_by_address("carol@d1.test") is None
    assert await provider.user_by_username("carol") is None
    assert await provider.user_by_address("lice@d1.test") is None        # search is a substring match
    assert await provider.user_by_login("Alice@D1.test") == ALICE


async def test_200_concurrent_lookups_make_one_request(provider, authentik_standin):
    authentik_standin.set_fault("slow", delay=0.2)
    results = await asyncio.gather(*(provider.user_by_address("alice@d1.test") for _ in range(200)))
    assert results == [ALICE] * 200
    assert authentik_standin.counts["users"] == 1
    assert provider.cache.counters["coalesced"] == 199


async def test_n_lookups_over_k_addresses_make_k_requests(provider, authentik_standin):
    addresses = ["alice@d1.test", "malice@d1.test"]
    for _ in range(10):
        for address in addresses:
            assert (await provider.user_by_address(address)).email == address
    assert authentik_standin.counts["users"] == 2
    assert len(authentik_standin.peers) == 1


async def test_a_bad_token_is_forbidden(authentik_standin):
    idp = AuthentikProvider(config_for(authentik_standin, api_token="nope-token-1"))
    try:
        with pytest.raises(IdPError) as info:
            await idp.user_by_address("alice@d1.test")
        assert info.value.kind == ak.FORBIDDEN
        assert "nope-token-1" not in str(info.value)
    finally:
        await idp.close()


@pytest.mark.parametrize("fault, kind", [
    ("500", "http 500"), ("malformed", "malformed answer"), ("huge", "answer too large"),
])
async def test_faults_then_recovery(provider, authentik_standin, fault, kind):
    authentik_standin.set_fault(fault)
    with pytest.raises(IdPError) as info:
        await provider.user_by_address("alice@d1.test")
    assert info.value.kind == kind
    authentik_standin.clear_fault()
    assert await provider.user_by_address("alice@d1.test") == ALICE


async def test_hanging_and_unreachable(authentik_standin):
    idp = AuthentikProvider(config_for(authentik_standin, request_timeout_seconds=0.3))
    try:
        authentik_standin.set_fault("hang")
        with pytest.raises(IdPError) as info:
            await idp.user_by_address("alice@d1.test")
        assert info.value.kind == "timeout"
        authentik_standin.clear_fault()
        authentik_standin.stop()
        with pytest.raises(IdPError) as info:
            await idp.user_by_address("alice@d1.test")
        assert info.value.kind == "unreachable"
        authentik_standin.start()
        assert await idp.user_by_address("alice@d1.test") == ALICE
    finally:
        await idp.close()


async def test_stale_if_error(authentik_standin, clock, caplog):
    caplog.set_level(logging.DEBUG)
    idp = AuthentikProvider(config_for(authentik_standin), clock=clock)
    try:
        assert await idp.user_by_address("alice@d1.test") == ALICE
        authentik_standin.set_fault("500")
        clock.advance(300)
        assert await idp.user_by_address("alice@d1.test") == ALICE
        assert idp.cache.counters["stale"] == 1
        clock.advance(600)
        with pytest.raises(IdPError):
            await idp.user_by_address("alice@d1.test")
    finally:
        await idp.close()
    assert AUTHENTIK_TOKEN not in caplog.text


async def test_probe(authentik_standin):
    idp = AuthentikProvider(config_for(authentik_standin))
    try:
        assert await idp.probe() == "the API token is accepted; 4 users visible"
        authentik_standin.sees_users = False
        with pytest.raises(IdPError, match="view_user"):
            await idp.probe()
    finally:
        await idp.close()
    idp = AuthentikProvider(config_for(authentik_standin, api_token="bad"))
    try:
        with pytest.raises(IdPError, match="forbidden"):
            await idp.probe()
    finally:
        await idp.close()


def authentik_daemon_config(tmp_path, server, deadline=1.0, **section):
    return write_config(
        tmp_path,
        idp={"provider": "authentik", "authentik": {"base_url": server.url, "api_token": AUTHENTIK_TOKEN,
                                                    "request_timeout_seconds": 3, **section}},
        policy={"idp_failure_mode": "tempfail", "request_deadline_seconds": deadline})


def test_check_config_and_a_hanging_authentik_through_the_daemon(tmp_path, go_db, authentik_standin):
    path = authentik_daemon_config(tmp_path, authentik_standin)
    done = subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(path), "--check-config"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "idp: authentik OK (the API token is accepted; 4 users visible)" in done.stdout

    document = yaml.safe_load(path.read_text())
    document["idp"]["authentik"]["api_token"] = "bad-token-x1"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    done = subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(bad), "--check-config"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert done.returncode == 1
    assert "idp: ERROR authentik: forbidden" in done.stdout and "bad-token-x1" not in done.stdout

    daemon = DaemonProcess(path).start()
    try:
        authentik_standin.set_fault("hang")
        policy = PolicyClient(daemon.policy_socket, timeout=4)
        rcpt = dict(protocol_state="RCPT", sender="x@outside.example")
        assert policy.ask(**rcpt, recipient="alice@d1.test") == IDP_TEMPFAIL
        authentik_standin.clear_fault()
        deadline = time.monotonic() + 15
        while (answer := policy.ask(**rcpt, recipient="alice@d1.test")) == IDP_TEMPFAIL:
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.1)
        assert answer == "DUNNO"
        assert policy.ask(**rcpt, recipient="carol@d1.test").startswith("550 5.1.1")
        policy.close()
    finally:
        daemon.stop()
    assert AUTHENTIK_TOKEN not in daemon.log()
