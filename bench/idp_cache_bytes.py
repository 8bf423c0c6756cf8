"""Bytes per cached IdP answer, measured in-process (the scale target's 100 000 cached answers).

    PYTHONPATH=<package root> python bench/idp_cache_bytes.py [N] [--rss]

N users (default 100 000) are looked up once by address through `KeycloakProvider` as the policy
asks (its parsing, its `IdPUser`, its `LookupCache`), the HTTP exchange answered in-process with
the Keycloak stand-in's own user representation (tests/standins/keycloak.py), so that the
measure is the cache and not a socket. Prints the memory kept per cached answer: by tracemalloc
(with the lines that hold it), or with `--rss` the growth of the process's RSS (no tracemalloc
overhead). PYTHONPATH chooses which copy of the package is measured (before/after a change).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from mailcloak.config import KeycloakConfig  # noqa: E402
from mailcloak.idp.keycloak import KeycloakProvider  # noqa: E402
from standins.keycloak import User  # noqa: E402
from workload import user_email  # noqa: E402

TOKEN = json.dumps({"access_token": "t", "expires_in": 3600}).encode()


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def provider() -> KeycloakProvider:
    """A provider whose HTTP requests the stand-in's representation answers, in-process."""
    idp = KeycloakProvider(KeycloakConfig(base_url="http://127.0.0.1:1", realm="mail", client_id="c",
                                          client_secret="s", cache_ttl_seconds=3600))

    async def request(label, method, url, *, params=None, data=None, headers=None):
        if label == "token":
            return 200, TOKEN
        email = params["email"]
        user = User(email.split("@")[0], email)
        return 200, json.dumps([user.representation(brief=False)]).encode()

    idp._http.request = request
    return idp


async def fill(idp: KeycloakProvider, addresses: list[str]) -> None:
    for address in addresses:
        if await idp.user_by_address(address) is None:
            raise RuntimeError(f"{address}: no user")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=100_000)
    parser.add_argument("--rss", action="store_true", help="RSS growth instead of tracemalloc")
    args = parser.parse_args()
    addresses = [user_email(i) for i in range(args.n)]
    idp = provider()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(fill(idp, addresses[:10]))  # token, imports and first allocations
    gc.collect()
    if args.rss:
        before = rss_kb()
    else:
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
    loop.run_until_complete(fill(idp, addresses[10:]))
    gc.collect()
    cached = len(idp.cache)
    if args.rss:
        grown = (rss_kb() - before) * 1024
        print(f"{cached} cached answers: RSS grew {grown / 2**20:.1f} MiB, "
              f"{grown / (args.n - 10):.0f} bytes per cached answer")
    else:
        after = tracemalloc.take_snapshot()
        stats = after.compare_to(before, "lineno")
        grown = sum(s.size_diff for s in stats)
        print(f"{cached} cached answers: {grown / 2**20:.1f} MiB kept, "
              f"{grown / (args.n - 10):.0f} bytes per cached answer (tracemalloc)")
        for stat in stats[:8]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / (args.n - 10):6.0f} B/answer  {frame.filename}:{frame.lineno}")
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
