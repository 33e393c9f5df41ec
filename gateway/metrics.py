"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from lorafleet.adapter_labels import TopAdapters, remove_adapter_series


class GatewayMetrics:
    def __init__(self, adapter_labels: int = 32) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_gateway_requests", "upstream attempts by replica and outcome (status code or error)", ["replica", "outcome"], registry=r)
        self.routing = Counter("lorafleet_gateway_routing", "requests served by the adapter's top owner, another replica holding it hot, a spill to another owner, or with no adapter", ["result"], registry=r)
        self.retries = Counter("lorafleet_gateway_retries", "requests sent on to the next owner after a failure", registry=r)
        self.handoffs = Counter("lorafleet_gateway_handoffs", "adapters warmed on a replica before their traffic moves to it, by result", ["result"], registry=r)
        self.ejections = Counter("lorafleet_gateway_ejections", "replicas ejected after repeated failures", registry=r)
        self.upstream_latency = Histogram("lorafleet_gateway_upstream_seconds", "time until the replica's response starts", registry=r,
                                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
        # By adapter, only for answers a replica served (the adapter exists), the busiest by name and the rest `other`.
        self.adapter_requests = Counter("lorafleet_gateway_adapter_requests", "requests a replica answered with 200, by adapter "
                                        "(\"\" the base model) and how the replica was chosen", ["adapter", "placement"], registry=r)
        self.adapters = TopAdapters(adapter_labels, on_drop=lambda adapter: remove_adapter_series([self.adapter_requests], adapter))
        self.held = Counter("lorafleet_gateway_cold_start_waits", "requests that found no ready replica and waited for one "
                            "(--hold-at-zero-s): served, timeout (a 503 after the hold), overflow (more than --hold-queue waiting)",
                            ["outcome"], registry=r)
        # By tenant (--tenants-file): its name is declared by the policy, never a caller's string (an unknown key is a 401,
        # counted nowhere), so the series are as many as tenants × outcomes.
        self.tenant_requests = Counter("lorafleet_gateway_tenant_requests", "a tenant's requests by outcome (the status code answered)",
                                       ["tenant", "outcome"], registry=r)
        self.tenant_tokens = Counter("lorafleet_gateway_tenant_tokens", "a tenant's prompt and generated tokens, as the replicas state them "
                                     "(a stream's generated tokens when it ends)", ["tenant", "kind"], registry=r)

    def watch_replicas(self, states: Callable[[], dict[str, int]]) -> None:
        """``lorafleet_gateway_replicas{state}``: replicas routable and ejected, read at scrape time."""
        self.registry.register(_ReplicaStates(states))


class _ReplicaStates:
    def __init__(self, states: Callable[[], dict[str, int]]) -> None:
        self.states = states

    def collect(self):  # noqa: ANN201
        family = GaugeMetricFamily("lorafleet_gateway_replicas", "replicas this gateway knows, by state: routable (healthy, not ejected), "
                                   "ejected (failing, taken out of the ring for a while), unhealthy (failing its health probe)", labels=["state"])
        for state, count in self.states().items():
            family.add_metric([state], count)
        yield family
