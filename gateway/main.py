"""``lorafleet gateway``: adapter-aware routing in front of the replicas."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lorafleet.gateway.config import POLICIES, GatewayConfig, load_factor


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    members = parser.add_mutually_exclusive_group(required=True)
    members.add_argument("--replica", action="append", metavar="URL", help="a replica's base URL (repeatable)")
    members.add_argument("--service", metavar="NAMESPACE/NAME", help="discover replicas from this Service's EndpointSlices")
    defaults = GatewayConfig()
    parser.add_argument("--load-factor", type=load_factor, default=defaults.load_factor, help=f"bounded-load factor c, > 1 (default: {defaults.load_factor})")
    parser.add_argument("--api-key-file", type=Path, help="file of bearer keys, one per line, re-read on change")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help=f"largest request body (default: {defaults.max_body_bytes})")
    parser.add_argument("--policy", choices=POLICIES, default=defaults.policy,
                        help="routing: lorafleet (adapter-aware ring with bounded loads), or round-robin / least-loaded to compare (default: %(default)s)")
    parser.add_argument("--min-bound", type=int, default=defaults.min_bound,
                        help="a replica is never over the load bound below this many requests in flight (default: %(default)s)")
    parser.add_argument("--no-handoff", dest="handoff", action="store_false",
                        help="do not warm adapters on a joining replica or on a leaving one's next owners (to measure what it buys)")
    parser.add_argument("--served-model-name", default=defaults.served_model_name, help="the base model's name in /v1/models (default: the replicas')")
    parser.add_argument("--metrics-adapter-labels", type=int, default=defaults.metrics_adapter_labels,
                        help="adapters with series of their own in /metrics (the busiest; the rest are `other`) (default: %(default)s)")
    parser.add_argument("--prefix-chars", type=int, default=defaults.prefix_chars,
                        help="route by the adapter and the prompt's first N characters, so requests sharing a prefix meet the replica "
                             "that has its KV blocks cached (default: 0, by adapter only)")
    parser.add_argument("--otlp-endpoint", default=defaults.otlp_endpoint,
                        help="send traces here over OTLP/HTTP, e.g. http://otel-collector:4318 (default: OTEL_EXPORTER_OTLP_ENDPOINT; unset: off)")
    parser.add_argument("--warm-token", default=os.environ.get("LORAFLEET_WARM_TOKEN") or None,
                        help="bearer token the replicas take for POST /adapters/warm (hand-offs); best set through LORAFLEET_WARM_TOKEN "
                             "from a Secret (the operator does)")
    parser.add_argument("--upstream-timeout", type=float, default=defaults.upstream_timeout,
                        help=f"seconds to wait for a replica's response to start (default: {defaults.upstream_timeout:g})")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lorafleet.gateway.app import create_gateway_app
    from lorafleet.http_limits import server_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request would drown the decisions
    if args.service and "/" not in args.service:
        print("lorafleet gateway: --service must be NAMESPACE/NAME", file=sys.stderr)
        return 2
    if args.api_key_file and not args.api_key_file.is_file():
        print(f"lorafleet gateway: --api-key-file {args.api_key_file} does not exist", file=sys.stderr)
        return 2
    try:
        config = GatewayConfig(load_factor=args.load_factor, api_key_file=args.api_key_file, max_body_bytes=args.max_body_bytes,
                               upstream_timeout=args.upstream_timeout, policy=args.policy, served_model_name=args.served_model_name,
                               handoff=args.handoff, min_bound=max(1, args.min_bound),
                               metrics_adapter_labels=args.metrics_adapter_labels, otlp_endpoint=args.otlp_endpoint,
                               prefix_chars=max(0, args.prefix_chars), warm_token=args.warm_token)
        app = create_gateway_app(args.replica, args.service, config)
    except ValueError as exc:
        print(f"lorafleet gateway: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(server_config(app, args.host, args.port)).run()
    return 0
