"""Prometheus metrics of one replica, in a registry of its own (several servers can share a test process).

Besides lorafleet's own series, it exports the three signals the Gateway API Inference
Extension's endpoint picker reads from vLLM-compatible servers, under vLLM's names, so a replica
can sit behind that picker unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lorafleet.adapter_labels import OTHER, TopAdapters, remove_adapter_series
from lorafleet.server.api.version_counts import VersionTally

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
DEFAULT_ADAPTER_LABELS = 32


class _EngineCollector:
    """Read at scrape time from the engine, so the gauges are never stale."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        self.taken: dict[str, Any] | None = None  # what the scrape took on the engine thread, when it did

    def collect(self):  # noqa: ANN201
        s = self.taken if self.taken is not None else self.snapshot()
        for name, help_text, value in [
            ("lorafleet_queue_size", "requests waiting to be scheduled", s["waiting"]),
            ("lorafleet_batch_size", "sequences in the running batch", s["running"]),
            ("lorafleet_kv_cache_usage_ratio", "fraction of KV blocks in use", s["kv_usage"]),
            ("vllm:num_requests_waiting", "requests waiting (vLLM name, read by the inference-extension endpoint picker)", s["waiting"]),
            ("vllm:num_requests_running", "requests running (vLLM name)", s["running"]),
            ("vllm:kv_cache_usage_perc", "KV-cache usage as a fraction (vLLM name, read by the endpoint picker)", s["kv_usage"]),
            ("vllm:gpu_cache_usage_perc", "the same, under the name older endpoint pickers read", s["kv_usage"]),
        ]:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        # Made afresh at each scrape, so an old label set never lingers; the value is the time (the picker reads the newest).
        queried, hit = s["prefix_cache"]
        for name, help_text, value in [
            ("vllm:prefix_cache_queries", "prompt tokens looked up in the prefix cache (vLLM name, read by prefix-aware routers)", queried),
            ("vllm:prefix_cache_hits", "prompt tokens found in the prefix cache, their KV blocks reused (vLLM name)", hit),
            *zip(("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"),
                 ("speculative verify rows run (one per request per step that proposed tokens)", "tokens proposed by prompt lookup and verified",
                  "proposed tokens accepted: each saved a decode step"), s["speculative"]),
        ]:
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], value)
            yield counter
        slots = GaugeMetricFamily("lorafleet_adapter_slots", "device slots for adapters (what vllm:lora_requests_info calls max_lora)")
        slots.add_metric([], s["max_lora"])
        yield slots
        lora = GaugeMetricFamily("vllm:lora_requests_info", "adapters resident on the device (running) and requested but not resident "
                                 "(waiting), and the device slots (vLLM name, read by the endpoint picker for LoRA affinity)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric([str(s["max_lora"]), ",".join(s["running_adapters"]), ",".join(s["waiting_adapters"])], s["timestamp"])
        yield lora
        loaded = GaugeMetricFamily("lorafleet_adapter_loaded", "1 per adapter and the tier holding it: device, cpu or disk "
                                   "(device and cpu complete; disk the most recently used few hundred)", labels=["adapter", "tier"])
        for adapter, tier in s["residency"]:
            loaded.add_metric([adapter, tier], 1)
        yield loaded
        tiers = GaugeMetricFamily("lorafleet_adapter_tier_adapters", "adapters held per tier", labels=["tier"])
        for tier, count in s["adapters_per_tier"].items():
            tiers.add_metric([tier], count)
        yield tiers
        tier_bytes = GaugeMetricFamily("lorafleet_adapter_tier_bytes", "bytes held per tier", labels=["tier"])
        for tier, size in s["bytes_per_tier"].items():
            tier_bytes.add_metric([tier], size)
        yield tier_bytes
        memory = GaugeMetricFamily("lorafleet_memory_bytes", "bytes held, by what holds them: base_weights, kv_cache_allocated/used, "
                                   "adapter_slots_allocated/used, cpu_tier, disk_tier; on cuda cuda_reserved/allocated/free", labels=["kind"])
        for kind, size in s.get("memory", {}).items():
            memory.add_metric([kind], size)
        yield memory
        events = GaugeMetricFamily("lorafleet_adapter_events", "adapter hits, fetches and evictions since start", labels=["event"])
        for event, count in s["adapter_events"].items():
            events.add_metric([event], count)
        yield events


class ServerMetrics:
    """The replica's series. Per-adapter ones take their ``adapter`` label from ``self.adapters`` (the busiest
    ``adapter_labels`` adapters, the rest ``other``, "" for the base model), so their count is bounded: an adapter is
    labelled by the registered name a request used (the Adapter resource's), else by its id (and @revision). The
    ``version`` label beside it is the version served (id@revision), so a name's two versions during a rollout have
    series of their own; it is ``other`` (or "") with the adapter label. ``cache`` is hot when the adapter was on the
    device when the request arrived, cold when it had to be loaded."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], adapter_labels: int = DEFAULT_ADAPTER_LABELS) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_requests", "requests by route, status and adapter", ["route", "status", "adapter", "version"], registry=r)
        self.duration = Histogram("lorafleet_request_duration_seconds", "request duration", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("lorafleet_generated_tokens", "tokens generated", ["adapter", "version"], registry=r)
        by_adapter = ["adapter", "version", "cache"]
        self.time_to_first_token = Histogram("lorafleet_time_to_first_token_seconds", "time to first token, by adapter and hot/cold",
                                             by_adapter, buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("lorafleet_time_per_output_token_seconds", "time per output token after the first, by adapter and hot/cold",
                                               by_adapter, buckets=TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram("lorafleet_e2e_request_latency_seconds", "a generation from arrival to its last token, by adapter and hot/cold",
                                     by_adapter, buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("lorafleet_adapter_load_seconds", "adapter load latency per tier step", ["step"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("lorafleet_requests_in_flight", "requests being served", registry=r)
        per_adapter = (self.requests, self.generated_tokens, self.time_to_first_token, self.time_per_output_token, self.e2e_latency)
        # An adapter that loses its label to busier ones loses its series (their counts continue under `other`).
        self.adapters = TopAdapters(adapter_labels, on_drop=lambda adapter: remove_adapter_series(per_adapter, adapter))
        self.versions = VersionTally()  # exact per-version counts for canary analysis (unbounded by labels)
        self._collector = _EngineCollector(snapshot)
        r.register(self._collector)

    def labels(self, name: str | None, version: str) -> tuple[str, str]:
        """(adapter, version) label values for one more request of ``version`` asked for by ``name`` (or by id)."""
        adapter = self.adapters.label(name or version)
        return adapter, version if adapter not in ("", OTHER) else adapter

    def observe_generation(self, name: str | None, version: str, tier: str, tokens: int, first_token_s: float, rest_s: float) -> None:
        """One finished generation: tokens and latencies under its adapter's labels, hot or cold."""
        labels, cache = self.labels(name, version), "hot" if tier in ("", "device") else "cold"
        self.versions.first_token(version, first_token_s)
        self.generated_tokens.labels(*labels).inc(tokens)
        self.time_to_first_token.labels(*labels, cache).observe(first_token_s)
        self.e2e_latency.labels(*labels, cache).observe(first_token_s + rest_s)
        if tokens > 1:
            self.time_per_output_token.labels(*labels, cache).observe(rest_s / (tokens - 1))

    def render(self, snapshot: dict[str, Any] | None = None) -> bytes:
        """The exposition; ``snapshot`` is the engine's state as its own thread read it (the scrape's normal path:
        read from the event loop, the slots and states change under the read)."""
        self._collector.taken = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._collector.taken = None
