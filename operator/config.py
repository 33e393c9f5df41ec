"""The operator's settings: one dataclass, each field its flag and LORAFLEET_ variable (lorafleet/settings.py); the
handlers, the fleet loops and the replica calls read it, so each default is written once."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.settings import optional, positive, setting

# A BaseModel that sets no engine.maxLoraRank gets the replica's default (`lorafleet serve --max-lora-rank`; the CRD's
# default says the same, tests/operator/test_crd_flags.py keeps them equal): what the operator checks adapters against.
DEFAULT_MAX_LORA_RANK = 64


@dataclass(slots=True)
class OperatorConfig:
    residency_check_s: float = setting(300.0, parse=positive(float),
                                       help="safety net: re-read every replica's adapter listing this often; events do the real work")
    replica_concurrency: int = setting(4, parse=positive(int), help="calls in flight to one replica at a time")
    liveness: str = setting("http://0.0.0.0:8081/healthz", help="liveness endpoint URL")
    otlp_endpoint: str | None = setting(None, parse=optional, help="OTLP/HTTP collector for the fleets whose BaseModel sets no "
                                        "spec.tracing.otlpEndpoint (default: none, tracing off)")
    tenant_key_poll_s: float = setting(15.0, parse=positive(float), help="seconds between re-reads of the Secrets holding tenants' keys "
                                       "(the operator may not watch Secrets): a rotated key is seen within this")
    status_interval: float = setting(5.0, parse=positive(float), help="seconds between BaseModel status refreshes (Deployments' readiness)")
