"""The passdb's dummy hash (one argon2id, ~0.2 s and 64 MiB) is made only by a daemon with an
HTTP listener, where logins can come, and the start does not wait for it (tests/unit/
test_apps_auth.py: an unknown login that comes first waits for it instead)."""

from __future__ import annotations

import pytest
from aiohttp import web

from mailcloak.apps_auth import AppAuthenticator
from mailcloak.config import load_config
from mailcloak.daemon import build_app
from support import write_config


@pytest.mark.parametrize("listen, makings", [(None, 0), ("127.0.0.1:8425", 1)])
async def test_dummy_hash_started_only_with_an_http_listener(tmp_path, go_db, monkeypatch, listen, makings):
    started = []
    monkeypatch.setattr(AppAuthenticator, "prepare", lambda self: started.append(self))
    sections = {"http": {"listen": listen}} if listen else {}
    path = write_config(tmp_path, **sections)
    runner = web.AppRunner(build_app(load_config(path), str(path)), handle_signals=False)
    await runner.setup()
    try:
        assert len(started) == makings
    finally:
        await runner.cleanup()
