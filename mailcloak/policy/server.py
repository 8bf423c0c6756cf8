"""The policy service on its unix socket: many requests per connection, as Postfix reuses them."""

from __future__ import annotations

import asyncio
import logging
import re

from mailcloak.errors import ProtocolError
from mailcloak.idp.base import IdentityProvider
from mailcloak.memo import SnapshotMemo
from mailcloak.metrics import Metrics, action_class
from mailcloak.policy.codec import MalformedRequest, PolicyRequest, encode_reply, parse_request, read_request_lines
from mailcloak.policy.decision import INTERNAL_TEMPFAIL, MALFORMED, Decision, decide
from mailcloak.policy.facts import gather_facts
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.store.model import Snapshot
from mailcloak.unixserver import Connection, ReadDeadline

log = logging.getLogger(__name__)

DECISION_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}

# Decisions kept per snapshot and runtime (mailcloak.memo), and for at most MEMO_SECONDS, so that
# a rule that came to depend on the clock could never be answered from the memo for long.
MEMO_SIZE = 8192
MEMO_SECONDS = 1.0
# Attributes that change with every message or connection and that no rule of SPEC §6 reads: a
# request is memoised under its lines without them. A rule that reads one of them must take it
# out of this list. Only a printable-ASCII value is left out, so a line that would make the request
# malformed (NUL, invalid UTF-8) stays in the key, and the request is parsed (and refused) itself.
_PER_MESSAGE = re.compile(
    rb"\n(?:instance|queue_id|client_port|size|recipient_count)=[\x20-\x7e]*(?=\n|\Z)")


def memo_key(lines: list[bytes]) -> bytes:
    """The request without its per-message attributes: two requests with one key get one decision."""
    return _PER_MESSAGE.sub(b"", b"\n".join(lines))


class _Watched:
    """The IdP as `gather_facts` sees it, noting whether it was asked anything: a decision that
    used a remote IdP's answer must not outlive that answer's TTL, so it is not memoised."""

    __slots__ = ("idp", "asked")

    def __init__(self, idp: IdentityProvider):
        self.idp = idp
        self.asked = False

    def __getattr__(self, name: str):
        self.asked = True
        return getattr(self.idp, name)


class PolicyService:
    def __init__(self, ref: RuntimeRef, metrics: Metrics):
        self._ref = ref
        self._metrics = metrics
        self._decisions = metrics.policy_decisions
        self._latency = metrics.request_seconds.labels("policy")
        self._memo = SnapshotMemo(MEMO_SIZE, MEMO_SECONDS)

    async def evaluate(self, request: PolicyRequest) -> Decision:
        """Facts, then the pure decision. Always returns within the configured deadline."""
        runtime = self._ref.current
        return await self._evaluate(request, runtime, runtime.state.snapshot, runtime.idp)

    @staticmethod
    async def _evaluate(request: PolicyRequest, runtime: Runtime, snapshot: Snapshot | None,
                        idp) -> Decision:
        if snapshot is None:
            return Decision(INTERNAL_TEMPFAIL, "database state unavailable")
        policy = runtime.config.policy
        deadline = asyncio.get_running_loop().time() + policy.request_deadline_seconds
        facts = await gather_facts(request, snapshot, idp, policy.recipient_delimiter, deadline)
        return decide(request, facts, runtime.failure_action)

    async def answer_lines(self, lines: list[bytes], now: float) -> tuple:
        """(reply, metrics label, decision, parsed request) for one request's lines; the decision
        is None for a malformed request, the parsed request None for an answer from the memo."""
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        memo = self._memo
        key = memo_key(lines)
        kept = memo.entries_for(runtime, snapshot, now).get(key)
        if kept is not None:
            return kept + (None,)
        parsed = parse_request(lines)
        if isinstance(parsed, MalformedRequest):
            log.warning("policy: malformed request (%s); answering DEFER_IF_PERMIT", parsed.reason)
            self._metrics.protocol_errors["policy"] += 1
            return encode_reply(MALFORMED), None, None, None
        idp = _Watched(runtime.idp)
        decision = await self._evaluate(parsed, runtime, snapshot, idp)
        answer = (encode_reply(decision.action), (action_class(decision.action), decision.rule), decision)
        if snapshot is not None and (not idp.asked or runtime.idp.name == "static"):
            memo.keep(runtime, snapshot, key, answer)  # the static provider's answers never change
        return answer + (parsed,)

    def _log_decision(self, lines: list[bytes], request: PolicyRequest | None, decision: Decision) -> None:
        """One line per decision, with what an administrator searches for; never a secret."""
        level = DECISION_LEVELS[self._ref.current.config.daemon.decision_log_level]
        if not log.isEnabledFor(level):
            return
        if request is None:  # answered from the memo: its per-message attributes are wanted here
            request = parse_request(lines)
        log.log(level, "policy decision", extra={"fields": {
            "queue_id": request.get("queue_id"), "client": request.get("client_address"),
            "sasl_method": request.get("sasl_method"), "sasl_username": request.sasl_username,
            "sender": request.sender, "recipient": request.recipient,
            "state": request.protocol_state, "action": decision.action, "rule": decision.rule,
        }})

    @staticmethod
    def _idle_timeout(conn: Connection) -> None:
        log.warning("policy: closing connection: idle timeout")
        conn.close_now()

    async def handle(self, conn: Connection) -> None:
        sockets = self._ref.current.config.sockets
        loop = asyncio.get_running_loop()
        # The wait for a request to start is bounded here, with one timer per connection.
        idle = ReadDeadline(loop, lambda: self._idle_timeout(conn))
        try:
            await self._serve(conn, sockets, loop, idle)
        finally:
            idle.stop()

    async def _serve(self, conn: Connection, sockets, loop, idle: ReadDeadline) -> None:
        while not conn.closing:
            idle.reading_until(loop.time() + sockets.idle_timeout_seconds)
            try:
                lines = await read_request_lines(conn.reader, None, sockets.request_timeout_seconds,
                                                 idle.done)
            except ProtocolError as exc:
                if not idle.expired:  # after an idle timeout the read only sees the close
                    log.warning("policy: closing connection: %s", exc)
                    self._metrics.protocol_errors["policy"] += 1
                return
            idle.done()
            if lines is None:
                return
            conn.busy = True
            started = loop.time()
            try:
                reply, label, decision, parsed = await self.answer_lines(lines, started)
                if decision is not None:
                    self._decisions[label] += 1
                    self._log_decision(lines, parsed, decision)
                conn.writer.write(reply)
                self._latency.observe(loop.time() - started)
                await conn.drain(sockets.request_timeout_seconds)
            finally:
                conn.busy = False
