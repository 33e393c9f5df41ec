"""The dashboard and the alerts ask only for series the replica and the gateway export, in valid PromQL,
and the chart ships them (a ConfigMap for Grafana's sidecar, a PrometheusRule when the operator is there)."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
import yaml
from support.helm import CHART, render

from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.replicas import ReplicaSet
from lorafleet.server.api.metrics import ServerMetrics

DASHBOARD = json.loads((CHART / "monitoring" / "dashboard.json").read_text())
ALERTS = yaml.safe_load((CHART / "monitoring" / "alerts.yaml").read_text())
# Labels Prometheus adds to every target (the ServiceMonitor's targetLabels included), and histograms' le.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container", "app_kubernetes_io_instance", "app_kubernetes_io_component", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",), "unknown": ("",)}


def exported() -> dict[str, set[str]]:
    """Every series name the replica and the gateway can export, with its label names."""
    snapshot = {"waiting": 0, "running": 0, "kv_usage": 0.0, "prefix_cache": (0, 0), "speculative": (0, 0, 0), "max_lora": 4, "running_adapters": [], "waiting_adapters": [], "timestamp": 0.0,
                "adapters_per_tier": {"device": 1}, "bytes_per_tier": {"device": 1}, "adapter_events": {"device_hit": 1}, "residency": [("a", "device")],
                "memory": {"base_weights": 1}}
    gateway = GatewayMetrics()
    gateway.watch_replicas(ReplicaSet().states)
    names: dict[str, set[str]] = {}
    for registry in (ServerMetrics(lambda: snapshot).registry, gateway.registry):
        for family in registry.collect():  # the scrape-time collectors' series, with the labels of their samples
            for suffix in SUFFIXES[family.type]:
                names.setdefault(family.name + suffix, set()).update(label for sample in family.samples for label in sample.labels)
        # Labelled metrics with no children yet have no samples: their declared label names.
        for collector, collector_names in registry._collector_to_names.items():  # noqa: SLF001 - prometheus_client's own index
            for name in collector_names:
                names.setdefault(name, set()).update(getattr(collector, "_labelnames", ()))
    return names


def expressions() -> list[tuple[str, str]]:
    found = [(panel["title"], target["expr"]) for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]
    found += [(var["name"], var["query"]["query"]) for var in DASHBOARD["templating"]["list"] if var["type"] == "query"]
    found += [(rule["alert"], rule["expr"]) for group in ALERTS["groups"] for rule in group["rules"]]
    return found


def as_promql(expr: str) -> str:
    """Grafana's variables as Prometheus would get them; label_values(m, l) queries as the selector they read."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
    match = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr)
    return match.group(1) if match else expr


def used(expr: str) -> tuple[set[str], set[str]]:
    """The series names and label names an expression reads."""
    series, labels = set(), set()

    def visit(node) -> None:  # noqa: ANN001
        if isinstance(node, promql_parser.VectorSelector):
            series.add(node.name)
            labels.update(m.name for m in node.matchers.matchers)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None and node.modifier.matching is not None:
            labels.update(node.modifier.matching.labels)

    promql_parser.walk(promql_parser.parse(as_promql(expr)), visit)
    return series, labels


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[e[0][:40] for e in expressions()])
def test_each_query_reads_series_the_code_exports(where: str, expr: str) -> None:
    names = exported()
    series, labels = used(expr)
    assert series, f"{where}: no series in {expr}"
    if all(s.startswith("DCGM_") for s in series):  # NVIDIA's dcgm-exporter's standard series: optional, not ours
        return
    assert series <= set(names), f"{where}: not exported: {series - set(names)}"
    known = set().union(*(names[s] for s in series)) | TARGET_LABELS
    assert labels <= known, f"{where}: labels no series here has: {labels - known}"


def test_the_dashboard_covers_what_operators_watch() -> None:
    everything = " ".join(expr for _, expr in expressions())
    for series in ("lorafleet_time_to_first_token_seconds_bucket", "lorafleet_time_per_output_token_seconds_bucket", "lorafleet_adapter_events",
                   "lorafleet_adapter_load_seconds_count", "lorafleet_adapter_tier_adapters", "lorafleet_queue_size", "lorafleet_gateway_routing_total",
                   "lorafleet_gateway_retries_total", "lorafleet_gateway_replicas", "lorafleet_requests_total", "lorafleet_e2e_request_latency_seconds_bucket",
                   "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        assert series in everything
    assert {r["alert"] for g in ALERTS["groups"] for r in g["rules"]} == {
        "LorafleetAdapterCacheThrash", "LorafleetReplicaEjected", "LorafleetQueueGrowing", "LorafleetHighErrorRate", "LorafleetKVCacheFull",
        "LorafleetColdStartSlow", "LorafleetAdapterLoadFailing"}
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_a_query_naming_a_series_nobody_exports_is_caught() -> None:
    """The check above is not vacuous: a misspelt series or label fails it."""
    names = exported()
    assert not used("rate(lorafleet_request_total[5m])")[0] <= set(names)
    series, labels = used("sum by (adaptor) (rate(lorafleet_requests_total[5m]))")
    assert "adaptor" not in set().union(*(names[s] for s in series)) | TARGET_LABELS


@pytest.mark.parametrize(("enabled", "api_versions", "expected"), [
    ("auto", [], False), ("auto", ["monitoring.coreos.com/v1/PrometheusRule"], True), (True, [], True), (False, ["monitoring.coreos.com/v1/PrometheusRule"], False),
])
def test_the_chart_ships_the_dashboard_and_the_alerts(enabled, api_versions, expected) -> None:  # noqa: ANN001
    objects = render({"metrics": {"prometheusRule": {"enabled": enabled}}}, api_versions=api_versions)
    dashboard = next(o for o in objects if o["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1" and json.loads(dashboard["data"]["lorafleet.json"]) == DASHBOARD
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert len(rules) == int(expected)
    if expected:
        assert rules[0]["spec"] == ALERTS
    assert not any(o["kind"] == "ConfigMap" for o in render({"metrics": {"dashboard": {"enabled": False}}}))
