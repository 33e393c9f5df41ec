"""The gateway's settings: one dataclass whose defaults the flags, the app and the proxy all read."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafleet import ring
from lorafleet.http_limits import MAX_BODY_BYTES


@dataclass(slots=True)
class GatewayConfig:
    load_factor: float = ring.DEFAULT_LOAD_FACTOR  # the bounded-load factor c; the operator's CRD default must match
    api_key_file: Path | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    upstream_timeout: float = 300.0  # seconds to wait for a replica's response to start
    probe_interval: float = 1.0  # seconds between /health probes of each replica
    policy: str = "lorafleet"  # one of POLICIES
    min_bound: int = 4  # a replica is never "full" under this many in flight (ring.load_bound's floor)
    handoff: bool = True  # warm adapters where their traffic is about to go (gateway/handoff.py)
    served_model_name: str | None = None  # the base model's name in /v1/models (the operator passes the BaseModel's)
    metrics_adapter_labels: int = 32  # adapters with series of their own in /metrics; the rest are "other"
    prefix_chars: int = 0  # route by adapter + the prompt's first N characters (prefix caching affinity); 0: off
    warm_token: str | None = None  # the replicas' warm token (LORAFLEET_WARM_TOKEN): hand-offs send it, and nothing else
    otlp_endpoint: str | None = None  # traces go here (OTLP over HTTP); None: tracing off unless OTEL_EXPORTER_OTLP_ENDPOINT is set


POLICIES = ("lorafleet", "round-robin", "least-loaded")


def load_factor(text: str) -> float:
    """--load-factor's parser: bounded loads need c > 1 (at c = 1 a request can find every replica full)."""
    value = float(text)
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"must be > 1.0, got {text}")
    return value
