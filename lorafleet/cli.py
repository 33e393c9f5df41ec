"""The ``lorafleet`` command line: one parser, subcommands imported only when run.

Importing a subcommand lazily keeps ``lorafleet --help``, the gateway and the operator free of
torch. Flags are parsed here, once, into values handed down; nothing reads the environment at
import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _serve(args: argparse.Namespace) -> int:
    from lorafleet.server.main import run

    return run(args)


def _gateway(args: argparse.Namespace) -> int:
    from lorafleet.gateway.main import run

    return run(args)


def _local(command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from lorafleet.local import up

        return getattr(up, command)(args)

    return run


def _demo_adapters(args: argparse.Namespace) -> int:
    from lorafleet import model_store
    from lorafleet.local.demo_adapters import make_demo_adapters

    base = model_store.fetch("smollm2", log=print) if args.model == "smollm2" else Path(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    make_demo_adapters(base, args.out, epochs=args.epochs)
    print(args.out)
    return 0


def _operator(args: argparse.Namespace) -> int:
    from lorafleet.operator.main import run

    return run(args)


def _kube_api(args: argparse.Namespace) -> int:
    import threading

    from lorafleet.local.kubeapi import EmbeddedKubeAPI
    from lorafleet.local.kubeapi.crd_files import read_crds

    try:
        crds = read_crds(args.crds) if args.crds else []
    except (OSError, ValueError) as exc:
        print(f"lorafleet kube-api: {exc}", file=sys.stderr)
        return 2
    api = EmbeddedKubeAPI(args.host, args.port, crds).start()
    config = api.write_kubeconfig(args.kubeconfig)
    print(f"embedded Kubernetes API at {api.url}\nexport KUBECONFIG={config.resolve()}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from lorafleet import model_store

    try:
        path = model_store.fetch(args.name, log=lambda line: print(line, file=sys.stderr))
    except KeyError as exc:
        print(f"lorafleet models fetch: {exc.args[0]}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _models_list(_: argparse.Namespace) -> int:
    from lorafleet import model_store

    for name, folder, state in model_store.list_models():
        print(f"{name:<24} {state:<12} {folder}")
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="lorafleet", description="Serve many LoRA adapters of one base model as a fleet.")
    from lorafleet import __version__

    parser.add_argument("--version", action="version", version=f"lorafleet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True

    def add(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> OneLineParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=run)
        return sub

    serve = add("serve", "run one replica: the batched multi-LoRA engine and its HTTP APIs", _serve)
    from lorafleet.server.serve_config import add_serve_flags

    add_serve_flags(serve)
    gateway = add("gateway", "route requests by adapter id to the replica holding it hot", _gateway)
    from lorafleet.gateway.main import add_gateway_flags

    add_gateway_flags(gateway)
    operator = add("operator", "run the kopf operator for BaseModel and Adapter resources", _operator)
    from lorafleet.operator.main import add_operator_flags

    add_operator_flags(operator)
    kube = add("kube-api", "run the embedded Kubernetes API alone and write a kubeconfig for it", _kube_api)
    kube.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    kube.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    kube.add_argument("--crds", type=Path, help="a folder of CustomResourceDefinition YAML files to install at start")
    kube.add_argument("--kubeconfig", type=Path, default=Path(".lorafleet/kubeconfig"), help="where to write the kubeconfig")
    up = add("up", "run the whole fleet on this machine", _local("up"))
    up.add_argument("--model", default="smollm2", help="smollm2 (the default) or a local model folder")
    up.add_argument("--adapters", type=Path, default=Path(".lorafleet/adapters"), help="a folder of PEFT adapters, one Adapter each")
    up.add_argument("--replicas", type=int, default=2, help="replica processes (default: 2)")
    up.add_argument("--port", type=int, default=8000, help="the gateway's port on 127.0.0.1 (default: 8000)")
    up.add_argument("--api-port", type=int, default=0, help="the embedded Kubernetes API's port (default: any free port)")
    up.add_argument("--name", default="smollm2", help="the BaseModel's name (default: smollm2)")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the fleet to be ready")
    up.add_argument("--tenants", choices=("demo", "none"), default="demo",
                    help="demo (the default): two Tenants, acme and globex, with keys printed; none: an open gateway")
    demo = add("demo-adapters", "fine-tune the three demo LoRA adapters (pirate, french, shouty) on the CPU", _demo_adapters)
    demo.add_argument("--model", default="smollm2", help="smollm2 (the default) or a local model folder")
    demo.add_argument("--out", type=Path, default=Path(".lorafleet/adapters"), help="the adapter root to write them into")
    demo.add_argument("--epochs", type=int, default=4, help="passes over each small dataset (default: 4)")
    for sub in (up, add("down", "stop the fleet started by `lorafleet up`", _local("down")),
                add("status", "show fleets, replicas and where each adapter is hot", _local("status"))):
        sub.add_argument("--workdir", type=Path, default=Path(".lorafleet"), help="state, logs and kubeconfig (default: .lorafleet)")

    models = commands.add_parser("models", help="fetch and list base models", description="Fetch and list base models.")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=OneLineParser)
    model_commands.required = True
    fetch = model_commands.add_parser("fetch", help="make a known model's safetensors folder (no hub access)")
    fetch.add_argument("name", help="a known model name, e.g. smollm2")
    fetch.set_defaults(run=_models_fetch)
    listing = model_commands.add_parser("list", help="list the models in the store")
    listing.set_defaults(run=_models_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
