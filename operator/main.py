"""``lorafleet operator``: the kopf operator for BaseModel and Adapter resources."""

from __future__ import annotations

import argparse
import logging

from lorafleet.operator.config import OperatorConfig
from lorafleet.settings import add_flags, values


def add_operator_flags(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", metavar="NS", help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    add_flags(parser, OperatorConfig)


def run(args: argparse.Namespace) -> int:
    import kopf

    from lorafleet.operator.handlers import register

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per replica call: 10,000 of them on a scale-up
    # One active operator at a time comes from the Deployment's Recreate strategy (see manifests/),
    # so kopf runs standalone and needs no peering resources.
    config = OperatorConfig(**values(OperatorConfig, args))
    kopf.run(registry=register(kopf.get_default_registry(), config), standalone=True, liveness_endpoint=config.liveness,
             clusterwide=not args.namespace, namespaces=args.namespace or ())
    return 0
