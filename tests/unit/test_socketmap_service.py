"""The socketmap service around the maps: the netstring it answers, the answers counted per map
and status (from its memo too) and the latency observed for each, and Postfix's reply limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mailcloak.config import load_config
from mailcloak.idp.static import StaticProvider
from mailcloak.metrics import Metrics
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.socketmap.maps import MAX_REPLY
from mailcloak.socketmap.server import MEMO_SIZE, SocketmapService
from mailcloak.store.model import Alias, Domain, Rows, Snapshot
from support import write_config

# A list whose answer (every target `@d1.test`, comma-separated) is over Postfix's reply limit.
MANY = tuple(f"member{i:06d}" for i in range(MAX_REPLY // 16))
SNAPSHOT = Snapshot.from_rows(Rows(
    domains=(Domain("d1.test", True, 0),),
    aliases=(Alias("alias1@d1.test", "alice", "d1.test", True, 0),
             Alias("huge@d1.test", "alice", "d1.test", True, 0, MANY)),
))


@pytest.fixture
def service(tmp_path):
    config = load_config(write_config(tmp_path))
    runtime = Runtime(config, StaticProvider(config.idp.static), SimpleNamespace(snapshot=SNAPSHOT))
    metrics = Metrics()
    return SocketmapService(RuntimeRef(runtime), metrics), metrics


def counts(metrics: Metrics) -> dict:
    return {label: n for label, n in metrics.socketmap_answers.items() if n}


def test_answers_counted_per_map_and_status_when_memoised_too(service):
    sm, metrics = service
    for _ in range(2):
        assert sm.respond(b"alias Alias1+x@D1.test") == b"18:OK alice+x@d1.test,"
        assert sm.respond(b"alias nobody@d1.test") == b"9:NOTFOUND ,"
        assert sm.respond(b"domain d1.test") == b"10:OK d1.test,"
    assert sm.respond(b"nosuchmap x@d1.test") == b"37:PERM unknown map or malformed request,"
    assert sm.respond(b"alias \xff@d1.test") == b"9:NOTFOUND ,"  # not UTF-8
    assert counts(metrics) == {("alias", "OK"): 2, ("alias", "NOTFOUND"): 3, ("domain", "OK"): 2,
                               ("nosuchmap", "PERM"): 1}
    assert sum(metrics.request_seconds.labels("socketmap").counts) == 8


def test_reply_over_postfix_limit_is_temp(service):
    sm, metrics = service
    assert sm.respond(b"alias huge@d1.test") == b"20:TEMP reply too large,"
    assert counts(metrics) == {("alias", "TEMP"): 1}


def test_memo_stays_within_its_size(service):
    sm, _ = service
    for n in range(MEMO_SIZE + 10):
        sm.respond(b"alias nobody%d@d1.test" % n)
    assert 0 < len(sm._memo) <= MEMO_SIZE
