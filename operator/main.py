"""``lorafleet operator``: the kopf operator for BaseModel and Adapter resources."""

from __future__ import annotations

import argparse
import logging


def add_operator_flags(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", metavar="NS", help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    parser.add_argument("--residency-check-s", type=float, default=300.0, metavar="S",
                        help="safety net: re-read every replica's adapter listing this often; events do the real work (default: %(default)s)")
    parser.add_argument("--replica-concurrency", type=int, default=4, metavar="N",
                        help="calls in flight to one replica at a time (default: %(default)s)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL (default: %(default)s)")
    parser.add_argument("--otlp-endpoint", metavar="URL",
                        help="OTLP/HTTP collector for the fleets whose BaseModel sets no spec.tracing.otlpEndpoint (default: none, tracing off)")


def run(args: argparse.Namespace) -> int:
    import kopf

    from lorafleet.operator.handlers import register

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One active operator at a time comes from the Deployment's Recreate strategy (see manifests/),
    # so kopf runs standalone and needs no peering resources.
    kopf.run(registry=register(kopf.get_default_registry(), residency_check_s=args.residency_check_s, per_replica=args.replica_concurrency,
                               otlp_endpoint=args.otlp_endpoint), standalone=True, liveness_endpoint=args.liveness,
             clusterwide=not args.namespace, namespaces=args.namespace or ())
    return 0
