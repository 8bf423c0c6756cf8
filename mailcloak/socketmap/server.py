"""The socketmap service on its unix socket: one connection carries many netstring requests."""

from __future__ import annotations

import logging
from time import monotonic
from typing import Awaitable

from mailcloak.config import SocketsConfig
from mailcloak.errors import ProtocolError
from mailcloak.memo import SnapshotMemo
from mailcloak.metrics import Metrics
from mailcloak.runtime import RuntimeRef
from mailcloak.socketmap.maps import MAPS, MAX_KEY, MAX_REPLY, NOTFOUND, STATUSES, Reply, lookup
from mailcloak.socketmap.netstring import NetstringDecoder, encode

log = logging.getLogger(__name__)

MAX_REQUEST = MAX_KEY + 256  # map name, space and key
# Framed answers kept for the snapshot and runtime in force (mailcloak.memo): Postfix asks for each
# address several times per message (smtpd, cleanup, then the answer again). The key is the whole
# request, map name included; requests longer than MEMO_KEY_MAX are not kept.
MEMO_SIZE = 4096
MEMO_KEY_MAX = 512
_NOTFOUND_FRAMED = encode(NOTFOUND.encode())


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
        # The counter cell of each map and status there is, found by the map's name as it comes
        # on the wire; and NOTFOUND, every map's most common answer, framed once with its cell.
        self._cells = {(name.encode(), status): self._answers.cell((name, status))
                       for name in MAPS for status in STATUSES}
        self._notfound = {name: (_NOTFOUND_FRAMED, cell)
                          for (name, status), cell in self._cells.items() if status == NOTFOUND.status}

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
        stay in force, with the counter cell it counts in."""
        started = monotonic()
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        entries = self._memo.entries_for(runtime, snapshot)
        known = entries.get(request)
        if known is None:
            reply = self.answer(request)
            if type(reply) is not Reply:
                return self._answer_later(request, reply, started)
            known = self._framed(request, reply)
            if snapshot is not None and len(request) <= MEMO_KEY_MAX:
                entries[request] = known
        known[1][0] += 1
        self._latency.observe(monotonic() - started)
        return known[0]

    async def _answer_later(self, request: bytes, pending: Awaitable[Reply], started: float) -> bytes:
        framed, cell = self._framed(request, await pending)
        cell[0] += 1
        self._latency.observe(monotonic() - started)
        return framed

    def _framed(self, request: bytes, reply: Reply) -> tuple[bytes, list[int]]:
        """The netstring and the counter cell of its (map, status) label."""
        name = request.partition(b" ")[0]
        if reply is NOTFOUND:
            framed = self._notfound.get(name)
            if framed is not None:
                return framed
        payload = reply.encode()
        status = reply.status
        if len(payload) > MAX_REPLY:
            payload, status = b"TEMP reply too large", "TEMP"
        cell = self._cells.get((name, status))
        if cell is None:  # a map that does not exist
            cell = self._answers.cell((name.decode("ascii", "replace")[:32], status))
        return encode(payload), cell

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
            return NOTFOUND
        policy = runtime.config.policy
        return lookup(name.decode("ascii", "replace"), key, snapshot, runtime.idp,
                      policy.recipient_delimiter, policy.request_deadline_seconds)
