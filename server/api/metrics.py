"""Prometheus metrics of one replica, in a registry of its own (several servers can share a test process).

Besides lorafleet's own series, it exports the three signals the Gateway API Inference
Extension's endpoint picker reads from vLLM-compatible servers, under vLLM's names, so a replica
can sit behind that picker unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Read at scrape time from the engine, so the gauges are never stale."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self):  # noqa: ANN201
        s = self.snapshot()
        for name, help_text, value in [
            ("lorafleet_queue_size", "requests waiting to be scheduled", s["waiting"]),
            ("lorafleet_batch_size", "sequences in the running batch", s["running"]),
            ("lorafleet_kv_cache_usage_ratio", "fraction of KV blocks in use", s["kv_usage"]),
            ("vllm:num_requests_waiting", "requests waiting (vLLM name, read by the inference-extension endpoint picker)", s["waiting"]),
            ("vllm:num_requests_running", "requests running (vLLM name)", s["running"]),
            ("vllm:kv_cache_usage_perc", "KV-cache usage as a fraction (vLLM name, read by the endpoint picker)", s["kv_usage"]),
        ]:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        lora = GaugeMetricFamily("vllm:lora_requests_info", "running and waiting adapters (vLLM name, read by the endpoint picker)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric([str(s["max_lora"]), ",".join(s["running_adapters"]), ",".join(s["waiting_adapters"])], s["timestamp"])
        yield lora
        tiers = GaugeMetricFamily("lorafleet_adapter_tier_adapters", "adapters held per tier", labels=["tier"])
        for tier, count in s["adapters_per_tier"].items():
            tiers.add_metric([tier], count)
        yield tiers
        tier_bytes = GaugeMetricFamily("lorafleet_adapter_tier_bytes", "bytes held per tier", labels=["tier"])
        for tier, size in s["bytes_per_tier"].items():
            tier_bytes.add_metric([tier], size)
        yield tier_bytes
        events = GaugeMetricFamily("lorafleet_adapter_events", "adapter hits, fetches and evictions since start", labels=["event"])
        for event, count in s["adapter_events"].items():
            events.add_metric([event], count)
        yield events


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_requests", "requests by route, status and adapter", ["route", "status", "adapter"], registry=r)
        self.duration = Histogram("lorafleet_request_duration_seconds", "request duration", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("lorafleet_generated_tokens", "tokens generated", ["adapter"], registry=r)
        self.time_to_first_token = Histogram("lorafleet_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("lorafleet_time_per_output_token_seconds", "time per output token after the first",
                                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.adapter_load = Histogram("lorafleet_adapter_load_seconds", "adapter load latency per tier step", ["step"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("lorafleet_requests_in_flight", "requests being served", registry=r)
        r.register(_EngineCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
