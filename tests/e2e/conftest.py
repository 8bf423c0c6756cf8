"""Fixtures for end-to-end tests: the daemon as a process and a real Postfix in front of it.

Both are module-scoped: one daemon and one Postfix instance per test module keeps a run fast
(Postfix starts in ~0.5 s, stops in ~1 s), and a module that needs another setup (SASL through
Dovecot, say) builds its own `PostfixInstance` with extra main.cf lines.

The Postfix modules run once per store (issue #10): `e2e_store_kind` is a module-scoped
parameter, so pytest runs a module's tests grouped by store and starts its daemon and Postfix
once per store, over `e2e_go_site` (the Go project's data in that store); mailcloakctl reaches
that store through the daemon's config (support.mailcloakctl).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dovecot_instance import dovecot_unavailable_reason  # noqa: E402
from postfix_instance import (  # noqa: E402
    Listener,
    PostfixInstance,
    postfix_unavailable_reason,
    world_readable_tmpdir,
)
from stores import STORE_KINDS, SQLiteSite, postgres_site  # noqa: E402
from support import DaemonProcess, make_go_database, running, write_config  # noqa: E402


@pytest.fixture(scope="module")
def require_postfix():
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip("E2E SKIPPED, " + reason)


@pytest.fixture(scope="module")
def e2e_dir(require_postfix, e2e_store_kind):
    """A directory under /tmp that Postfix's unprivileged processes can traverse (0755), one per
    module and store."""
    path = world_readable_tmpdir(f"mailcloak-e2e-{e2e_store_kind}-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix_dovecot_dir(request, e2e_store_kind):
    """Like e2e_dir, for a module that needs Dovecot (SASL) as well as Postfix."""
    for reason in (postfix_unavailable_reason(), dovecot_unavailable_reason()):
        if reason:
            pytest.skip("E2E SKIPPED, " + reason)
    module = request.module.__name__.removeprefix("test_")
    path = world_readable_tmpdir(f"mailcloak-{module}-{e2e_store_kind}-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=STORE_KINDS)
def e2e_store_kind(request) -> str:
    """The store of a module's daemon: a module parameter, so each store gets one set-up."""
    return request.param


@pytest.fixture(scope="module")
def e2e_go_site(request, e2e_store_kind, tmp_path_factory):
    """The Go project's data in a store of `e2e_store_kind`, for one module."""
    if e2e_store_kind == "postgres":
        return postgres_site(request, "pg_go_template")
    return SQLiteSite(make_go_database(tmp_path_factory.mktemp("e2e-go") / "state.db"))


@pytest.fixture(scope="module")
def e2e_daemon(e2e_dir, e2e_go_site):
    """The daemon on sockets in e2e_dir (mode 0666), over the Go-project data in either store."""
    daemon_dir = e2e_dir / "daemon"
    daemon_dir.mkdir()
    daemon_dir.chmod(0o755)
    proc = DaemonProcess(write_config(daemon_dir, **e2e_go_site.config_sections()))
    with running(proc):
        yield proc


@pytest.fixture(scope="module")
def postfix(e2e_dir, e2e_daemon):
    """A real Postfix whose smtpd asks the daemon's policy and socketmap services.

    Listeners: "smtpd" (main.cf's restrictions: the policy first), "relayfirst" (Postfix's
    conventional smtpd_relay_restrictions before the policy) and "mailstage"
    (smtpd_delay_reject = no with the policy as sender and DATA restriction too).
    """
    instance = PostfixInstance(
        e2e_dir / "postfix-instance",
        policy_socket=e2e_daemon.policy_socket,
        socketmap_socket=e2e_daemon.socketmap_socket,
        listeners=[
            Listener("smtpd"),
            Listener("relayfirst", {
                "smtpd_relay_restrictions":
                    "permit_mynetworks,permit_sasl_authenticated,reject_unauth_destination",
                "smtpd_recipient_restrictions": "$mailcloak_policy",
            }),
            Listener("mailstage", {
                "smtpd_delay_reject": "no",
                "smtpd_sender_restrictions": "$mailcloak_policy",
                "smtpd_data_restrictions": "$mailcloak_policy",
            }),
        ],
    )
    with running(instance):
        yield instance
    instance.remove()
