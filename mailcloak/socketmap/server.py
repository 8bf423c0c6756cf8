"""The socketmap service on its unix socket: one connection carries many netstring requests."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable

from mailcloak.config import SocketsConfig
from mailcloak.errors import ProtocolError
from mailcloak.memo import SnapshotMemo
from mailcloak.metrics import Metrics
from mailcloak.runtime import RuntimeRef
from mailcloak.socketmap.maps import MAX_KEY, MAX_REPLY, Reply, lookup
from mailcloak.socketmap.netstring import NetstringDecoder, encode

log = logging.getLogger(__name__)

MAX_REQUEST = MAX_KEY + 256  # map name, space and key
# Framed answers kept for the snapshot and runtime in force (mailcloak.memo): Postfix asks for each
# address several times per message (smtpd, cleanup, then the answer again). The key is the whole
# request, map name included; requests longer than MEMO_KEY_MAX are not kept.
MEMO_SIZE = 4096
MEMO_KEY_MAX = 512


class SocketmapService:
    """Answers netstring requests framed by mailcloak.unixserver. A map answers with a Reply, or
    with an awaitable of one when it must ask the IdP: that answer is awaited in a task and never
    memoised (its lifetime is the IdP cache's to decide)."""

    name = "socketmap"

    def __init__(self, ref: RuntimeRef, metrics: Metrics):
        self._ref = ref
        self._answers = metrics.socketmap_answers
        self._errors = metrics.protocol_errors
        self._latency = metrics.request_seconds.labels("socketmap")
        self._memo = SnapshotMemo(MEMO_SIZE)

    @property
    def sockets(self) -> SocketsConfig:
        return self._ref.current.config.sockets

    @staticmethod
    def framer() -> NetstringDecoder:
        return NetstringDecoder(MAX_REQUEST)

    def protocol_error(self, exc: ProtocolError) -> None:
        log.warning("socketmap: closing connection: %s", exc)
        self._errors["socketmap"] += 1

    @staticmethod
    def expired(mid_request: bool) -> None:
        log.debug("socketmap: closing idle or stalled connection")

    def respond(self, request: bytes) -> bytes | Awaitable[bytes]:
        """The netstring that answers `request`. An answer given at once is a function of the
        request, the snapshot and the config alone, so it is kept (see MEMO_SIZE) while both
        stay in force."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        memo = self._memo.entries_for(runtime, snapshot).get(request)
        if memo is None:
            reply = self.answer(request)
            if type(reply) is not Reply:
                return self._answer_later(request, reply, started)
            memo = self._framed(request, reply)
            if snapshot is not None and len(request) <= MEMO_KEY_MAX:
                self._memo.keep(runtime, snapshot, request, memo)
        self._answers[memo[1]] += 1
        self._latency.observe(loop.time() - started)
        return memo[0]

    async def _answer_later(self, request: bytes, pending: Awaitable[Reply], started: float) -> bytes:
        framed, label = self._framed(request, await pending)
        self._answers[label] += 1
        self._latency.observe(asyncio.get_running_loop().time() - started)
        return framed

    @staticmethod
    def _framed(request: bytes, reply: Reply) -> tuple[bytes, tuple[str, str]]:
        """The netstring and its (map, status) metrics label, which travels with a memoised answer."""
        payload = reply.encode()
        status = reply.status
        if len(payload) > MAX_REPLY:
            payload, status = b"TEMP reply too large", "TEMP"
        return encode(payload), (request[:request.find(b" ")].decode("ascii", "replace")[:32], status)

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
