"""GET /healthz and GET /metrics on the daemon's HTTP listener.

/healthz answers 200 when the database state is loaded and fresh, the IdP is answering and both
Postfix-facing sockets listen; 503 otherwise, with a JSON body that says which part is wrong (the
IdP's current failure kinds, the database's last refresh error). It never names a secret.
"""

from __future__ import annotations

import time

from aiohttp import web

from mailcloak.appkeys import METRICS, RUNTIME, SERVERS


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    runtime = app[RUNTIME].current
    state = runtime.state
    database = {
        "ok": state.snapshot is not None and state.last_error is None,
        "loaded_seconds_ago": round(time.monotonic() - state.loaded_at, 3) if state.loaded_at else None,
        "error": state.last_error,
    }
    idp = {"provider": runtime.config.idp.provider, **runtime.idp.health()}
    sockets = {server.name: server.listening for server in app[SERVERS]}
    healthy = database["ok"] and idp["ok"] and all(sockets.values())
    body = {"status": "ok" if healthy else "fail", "database": database, "idp": idp, "sockets": sockets}
    return web.json_response(body, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def setup_health(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
