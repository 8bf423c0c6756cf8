"""Prometheus metrics, in a registry owned by the daemon (never prometheus_client's global one).

The hot paths only increment counters and observe latencies. Figures that other parts already
keep (IdP request counters and cache hits, open connections, database state) are read at scrape
time by `_ScrapeTimeCollector`, so they cost nothing per request.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def action_class(action: str) -> str:
    """A bounded label for a policy action: its first word (DUNNO, 550, 553, 451, DEFER_IF_PERMIT)."""
    return action.split(" ", 1)[0]


class Metrics:
    """Counters the request paths increment: plain `collections.Counter`s (a dict increment, the
    cheapest thing on a hot path), turned into Prometheus families when /metrics is scraped. Only
    latencies use a prometheus_client Histogram (children bound once per service)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.policy_decisions: Counter[tuple[str, str]] = Counter()   # (action class, rule)
        self.socketmap_answers: Counter[tuple[str, str]] = Counter()  # (map, status)
        self.protocol_errors: Counter[str] = Counter()                # service
        self.request_seconds = Histogram(
            "mailcloak_request_duration_seconds", "Time to answer one request, per service.",
            ["service"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.add_scrape_time_source(self._counter_families)

    def decision(self, action: str, rule: str) -> None:
        self.policy_decisions[(action_class(action), rule)] += 1

    def _counter_families(self) -> Iterable:
        family = CounterMetricFamily("mailcloak_policy_decisions",
                                     "Policy decisions by action and by the rule that decided.",
                                     labels=["action", "rule"])
        for (action, rule), count in list(self.policy_decisions.items()):
            family.add_metric([action, rule], count)
        yield family
        family = CounterMetricFamily("mailcloak_socketmap_answers", "Socketmap answers by map and status.",
                                     labels=["map", "status"])
        for (name, status), count in list(self.socketmap_answers.items()):
            family.add_metric([name, status], count)
        yield family
        family = CounterMetricFamily("mailcloak_protocol_errors",
                                     "Connections closed or requests refused for bad input.",
                                     labels=["service"])
        for service, count in list(self.protocol_errors.items()):
            family.add_metric([service], count)
        yield family

    def add_scrape_time_source(self, collect: Callable[[], Iterable]) -> None:
        """Register a function yielding metric families, called at each scrape."""
        self.registry.register(_ScrapeTimeCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
    if "http_requests" in stats:
        family = CounterMetricFamily("mailcloak_idp_http_requests", "HTTP requests sent to the IdP.",
                                     labels=["endpoint"])
        for endpoint, count in stats["http_requests"].items():
            family.add_metric([endpoint], count)
        yield family
    if "lookups" in stats:
        family = CounterMetricFamily("mailcloak_idp_lookups", "IdP lookups by cache outcome.",
                                     labels=["outcome"])
        for outcome, count in stats["lookups"].items():
            family.add_metric([outcome], count)
        yield family
    if "lookup_errors" in stats:
        family = CounterMetricFamily("mailcloak_idp_errors", "Failed IdP lookups by kind.",
                                     labels=["kind"])
        for kind, count in stats["lookup_errors"].items():
            family.add_metric([kind], count)
        yield family
    family = CounterMetricFamily("mailcloak_passdb_results", "Dovecot passdb answers by result.",
                                 labels=["result"])
    for result, count in list(passdb_counters.items()):
        family.add_metric([result], count)
    yield family
