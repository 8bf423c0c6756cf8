"""The Authentik provider: the core users API, read with an API token.

Requests: `GET {base_url}/api/v3/core/users/?email=E&is_active=true` ("which user has this
address") and `?username=U&is_active=true` ("which user has this login"), with
`Authorization: Bearer <api_token>`; the answer's `results` hold `username`, `email`,
`is_active`. Only active users whose email/username equals the asked one case-insensitively are
kept.

Case: unlike Keycloak, Authentik stores emails and usernames as typed and its `email`/`username`
filters are exact, case-sensitive matches (on PostgreSQL). mailcloak asks with the lower-cased
address (the form Postfix lookups arrive in), so an address stored as `Bob@Example.org` is not
found by that filter. When the exact filter finds nothing, mailcloak asks once more with
`search=<address>` (Authentik's search is a case-insensitive substring match over username, name
and email) and keeps only case-insensitively equal entries. So mixed-case entries are found, at
the price of a second request for addresses that do not exist (negative answers are cached, by
default 30 s). Storing addresses lower-case in Authentik avoids that second request.

The token's user must be allowed to view users: Authentik filters lists by object permission, so
a token without it sees *no* users, which would make every local recipient "unknown" — `probe()`
(`mailcloak --check-config`) refuses that case.

Authentik has no introspection here (`introspect_token` accepts no token): its introspection
endpoint belongs to an OAuth2 provider with its own client credentials, which this config does not
hold. Lookups are cached by `LookupCache` (TTLs, coalescing, stale-if-error), a user found both
by address and by username as one `IdPUser` (mailcloak.idp.remote).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from mailcloak.config import AuthentikConfig
from mailcloak.idp.base import IdPUser, same_string
from mailcloak.idp.remote import RemoteProvider

log = logging.getLogger(__name__)

FORBIDDEN = "forbidden: the API token is invalid, expired or not allowed"
PAGE_SIZE = "100"


class AuthentikProvider(RemoteProvider):
    name = "authentik"

    def __init__(self, config: AuthentikConfig, *, clock: Callable[[], float] = time.monotonic):
        super().__init__(config, clock=clock)
        self._users_url = f"{self._base}/api/v3/core/users/"

    def __repr__(self) -> str:  # never the token
        return f"AuthentikProvider({self._base!r})"

    async def user_by_address(self, address: str) -> IdPUser | None:
        address = address.strip().lower()
        if not address:
            return None
        return await self.cache.get(("address", address), lambda: self._lookup("email", address, address))

    async def user_by_username(self, username: str) -> IdPUser | None:
        username = username.strip()
        if not username:
            return None
        key = username.lower()
        return await self.cache.get(("username", key), lambda: self._lookup("username", username, key))

    async def probe(self) -> str:
        doc = await self._list({"page_size": "1"})
        pagination = doc.get("pagination")
        count = pagination.get("count") if isinstance(pagination, dict) else None
        if count == 0 or (count is None and not doc["results"]):
            raise self._http.error(
                "the API token sees no users",
                "give the token's user the permission to view users (authentik_core.view_user)")
        return f"the API token is accepted; {count if count is not None else 'some'} users visible"

    async def _lookup(self, field: str, value: str, wanted: str) -> IdPUser | None:
        """The user whose `field` is `value` (`wanted`: lower-cased, the cache key's string)."""
        doc = await self._list({field: value, "is_active": "true"})
        user = self._pick(doc["results"], field, wanted)
        if user is None:
            # Exact filters are case-sensitive: catch entries stored with other case.
            doc = await self._list({"search": value, "is_active": "true", "page_size": PAGE_SIZE})
            user = self._pick(doc["results"], field, wanted)
        return self._shared(user)

    @staticmethod
    def _pick(results: list[Any], field: str, wanted: str) -> IdPUser | None:
        found = [u for u in results
                 if isinstance(u, dict) and u.get("is_active") is True
                 and isinstance(u.get("username"), str) and u["username"]
                 and isinstance(u.get(field), str) and u[field].strip().lower() == wanted]
        if not found:
            return None
        found.sort(key=lambda u: u["username"].lower())
        chosen = found[0]
        email = chosen.get("email")
        email = email.strip().lower() if isinstance(email, str) else ""
        return IdPUser(same_string(chosen["username"], wanted), same_string(email, wanted))

    async def _list(self, params: dict[str, str]) -> dict[str, Any]:
        status, body = await self._http.request(
            "users", "GET", self._users_url, params=params,
            headers={"Authorization": f"Bearer {self.config.api_token}", "Accept": "application/json"})
        if status == 200:
            doc = self._http.json(body, dict)
            if not isinstance(doc.get("results"), list):
                raise self._http.error("malformed answer", "no results list")
            return doc
        if status in (401, 403):
            raise self._http.error(FORBIDDEN, f"HTTP {status} from the users API: check idp.authentik.api_token")
        if status == 404:
            raise self._http.error("not found", f"no Authentik API at {self._base}/api/v3/: check base_url")
        raise self._http.error(f"http {status}", "users API")
