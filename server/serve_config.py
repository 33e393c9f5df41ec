"""``lorafleet serve``'s settings beyond the engine's: each declared once, as a field (lorafleet/settings.py), which
is its flag, its LORAFLEET_<FLAG> variable (parsed exactly as the flag, so a bad one fails the same way) and its line
of ``/info``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafleet.http_limits import MAX_BODY_BYTES
from lorafleet.server.config import EngineConfig
from lorafleet.settings import add_flags, optional, positive, setting, size, values


@dataclass(slots=True)
class ServeConfig:
    engine: EngineConfig
    model_id: str = setting("smollm2", flag="--model", help="base model: a known name (smollm2), a local folder, or a hub id")
    model_source: str = setting("auto", help="where --model lives: auto, local or hub")
    revision: str | None = setting(None, parse=optional, help="hub revision of the base model")
    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(8080, parse=positive(int), help="port to listen on")
    adapter_source: str = setting("hub", help="default adapter_source for requests that name none: hub, local or s3")
    max_concurrent_requests: int = setting(128, parse=positive(int), help="sequences in flight before new requests get 429",
                                           crd={"type": "integer", "minimum": 1, "default": 128})
    max_stop_sequences: int = setting(4, parse=positive(int), help="stop sequences per request")
    max_best_of: int = setting(2, parse=positive(int), help="largest best_of")
    max_body_bytes: int = setting(MAX_BODY_BYTES, parse=size, help="largest request body")
    preload_adapters: list[str] = setting(flag="--preload-adapter", multiple=True, default_factory=list,
                                          help="adapter id to load and pin at start-up (repeatable; source: --adapter-source)")
    grace_period_s: float = setting(30.0, parse=float, help="on SIGTERM, how long running requests may finish")
    admin_token: str | None = setting(None, parse=optional, secret=True,
                                      help="bearer token POST and DELETE /adapters require (load, pin, unload); set it from a Secret through "
                                      "LORAFLEET_ADMIN_TOKEN rather than on the command line. Unset: those routes are refused (403) unless --admin-open")
    # no token and open admin routes: a laptop's choice, never a default
    admin_open: bool = setting(False, parse=None, help="without --admin-token, let anyone who reaches this replica load, pin, unload and "
                               "warm adapters (a laptop; never a shared network)")
    warm_token: str | None = setting(None, parse=optional, secret=True,
                                     help="bearer token that allows POST /adapters/warm and nothing else: the gateways' credential for hand-offs "
                                     "(the admin token allows it too); set it through LORAFLEET_WARM_TOKEN")
    served_model_name: str | None = setting(None, parse=optional, help="the name clients use for the base model in `model` and /v1/models "
                                            "(the operator passes the BaseModel's name); --model's value is accepted too")
    metrics_adapter_labels: int = setting(32, parse=positive(int), help="adapters with per-adapter series of their own in /metrics (the busiest; "
                                          "the rest are counted as `other`), so thousands of adapters cannot grow it without bound")
    otlp_endpoint: str | None = setting(None, parse=optional, help="send traces here over OTLP/HTTP, e.g. http://otel-collector:4318 "
                                        "(OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME apply too); unset: tracing off")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ServeConfig, EngineConfig)


def serve_config_from_args(args: argparse.Namespace, model_folder: Path) -> ServeConfig:
    return ServeConfig(engine=EngineConfig(model=str(model_folder), **values(EngineConfig, args)), **values(ServeConfig, args))
