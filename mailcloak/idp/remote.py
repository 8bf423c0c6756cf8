"""What the HTTP-backed providers (Keycloak, Authentik) share: one HTTP client, one failure log,
one lookup cache, and the health and counters they expose.

Users are cached under ("address", address) and ("username", lower-case username). A user found
by one kind of lookup that equals the one the cache holds from the other is that object, so a
user both received for and logged in as costs one `IdPUser`, not two (`_shared`, applied by the
providers' fetches)."""

from __future__ import annotations

import time
from typing import Any, Callable

from mailcloak.config import AuthentikConfig, KeycloakConfig
from mailcloak.idp.base import IdentityProvider, IdPUser
from mailcloak.idp.cache import FailureLog, LookupCache
from mailcloak.idp.http import HttpClient


class RemoteProvider(IdentityProvider):
    def __init__(self, config: KeycloakConfig | AuthentikConfig, *,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._base = config.base_url.rstrip("/")
        self._http = HttpClient(self.name, config.connect_timeout_seconds, config.request_timeout_seconds)
        self.clock = clock
        self.failures = FailureLog(self.name, clock=clock)
        self.cache = LookupCache(
            self.name, ttl=config.cache_ttl_seconds, negative_ttl=config.negative_cache_ttl_seconds,
            stale_if_error=config.stale_if_error_seconds, max_entries=config.cache_max_entries,
            clock=clock, failures=self.failures)

    def _shared(self, user: IdPUser | None) -> IdPUser | None:
        """`user` as fetched, or the equal one the cache holds from the other kind of lookup."""
        if user is None:
            return None
        for key in (("address", user.email), ("username", user.username.lower())):
            known = self.cache.peek(key)
            if known == user:
                return known
        return user

    def health(self) -> dict[str, Any]:
        return {"ok": not self.failures.failing, "failing": sorted(self.failures.kinds)}

    def stats(self) -> dict[str, Any]:
        return {"http_requests": dict(self._http.requests), "lookups": dict(self.cache.counters),
                "lookup_errors": dict(self.cache.errors)}

    async def close(self) -> None:
        await self._http.close()
