"""The Keycloak provider against the Keycloak stand-in, and through the daemon.

The stand-in runs in its own thread (tests/standins). Where token lifetimes matter, the provider
and the stand-in share a fake clock, so no test waits for a token to expire; one test uses a
real one-second token to show the same without a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time

import pytest
import yaml

from mailcloak.config import KeycloakConfig
from mailcloak.errors import IdPError
from mailcloak.idp import keycloak as kc
from mailcloak.idp.base import IdPUser
from mailcloak.idp.keycloak import KeycloakProvider
from mailcloak.policy.decision import IDP_TEMPFAIL
from standins.fixtures import CLIENT_ID, CLIENT_SECRET, clock, keycloak_standin  # noqa: F401
from support import REPO, DaemonProcess, PolicyClient, write_config

ALICE = IdPUser("alice", "alice@d1.test")


def config_for(server, **overrides) -> KeycloakConfig:
    options = dict(base_url=server.url, realm="mail", client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                   request_timeout_seconds=2, connect_timeout_seconds=1)
    options.update(overrides)
    return KeycloakConfig(**options)


@pytest.fixture
async def provider(keycloak_standin):
    idp = KeycloakProvider(config_for(keycloak_standin))
    yield idp
    await idp.close()


async def eventually(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# -- lookups ------------------------------------------------------------------------------------

async def test_lookups_by_address_and_username_ignore_case(provider, keycloak_standin):
    assert await provider.user_by_address("alice@d1.test") == ALICE
    assert await provider.user_by_address("ALICE@D1.Test") == ALICE      # same cache entry
    assert await provider.user_by_username("Alice") == ALICE
    assert await provider.user_by_username("alice") == ALICE
    assert await provider.user_by_address("bob@d2.test") == IdPUser("bob", "bob@d2.test")
    assert await provider.user_by_address("nobody@d1.test") is None
    assert await provider.user_by_username("nobody") is None
    assert await provider.user_by_username("dave") == IdPUser("dave", "")
    assert keycloak_standin.counts["users"] == 6
    assert keycloak_standin.counts["token"] == 1


async def test_login_by_username_or_primary_email(provider):
    assert await provider.user_by_login("alice") == ALICE
    assert await provider.user_by_login("Alice@D1.test") == ALICE


async def test_a_disabled_user_does_not_exist(provider):
    assert await provider.user_by_address("carol@d1.test") is None
    assert await provider.user_by_username("carol") is None


async def test_only_equal_entries_count_even_if_the_server_matches_substrings(provider, keycloak_standin):
    keycloak_standin.ignore_exact = True   # an answer with malice@ for alice@
    assert await provider.user_by_address("alice@d1.test") == ALICE
    assert await provider.user_by_address("lice@d1.test") is None
    assert await provider.user_by_username("lice") is None


async def test_requests_go_out_with_exact_matching(keycloak_standin):
    seen = []
    idp = KeycloakProvider(config_for(keycloak_standin))
    original = idp._http.request

    async def spy(label, method, url, **kwargs):
        seen.append((label, kwargs.get("params")))
        return await original(label, method, url, **kwargs)

    idp._http.request = spy
    try:
        await idp.user_by_address("bob@d2.test")
        await idp.user_by_username("bob")
    finally:
        await idp.close()
    assert seen == [("token", None), ("users", {"email": "bob@d2.test", "exact": "true"}),
                    ("users", {"username": "bob", "exact": "true"})]


async def test_n_lookups_over_k_addresses_make_k_requests_and_one_token(provider, keycloak_standin):
    addresses = [f"user{i}@d1.test" for i in range(10)] + ["alice@d1.test", "bob@d2.test"]
    for _round in range(5):
        for address in addresses:
            await provider.user_by_address(address.upper())
    assert keycloak_standin.counts["users"] == len(addresses)
    assert keycloak_standin.counts["token"] == 1
    assert provider.cache.counters["hits"] == 4 * len(addresses)
    assert len(keycloak_standin.peers) == 1   # one kept-alive connection for all of them


async def test_200_concurrent_lookups_of_one_address_make_one_request(provider, keycloak_standin):
    keycloak_standin.set_fault("slow", {"users"}, delay=0.2)
    results = await asyncio.gather(*(provider.user_by_address("alice@d1.test") for _ in range(200)))
    assert results == [ALICE] * 200
    assert keycloak_standin.counts["users"] == 1
    assert keycloak_standin.counts["token"] == 1
    assert provider.cache.counters["coalesced"] == 199


async def test_concurrent_lookups_share_one_token_request(provider, keycloak_standin):
    keycloak_standin.set_fault("slow", {"token"}, delay=0.2)
    users = await asyncio.gather(*(provider.user_by_address(f"u{i}@d1.test") for i in range(30)))
    assert users == [None] * 30
    assert keycloak_standin.counts["token"] == 1
    assert keycloak_standin.counts["users"] == 30


# -- the token ----------------------------------------------------------------------------------

async def test_token_renewed_before_it_expires(keycloak_standin, clock):
    keycloak_standin.clock = clock
    keycloak_standin.expires_in = 10
    idp = KeycloakProvider(config_for(keycloak_standin), clock=clock)
    try:
        await idp.user_by_address("a1@d1.test")
        clock.advance(7)                                   # 70 %: the token simply serves
        await idp.user_by_address("a2@d1.test")
        assert keycloak_standin.counts["token"] == 1
        clock.advance(1.5)                                 # 85 %: renewed in the background
        await idp.user_by_address("a3@d1.test")
        await eventually(lambda: keycloak_standin.counts["token"] == 2)
        clock.advance(5)                                   # the first token has expired now
        await idp.user_by_address("a4@d1.test")
        assert keycloak_standin.counts["users"] == 4       # no 401, no retry
        assert keycloak_standin.counts["token"] == 2
    finally:
        await idp.close()


async def test_an_expired_token_is_replaced_before_use(keycloak_standin, clock):
    keycloak_standin.clock = clock
    keycloak_standin.expires_in = 10
    idp = KeycloakProvider(config_for(keycloak_standin), clock=clock)
    try:
        await idp.user_by_address("a1@d1.test")
        clock.advance(30)                                  # idle past the token's lifetime
        await idp.user_by_address("a2@d1.test")
        assert keycloak_standin.counts["token"] == 2
        assert keycloak_standin.counts["users"] == 2       # the old token was never tried
    finally:
        await idp.close()


async def test_a_token_of_two_seconds_expires_mid_run(keycloak_standin):
    keycloak_standin.expires_in = 2                        # real clocks on both sides
    idp = KeycloakProvider(config_for(keycloak_standin))
    try:
        lookups = 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            await idp.user_by_address(f"r{lookups}@d1.test")
            lookups += 1
            await asyncio.sleep(0.05)
        assert keycloak_standin.counts["token"] >= 2       # renewed at least once
        assert keycloak_standin.counts["users"] == lookups  # and never refused (no 401 retry)
    finally:
        await idp.close()


async def test_a_401_drops_the_token_and_retries_once(provider, keycloak_standin):
    assert await provider.user_by_address("alice@d1.test") == ALICE
    keycloak_standin.revoke_tokens()                       # e.g. Keycloak restarted
    assert await provider.user_by_address("bob@d2.test") == IdPUser("bob", "bob@d2.test")
    assert keycloak_standin.counts["token"] == 2
    assert keycloak_standin.counts["users"] == 3           # 1 + (401 + retry)
    assert await provider.user_by_address("nobody@d2.test") is None
    assert keycloak_standin.counts["token"] == 2


async def test_token_endpoint_failures(keycloak_standin):
    bad = KeycloakProvider(config_for(keycloak_standin, client_secret="wrong"))
    noservice = KeycloakProvider(config_for(keycloak_standin, client_id="noservice",
                                            client_secret="noservice-secret"))
    try:
        with pytest.raises(IdPError) as info:
            await bad.user_by_address("alice@d1.test")
        assert info.value.kind == kc.BAD_CREDENTIALS
        assert "client_secret" in str(info.value)
        with pytest.raises(IdPError) as info:
            await noservice.user_by_address("alice@d1.test")
        assert "service accounts" in str(info.value)
    finally:
        await bad.close()
        await noservice.close()


# -- faults -------------------------------------------------------------------------------------

async def test_403_names_the_missing_roles(keycloak_standin):
    idp = KeycloakProvider(config_for(keycloak_standin, client_id="noroles", client_secret="noroles-secret"))
    try:
        with pytest.raises(IdPError) as info:
            await idp.user_by_address("alice@d1.test")
        assert info.value.kind == kc.FORBIDDEN
        assert "view-users" in str(info.value) and "query-users" in str(info.value)
    finally:
        await idp.close()


@pytest.mark.parametrize("fault, kind", [
    ("500", "http 500"),
    ("malformed", "malformed answer"),
    ("huge", "answer too large"),
])
async def test_faults_become_idp_errors_then_recover(provider, keycloak_standin, fault, kind):
    keycloak_standin.set_fault(fault, {"users"})
    with pytest.raises(IdPError) as info:
        await provider.user_by_address("alice@d1.test")
    assert info.value.kind == kind
    assert provider.cache.errors == {kind: 1}
    keycloak_standin.clear_fault()
    assert await provider.user_by_address("alice@d1.test") == ALICE


async def test_a_malformed_token_answer(provider, keycloak_standin):
    keycloak_standin.set_fault("malformed", {"token"})
    with pytest.raises(IdPError) as info:
        await provider.user_by_address("alice@d1.test")
    assert info.value.kind == "malformed answer"


async def test_a_hanging_idp_times_out(keycloak_standin):
    idp = KeycloakProvider(config_for(keycloak_standin, request_timeout_seconds=0.3))
    try:
        keycloak_standin.set_fault("hang", {"users"})
        with pytest.raises(IdPError) as info:
            await idp.user_by_address("alice@d1.test")
        assert info.value.kind == "timeout"
        keycloak_standin.clear_fault()
        assert await idp.user_by_address("alice@d1.test") == ALICE
    finally:
        await idp.close()


async def test_an_unreachable_idp_then_recovery(provider, keycloak_standin):
    keycloak_standin.stop()
    with pytest.raises(IdPError) as info:
        await provider.user_by_address("alice@d1.test")
    assert info.value.kind == "unreachable"
    keycloak_standin.start()
    assert await provider.user_by_address("alice@d1.test") == ALICE


async def test_stale_answers_while_keycloak_is_down(keycloak_standin, clock, caplog):
    caplog.set_level(logging.INFO, logger="mailcloak")
    idp = KeycloakProvider(config_for(keycloak_standin), clock=clock)
    try:
        assert await idp.user_by_address("alice@d1.test") == ALICE
        assert await idp.user_by_address("nobody@d1.test") is None
        keycloak_standin.set_fault("500")
        clock.advance(121 + 300)                   # past the TTL, inside stale-if-error
        for _ in range(3):
            assert await idp.user_by_address("alice@d1.test") == ALICE
            with pytest.raises(IdPError):          # "no such user" is not served stale
                await idp.user_by_address("nobody@d1.test")
        clock.advance(400)                         # past stale-if-error too
        with pytest.raises(IdPError):
            await idp.user_by_address("alice@d1.test")
        keycloak_standin.clear_fault()
        assert await idp.user_by_address("alice@d1.test") == ALICE
    finally:
        await idp.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("mailcloak.idp")
             and r.levelno >= logging.WARNING]
    assert len([m for m in lines if "failing" in m]) == 1
    assert len([m for m in lines if "past their TTL" in m]) == 1
    assert len([m for m in lines if "answers again" in m]) == 1


# -- aliases from a user attribute ----------------------------------------------------------------

async def test_alias_attribute_through_q(keycloak_standin):
    idp = KeycloakProvider(config_for(keycloak_standin, alias_attribute="mailAlias"))
    try:
        user = await idp.user_by_address("SALES@d1.test")
        assert user.username == "alice" and user.email == "alice@d1.test"
        assert user.addresses == frozenset({"sales@d1.test", "info@d1.test"})
        assert user.owns("sales@d1.test")
        assert keycloak_standin.counts["users"] == 2          # email=..., then q=mailAlias:...
        login = await idp.user_by_username("alice")
        assert login.owns("info@d1.test") and login.owns("alice@d1.test")
        assert await idp.user_by_address("old@d1.test") is None   # carol is disabled
        assert await idp.user_by_address("alice@d1.test") == user   # primary email: one request
        assert keycloak_standin.counts["users"] == 6
    finally:
        await idp.close()


async def test_without_alias_attribute_aliases_are_unknown(provider, keycloak_standin):
    assert await provider.user_by_address("sales@d1.test") is None
    assert keycloak_standin.counts["users"] == 1
    assert (await provider.user_by_username("alice")).addresses == frozenset()


# -- introspection ------------------------------------------------------------------------------

async def test_introspection_active_inactive_expired(keycloak_standin, clock):
    keycloak_standin.clock = clock
    idp = KeycloakProvider(config_for(keycloak_standin), clock=clock)
    try:
        token = keycloak_standin.issue_user_token("alice", lifetime=300)
        assert await idp.introspect_token(token) == ALICE
        assert await idp.introspect_token(token) == ALICE
        assert keycloak_standin.counts["introspect"] == 1     # cached
        assert await idp.introspect_token("not-a-token") is None
        assert await idp.introspect_token("") is None
        short = keycloak_standin.issue_user_token("bob", lifetime=5)
        assert await idp.introspect_token(short) == IdPUser("bob", "bob@d2.test")
        clock.advance(6)
        assert await idp.introspect_token(short) is None        # expired: not kept past exp
        clock.advance(60)
        assert await idp.introspect_token(token) == ALICE       # asked again after 60 s at most
        assert keycloak_standin.counts["introspect"] == 5
        keys = repr(list(idp.introspection_cache._entries.keys()))
        assert token not in keys and short not in keys
    finally:
        await idp.close()


async def test_introspection_refuses_disabled_users_and_service_accounts(provider, keycloak_standin):
    token = keycloak_standin.issue_user_token("alice")
    keycloak_standin.user("alice").enabled = False
    assert await provider.introspect_token(token) is None
    service = keycloak_standin._issue(CLIENT_ID, f"service-account-{CLIENT_ID}", 300, "", "profile")
    assert await provider.introspect_token(service) is None


async def test_introspection_with_a_bad_secret_is_an_error(keycloak_standin):
    idp = KeycloakProvider(config_for(keycloak_standin, client_secret="wrong"))
    try:
        with pytest.raises(IdPError) as info:
            await idp.introspect_token(keycloak_standin.issue_user_token("alice"))
        assert info.value.kind == kc.BAD_CREDENTIALS
    finally:
        await idp.close()


# -- secrets and the session ----------------------------------------------------------------------

async def test_no_secret_or_token_in_any_log_line(keycloak_standin, caplog):
    caplog.set_level(logging.DEBUG)
    user_token = keycloak_standin.issue_user_token("alice")
    secrets = [CLIENT_SECRET, "noroles-secret", "bad-secret-7Hq"]
    clients = [(CLIENT_ID, CLIENT_SECRET), ("noroles", "noroles-secret"), (CLIENT_ID, "bad-secret-7Hq")]
    for client, secret in clients:
        idp = KeycloakProvider(config_for(keycloak_standin, client_id=client, client_secret=secret,
                                          request_timeout_seconds=0.3))
        try:
            for fault in (None, "500", "malformed", "huge"):
                keycloak_standin.set_fault(fault)
                for call in (idp.user_by_address("alice@d1.test"), idp.introspect_token(user_token),
                             idp.probe()):
                    try:
                        await call
                    except IdPError as exc:
                        assert secret not in str(exc) and user_token not in str(exc)
                idp.cache.clear()
                idp.introspection_cache.clear()
            keycloak_standin.clear_fault()
            keycloak_standin.revoke_tokens()               # a 401 and a retry, logged at debug
            try:
                await idp.user_by_address("x@d1.test")
            except IdPError:
                pass
            assert secret not in repr(idp)
        finally:
            await idp.close()
    assert any(r.name.startswith("mailcloak.idp") for r in caplog.records)
    text = caplog.text
    for secret in [*secrets, user_token, *keycloak_standin.tokens]:
        assert secret not in text


async def test_one_session_created_in_the_loop_and_closed(keycloak_standin):
    idp = KeycloakProvider(config_for(keycloak_standin))
    assert idp._http._session is None                      # nothing opened at construction
    await idp.user_by_address("alice@d1.test")
    session = idp._http._session
    await idp.user_by_username("bob")
    assert idp._http._session is session
    await idp.close()
    assert session.closed


async def test_probe_says_what_is_wrong(keycloak_standin):
    cases = [
        (config_for(keycloak_standin), None),
        (config_for(keycloak_standin, client_secret="wrong"), "invalid_client"),
        (config_for(keycloak_standin, client_id="noroles", client_secret="noroles-secret"), "view-users"),
        (config_for(keycloak_standin, realm="nope"), "realm 'nope' not found"),
        (config_for(keycloak_standin, base_url="http://127.0.0.1:9"), "unreachable"),
    ]
    for config, expected in cases:
        idp = KeycloakProvider(config)
        try:
            if expected is None:
                assert "users API of realm 'mail' answers" in await idp.probe()
            else:
                with pytest.raises(IdPError, match=expected):
                    await idp.probe()
        finally:
            await idp.close()


# -- through the daemon -------------------------------------------------------------------------

def keycloak_daemon_config(tmp_path, server, deadline: float = 1.0, **keycloak):
    section = {"base_url": server.url, "realm": "mail", "client_id": CLIENT_ID,
               "client_secret": CLIENT_SECRET, "request_timeout_seconds": 3, **keycloak}
    return write_config(tmp_path, idp={"provider": "keycloak", "keycloak": section},
                        policy={"idp_failure_mode": "tempfail", "request_deadline_seconds": deadline})


def check_config(path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(path), "--check-config"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    return done.returncode, done.stdout + done.stderr


def test_check_config_probes_keycloak(tmp_path, go_db, keycloak_standin):
    path = keycloak_daemon_config(tmp_path, keycloak_standin)
    code, out = check_config(path)
    assert code == 0, out
    assert "idp: keycloak OK (client 'mailcloak' got a token; the users API of realm 'mail' answers)" in out

    def run(**section):
        document = yaml.safe_load(path.read_text())
        document["idp"]["keycloak"].update(section)
        path.write_text(yaml.safe_dump(document))
        return check_config(path)

    code, out = run(client_secret="bad-secret-7Hq")
    assert code == 1 and "idp: ERROR keycloak: bad credentials" in out and "invalid_client" in out
    assert "bad-secret-7Hq" not in out
    code, out = run(client_id="noroles", client_secret="noroles-secret")
    assert code == 1 and "idp: ERROR keycloak: forbidden" in out
    assert "view-users" in out and "query-users" in out
    code, out = run(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, realm="nope")
    assert code == 1 and "idp: ERROR keycloak: unknown realm (realm 'nope' not found" in out
    keycloak_standin.stop()
    code, out = run(realm="mail")
    assert code == 1 and "idp: ERROR keycloak: unreachable (cannot connect to" in out
    assert CLIENT_SECRET not in out and "noroles-secret" not in out


def test_a_hanging_keycloak_gets_a_tempfail_in_time_then_recovers(tmp_path, go_db, keycloak_standin):
    daemon = DaemonProcess(keycloak_daemon_config(tmp_path, keycloak_standin, deadline=1.0)).start()
    try:
        keycloak_standin.set_fault("hang")
        # the client's own timeout bounds the wait: an answer past it fails the test
        policy = PolicyClient(daemon.policy_socket, timeout=4)
        rcpt = dict(protocol_state="RCPT", sender="x@outside.example")
        assert policy.ask(**rcpt, recipient="alice@d1.test") == IDP_TEMPFAIL
        assert policy.ask(**rcpt, recipient="bob@d1.test") == IDP_TEMPFAIL
        keycloak_standin.clear_fault()
        deadline = time.monotonic() + 15
        while (answer := policy.ask(**rcpt, recipient="alice@d1.test")) == IDP_TEMPFAIL:
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.1)
        assert answer == "DUNNO"
        assert policy.ask(**rcpt, recipient="nobody@d1.test").startswith("550 5.1.1")
        policy.close()
        assert daemon.proc.poll() is None                  # same process: no restart
    finally:
        daemon.stop()
    log = daemon.log()
    assert CLIENT_SECRET not in log
    assert log.count("IdP lookups failing") <= 2           # one line per kind, not per request


def test_concurrent_policy_requests_make_one_users_request(tmp_path, go_db, keycloak_standin):
    daemon = DaemonProcess(keycloak_daemon_config(tmp_path, keycloak_standin, deadline=5)).start()
    try:
        keycloak_standin.set_fault("slow", {"users"}, delay=0.3)
        clients = [PolicyClient(daemon.policy_socket, timeout=10) for _ in range(50)]
        barrier = threading.Barrier(len(clients))
        answers: list[str] = []

        def ask(client):
            barrier.wait()
            answers.append(client.ask(protocol_state="RCPT", sender="x@outside.example",
                                      recipient="Alice@D1.test"))

        threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        for c in clients:
            c.close()
        assert answers == ["DUNNO"] * 50
        assert keycloak_standin.counts["users"] == 1
        assert keycloak_standin.counts["token"] == 1
    finally:
        daemon.stop()
