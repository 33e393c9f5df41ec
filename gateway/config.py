"""The gateway's settings: one dataclass, each field its flag and LORAFLEET_ variable (lorafleet/settings.py), whose
defaults the flags, the app and the proxy all read."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafleet import ring
from lorafleet.http_limits import MAX_BODY_BYTES
from lorafleet.settings import non_negative, non_negative_of, one_of, optional, positive, setting, size

POLICIES = ("lorafleet", "round-robin", "least-loaded")


def load_factor(text: str) -> float:
    """--load-factor's parser: bounded loads need c > 1 (at c = 1 a request can find every replica full)."""
    value = float(text)
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"must be > 1.0, got {text}")
    return value


@dataclass(slots=True)
class GatewayConfig:
    load_factor: float = setting(ring.DEFAULT_LOAD_FACTOR, parse=load_factor, help="bounded-load factor c, > 1 (the BaseModel CRD's default must match)")
    api_key_file: Path | None = setting(None, parse=Path, help="file of bearer keys, one per line, re-read on change")
    tenants_file: Path | None = setting(None, parse=Path, help="tenant policy (JSON: tenants by key hash, their adapters and limits; "
                                        "gateway/tenants.py), re-read on change; replaces --api-key-file")
    tenant_gateways: int = setting(1, parse=positive(int), help="gateways sharing the tenants' limits: each enforces limit / this")
    access_log: bool = setting(True, parse=None, help="one log line per tenant request (lorafleet.gateway.access): tenant, route, adapter, "
                               "status, prompt and generated tokens, milliseconds")
    metrics_port: int = setting(0, parse=non_negative, help="serve /metrics on this port (same address) instead of the API's (0: on the API's). "
                                "The operator sets it: the scrape path stays cluster-internal, since the gateway's metrics name every tenant "
                                "and its usage, and tenants reach the API port only")
    http_parser: str = setting("httptools", parse=one_of(("httptools", "h11")), help="the HTTP/1.1 parser the gateway serves with, "
                               "under the same head, deadline and connection limits (lorafleet/http_guard_httptools.py); h11 to compare")
    hold_at_zero_s: float = setting(0.0, parse=non_negative_of(float), help="when no replica is ready, hold a request up to this long for one "
                                    "(scale from zero: gateway/demand.py), then 503 with Retry-After (0: answer 503 at once)")
    hold_queue: int = setting(256, parse=positive(int), help="requests held at once while no replica is ready; more get 503 at once")
    demand_basemodel: str | None = setting(None, parse=optional, help="NAMESPACE/NAME of the BaseModel to stamp lorafleet.io/demand-at on "
                                           "when a request finds no ready replica (the operator then scales from zero at once)")
    max_body_bytes: int = setting(MAX_BODY_BYTES, parse=size, help="largest request body")
    upstream_timeout: float = setting(300.0, parse=positive(float), help="seconds to wait for a replica's response to start")
    probe_interval: float = setting(1.0, parse=positive(float), help="seconds between /health probes of each replica")
    policy: str = setting("lorafleet", parse=one_of(POLICIES),
                          help="routing: lorafleet (adapter-aware ring with bounded loads), or round-robin / least-loaded to compare")
    min_bound: int = setting(4, parse=positive(int), help="a replica is never over the load bound below this many requests in flight")
    handoff: bool = setting(True, parse=None, help="warm adapters on a joining replica and on a leaving one's next owners (gateway/handoff.py); "
                            "--no-handoff measures what it buys")
    served_model_name: str | None = setting(None, parse=optional, help="the base model's name in /v1/models (default: the replicas')")
    metrics_adapter_labels: int = setting(32, parse=positive(int), help="adapters with series of their own in /metrics (the busiest; the rest are `other`)")
    prefix_chars: int = setting(0, parse=non_negative, help="route by the adapter and the prompt's first N characters, so requests sharing a "
                                "prefix meet the replica that has its KV blocks cached (0: by adapter only)")
    warm_token: str | None = setting(None, parse=optional, secret=True, help="bearer token the replicas take for POST /adapters/warm "
                                     "(hand-offs); best set through LORAFLEET_WARM_TOKEN from a Secret (the operator does)")
    otlp_endpoint: str | None = setting(None, parse=optional, help="send traces here over OTLP/HTTP, e.g. http://otel-collector:4318 "
                                        "(default: OTEL_EXPORTER_OTLP_ENDPOINT; unset: off)")
