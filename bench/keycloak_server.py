"""The Keycloak stand-in (tests/standins/keycloak.py) as its own process, for the benchmark.

    python bench/keycloak_server.py K CLIENT_ID CLIENT_SECRET

Seeds users u0..u{K-1} (bench/workload.py's addresses), prints `port N` on stdout, then reads
commands on stdin: `counts` prints the per-endpoint request counts as one JSON line; `quit`
(or EOF) stops it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from aiohttp import web  # noqa: E402
from standins.keycloak import KeycloakStandIn  # noqa: E402
from workload import user_email  # noqa: E402

# The exact one-field look-ups the daemon makes (`email=E&exact=true`, `username=U&exact=true`),
# with nothing else but these parameters, are answered from an index: the stand-in scans its
# users for every request, which at 100 000 users would make it, not the daemon, the bench.
INDEXABLE = {"exact", "briefRepresentation", "first", "max"}


class IndexedKeycloak(KeycloakStandIn):
    """The stand-in with its seeded users indexed by lower-case email and username (the bench
    never changes a user after seeding); every other query goes to the stand-in as it is."""

    def index(self) -> None:
        self._by = {("email", u.email.lower()): u for u in self.users}
        self._by.update({("username", u.username.lower()): u for u in self.users})

    async def users_endpoint(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        fields = [f for f in ("email", "username") if f in query]
        if len(fields) != 1 or query.get("exact", "").lower() != "true" \
                or set(query) - INDEXABLE - set(fields):
            return await super().users_endpoint(request)
        if (fault := await self.faulted("users", request)) is not None:
            return fault
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        user = self._by.get((fields[0], query[fields[0]].lower()))
        brief = query.get("briefRepresentation", "false").lower() == "true"
        found = [user] if user is not None and int(query.get("first", "0")) == 0 else []
        return web.json_response([u.representation(brief) for u in found])


def main() -> None:
    k, client_id, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = IndexedKeycloak(realm="mail")
    server.add_client(client_id, secret)
    for i in range(k):
        server.add_user(f"u{i}", user_email(i))
    server.index()
    server.start()
    print(f"port {server.port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "counts":
            print(json.dumps(dict(server.counts)), flush=True)
        elif command == "quit":
            break
    server.close()


if __name__ == "__main__":
    main()
