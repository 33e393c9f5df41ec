"""The Dockerfile builds what the wheel test installs, runs as non-root, and every command it is run with exists.

No container engine runs here, so the image itself is not built in CI: this reads the Dockerfile and checks it
against the project's own declarations (pyproject's package folders, the CLI's subcommands, the containers the
operator and its manifests create), which is where it drifted before (the CRDs became package data).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from lorafleet.cli import build_parser
from lorafleet.operator.desired import gateway_deployment, replica_deployment

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _subcommands() -> set[str]:
    parser = build_parser()
    return {name for action in parser._subparsers._group_actions for name in action.choices}  # noqa: SLF001 - argparse keeps them here


def test_the_image_installs_the_wheel_from_every_package_folder_and_runs_as_non_root() -> None:
    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {m.group(1) for m in re.finditer(r"^COPY (\S+) \./\S+$", DOCKERFILE, re.M)}
    assert folders <= copied, f"package folders the image does not copy: {folders - copied}"
    assert "pip wheel" in DOCKERFILE and re.search(r'pip install [^\n]*/wheels/lorafleet-\*\.whl', DOCKERFILE)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["lorafleet"\]$', DOCKERFILE, re.M)


def test_every_command_the_image_is_run_with_exists() -> None:
    spec = {"model": {"id": "org/base"}, "replicas": 2, "tracing": {"otlpEndpoint": "http://collector:4318"}}
    containers = [c for d in (replica_deployment("b", "ns", spec), gateway_deployment("b", "ns", spec)) for c in d["spec"]["template"]["spec"]["containers"]]
    operator = yaml.safe_load_all((REPO / "manifests" / "operator.yaml").read_text())
    containers += [c for doc in operator if doc and doc.get("kind") == "Deployment" for c in doc["spec"]["template"]["spec"]["containers"]]
    used = {c["args"][0] for c in containers}
    assert used == {"serve", "gateway", "operator"}
    assert used <= _subcommands()
    for command in used:  # and each parses the arguments it is given
        args = next(c["args"] for c in containers if c["args"][0] == command)
        build_parser().parse_args(args)
