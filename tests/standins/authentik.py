"""An Authentik stand-in: `GET /api/v3/core/users/` as Authentik answers it.

- `Authorization: Bearer <token>` required: a missing header → 403 `{"detail": "Authentication
  credentials were not provided."}`, an unknown token → 403 `{"detail": "Token invalid/expired"}`.
- filters `username`, `email` (exact and case-sensitive, as Django's default lookup on
  PostgreSQL), `is_active`, `search` (case-insensitive substring over username, name, email),
  `page`, `page_size` (default 100); answer `{"pagination": {next, previous, count, current,
  total_pages, start_index, end_index}, "results": [...]}`, ordered by username.
- `sees_users = False` models a token whose user lacks the view permission: lists come back empty.

Emails and usernames are stored as given (Authentik does not lower-case them). Counts: "users".
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from standins import StandInServer


@dataclass
class User:
    pk: int
    username: str
    email: str
    is_active: bool = True
    name: str = ""
    attributes: dict = field(default_factory=dict)
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def representation(self) -> dict:
        return {
            "pk": self.pk, "username": self.username, "name": self.name, "is_active": self.is_active,
            "last_login": None, "is_superuser": False, "groups": [], "groups_obj": [],
            "email": self.email, "avatar": "/static/dist/assets/images/user_default.png",
            "attributes": self.attributes, "uid": self.uuid.replace("-", ""), "path": "users",
            "type": "internal", "uuid": self.uuid,
        }


class AuthentikStandIn(StandInServer):
    def __init__(self, api_token: str = "ak-token", clock=time.monotonic):
        super().__init__(clock)
        self.api_tokens = {api_token}
        self.users: list[User] = []
        self.sees_users = True

    def add_user(self, username: str, email: str, is_active: bool = True, name: str = "") -> User:
        user = User(len(self.users) + 1, username, email, is_active, name or username)
        self.users.append(user)
        return user

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v3/core/users/", self.users_endpoint)

    async def users_endpoint(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self.faulted("users", request)) is not None:
            return fault
        header = request.headers.get("Authorization", "")
        if not header:
            return web.json_response({"detail": "Authentication credentials were not provided."}, status=403)
        if not header.startswith("Bearer ") or header[7:] not in self.api_tokens:
            return web.json_response({"detail": "Token invalid/expired"}, status=403)
        query = request.query
        found = sorted(self.users, key=lambda u: u.username) if self.sees_users else []
        for param in ("username", "email"):
            if param in query:
                found = [u for u in found if getattr(u, param) == query[param]]
        if "is_active" in query:
            want = query["is_active"].lower() == "true"
            found = [u for u in found if u.is_active == want]
        if query.get("search"):
            term = query["search"].lower()
            found = [u for u in found if any(term in v.lower() for v in (u.username, u.name, u.email))]
        size = max(1, int(query.get("page_size", "100")))
        page = max(1, int(query.get("page", "1")))
        total_pages = max(1, math.ceil(len(found) / size))
        chunk = found[(page - 1) * size: page * size]
        pagination = {
            "next": page + 1 if page < total_pages else 0,
            "previous": page - 1 if page > 1 else 0,
            "count": len(found), "current": page, "total_pages": total_pages,
            "start_index": (page - 1) * size + 1 if chunk else 0,
            "end_index": (page - 1) * size + len(chunk),
        }
        return web.json_response({"pagination": pagination,
                                  "results": [u.representation() for u in chunk]})
