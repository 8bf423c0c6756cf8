"""Routes of the daemon's HTTP listener. `setup_http` adds them to the daemon's application.

- `POST /dovecot/passdb` — app passwords for the Lua passdb (`mailcloak.http.passdb`);
- `POST /oauth2/introspect` — users' IdP tokens for Dovecot's oauth2 passdb
  (`mailcloak.http.introspect`);
- `GET /healthz`, `GET /metrics` (`mailcloak.http.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from aiohttp import web

from mailcloak.appkeys import CONFIG, STATE
from mailcloak.apps_auth import AppAuthenticator
from mailcloak.http import introspect
from mailcloak.http.health import setup_health
from mailcloak.http.passdb import PATH as PASSDB_PATH
from mailcloak.http.passdb import PassdbEndpoint, SharedSecret

PASSDB = web.AppKey("passdb", PassdbEndpoint)


async def _passdb_ctx(app: web.Application) -> AsyncIterator[None]:
    endpoint = app[PASSDB]
    endpoint.secret.load()                 # ConfigError (one line) stops the start
    if app[CONFIG].http.listen:
        # The dummy hash only where logins can come, and made while the start goes on.
        endpoint.authenticator.prepare()
    # Last use of apps: written every passdb.last_use_flush_seconds and once more at stop.
    usage, store = endpoint.authenticator.usage, app[STATE].store
    interval = app[CONFIG].passdb.last_use_flush_seconds
    flusher = asyncio.create_task(usage.run(store, interval), name="app-usage-flush")
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    await usage.flush(store)
    await endpoint.authenticator.close()


def setup_http(app: web.Application) -> None:
    """Register the HTTP routes and their cleanup contexts on the daemon's application."""
    config = app[CONFIG]
    endpoint = PassdbEndpoint(AppAuthenticator.from_config(config.passdb),
                              SharedSecret(config.http.shared_secret_file))
    app[PASSDB] = endpoint
    app.cleanup_ctx.append(_passdb_ctx)
    app.router.add_post(PASSDB_PATH, endpoint.handle, expect_handler=endpoint.expect)
    app.router.add_post(introspect.PATH, introspect.handle)
    setup_health(app)
