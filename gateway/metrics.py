"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_gateway_requests", "upstream attempts by replica and outcome (status code or error)", ["replica", "outcome"], registry=r)
        self.routing = Counter("lorafleet_gateway_routing", "requests served by the adapter's top owner, another replica holding it hot, a spill to another owner, or with no adapter", ["result"], registry=r)
        self.retries = Counter("lorafleet_gateway_retries", "requests sent on to the next owner after a failure", registry=r)
        self.handoffs = Counter("lorafleet_gateway_handoffs", "adapters warmed on a replica before their traffic moves to it, by result", ["result"], registry=r)
        self.ejections = Counter("lorafleet_gateway_ejections", "replicas ejected after repeated failures", registry=r)
        self.upstream_latency = Histogram("lorafleet_gateway_upstream_seconds", "time until the replica's response starts", registry=r,
                                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
