"""The floor: the least a plain Python asyncio server does per request, for comparison.

Policy: read one request (lines up to the empty line), parse its attributes into a dict, answer
`action=DUNNO`. Socketmap: read one netstring, decode it, answer `NOTFOUND `. Written the way one
would write it with asyncio streams and nothing else: no bounds, no timeouts, no state.

    python bench/floor.py POLICY_SOCKET SOCKETMAP_SOCKET [--uvloop]
"""

from __future__ import annotations

import asyncio
import os
import sys

DUNNO = b"action=DUNNO\n\n"


async def policy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                block = await reader.readuntil(b"\n\n")
            except asyncio.IncompleteReadError:
                return
            attributes = {}
            for line in block[:-2].split(b"\n"):
                name, _, value = line.partition(b"=")
                attributes[name.decode()] = value.decode()
            writer.write(DUNNO)
            await writer.drain()
    finally:
        writer.close()


async def socketmap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                length = int((await reader.readuntil(b":"))[:-1])
                payload = await reader.readexactly(length + 1)
            except asyncio.IncompleteReadError:
                return
            _name, _, _key = payload[:-1].decode().partition(" ")
            writer.write(b"9:NOTFOUND ,")
            await writer.drain()
    finally:
        writer.close()


async def main(policy_path: str, socketmap_path: str) -> None:
    for path in (policy_path, socketmap_path):
        if os.path.exists(path):
            os.unlink(path)
    s1 = await asyncio.start_unix_server(policy, policy_path)
    s2 = await asyncio.start_unix_server(socketmap, socketmap_path)
    print("floor ready", file=sys.stderr, flush=True)
    async with s1, s2:
        await asyncio.gather(s1.serve_forever(), s2.serve_forever())


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        sys.argv.remove("--uvloop")
        import uvloop

        uvloop.install()
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    except KeyboardInterrupt:
        pass
