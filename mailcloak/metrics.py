"""Prometheus metrics, in a registry owned by the daemon (never prometheus_client's global one).

The hot paths only increment counters and observe latencies. Figures that other parts already
keep (IdP request counters and cache hits, open connections, database state) are read at scrape
time by `_ScrapeTimeCollector`, so they cost nothing per request.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from itertools import accumulate
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FIRST_BUCKET = LATENCY_BUCKETS[0]


def action_class(action: str) -> str:
    """A bounded label for a policy action: its first word (DUNNO, 550, 553, 451, DEFER_IF_PERMIT)."""
    return action.split(" ", 1)[0]


class Cells:
    """Counters by label for a hot path that knows its label before it counts: each is a
    one-element list that the path holds on to (`cell[0] += 1` costs a third of a
    `Counter[label] += 1`, which hashes the label twice)."""

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: dict[tuple[str, ...], list[int]] = {}

    def cell(self, label: tuple[str, ...]) -> list[int]:
        return self._cells.setdefault(label, [0])

    def items(self) -> Iterable[tuple[tuple[str, ...], int]]:
        return [(label, cell[0]) for label, cell in list(self._cells.items())]


class Latency:
    """One service's latency histogram: a bucket count and a sum, no lock (one event loop
    observes it); prometheus_client's Histogram costs ten times as much per request."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        if seconds <= FIRST_BUCKET:  # most answers: no search
            self.counts[0] += 1
        else:
            self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


class LatencyHistograms:
    """`labels(service)` binds a service's histogram once, as prometheus_client's does."""

    def __init__(self) -> None:
        self.services: dict[str, Latency] = {}

    def labels(self, service: str) -> Latency:
        return self.services.setdefault(service, Latency())

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("mailcloak_request_duration_seconds",
                                       "Time to answer one request, per service.", labels=["service"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for service, latency in list(self.services.items()):
            family.add_metric([service], list(zip(bounds, accumulate(latency.counts))), latency.total)
        return family


class Metrics:
    """Counters the request paths increment: plain `collections.Counter`s (a dict increment), the
    socketmap's answers as `Cells` (its memo keeps each answer's cell), and latencies as bucket
    counts (`Latency`), all turned into Prometheus families when /metrics is scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.policy_decisions: Counter[tuple[str, str]] = Counter()   # (action class, rule)
        self.socketmap_answers = Cells()                              # (map, status)
        self.protocol_errors: Counter[str] = Counter()                # service
        self.request_seconds = LatencyHistograms()
        self.add_scrape_time_source(self._counter_families)

    def _counter_families(self) -> Iterable:
        yield counter_family("mailcloak_policy_decisions",
                             "Policy decisions by action and by the rule that decided.",
                             ["action", "rule"], self.policy_decisions)
        yield counter_family("mailcloak_socketmap_answers", "Socketmap answers by map and status.",
                             ["map", "status"], self.socketmap_answers)
        yield counter_family("mailcloak_protocol_errors",
                             "Connections closed or requests refused for bad input.",
                             ["service"], self.protocol_errors)
        yield self.request_seconds.family()

    def add_scrape_time_source(self, collect: Callable[[], Iterable]) -> None:
        """Register a function yielding metric families, called at each scrape."""
        self.registry.register(_ScrapeTimeCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def counter_family(name: str, documentation: str, labels: list[str], counts: dict | Cells) -> CounterMetricFamily:
    """A counter family from counts whose keys are label values (a tuple, or one string)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in list(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


class _ScrapeTimeCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable]):
        self._collect = collect

    def collect(self):
        yield from self._collect()


def daemon_families(servers, runtime_ref, passdb_counters) -> Iterable:
    """Open connections, database state, IdP and passdb counters, read when /metrics is scraped."""
    connections = GaugeMetricFamily("mailcloak_open_connections", "Open connections per socket.",
                                    labels=["service"])
    for server in servers:
        connections.add_metric([server.name], server.open_connections)
    yield connections
    runtime = runtime_ref.current
    state = runtime.state
    age = GaugeMetricFamily("mailcloak_database_state_age_seconds",
                            "Seconds since the in-memory database state was last loaded.")
    age.add_metric([], max(0.0, time.monotonic() - state.loaded_at) if state.loaded_at else 0.0)
    yield age
    ok = GaugeMetricFamily("mailcloak_database_refresh_ok", "1 when the last refresh succeeded.")
    ok.add_metric([], 0.0 if state.last_error else 1.0)
    yield ok
    stats = runtime.idp.stats()
    for key, name, documentation, label in (
        ("http_requests", "mailcloak_idp_http_requests", "HTTP requests sent to the IdP.", "endpoint"),
        ("lookups", "mailcloak_idp_lookups", "IdP lookups by cache outcome.", "outcome"),
        ("lookup_errors", "mailcloak_idp_errors", "Failed IdP lookups by kind.", "kind"),
    ):
        if key in stats:
            yield counter_family(name, documentation, [label], stats[key])
    yield counter_family("mailcloak_passdb_results", "Dovecot passdb answers by result.", ["result"],
                         passdb_counters)
