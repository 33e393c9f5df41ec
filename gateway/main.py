"""``lorafleet gateway``: adapter-aware routing in front of the replicas."""

from __future__ import annotations

import argparse
import logging
import sys

from lorafleet.gateway.config import GatewayConfig
from lorafleet.settings import add_flags, values


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    members = parser.add_mutually_exclusive_group(required=True)
    members.add_argument("--replica", action="append", metavar="URL", help="a replica's base URL (repeatable)")
    members.add_argument("--service", metavar="NAMESPACE/NAME", help="discover replicas from this Service's EndpointSlices")
    add_flags(parser, GatewayConfig)


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
        config = GatewayConfig(**values(GatewayConfig, args))
        app = create_gateway_app(args.replica, args.service, config)
    except ValueError as exc:
        print(f"lorafleet gateway: {exc}", file=sys.stderr)
        return 2
    metrics_server = None
    if config.metrics_port:  # prometheus_client's own server, in a thread: the scrape never waits on the proxy's loop
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(config.metrics_port, addr=args.host, registry=app.metrics.registry)
    try:
        uvicorn.Server(server_config(app, args.host, args.port, parser=config.http_parser)).run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0
