"""Fixtures for the stand-ins; a test module imports the ones it uses.

`keycloak_standin`: realm "mail"; client "mailcloak" (secret CLIENT_SECRET, roles granted) and
"noroles" (no realm-management roles); users alice (Alice@D1.test, mailAlias attribute),
bob, carol (disabled), dave (no email).
`authentik_standin`: token AUTHENTIK_TOKEN; users alice, Bob (email stored mixed-case), carol
(inactive).
"""

from __future__ import annotations

import pytest

from standins import FakeClock
from standins.authentik import AuthentikStandIn
from standins.keycloak import KeycloakStandIn

CLIENT_ID = "mailcloak"
CLIENT_SECRET = "kc-secret-Zq81vP"
AUTHENTIK_TOKEN = "ak-token-3k9XwQ"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keycloak_standin():
    server = KeycloakStandIn(realm="mail")
    server.add_client(CLIENT_ID, CLIENT_SECRET)
    server.add_client("noroles", "noroles-secret", roles=False)
    server.add_client("noservice", "noservice-secret", service_accounts=False)
    server.add_user("alice", "Alice@D1.test", attributes={"mailAlias": ["Sales@D1.test", "info@d1.test"]},
                    first_name="Alice", last_name="Liddell")
    server.add_user("bob", "bob@d2.test")
    server.add_user("malice", "malice@d1.test")
    server.add_user("carol", "carol@d1.test", enabled=False, attributes={"mailAlias": ["old@d1.test"]})
    server.add_user("dave")
    server.start()
    yield server
    server.close()


@pytest.fixture
def authentik_standin():
    server = AuthentikStandIn(api_token=AUTHENTIK_TOKEN)
    server.add_user("alice", "alice@d1.test", name="Alice Liddell")
    server.add_user("Bob", "Bob@D2.test", name="Bob")
    server.add_user("carol", "carol@d1.test", is_active=False)
    server.add_user("malice", "malice@d1.test")
    server.start()
    yield server
    server.close()
