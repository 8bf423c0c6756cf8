"""A Keycloak stand-in: the token, admin users and introspection endpoints of one realm.

Answers as Keycloak 24-26 does (see /work/shared/notes/protocols.md §5):

- `POST /realms/{realm}/protocol/openid-connect/token` (client_credentials; client auth in the
  form or HTTP Basic): `access_token`, `expires_in` (`expires_in` attribute, seconds of
  `clock`), `refresh_expires_in` 0, `token_type` Bearer, `not-before-policy` 0, `scope`; wrong
  client or secret → 401 `invalid_client`; a client without service accounts → 401
  `unauthorized_client`; unknown realm → 404 `Realm does not exist`.
- `GET /admin/realms/{realm}/users`: Bearer token required (unknown, revoked or expired → 401
  `{"error":"HTTP 401 Unauthorized"}`); a service account without view-users/query-users → 403
  `{"error":"HTTP 403 Forbidden"}`; `email`/`username`/`firstName`/`lastName` are a
  case-insensitive whole-value match with `exact=true` and a substring match otherwise; `q=k:v`
  matches attribute values (case-insensitive, exact unless `exact=false`); `enabled`,
  `search`, `first`, `max`, `briefRepresentation` (drops `attributes`). Usernames and emails are
  stored lower-cased, as Keycloak does.
- `GET /admin/realms/{realm}/groups`: same token rules; `q=k:v` (attribute values, exact and
  case-sensitive as stored — the JPA query is an equality), `search` (name, substring unless
  `exact=true`), `first`, `max`, `briefRepresentation` (**default true**: no `attributes`),
  `populateHierarchy` (default true: a match deep in the tree comes nested in `subGroups` under
  its top-level ancestor, as Keycloak 23+ answers searches).
- `GET /admin/realms/{realm}/groups/{id}/members`: direct members only, by username;
  `first` (default 0), `max` (default 100), `briefRepresentation`; unknown id → 404
  `{"error":"Could not find group by id"}`.
- `POST /realms/{realm}/protocol/openid-connect/token/introspect` (client auth): `{"active":
  false}` for unknown, revoked or expired tokens and disabled users; otherwise the claims with
  `active`, `username`, `preferred_username`, `sub`, `exp`, `iat`, `client_id`, `token_type`,
  `scope`.

Counts per endpoint: "token", "users", "groups", "members", "introspect".
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from standins import StandInServer

INVALID_CLIENT = {"error": "invalid_client", "error_description": "Invalid client or Invalid client credentials"}


@dataclass
class Client:
    client_id: str
    secret: str
    roles: bool = True              # view-users + query-users on realm-management
    service_accounts: bool = True


@dataclass
class Token:
    client_id: str
    username: str                  # service-account-<client> or the user's username
    expires_at: float              # stand-in clock
    exp: int                       # unix time
    iat: int
    user_id: str = ""
    scope: str = "profile email"


@dataclass
class User:
    username: str
    email: str
    enabled: bool = True
    first_name: str = ""
    last_name: str = ""
    attributes: dict[str, list[str]] = field(default_factory=dict)
    email_verified: bool = True
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: int = field(default_factory=lambda: int(time.time() * 1000))

    def representation(self, brief: bool) -> dict:
        rep = {
            "id": self.id, "username": self.username, "firstName": self.first_name,
            "lastName": self.last_name, "email": self.email, "emailVerified": self.email_verified,
            "createdTimestamp": self.created, "enabled": self.enabled, "totp": False,
            "disableableCredentialTypes": [], "requiredActions": [], "notBefore": 0,
            "access": {"manage": False},
        }
        if not self.email:
            del rep["email"]
        if not brief:
            rep["attributes"] = {k: list(v) for k, v in self.attributes.items()}
        return rep


@dataclass
class Group:
    name: str
    attributes: dict[str, list[str]] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)   # usernames
    subgroups: list["Group"] = field(default_factory=list)
    parent: "Group | None" = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def path(self) -> str:
        return (self.parent.path if self.parent else "") + "/" + self.name

    def representation(self, brief: bool, children: list[dict]) -> dict:
        rep = {"id": self.id, "name": self.name, "path": self.path,
               "subGroupCount": len(self.subgroups), "subGroups": children}
        if self.parent is not None:
            rep["parentId"] = self.parent.id
        if not brief:
            rep["attributes"] = {k: list(v) for k, v in self.attributes.items()}
            rep["realmRoles"], rep["clientRoles"], rep["access"] = [], {}, {"view": True}
        return rep


class KeycloakStandIn(StandInServer):
    def __init__(self, realm: str = "mail", clock=time.monotonic, wallclock=time.time):
        super().__init__(clock)
        self.realm = realm
        self.wallclock = wallclock
        self.expires_in = 300
        self.clients: dict[str, Client] = {}
        self.users: list[User] = []
        self.tokens: dict[str, Token] = {}
        self.groups: list[Group] = []  # top-level groups
        self.ignore_exact = False  # answer `exact=true` like a substring search (an odd server)

    # -- setup -------------------------------------------------------------------------------

    def add_client(self, client_id: str, secret: str, roles: bool = True,
                   service_accounts: bool = True) -> Client:
        client = Client(client_id, secret, roles, service_accounts)
        self.clients[client_id] = client
        return client

    def add_user(self, username: str, email: str = "", enabled: bool = True,
                 attributes: dict[str, list[str]] | None = None, **names: str) -> User:
        user = User(username.lower(), email.lower(), enabled, names.get("first_name", ""),
                    names.get("last_name", ""), dict(attributes or {}))
        self.users.append(user)
        return user

    def add_group(self, name: str, attributes: dict[str, list[str]] | None = None,
                  members: list[str] = (), parent: Group | None = None) -> Group:
        group = Group(name, dict(attributes or {}), [m.lower() for m in members], parent=parent)
        (parent.subgroups if parent else self.groups).append(group)
        return group

    def _all_groups(self, groups: list[Group] | None = None):
        for group in self.groups if groups is None else groups:
            yield group
            yield from self._all_groups(group.subgroups)

    def user(self, username: str) -> User:
        return next(u for u in self.users if u.username == username.lower())

    def issue_user_token(self, username: str, lifetime: float = 300, client_id: str = "webmail") -> str:
        """An access token as if `username` had logged in to `client_id` (for introspection)."""
        user = self.user(username)
        return self._issue(client_id, user.username, lifetime, user.id, scope="openid profile email")

    def revoke_tokens(self) -> None:
        """Every token becomes unknown (a Keycloak restart, a key rotation, a revoked session)."""
        self.tokens.clear()

    def _issue(self, client_id: str, username: str, lifetime: float, user_id: str, scope: str) -> str:
        token = "eyJ" + secrets.token_urlsafe(48)
        now = int(self.wallclock())
        self.tokens[token] = Token(client_id, username, self.clock() + lifetime,
                                   now + int(lifetime), now, user_id, scope)
        return token

    def _valid(self, token: str) -> Token | None:
        info = self.tokens.get(token)
        if info is None or self.clock() >= info.expires_at:
            return None
        return info

    # -- HTTP --------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/realms/{realm}/protocol/openid-connect/token", self.token)
        app.router.add_post("/realms/{realm}/protocol/openid-connect/token/introspect", self.introspect)
        app.router.add_get("/admin/realms/{realm}/users", self.users_endpoint)
        app.router.add_get("/admin/realms/{realm}/groups", self.groups_endpoint)
        app.router.add_get("/admin/realms/{realm}/groups/{id}/members", self.members_endpoint)

    async def _client_auth(self, request: web.Request) -> tuple[Client | None, dict]:
        form = dict(await request.post())
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return None, form
        client = self.clients.get(client_id)
        if client is None or not secrets.compare_digest(client.secret, secret):
            return None, form
        return client, form

    async def token(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self.faulted("token", request)) is not None:
            return fault
        if request.match_info["realm"] != self.realm:
            return web.json_response({"error": "Realm does not exist"}, status=404)
        client, form = await self._client_auth(request)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type",
                                      "error_description": "Unsupported grant_type"}, status=400)
        if client is None:
            return web.json_response(INVALID_CLIENT, status=401)
        if not client.service_accounts:
            return web.json_response({"error": "unauthorized_client",
                                      "error_description": "Client not enabled to retrieve service account"},
                                     status=401)
        token = self._issue(client.client_id, f"service-account-{client.client_id}", self.expires_in,
                            "", scope="profile email")
        return web.json_response({
            "access_token": token, "expires_in": self.expires_in, "refresh_expires_in": 0,
            "token_type": "Bearer", "not-before-policy": 0, "scope": "profile email",
        })

    async def introspect(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self.faulted("introspect", request)) is not None:
            return fault
        if request.match_info["realm"] != self.realm:
            return web.json_response({"error": "Realm does not exist"}, status=404)
        client, form = await self._client_auth(request)
        if client is None:
            return web.json_response(INVALID_CLIENT, status=401)
        token = form.get("token")
        if not token:
            return web.json_response({"error": "invalid_request",
                                      "error_description": "Token not provided."}, status=400)
        info = self._valid(token)
        user = next((u for u in self.users if u.username == info.username), None) if info else None
        if info is None or (info.user_id and (user is None or not user.enabled)):
            return web.json_response({"active": False})
        claims = {
            "exp": info.exp, "iat": info.iat, "jti": str(uuid.uuid4()),
            "iss": f"{self.url}/realms/{self.realm}", "aud": "account",
            "sub": info.user_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, info.username)),
            "typ": "Bearer", "azp": info.client_id, "preferred_username": info.username,
            "scope": info.scope, "client_id": info.client_id, "username": info.username,
            "token_type": "Bearer", "active": True,
        }
        if user is not None and user.email:
            claims.update(email=user.email, email_verified=user.email_verified)
        return web.json_response(claims)

    def _admin_refusal(self, request: web.Request) -> web.StreamResponse | None:
        """The admin API's answer to a request without a valid service-account token, if any."""
        header = request.headers.get("Authorization", "")
        info = self._valid(header[7:]) if header.startswith("Bearer ") else None
        if info is None:
            return web.json_response({"error": "HTTP 401 Unauthorized"}, status=401)
        if request.match_info["realm"] != self.realm:
            return web.json_response({"error": "Realm not found."}, status=404)
        client = self.clients.get(info.client_id)
        if info.user_id or client is None or not client.roles:
            return web.json_response({"error": "HTTP 403 Forbidden"}, status=403)
        return None

    async def groups_endpoint(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self.faulted("groups", request)) is not None:
            return fault
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        query = request.query
        brief = query.get("briefRepresentation", "true").lower() != "false"
        hierarchy = query.get("populateHierarchy", "true").lower() != "false"
        if "q" in query or "search" in query:
            found = list(self._all_groups())
            for pair in query.get("q", "").split():
                key, _, value = pair.partition(":")
                found = [g for g in found if value in g.attributes.get(key, [])]
            if "search" in query:
                term = query["search"].lower()
                exact = query.get("exact", "false").lower() == "true"
                found = [g for g in found if (g.name.lower() == term if exact else term in g.name.lower())]
        else:
            found, hierarchy = list(self.groups), False
        first, count = int(query.get("first", "0")), int(query.get("max", "100"))
        found = found[first:first + count]
        if not hierarchy:
            return web.json_response([g.representation(brief, []) for g in found])
        tops: dict[str, dict] = {}
        for group in found:  # each match nested under its ancestors, as Keycloak answers searches
            chain = [group]
            while chain[-1].parent is not None:
                chain.append(chain[-1].parent)
            rep = None
            for node in chain:
                rep = node.representation(brief, [rep] if rep else [])
            top = tops.setdefault(rep["id"], rep)
            if top is not rep:
                top["subGroups"].extend(rep["subGroups"])
        return web.json_response(list(tops.values()))

    async def members_endpoint(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self.faulted("members", request)) is not None:
            return fault
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        group = next((g for g in self._all_groups() if g.id == request.match_info["id"]), None)
        if group is None:
            return web.json_response({"error": "Could not find group by id"}, status=404)
        query = request.query
        members = sorted((u for u in self.users if u.username in group.members), key=lambda u: u.username)
        first, count = int(query.get("first", "0")), int(query.get("max", "100"))
        brief = query.get("briefRepresentation", "false").lower() == "true"
        return web.json_response([u.representation(brief) for u in members[first:first + count]])

    async def users_endpoint(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self.faulted("users", request)) is not None:
            return fault
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        query = request.query
        exact = query.get("exact", "").lower() == "true" and not self.ignore_exact
        found = list(self.users)
        for param, attr in (("email", "email"), ("username", "username"),
                            ("firstName", "first_name"), ("lastName", "last_name")):
            if param in query:
                wanted = query[param].lower()
                found = [u for u in found
                         if (getattr(u, attr).lower() == wanted if exact else wanted in getattr(u, attr).lower())]
        if "search" in query:
            term = query["search"].lower().strip('"*')
            found = [u for u in found if any(term in v.lower() for v in
                                             (u.username, u.email, u.first_name, u.last_name))]
        if "q" in query:
            attr_exact = query.get("exact", "").lower() != "false" and not self.ignore_exact
            for pair in query["q"].split():
                key, _, value = pair.partition(":")
                value = value.lower()
                found = [u for u in found if any(
                    (v.lower() == value if attr_exact else value in v.lower())
                    for v in u.attributes.get(key, []))]
        if "enabled" in query:
            want = query["enabled"].lower() == "true"
            found = [u for u in found if u.enabled == want]
        first = int(query.get("first", "0"))
        count = int(query.get("max", "100"))
        brief = query.get("briefRepresentation", "false").lower() == "true"
        return web.json_response([u.representation(brief) for u in found[first:first + count]])
