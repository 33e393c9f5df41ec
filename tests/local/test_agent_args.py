"""The local node agent binds each container to its pod's loopback address and folders, whatever the operator wrote."""

from __future__ import annotations

from pathlib import Path

from lorafleet.cli import build_parser
from lorafleet.local.agent import local_args


def test_the_pods_address_port_and_folders_win_over_any_spelling_of_the_operators() -> None:
    operator_args = ["serve", "--model", "m", "--port=8080", "--host", "0.0.0.0", "--device", "cuda", "--adapter-cache-dir=/data/adapters"]
    args = build_parser().parse_args(local_args(operator_args, "127.0.0.9", 1234, Path("/tmp/pod"), Path("/tmp/adapters")))
    assert (args.host, args.port, args.device) == ("127.0.0.9", 1234, "cpu")
    assert args.adapter_cache_dir == Path("/tmp/pod/adapters") and args.adapter_roots == [Path("/tmp/adapters")]
    gateway = build_parser().parse_args(local_args(["gateway", "--service", "ns/x", "--port=8000"], "127.0.0.1", 8001, Path("/tmp/g"), None))
    assert (gateway.host, gateway.port) == ("127.0.0.1", 8001)
