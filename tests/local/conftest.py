"""`lorafleet up` as a fixture: the embedded API, the operator, the node agent and a gateway, on the tiny model."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.kube import kubectl_for
from support.server import free_port

from lorafleet.testing import make_lora_adapter


@contextlib.contextmanager
def lorafleet_up(model: Path, adapters: Path, tmp_path: Path, *extra: str):
    """``lorafleet up`` until it says it is up; yields (process, kubectl, gateway URL, workdir, its output)."""
    port, workdir = free_port(), tmp_path / "state"
    process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "up", "--model", str(model), "--adapters", str(adapters),
                                "--replicas", "2", "--port", str(port), "--workdir", str(workdir), "--timeout", "120", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "lorafleet is up" in line or "not ready after" in line:
                break
        assert any("lorafleet is up" in line for line in lines), "".join(lines)
        kubectl = kubectl_for(workdir / "kubeconfig", tmp_path / "kubecache")
        yield process, kubectl, f"http://127.0.0.1:{port}", workdir, "".join(lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


@pytest.fixture
def fleet(tiny_models: dict[str, Path], tmp_path: Path):
    """An open fleet (no tenants): what the tests of everything but tenancy call."""
    adapters = tmp_path / "adapters"
    make_lora_adapter(tiny_models["llama"], adapters / "pirate", r=4, seed=1)
    make_lora_adapter(tiny_models["llama"], adapters / "Support_Bot.v2", r=4, seed=3)  # not a valid object name as it is
    with lorafleet_up(tiny_models["llama"], adapters, tmp_path, "--tenants", "none") as (process, kubectl, url, workdir, output):
        yield process, kubectl, url, workdir, adapters, tiny_models["llama"], output


@pytest.fixture
def tenant_fleet(tiny_models: dict[str, Path], tmp_path: Path):
    """The demo tenants (the default): pirate is acme's, shouty globex's, support shared."""
    adapters = tmp_path / "adapters"
    for seed, name in enumerate(("pirate", "shouty", "support")):
        make_lora_adapter(tiny_models["llama"], adapters / name, r=4, seed=seed + 1)
    with lorafleet_up(tiny_models["llama"], adapters, tmp_path) as (process, kubectl, url, workdir, output):
        yield kubectl, url, json.loads((workdir / "up.json").read_text())["tenants"], output
