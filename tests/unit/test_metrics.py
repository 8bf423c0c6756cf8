"""Metrics rendering: counters kept as plain dicts come out as Prometheus families."""

from types import SimpleNamespace

from mailcloak.metrics import Metrics, action_class, daemon_families


class _IdP:
    def stats(self):
        return {"http_requests": {"token": 1, "users": 5}, "lookups": {"hits": 7, "misses": 5},
                "lookup_errors": {"timeout": 2}}


def test_action_class_is_bounded():
    assert action_class("550 5.1.1 No such user") == "550"
    assert action_class("DUNNO") == "DUNNO"
    assert action_class("DEFER_IF_PERMIT 4.3.0 Malformed policy request") == "DEFER_IF_PERMIT"


def test_render_counters_and_scrape_time_sources():
    metrics = Metrics()
    label = (action_class("553 5.7.1 Sender not owned by authenticated user"), "8 sender not owned by app")
    metrics.policy_decisions[label] += 2
    metrics.socketmap_answers.cell(("alias", "NOTFOUND"))[0] += 3
    metrics.protocol_errors["socketmap"] += 1
    metrics.request_seconds.labels("policy").observe(0.002)
    runtime = SimpleNamespace(state=SimpleNamespace(loaded_at=0.0, last_error="boom"), idp=_IdP())
    servers = [SimpleNamespace(name="policy", open_connections=4)]
    metrics.add_scrape_time_source(lambda: daemon_families(servers, SimpleNamespace(current=runtime),
                                                           {"ok": 9, "password_mismatch": 1}))
    text = metrics.render().decode()
    for line in (
        'mailcloak_policy_decisions_total{action="553",rule="8 sender not owned by app"} 2.0',
        'mailcloak_socketmap_answers_total{map="alias",status="NOTFOUND"} 3.0',
        'mailcloak_protocol_errors_total{service="socketmap"} 1.0',
        'mailcloak_request_duration_seconds_bucket{le="0.0025",service="policy"} 1.0',
        'mailcloak_open_connections{service="policy"} 4.0',
        "mailcloak_database_refresh_ok 0.0",
        'mailcloak_idp_http_requests_total{endpoint="users"} 5.0',
        'mailcloak_idp_lookups_total{outcome="hits"} 7.0',
        'mailcloak_idp_errors_total{kind="timeout"} 2.0',
        'mailcloak_passdb_results_total{result="ok"} 9.0',
    ):
        assert line in text, line


def test_latency_buckets_are_cumulative_and_include_their_bound():
    metrics = Metrics()
    latency = metrics.request_seconds.labels("socketmap")
    for seconds in (0.001, 0.0011, 30):
        latency.observe(seconds)
    text = metrics.render().decode()
    assert 'mailcloak_request_duration_seconds_bucket{le="0.001",service="socketmap"} 1.0' in text
    assert 'mailcloak_request_duration_seconds_bucket{le="0.0025",service="socketmap"} 2.0' in text
    assert 'mailcloak_request_duration_seconds_bucket{le="+Inf",service="socketmap"} 3.0' in text
    assert 'mailcloak_request_duration_seconds_count{service="socketmap"} 3.0' in text
