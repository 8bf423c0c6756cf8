"""`make run`: a demo database beside the checkout, then the daemon in the foreground."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mailcloak.config import load_config
from mailcloak.daemon import main as daemon_main
from mailcloak.store import open_store

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

HOW_TO_TRY = """\
mailcloak demo: users alice, bob (carol is disabled); domain demo.test; alias info@demo.test -> alice;
list team@demo.test -> alice, bob; app 'mailer' may send as info@demo.test.
Try it from another shell in this folder:
  printf 'request=smtpd_access_policy\\nprotocol_state=RCPT\\nsender=x@outside.example\\nrecipient=nobody@demo.test\\n\\n' | python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect("{policy}"); s.sendall(sys.stdin.buffer.read()); print(s.recv(4096).decode())'
  postmap -q info@demo.test socketmap:unix:{socketmap}:alias      (with Postfix installed)
  postmap -q team@demo.test socketmap:unix:{socketmap}:alias
  postmap -q team@demo.test socketmap:unix:{socketmap}:sender_login
Stop with Ctrl-C.
"""


async def _prepare(config) -> None:
    store = await open_store(config, create=True)
    try:
        await store.add_domain("demo.test")
        await store.add_alias("info@demo.test", "alice")
        await store.set_alias_targets("team@demo.test", ("alice", "bob"))
        rows = await store.load()
        if not any(app.app_id == "mailer" for app in rows.apps):
            from mailcloak.passwords import hash_secret

            await store.add_app("mailer", hash_secret("demo-app-password"))
            await store.allow_sender("mailer", "info@demo.test")
    finally:
        await store.close()


def main() -> int:
    os.makedirs("run", exist_ok=True)
    config = load_config(DEMO_CONFIG)
    asyncio.run(_prepare(config))
    print(HOW_TO_TRY.format(policy=os.path.abspath(config.sockets.policy_socket),
                            socketmap=os.path.abspath(config.sockets.socketmap_socket)), flush=True)
    return daemon_main(["--config", str(DEMO_CONFIG)])


if __name__ == "__main__":
    sys.exit(main())
