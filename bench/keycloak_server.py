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

from standins.keycloak import KeycloakStandIn  # noqa: E402
from workload import user_email  # noqa: E402


def main() -> None:
    k, client_id, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = KeycloakStandIn(realm="mail")
    server.add_client(client_id, secret)
    for i in range(k):
        server.add_user(f"u{i}", user_email(i))
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
