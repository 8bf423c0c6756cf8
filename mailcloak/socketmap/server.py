"""The socketmap service on its unix socket: one connection carries many netstring requests."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Awaitable

from mailcloak.errors import ProtocolError
from mailcloak.metrics import Metrics
from mailcloak.runtime import RuntimeRef
from mailcloak.socketmap.maps import MAX_KEY, MAX_REPLY, Reply, lookup
from mailcloak.socketmap.netstring import NetstringDecoder, encode
from mailcloak.unixserver import Connection, ReadDeadline

log = logging.getLogger(__name__)

MAX_REQUEST = MAX_KEY + 256  # map name, space and key
READ_SIZE = 16 * 1024
# Framed answers kept for the snapshot and config in force: Postfix asks for each address several
# times per message (smtpd, cleanup, then the answer again). Emptied when full or when either
# changes; requests longer than MEMO_KEY_MAX are not kept.
MEMO_SIZE = 4096
MEMO_KEY_MAX = 512


def _dead() -> None:
    return None


def _framed(request: bytes, reply: Reply) -> tuple[bytes, tuple[str, str]]:
    """The netstring of `reply`, and its (map, status) label for the answer counter (it travels
    with a memoized answer, so that a memo hit is counted too)."""
    payload = reply.encode()
    if len(payload) > MAX_REPLY:
        payload = b"TEMP reply too large"
    label = (request.partition(b" ")[0].decode("ascii", "replace")[:32],
             payload.split(b" ", 1)[0].decode("ascii"))
    return encode(payload), label


class SocketmapService:
    def __init__(self, ref: RuntimeRef, metrics: Metrics):
        self._ref = ref
        self._answers = metrics.socketmap_answers
        self._errors = metrics.protocol_errors
        self._latency = metrics.request_seconds.labels("socketmap")
        self._memo: dict[bytes, tuple[bytes, tuple[str, str]]] = {}
        # What the memo was made for, weakly: an old snapshot must not be kept alive by it.
        self._memo_snapshot = self._memo_runtime = _dead

    def framed_answer(self, request: bytes) -> bytes | Awaitable[bytes]:
        """The netstring that answers `request`. An answer made without the IdP is a function of
        the request, the snapshot and the config alone, so it is kept (see MEMO_SIZE) while both
        stay in force; one that needs the IdP comes as an awaitable, and is not kept."""
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        if self._memo_snapshot() is not snapshot or self._memo_runtime() is not runtime:
            self._memo = {}
            self._memo_snapshot = weakref.ref(snapshot) if snapshot is not None else _dead
            self._memo_runtime = weakref.ref(runtime)
        memo = self._memo.get(request)
        if memo is None:
            reply = self.answer(request)
            if type(reply) is not Reply:
                return self._framed_later(request, reply)
            memo = _framed(request, reply)
            if snapshot is not None and len(request) <= MEMO_KEY_MAX:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[request] = memo
        self._answers[memo[1]] += 1
        return memo[0]

    async def _framed_later(self, request: bytes, reply: Awaitable[Reply]) -> bytes:
        framed, label = _framed(request, await reply)
        self._answers[label] += 1
        return framed

    def answer(self, request: bytes) -> Reply | Awaitable[Reply]:
        name, sep, key_bytes = request.partition(b" ")
        if not sep:
            return Reply("PERM", "unknown map or malformed request")
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        if snapshot is None:
            return Reply("TEMP", "database state unavailable")
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return Reply("NOTFOUND")
        policy = runtime.config.policy
        return lookup(name.decode("ascii", "replace"), key, snapshot, runtime.idp,
                      policy.recipient_delimiter, policy.request_deadline_seconds)

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
                    framed = list(map(self.framed_answer, requests))
                    for i, answer in enumerate(framed):
                        if type(answer) is not bytes:  # asks the IdP: answers keep their order
                            framed[i] = await answer
                    conn.writer.write(framed[0] if len(framed) == 1 else b"".join(framed))
                    self._latency.observe((loop.time() - answered_from) / len(requests))
                    await conn.drain(sockets.request_timeout_seconds)
                finally:
                    conn.busy = False
        finally:
            watchdog.stop()
