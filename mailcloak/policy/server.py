"""The policy service on its unix socket: many requests per connection, as Postfix reuses them."""

from __future__ import annotations

import asyncio
import logging

from mailcloak.errors import ProtocolError
from mailcloak.metrics import Metrics
from mailcloak.policy.codec import MalformedRequest, PolicyRequest, encode_reply, parse_request, read_request_lines
from mailcloak.policy.decision import INTERNAL_TEMPFAIL, MALFORMED, Decision, decide
from mailcloak.policy.facts import gather_facts
from mailcloak.runtime import RuntimeRef
from mailcloak.unixserver import Connection, ReadDeadline

log = logging.getLogger(__name__)

DECISION_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


class PolicyService:
    def __init__(self, ref: RuntimeRef, metrics: Metrics):
        self._ref = ref
        self._metrics = metrics
        self._latency = metrics.request_seconds.labels("policy")

    async def evaluate(self, request: PolicyRequest) -> Decision:
        """Facts, then the pure decision. Always returns within the configured deadline."""
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        if snapshot is None:
            return Decision(INTERNAL_TEMPFAIL, "database state unavailable")
        policy = runtime.config.policy
        deadline = asyncio.get_running_loop().time() + policy.request_deadline_seconds
        facts = await gather_facts(request, snapshot, runtime.idp, policy.recipient_delimiter, deadline)
        return decide(request, facts, runtime.failure_action)

    def _log_decision(self, request: PolicyRequest, decision: Decision) -> None:
        """One line per decision, with what an administrator searches for; never a secret."""
        level = DECISION_LEVELS[self._ref.current.config.daemon.decision_log_level]
        if not log.isEnabledFor(level):
            return
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
                parsed = parse_request(lines)
                if isinstance(parsed, MalformedRequest):
                    log.warning("policy: malformed request (%s); answering DEFER_IF_PERMIT", parsed.reason)
                    self._metrics.protocol_errors["policy"] += 1
                    action = MALFORMED
                else:
                    decision = await self.evaluate(parsed)
                    action = decision.action
                    self._metrics.decision(action, decision.rule)
                    self._log_decision(parsed, decision)
                conn.writer.write(encode_reply(action))
                self._latency.observe(loop.time() - started)
                await conn.drain(sockets.request_timeout_seconds)
            finally:
                conn.busy = False
