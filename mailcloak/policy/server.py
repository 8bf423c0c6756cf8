"""The policy service on its unix socket: many requests per connection, as Postfix reuses them.

Decisions are memoised (mailcloak.memo), also those that used a remote IdP's answers: such a
decision is kept until the earliest end of freshness of those answers, as the IdP cache noted
them (mailcloak.idp.freshness), and worked out again once the provider's clock passes it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Awaitable

from mailcloak.config import SocketsConfig
from mailcloak.errors import IdPError, ProtocolError
from mailcloak.idp.base import IdentityProvider
from mailcloak.idp.freshness import Freshness, unwatch, watch
from mailcloak.memo import SnapshotMemo
from mailcloak.metrics import Metrics, action_class
from mailcloak.policy.codec import (APP_METHODS, DECIDING, MalformedRequest, PolicyRequest, RequestFramer,
                                    deciding, encode_reply, parse_request)
from mailcloak.policy.decision import INTERNAL_TEMPFAIL, MALFORMED, Decision, decide
from mailcloak.policy.facts import gather_facts
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.store.model import Snapshot

log = logging.getLogger(__name__)

DECISION_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}

# Decisions kept per snapshot and runtime (mailcloak.memo) under the request's `decision_key()`:
# facts and decision see nothing else (codec.DECIDING), so a kept decision is right for as long
# as snapshot and runtime stay in force. Rows 7/8 read an app login's client_address (its
# networks; decision_key() then holds it) and the time (its expiry: such decisions are not kept,
# `_reads_the_clock`). A decision that asked a remote IdP rests on answers with a TTL: it is kept
# with their earliest end of freshness (on the provider's clock) and only while the IdP cache
# vouched for every one of them (not stale, not failed, not cut short by the deadline).
MEMO_SIZE = 8192
FOREVER = math.inf  # the end of a kept decision that rests on no answer with a TTL
_METHOD = list(DECIDING).index("sasl_method")
_USERNAME = list(DECIDING).index("sasl_username")


def _reads_the_clock(key: tuple, snapshot: Snapshot) -> bool:
    """Whether the decision for `key` depends on the time: an app's login whose app expires
    (rows 7/8 compare the request's time with its expiry). Such a decision is not kept."""
    if key[_METHOD] not in APP_METHODS:
        return False
    app = snapshot.app(key[_USERNAME])
    return app is not None and app.expires_at is not None


class _Watched:
    """The IdP as `gather_facts` sees it, noting whether it was asked anything, and (`fresh`,
    filled by the IdP cache while the decision runs `watch`ed) until when its answers hold."""

    __slots__ = ("idp", "asked", "fresh")

    def __init__(self, idp: IdentityProvider):
        self.idp = idp
        self.asked = False
        self.fresh = Freshness()

    def expiry(self) -> float | None:
        """Until when a decision made through this IdP stays right (provider's clock): FOREVER
        when it asked nothing that can change, None when that cannot be told."""
        if not self.asked or self.idp.name == "static":  # the static provider's answers never change
            return FOREVER
        return self.fresh.expiry()

    def __getattr__(self, name: str):
        attribute = getattr(self.idp, name)
        if callable(attribute):  # a question; a plain attribute (lists_enabled) is no answer
            self.asked = True
        return attribute


class _WouldWait(Exception):
    """An IdP question cannot be answered from memory: the decision is made in a task."""


class _Settled:
    """An IdP question answered at once, as an awaitable that gives that answer (or raises its
    IdPError), also when run by hand (`send`), as `facts._at_once` does."""

    __slots__ = ("value", "error")

    def __init__(self, value=None, error: IdPError | None = None):
        self.value, self.error = value, error

    def send(self, _):
        if self.error is not None:
            raise self.error
        raise StopIteration(self.value)

    def __await__(self):
        if self.error is not None:
            raise self.error
        return self.value
        yield  # a generator that never waits


class _AtOnce(_Watched):
    """The IdP for a decision tried outside a task, in `data_received`: a question is run up to
    its first wait when it is asked. Answered from memory (a warm cache, the static provider), it
    is handed back answered; if it would wait, the attempt stops (`_WouldWait`) and the decision
    is made again in a task, where the question, still in flight in the IdP cache (its fetch is a
    task of its own), is awaited under the request's deadline."""

    __slots__ = ()

    def __getattr__(self, name: str):
        method = getattr(self.idp, name)
        if not callable(method):
            return method
        self.asked = True

        def at_once(*args):
            query = method(*args)
            try:
                waiting_on = query.send(None)
            except StopIteration as done:
                return _Settled(done.value)
            except IdPError as exc:
                return _Settled(error=exc)
            # Let go of the question and of the future it waits on (the IdP cache's shielded
            # fetch goes on; cancelled, the future does not log an exception nobody retrieved).
            query.close()
            if isinstance(waiting_on, asyncio.Future):
                waiting_on.cancel()
            raise _WouldWait
        return at_once


class PolicyService:
    """Answers framed requests (mailcloak.unixserver): from the memo, or worked out at once when
    the snapshot and the IdP's memory answer it, or in a task when the IdP must be asked."""

    name = "policy"

    def __init__(self, ref: RuntimeRef, metrics: Metrics):
        self._ref = ref
        self._metrics = metrics
        self._decisions = metrics.policy_decisions
        self._latency = metrics.request_seconds.labels("policy")
        self._memo = SnapshotMemo(MEMO_SIZE)

    @property
    def sockets(self) -> SocketsConfig:
        return self._ref.current.config.sockets

    @staticmethod
    def framer() -> RequestFramer:
        return RequestFramer()

    def protocol_error(self, exc: ProtocolError) -> None:
        log.warning("policy: closing connection: %s", exc)
        self._metrics.protocol_errors["policy"] += 1

    def expired(self, mid_request: bool) -> None:
        if mid_request:
            self.protocol_error(ProtocolError("request not completed in time"))
        else:
            log.warning("policy: closing connection: idle timeout")

    async def evaluate(self, request: PolicyRequest) -> Decision:
        """Facts, then the pure decision. Always returns within the configured deadline."""
        runtime = self._ref.current
        return await self._evaluate(deciding(request.decision_key()), runtime, runtime.state.snapshot,
                                    runtime.idp)

    @staticmethod
    async def _evaluate(request: PolicyRequest, runtime: Runtime, snapshot: Snapshot | None,
                        idp) -> Decision:
        if snapshot is None:
            return Decision(INTERNAL_TEMPFAIL, "database state unavailable")
        policy = runtime.config.policy
        deadline = asyncio.get_running_loop().time() + policy.request_deadline_seconds
        facts = await gather_facts(request, snapshot, idp, policy.recipient_delimiter, deadline)
        return decide(request, facts, runtime.failure_action)

    def respond(self, lines: list[bytes]) -> bytes | Awaitable[bytes]:
        """The reply to one request's lines; an awaitable when a remote IdP is asked."""
        started = asyncio.get_running_loop().time()
        request = parse_request(lines)
        if isinstance(request, MalformedRequest):
            log.warning("policy: malformed request (%s); answering DEFER_IF_PERMIT", request.reason)
            self._metrics.protocol_errors["policy"] += 1
            return encode_reply(MALFORMED)
        runtime = self._ref.current
        snapshot = runtime.state.snapshot
        key = request.decision_key()
        kept_entries = self._memo.entries_for(runtime, snapshot)
        kept = kept_entries.get(key)
        if kept is not None:
            if kept[3] == FOREVER or runtime.idp.clock() < kept[3]:
                return self._reply(kept, request, started)
            del kept_entries[key]  # an IdP answer it rested on is no longer fresh
        idp = _AtOnce(runtime.idp)
        evaluation = self._evaluate(deciding(key), runtime, snapshot, idp)
        watching = watch(idp.fresh)
        try:
            evaluation.send(None)
        except StopIteration as done:  # no task, no timer
            return self._reply(self._keep(runtime, snapshot, key, done.value, idp), request, started)
        except _WouldWait:
            pass
        else:  # it waits on something other than an IdP question (none does today)
            evaluation.close()
        finally:
            unwatch(watching)
        idp = _Watched(runtime.idp)
        evaluation = self._evaluate(deciding(key), runtime, snapshot, idp)
        return self._answer_later(evaluation, runtime, snapshot, key, idp, request, started)

    async def _answer_later(self, evaluation, runtime: Runtime, snapshot: Snapshot | None, key: tuple,
                            idp: _Watched, request: PolicyRequest, started: float) -> bytes:
        watching = watch(idp.fresh)
        try:
            decision = await evaluation
        finally:
            unwatch(watching)
        return self._reply(self._keep(runtime, snapshot, key, decision, idp), request, started)

    def _keep(self, runtime: Runtime, snapshot: Snapshot | None, key: tuple, decision: Decision,
              idp: _Watched) -> tuple:
        """The memo entry for `decision` (reply, metrics label (class, rule), action, end), kept
        until its end unless that cannot be told (an IdP answer stale, failed or cut short), the
        snapshot is missing or the decision reads the clock. Strings, bytes and a float only: the
        garbage collector stops tracking such a tuple, so the thousands kept are not walked by
        its collections (a Decision in it kept it tracked, and more full collections came)."""
        until = idp.expiry()
        action = decision.action
        entry = (encode_reply(action), (action_class(action), decision.rule), action, until)
        if until is not None and snapshot is not None and not _reads_the_clock(key, snapshot):
            self._memo.keep(runtime, snapshot, key, entry)
        return entry

    def _reply(self, entry: tuple, request: PolicyRequest, started: float) -> bytes:
        reply, label, action, _until = entry
        self._decisions[label] += 1
        self._log_decision(request, action, label[1])
        self._latency.observe(asyncio.get_running_loop().time() - started)
        return reply

    def _log_decision(self, request: PolicyRequest, action: str, rule: str) -> None:
        """One line per decision, with what an administrator searches for; never a secret."""
        level = DECISION_LEVELS[self._ref.current.config.daemon.decision_log_level]
        if not log.isEnabledFor(level):
            return
        log.log(level, "policy decision", extra={"fields": {
            "queue_id": request.get("queue_id"), "client": request.get("client_address"),
            "sasl_method": request.get("sasl_method"), "sasl_username": request.sasl_username,
            "sender": request.sender, "recipient": request.recipient,
            "state": request.protocol_state, "action": action, "rule": rule,
        }})
