"""Apps that age (issue #9) with a real Dovecot 2.3 and the shipped Lua script and snippet:
`doveadm auth test -x service=smtp -x rip=...` fails for an expired app and for an app used from
outside its networks, and passes for an allowed one; Dovecot's auth cache never carries a success
over to another remote IP. The daemon's data is the Go project's, in SQLite and in
PostgreSQL (the module runs once per store), migrated by `mailcloakctl init`, with the settings
written by `mailcloakctl apps add`; last use is flushed into the same store."""

from __future__ import annotations

import pytest

from dovecot_instance import DovecotInstance
from postfix_instance import free_ports
from support import GO_APP_PASSWORD, DaemonProcess, mailcloakctl, running, write_config
# The Dovecot module's fixtures (work_dir, store_dir, flushed: bound here to this module's
# `dovecot`) and checks of doveadm's answer.
from test_dovecot import assert_refused, auth_ok, flushed, require_dovecot, store_dir, work_dir  # noqa: F401

pytestmark = pytest.mark.e2e

EXPIRED_PASSWORD = "expired-app-secret"
OFFICE_PASSWORD = "office-app-secret"


@pytest.fixture(scope="module")
def daemon(store_dir, e2e_go_site):
    daemon_dir = store_dir / "daemon"
    daemon_dir.mkdir()
    daemon_dir.chmod(0o755)
    (port,) = free_ports(1)
    config = write_config(daemon_dir, http={"listen": f"127.0.0.1:{port}"}, **e2e_go_site.config_sections())
    for argv in (["init"],
                 ["apps", "add", "Expired", EXPIRED_PASSWORD, "--expires", "2001-01-01"],
                 ["apps", "add", "Office", OFFICE_PASSWORD, "--networks", "192.0.2.0/24,2001:db8::/32",
                  "--expires", "2999-01-01", "--description", "office scanner"]):
        mailcloakctl(config, *argv)
    proc = DaemonProcess(config)
    proc.url, proc.site = f"http://127.0.0.1:{port}", e2e_go_site
    with running(proc):
        yield proc


@pytest.fixture(scope="module")
def dovecot(store_dir, daemon):
    instance = DovecotInstance(store_dir / "dovecot", daemon_url=daemon.url, imap=False)
    with running(instance):
        yield instance


def test_expired_app_fails(flushed, daemon):
    assert_refused(flushed.auth_test("expired", EXPIRED_PASSWORD, service="smtp", rip="192.0.2.20"),
                   code="user_disabled")
    assert ("app auth refused (app expired at 2001-01-01T00:00:00Z) login='expired' service=smtp "
            "rip=192.0.2.20 app=Expired") in daemon.log()


@pytest.mark.parametrize("rip", ["192.0.2.21", "2001:db8::21"])
def test_app_inside_its_networks_passes(flushed, rip):
    result = flushed.auth_test("office", OFFICE_PASSWORD, service="smtp", rip=rip)
    assert auth_ok(result), (result.stdout, result.stderr, flushed.log()[-3000:])


def test_app_outside_its_networks_fails(flushed, daemon):
    assert_refused(flushed.auth_test("office", OFFICE_PASSWORD, service="smtp", rip="198.51.100.21"),
                   code="user_disabled")
    assert ("app auth refused (remote IP 198.51.100.21 is outside the app's networks) "
            "login='office' service=smtp rip=198.51.100.21 app=Office") in daemon.log()


def test_app_with_networks_fails_without_a_remote_ip(flushed):
    assert_refused(flushed.auth_test("office", OFFICE_PASSWORD, service="smtp"), code="user_disabled")


def test_a_cached_success_does_not_answer_for_another_network(flushed):
    """The snippet's cache key holds the remote IP (cache_key=%u%s%r)."""
    assert auth_ok(flushed.auth_test("office", OFFICE_PASSWORD, service="smtp", rip="192.0.2.22"))
    assert auth_ok(flushed.auth_test("office", OFFICE_PASSWORD, service="smtp", rip="192.0.2.22"))
    assert "cache hit" in flushed.log()
    assert_refused(flushed.auth_test("office", OFFICE_PASSWORD, service="smtp", rip="198.51.100.22"),
                   code="user_disabled")


def test_app_without_networks_or_expiry_still_passes_from_anywhere(flushed):
    assert auth_ok(flushed.auth_test("mailer", GO_APP_PASSWORD, service="smtp", rip="203.0.113.9"))


def test_last_use_is_recorded_when_the_daemon_stops(daemon, dovecot):
    assert auth_ok(dovecot.auth_test("office", OFFICE_PASSWORD, service="submission", rip="192.0.2.99"))
    assert daemon.stop() == 0
    used = dict(daemon.site.query("SELECT app_id, last_used_ip FROM app_usage"))
    assert used["Office"] == "192.0.2.99"
    assert "Expired" not in used
    bad = [line for line in daemon.log().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, "\n".join(bad)
