"""One trace per request from client to gateway to replica, over a loopback OTLP collector."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
from support.otlp import running_collector
from support.server import RunningServer, ThreadedApp

from lorafleet.gateway.app import create_gateway_app
from lorafleet.gateway.config import GatewayConfig
from lorafleet.testing import make_lora_adapter
from lorafleet.tracing import otlp_traces_url

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture(scope="module")
def traced(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("traced-adapters")
    for i, name in enumerate(("cold", "warm")):
        make_lora_adapter(tiny_models["llama"], root / name, r=4, seed=i)
    with running_collector() as collector, \
            RunningServer(tiny_models["llama"], root, tmp_path_factory.mktemp("cache"), otlp_endpoint=collector.url) as replica, \
            ThreadedApp(create_gateway_app([replica.url], None, GatewayConfig(otlp_endpoint=collector.url))) as gateway, \
            ThreadedApp(create_gateway_app([replica.url], None, GatewayConfig())) as untraced_gateway:
        yield collector.collector, replica, gateway, untraced_gateway


def by_name(spans: list[dict]) -> dict[str, dict]:
    return {s["name"]: s for s in spans}


def test_a_cold_adapter_request_is_one_trace_across_gateway_and_replica(traced) -> None:
    collector, replica, gateway, _ = traced
    header, trace_id, client_span = traceparent()
    response = httpx.post(gateway.url + "/generate", json={"inputs": "hello", "parameters": {"adapter_id": "cold", "max_new_tokens": 5}},
                          headers={"traceparent": header}, timeout=60)
    assert response.status_code == 200 and response.headers["x-adapter-tier"] != "device"
    spans = by_name(collector.trace(trace_id, 6))
    assert set(spans) == {"gateway POST /generate", "replica POST /generate", "queue", "adapter_load", "prefill", "decode"}
    edge, server = spans["gateway POST /generate"], spans["replica POST /generate"]
    assert edge["service"] == "lorafleet-gateway" and server["service"] == "lorafleet-replica"
    assert edge["parent_id"] == client_span and server["parent_id"] == edge["span_id"]  # client -> gateway -> replica
    assert {spans[n]["parent_id"] for n in ("queue", "adapter_load", "prefill", "decode")} == {server["span_id"]}
    assert edge["attributes"] == {"lorafleet.adapter": "cold", "lorafleet.routing.top_owner": edge["attributes"]["lorafleet.replica"],
                                  "lorafleet.routing.candidates": 1, "lorafleet.replica": edge["attributes"]["lorafleet.replica"],
                                  "lorafleet.routing.placement": "owner", "http.response.status_code": 200}
    assert server["attributes"]["gen_ai.usage.output_tokens"] == 5 and server["attributes"]["lorafleet.adapter"] == "cold"
    assert server["attributes"]["lorafleet.adapter.tier"] == response.headers["x-adapter-tier"]
    assert spans["adapter_load"]["attributes"]["lorafleet.adapter.source_tier"] == "local"  # read from its local folder
    assert spans["decode"]["attributes"]["gen_ai.usage.output_tokens"] == 5
    # The phases are in order and inside the replica's span, which is inside the gateway's.
    assert edge["start"] <= server["start"] <= spans["queue"]["start"] <= spans["prefill"]["start"] <= spans["decode"]["start"]
    assert spans["decode"]["end"] <= server["end"] <= edge["end"]


def test_hot_and_streamed_requests_are_traced_without_a_load(traced) -> None:
    collector, _, gateway, _ = traced
    httpx.post(gateway.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "warm", "max_new_tokens": 2}}, timeout=60)
    header, trace_id, _ = traceparent()
    with httpx.stream("POST", gateway.url + "/v1/completions", json={"model": "warm", "prompt": "hi", "max_tokens": 3, "stream": True},
                      headers={"traceparent": header}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200 and lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines
    spans = by_name(collector.trace(trace_id, 5))
    assert set(spans) == {"gateway POST /v1/completions", "replica POST /v1/completions", "queue", "prefill", "decode"}
    assert spans["replica POST /v1/completions"]["attributes"]["lorafleet.adapter.tier"] == "device"


def test_a_gateway_without_tracing_passes_the_callers_context_through(traced) -> None:
    collector, replica, _, untraced = traced
    header, trace_id, client_span = traceparent()
    assert httpx.post(untraced.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, headers={"traceparent": header}, timeout=60).status_code == 200
    spans = by_name(collector.trace(trace_id, 4))
    assert spans["replica POST /generate"]["parent_id"] == client_span and "gateway POST /generate" not in spans
    assert spans["replica POST /generate"]["attributes"]["lorafleet.adapter.tier"] == "base"


def test_tracing_is_off_without_an_endpoint(monkeypatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert otlp_traces_url(None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert otlp_traces_url(None) == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/custom")
    assert otlp_traces_url(None) == "http://traces:4318/custom"
    assert otlp_traces_url("http://flag:4318") == "http://flag:4318/v1/traces"
