"""Routes of the daemon's HTTP listener. `setup_http` adds them to the daemon's application."""

from __future__ import annotations

from aiohttp import web


def setup_http(app: web.Application) -> None:
    """Register the HTTP routes and their cleanup contexts on the daemon's application."""
