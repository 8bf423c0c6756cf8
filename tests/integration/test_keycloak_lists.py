"""Issue #9 "Keycloak groups as lists": the provider against the Keycloak stand-in's groups and
members endpoints (pagination, nested groups, sender rules, cache, faults), and the daemon's
socketmap and policy answering from them."""

from __future__ import annotations

import pytest

from mailcloak.errors import IdPError
from mailcloak.idp.base import IdPList, IdPUser
from mailcloak.idp.keycloak import MEMBERS_PAGE, KeycloakProvider
from standins.fixtures import CLIENT_ID, CLIENT_SECRET, keycloak_standin  # noqa: F401
from support import DaemonProcess, PolicyClient, SocketmapClient, write_config
from test_keycloak import config_for

ALICE = IdPUser("alice", "alice@d1.test")
BOB = IdPUser("bob", "bob@d2.test")


@pytest.fixture
def groups(keycloak_standin):
    kc = keycloak_standin
    kc.add_user("erin", "erin@d1.test")
    kc.add_group("team", {"mailList": ["team@d1.test"]}, ["alice", "bob", "carol", "dave"])
    staff = kc.add_group("staff", {"other": ["x"]})
    kc.add_group("board", {"mailList": ["board@d1.test"], "mailListSenders": ["erin"]}, ["alice"],
                 parent=staff)
    kc.add_group("quiet", {"mailList": ["quiet@d1.test"], "mailListSenders": ["nobody"]}, ["bob"])
    kc.add_group("plain", {}, ["alice"])
    return kc


@pytest.fixture
async def provider(groups):
    idp = KeycloakProvider(config_for(groups, list_attribute="mailList"))
    yield idp
    await idp.close()


async def test_a_group_with_the_attribute_is_a_list_of_its_enabled_members(provider, groups):
    # carol is disabled, dave has no email: neither receives
    assert await provider.list_by_address("Team@D1.test") == IdPList("team@d1.test", (ALICE, BOB))
    assert groups.counts["groups"] == 1 and groups.counts["members"] == 1
    assert await provider.list_by_address("team@d1.test") is not None   # cached
    assert groups.counts["groups"] == 1


async def test_nested_group_and_sender_rules(provider):
    board = await provider.list_by_address("board@d1.test")
    assert board == IdPList("board@d1.test", (ALICE,), "listed", ("erin",))
    assert board.sender_users == ("erin",)
    quiet = await provider.list_by_address("quiet@d1.test")
    assert (quiet.send_policy, quiet.sender_users) == ("nobody", ())
    team = await provider.list_by_address("team@d1.test")
    assert team.sender_users == ("alice", "bob")


async def test_not_a_list(provider, groups):
    assert await provider.list_by_address("nobody@d1.test") is None
    assert await provider.list_by_address("alice@d1.test") is None
    assert groups.counts["members"] == 0


async def test_members_are_read_page_by_page(provider, groups):
    names = [f"u{n:03d}" for n in range(MEMBERS_PAGE + 5)]
    for name in names:
        groups.add_user(name, f"{name}@d1.test")
    groups.add_group("all", {"mailList": ["all@d1.test"]}, names)
    found = await provider.list_by_address("all@d1.test")
    assert [m.username for m in found.members] == names
    assert groups.counts["members"] == 2


async def test_off_without_the_attribute(groups):
    idp = KeycloakProvider(config_for(groups))
    try:
        assert not idp.lists_enabled
        assert await idp.list_by_address("team@d1.test") is None
        assert groups.counts["groups"] == 0
    finally:
        await idp.close()


@pytest.mark.parametrize("fault", ["500", "malformed"])
async def test_idp_failure_is_an_error_not_an_empty_list(provider, groups, fault):
    groups.set_fault(fault, endpoints={"members"})
    with pytest.raises(IdPError):
        await provider.list_by_address("team@d1.test")


async def test_missing_group_permission_says_what_to_grant(groups):
    idp = KeycloakProvider(config_for(groups, client_id="noroles", client_secret="noroles-secret",
                                      list_attribute="mailList"))
    try:
        with pytest.raises(IdPError, match="query-groups"):
            await idp.list_by_address("team@d1.test")
    finally:
        await idp.close()


# Through the daemon -------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path, go_db, groups):
    config = write_config(tmp_path, idp={"provider": "keycloak", "keycloak": {
        "base_url": groups.url, "realm": "mail", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "list_attribute": "mailList"}})
    proc = DaemonProcess(config).start()
    yield proc
    proc.stop()


def test_daemon_answers_lists_from_keycloak(daemon, groups):
    sm = SocketmapClient(daemon.socketmap_socket)
    try:
        assert sm.ask("team@d1.test") == "OK alice@d1.test,bob@d2.test"
        assert sm.ask("Team+x@d1.test") == "OK alice+x@d1.test,bob+x@d2.test"
        assert sm.ask("alice@d1.test") == "NOTFOUND "
        assert sm.ask("board@d1.test", "sender_login") == "OK erin,erin@d1.test"
        groups.set_fault("500")
        assert sm.ask("ghost@d1.test").startswith("TEMP ")
        assert sm.ask("alias1@d1.test") == "OK alice@d1.test"  # the database still answers
    finally:
        sm.close()
        groups.clear_fault()
    policy = PolicyClient(daemon.policy_socket)
    try:
        assert policy.ask(protocol_state="RCPT", recipient="team@d1.test",
                          sender="x@example.org") == "DUNNO"
        assert policy.ask(protocol_state="MAIL", sender="quiet@d1.test", sasl_method="XOAUTH2",
                          sasl_username="bob").startswith("553 ")
        assert policy.ask(protocol_state="MAIL", sender="board@d1.test", sasl_method="XOAUTH2",
                          sasl_username="erin") == "DUNNO"
    finally:
        policy.close()


def test_pipelined_requests_keep_their_order_while_the_idp_hangs(tmp_path, go_db, groups):
    """Answers from the database come at once, an IdP question within the policy deadline as
    TEMP; several requests in one write are answered in order."""
    config = write_config(tmp_path, idp={"provider": "keycloak", "keycloak": {
        "base_url": groups.url, "realm": "mail", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "list_attribute": "mailList", "request_timeout_seconds": 30}},
        policy={"request_deadline_seconds": 0.5})
    proc = DaemonProcess(config).start()
    sm = SocketmapClient(proc.socketmap_socket)
    try:
        groups.set_fault("hang")
        requests = [b"alias team@d1.test", b"alias alias1@d1.test", b"domain d1.test",
                    b"mailbox alice@d1.test", b"alias Alias1+x@d1.test"]
        sm.sock.sendall(b"".join(b"%d:%s," % (len(r), r) for r in requests))
        answers = [sm.read_reply() for _ in requests]
        assert answers == ["TEMP identity provider did not answer in time", "OK alice@d1.test",
                           "OK d1.test", "TEMP identity provider did not answer in time",
                           "OK alice+x@d1.test"]
    finally:
        groups.clear_fault()
        sm.close()
        proc.stop()
