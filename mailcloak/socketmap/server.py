"""The socketmap service on its unix socket: one connection carries many netstring requests."""

from __future__ import annotations

import asyncio
import logging

from mailcloak.errors import ProtocolError
from mailcloak.runtime import RuntimeRef
from mailcloak.socketmap.maps import MAPS, MAX_KEY, MAX_REPLY, Reply
from mailcloak.socketmap.netstring import NetstringDecoder, encode
from mailcloak.unixserver import Connection

log = logging.getLogger(__name__)

MAX_REQUEST = MAX_KEY + 256  # map name, space and key
READ_SIZE = 16 * 1024


class SocketmapService:
    def __init__(self, ref: RuntimeRef):
        self._ref = ref

    def answer(self, request: bytes) -> Reply:
        name, sep, key_bytes = request.partition(b" ")
        lookup = MAPS.get(name.decode("ascii", "replace"))
        if not sep or lookup is None:
            return Reply("PERM", "unknown map or malformed request")
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        if snapshot is None:
            return Reply("TEMP", "database state unavailable")
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return Reply("NOTFOUND")
        return lookup(key, snapshot, runtime.config.policy.recipient_delimiter)

    async def handle(self, conn: Connection) -> None:
        sockets = self._ref.current.config.sockets
        decoder = NetstringDecoder(MAX_REQUEST)
        loop = asyncio.get_running_loop()
        started = 0.0  # when the request now arriving began; bounds a byte-a-second client
        while not conn.closing:
            if decoder.pending:
                deadline = started + sockets.request_timeout_seconds
            else:
                deadline = loop.time() + sockets.idle_timeout_seconds
            try:
                async with asyncio.timeout_at(deadline):
                    data = await conn.reader.read(READ_SIZE)
            except TimeoutError:
                log.debug("socketmap: closing idle or stalled connection")
                return
            if not data:
                return
            if not decoder.pending:
                started = loop.time()
            try:
                requests = decoder.feed(data)
            except ProtocolError as exc:
                log.warning("socketmap: closing connection: %s", exc)
                return
            if not requests:
                continue
            conn.busy = True
            try:
                out = []
                for request in requests:
                    payload = self.answer(request).encode()
                    if len(payload) > MAX_REPLY:
                        payload = b"TEMP reply too large"
                    out.append(encode(payload))
                conn.writer.write(b"".join(out))
                await conn.writer.drain()
            finally:
                conn.busy = False
