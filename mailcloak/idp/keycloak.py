"""The Keycloak provider: the realm's admin users API, read with a service-account token.

Requests (Keycloak 17+ paths; older ones need `/auth` in `base_url`):

- token: `POST {base_url}/realms/{realm}/protocol/openid-connect/token`,
  `grant_type=client_credentials` with the client's id and secret. The token is kept and reused;
  from 80 % of its lifetime (`expires_in`) a new one is fetched in the background while the old
  one is still used, and past 95 % lookups wait for the new one. One token request at a time,
  shared by every lookup that needs it. A 401 from the admin API drops the token, fetches a new
  one and retries once (Keycloak can refuse a token before its expiry: revoked sessions, key
  rotation, a restarted server).
- users: `GET {base_url}/admin/realms/{realm}/users?email=E&exact=true` and
  `?username=U&exact=true`. Keycloak stores both lower-cased and compares `exact` matches
  case-insensitively; mailcloak still keeps only *enabled* users whose email/username equals the
  asked one, case-insensitively (an older or proxied server may treat the filter as a substring).
- aliases (optional, `alias_attribute`, e.g. a multi-valued `mailAlias`): when no user has the
  address as primary email, `?q=<attribute>:<address>&exact=true`; the attribute's values
  (lower-cased) become `IdPUser.addresses`, for every lookup. Keycloak 24+ returns only attributes
  declared in the realm's user profile (or all, with the unmanaged-attribute policy set), so
  declare the attribute there. `briefRepresentation=false` is sent so attributes come back.
- introspection: `POST {base_url}/realms/{realm}/protocol/openid-connect/token/introspect`
  with the client credentials; an active token maps to the enabled user of its
  `preferred_username`. Answers are cached under a SHA-256 of the token (never the token),
  at most 60 s and never past the token's `exp`.

- lists (optional, `list_attribute`, e.g. `mailList`): a group carrying the address in that
  attribute is a distribution list. `GET {base_url}/admin/realms/{realm}/groups?q=<attribute>:
  <address>&exact=true&briefRepresentation=false&populateHierarchy=false`; the answer is walked
  with its `subGroups` (servers that ignore populateHierarchy nest a match under its parents) and
  only groups whose attribute holds the address (case-insensitively) count; of several, the one
  with the lowest id. Its members: `GET .../groups/{id}/members?first=N&max=100&briefRepresentation=true`,
  page after page (at most MAX_MEMBER_PAGES); enabled members with an email only, direct members
  only (Keycloak does not list members of subgroups there). Its sender rule is the group attribute
  `list_senders_attribute`: absent, empty or `members`; `nobody`; or the usernames allowed.
  Keycloak matches group attributes as stored: keep list addresses lower-case there.

The service account needs the `realm-management` client roles `view-users` and `query-users`
(and `query-groups` for lists). Lookups are cached by `LookupCache` (see there: TTLs,
coalescing, stale-if-error); lists share the user cache, its TTLs and its bound. A cached user
shares the asked address or username string and, with the other kind of lookup, its `IdPUser`
(mailcloak.idp.remote), to keep 100 000 of them small.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

from mailcloak.config import KeycloakConfig
from mailcloak.idp.base import NO_ADDRESSES, IdPList, IdPUser, same_string
from mailcloak.idp.cache import LookupCache
from mailcloak.idp.http import IdPRequestError, error_field
from mailcloak.idp.remote import RemoteProvider

log = logging.getLogger(__name__)

RENEW_FRACTION = 0.8     # from here on the token is renewed in the background
EXPIRE_FRACTION = 0.95   # from here on lookups wait for a new token
DEFAULT_TOKEN_LIFETIME = 60.0
INTROSPECTION_MAX_TTL = 60.0
PROBE_USERNAME = "mailcloak-probe"
MEMBERS_PAGE = 100
MAX_MEMBER_PAGES = 100  # a list of more than 10 000 members is cut there (and a socketmap
                        # answer that long is over Postfix's 100 000 bytes anyway)

BAD_CREDENTIALS = "bad credentials"
FORBIDDEN = "forbidden: the service account lacks view-users/query-users"
UNKNOWN_REALM = "unknown realm"


@dataclass(frozen=True, slots=True)
class _Introspected:
    user: IdPUser
    exp: float | None  # unix time the token expires, if the IdP said


class KeycloakProvider(RemoteProvider):
    name = "keycloak"

    def __init__(self, config: KeycloakConfig, *, clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time):
        super().__init__(config, clock=clock)
        base = self._base
        realm = quote(config.realm, safe="")
        self._token_url = f"{base}/realms/{realm}/protocol/openid-connect/token"
        self._introspect_url = f"{self._token_url}/introspect"
        self._users_url = f"{base}/admin/realms/{realm}/users"
        self._groups_url = f"{base}/admin/realms/{realm}/groups"
        self.lists_enabled = bool(config.list_attribute)
        self._wallclock = wallclock
        self._token: str | None = None
        self._renew_at = 0.0
        self._expires_at = 0.0
        self._token_task: asyncio.Future | None = None
        # Never stale: an answer about a token must not outlive what the IdP said about it.
        self.introspection_cache = LookupCache(
            "keycloak introspection", ttl=min(INTROSPECTION_MAX_TTL, config.cache_ttl_seconds),
            negative_ttl=min(INTROSPECTION_MAX_TTL, config.negative_cache_ttl_seconds),
            stale_if_error=0, max_entries=min(config.cache_max_entries, 10_000),
            clock=clock, failures=self.failures)

    def __repr__(self) -> str:  # never the secret
        return f"KeycloakProvider({self._base!r}, realm={self.config.realm!r}, client={self.config.client_id!r})"

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "introspection": dict(self.introspection_cache.counters)}

    # -- the interface -------------------------------------------------------------------------

    async def user_by_address(self, address: str) -> IdPUser | None:
        address = address.strip().lower()
        if not address:
            return None
        return await self.cache.get(("address", address), lambda: self._fetch_by_address(address))

    async def user_by_username(self, username: str) -> IdPUser | None:
        username = username.strip()
        if not username:
            return None
        key = username.lower()
        return await self.cache.get(("username", key), lambda: self._fetch_by_username(key))

    async def list_by_address(self, address: str) -> IdPList | None:
        address = address.strip().lower()
        if not self.lists_enabled or not address:
            return None
        return await self.cache.get(("list", address), lambda: self._fetch_list(address))

    async def introspect_token(self, token: str) -> IdPUser | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        answer = await self.introspection_cache.get(
            ("token", digest), lambda: self._introspect(token), ttl_of=self._introspection_ttl)
        return answer.user if answer is not None else None

    async def probe(self) -> str:
        """A token, then one users request: raises IdPError saying what an admin must fix."""
        await self._fetch_token()
        await self._users({"username": PROBE_USERNAME, "exact": "true", "max": "1"})
        return (f"client {self.config.client_id!r} got a token; the users API of realm "
                f"{self.config.realm!r} answers")

    async def close(self) -> None:
        if self._token_task is not None and not self._token_task.done():
            self._token_task.cancel()
        await super().close()

    # -- lookups -------------------------------------------------------------------------------

    def _params(self, **fields: str) -> dict[str, str]:
        params = {**fields, "exact": "true"}
        if self.config.alias_attribute:
            params["briefRepresentation"] = "false"
        return params

    async def _fetch_by_address(self, address: str) -> IdPUser | None:
        users = await self._users(self._params(email=address))
        user = self._pick(users, lambda u: _lower(u.get("email")) == address, address)
        attribute = self.config.alias_attribute
        if user is None and attribute:
            users = await self._users({"q": f"{attribute}:{address}", "exact": "true",
                                       "briefRepresentation": "false"})
            user = self._pick(users, lambda u: address in self._aliases(u), address)
        return self._shared(user)

    async def _fetch_by_username(self, username: str) -> IdPUser | None:
        users = await self._users(self._params(username=username))
        return self._shared(self._pick(users, lambda u: _lower(u.get("username")) == username, username))

    def _pick(self, users: list[Any], matches: Callable[[dict], bool], asked: str) -> IdPUser | None:
        found = [u for u in users
                 if isinstance(u, dict) and u.get("enabled") is True
                 and isinstance(u.get("username"), str) and u["username"] and matches(u)]
        if not found:
            return None
        found.sort(key=lambda u: u["username"].lower())  # deterministic if an address is shared
        chosen = found[0]
        return IdPUser(same_string(chosen["username"], asked), same_string(_lower(chosen.get("email")), asked),
                       self._aliases(chosen))

    def _aliases(self, user: dict) -> frozenset[str]:
        attribute = self.config.alias_attribute
        if not attribute:
            return NO_ADDRESSES
        attributes = user.get("attributes")
        values = attributes.get(attribute) if isinstance(attributes, dict) else None
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list):
            return NO_ADDRESSES
        return frozenset(v.strip().lower() for v in values if isinstance(v, str) and v.strip()) or NO_ADDRESSES

    async def _fetch_list(self, address: str) -> IdPList | None:
        attribute = self.config.list_attribute
        found = await self._admin_get("groups", self._groups_url, {
            "q": f"{attribute}:{address}", "exact": "true", "briefRepresentation": "false",
            "populateHierarchy": "false"})
        groups = sorted((g for g in _walk(found) if address in _values(g, attribute)),
                        key=lambda g: str(g.get("id")))
        if not groups or not isinstance(groups[0].get("id"), str):
            return None
        group = groups[0]
        members_url = f"{self._groups_url}/{quote(group['id'], safe='')}/members"
        members: list[IdPUser] = []
        for page in range(MAX_MEMBER_PAGES):
            batch = await self._admin_get("members", members_url, {
                "first": str(page * MEMBERS_PAGE), "max": str(MEMBERS_PAGE),
                "briefRepresentation": "true"})
            members.extend(
                IdPUser(u["username"], _lower(u.get("email")))
                for u in batch
                if isinstance(u, dict) and u.get("enabled") is True and isinstance(u.get("username"), str)
                and u["username"] and _lower(u.get("email")))
            if len(batch) < MEMBERS_PAGE:
                break
        else:
            log.warning("keycloak: list %s has more than %d members; the rest are left out",
                        address, MEMBERS_PAGE * MAX_MEMBER_PAGES)
        rule = [v.strip() for v in _values(group, self.config.list_senders_attribute, lower=False)
                if v.strip()]
        if not rule or rule == ["members"]:
            return IdPList(address, tuple(members))
        if rule == ["nobody"]:
            return IdPList(address, tuple(members), "nobody")
        return IdPList(address, tuple(members), "listed", tuple(rule))

    async def _users(self, params: dict[str, str]) -> list[Any]:
        return await self._admin_get("users", self._users_url, params)

    async def _admin_get(self, endpoint: str, url: str, params: dict[str, str]) -> list[Any]:
        """GET an admin API list with a valid token; one retry with a new token after a 401."""
        for attempt in (1, 2):
            token = await self._access_token()
            status, body = await self._http.request(
                endpoint, "GET", url, params=params,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
            if status == 401 and attempt == 1:
                log.debug("keycloak: the admin API refused the token (401); fetching a new one")
                self._drop_token(token)
                continue
            break
        if status == 200:
            return self._http.json(body, list)
        if status == 401:
            raise self._http.error("unauthorized", "the admin API refused a fresh token")
        if status == 403:
            raise self._http.error(
                FORBIDDEN, f"give the service account of client {self.config.client_id!r} the "
                "realm-management roles view-users and query-users (and query-groups for lists)")
        if status == 404:
            raise self._not_found(body)
        raise self._http.error(f"http {status}", f"{endpoint} API")

    async def _introspect(self, token: str) -> _Introspected | None:
        status, body = await self._http.request(
            "introspect", "POST", self._introspect_url,
            data={"token": token, "client_id": self.config.client_id,
                  "client_secret": self.config.client_secret},
            headers={"Accept": "application/json"})
        if status != 200:
            raise self._token_endpoint_error(status, body, "introspection")
        doc = self._http.json(body, dict)
        if doc.get("active") is not True:
            return None
        exp = doc.get("exp")
        exp = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
        if exp is not None and exp <= self._wallclock():
            return None
        username = doc.get("preferred_username") or doc.get("username")
        if not isinstance(username, str) or not username:
            return None
        user = await self.user_by_username(username)
        return _Introspected(user, exp) if user is not None else None

    def _introspection_ttl(self, answer: _Introspected | None) -> float | None:
        if answer is None:
            return None
        ttl = self.introspection_cache.ttl
        if answer.exp is not None:
            ttl = min(ttl, answer.exp - self._wallclock())
        return ttl

    # -- the service-account token -------------------------------------------------------------

    async def _access_token(self) -> str:
        now = self.clock()
        if self._token is not None and now < self._expires_at:
            if now >= self._renew_at:
                self._start_token_fetch()  # renewed in the background; this token still serves
            return self._token
        return await asyncio.shield(self._start_token_fetch())

    def _start_token_fetch(self) -> asyncio.Future:
        task = self._token_task
        if task is None or task.done():
            task = asyncio.ensure_future(self._fetch_token())
            task.add_done_callback(_retrieve)
            self._token_task = task
        return task

    def _drop_token(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _fetch_token(self) -> str:
        started = self.clock()
        status, body = await self._http.request(
            "token", "POST", self._token_url,
            data={"grant_type": "client_credentials", "client_id": self.config.client_id,
                  "client_secret": self.config.client_secret},
            headers={"Accept": "application/json"})
        if status != 200:
            raise self._token_endpoint_error(status, body, "token")
        doc = self._http.json(body, dict)
        token = doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._http.error("malformed answer", "no access_token in the token answer")
        lifetime = doc.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        self._token = token
        self._renew_at = started + lifetime * RENEW_FRACTION
        self._expires_at = started + lifetime * EXPIRE_FRACTION
        log.debug("keycloak: new service-account token, valid %ss", lifetime)
        return token

    def _token_endpoint_error(self, status: int, body: bytes, what: str) -> IdPRequestError:
        error, description = error_field(body)
        client = self.config.client_id
        if error == "invalid_client" or (status == 401 and not error):
            return self._http.error(
                BAD_CREDENTIALS, f"the {what} endpoint refused client {client!r} (invalid_client): "
                "check idp.keycloak.client_id and idp.keycloak.client_secret")
        if error == "unauthorized_client":
            return self._http.error(
                "client not allowed", f"client {client!r} may not use client credentials "
                f"({description or error}): make it confidential with service accounts enabled")
        if status == 404:
            return self._not_found(body)
        if status >= 500:
            return self._http.error(f"http {status}", f"{what} endpoint")
        detail = f"{what} endpoint" + (f": {error}" if error else "")
        return self._http.error(f"http {status}", detail)

    def _not_found(self, body: bytes) -> IdPRequestError:
        error, _ = error_field(body)
        if "realm" in error.lower():
            return self._http.error(UNKNOWN_REALM, f"realm {self.config.realm!r} not found at {self._base}")
        return self._http.error("not found", f"no Keycloak API under {self._base}: check base_url "
                                             "(Keycloak before 17 needs the /auth prefix)")


def _lower(value: Any) -> str:
    return value.strip().lower() if isinstance(value, str) else ""


def _walk(groups: Any):
    """Every group of a groups answer, subgroups included."""
    if not isinstance(groups, list):
        return
    for group in groups:
        if isinstance(group, dict):
            yield group
            yield from _walk(group.get("subGroups"))


def _values(group: dict, attribute: str, lower: bool = True) -> list[str]:
    """The values of a group's attribute (a list of strings in Keycloak's representation)."""
    attributes = group.get("attributes")
    values = attributes.get(attribute) if isinstance(attributes, dict) else None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        return []
    return [v.strip().lower() if lower else v for v in values if isinstance(v, str)]


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


__all__ = ["KeycloakProvider"]
