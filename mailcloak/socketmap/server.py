"""The socketmap service on its unix socket: one connection carries many netstring requests."""

from __future__ import annotations

import asyncio
import logging

from mailcloak.errors import ProtocolError
from mailcloak.memo import SnapshotMemo
from mailcloak.metrics import Metrics
from mailcloak.runtime import RuntimeRef
from mailcloak.socketmap.maps import MAPS, MAX_KEY, MAX_REPLY, Reply
from mailcloak.socketmap.netstring import NetstringDecoder, encode
from mailcloak.unixserver import Connection, ReadDeadline

log = logging.getLogger(__name__)

MAX_REQUEST = MAX_KEY + 256  # map name, space and key
READ_SIZE = 16 * 1024
# Framed answers kept for the snapshot and runtime in force (mailcloak.memo): Postfix asks for each
# address several times per message (smtpd, cleanup, then the answer again). The key is the whole
# request, map name included; requests longer than MEMO_KEY_MAX are not kept.
MEMO_SIZE = 4096
MEMO_KEY_MAX = 512


class SocketmapService:
    def __init__(self, ref: RuntimeRef, metrics: Metrics):
        self._ref = ref
        self._answers = metrics.socketmap_answers
        self._errors = metrics.protocol_errors
        self._latency = metrics.request_seconds.labels("socketmap")
        self._memo = SnapshotMemo(MEMO_SIZE)

    def framed_answer(self, request: bytes) -> bytes:
        """The netstring that answers `request`. An answer is a function of the request, the
        snapshot and the config alone, so it is kept (see MEMO_SIZE) while both stay in force."""
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        memo = self._memo.entries_for(runtime, snapshot).get(request)
        if memo is None:
            reply = self.answer(request)
            payload = reply.encode()
            if len(payload) > MAX_REPLY:
                payload = b"TEMP reply too large"
            # The (map, status) label travels with the answer, so a memo hit is counted too.
            label = (request.partition(b" ")[0].decode("ascii", "replace")[:32],
                     payload.split(b" ", 1)[0].decode("ascii"))
            memo = (encode(payload), label)
            if snapshot is not None and len(request) <= MEMO_KEY_MAX:
                self._memo.keep(runtime, snapshot, request, memo)
        self._answers[memo[1]] += 1
        return memo[0]

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

    @staticmethod
    def _expire(conn: Connection) -> None:
        log.debug("socketmap: closing idle or stalled connection")
        conn.close_now()

    async def handle(self, conn: Connection) -> None:
        sockets = self._ref.current.config.sockets
        decoder = NetstringDecoder(MAX_REQUEST)
        loop = asyncio.get_running_loop()
        watchdog = ReadDeadline(loop, lambda: self._expire(conn))
        started = 0.0  # when the request now arriving began; bounds a byte-a-second client
        try:
            while not conn.closing:
                if decoder.pending:
                    watchdog.reading_until(started + sockets.request_timeout_seconds)
                else:
                    watchdog.reading_until(loop.time() + sockets.idle_timeout_seconds)
                data = await conn.reader.read(READ_SIZE)
                watchdog.done()
                if not data:
                    return
                if not decoder.pending:
                    started = loop.time()
                try:
                    requests = decoder.feed(data)
                except ProtocolError as exc:
                    log.warning("socketmap: closing connection: %s", exc)
                    self._errors["socketmap"] += 1
                    return
                if not requests:
                    continue
                conn.busy = True
                answered_from = loop.time()
                try:
                    if len(requests) == 1:
                        conn.writer.write(self.framed_answer(requests[0]))
                    else:
                        conn.writer.write(b"".join(map(self.framed_answer, requests)))
                    self._latency.observe((loop.time() - answered_from) / len(requests))
                    await conn.drain(sockets.request_timeout_seconds)
                finally:
                    conn.busy = False
        finally:
            watchdog.stop()
