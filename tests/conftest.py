"""Shared fixtures: tiny real checkpoints and adapters, and the converted default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The Triton LoRA kernels are checked on CPU through the interpreter; it must be chosen before
# triton is first imported, which is why this is the one setting made at import time here.
os.environ.setdefault("TRITON_INTERPRET", "1")

from lorafleet import model_store
from lorafleet.testing import make_tiny_model

TINY_ARCHS = ["llama", "mistral", "qwen2"]


def pytest_configure(config: pytest.Config) -> None:
    """Replicas the tests start as processes compute in float32, where their tokens equal transformers'.

    `--dtype auto` picks bfloat16 on CPUs with AMX; the tests of that choice set it explicitly.
    """
    os.environ.setdefault("LORAFLEET_DTYPE", "float32")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads the converted default model is marked ``smollm2`` (``make test-fast`` leaves them out)."""
    for item in items:
        if "smollm2_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture (plus a tied-embedding Llama), made once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch=arch, seed=i) for i, arch in enumerate(TINY_ARCHS + ["llama-tied"])}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The converted SmolLM2 folder. `make setup` makes it; its absence is a setup failure, not a skip."""
    folder = model_store.model_path("smollm2")
    problem = model_store.verify_manifest(folder)
    if problem:
        pytest.fail(f"the default model is not ready ({problem}); run `make setup`")
    return folder


@pytest.fixture
def kube_api(tmp_path: Path):
    """The embedded Kubernetes API on a free loopback port, with the demo CRD installed and its own kubeconfig."""
    from support.kube import WIDGET_CRD

    from lorafleet.local.kubeapi import EmbeddedKubeAPI

    with EmbeddedKubeAPI(crds=[WIDGET_CRD]) as api:
        api.kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.kubecache = tmp_path / "kubecache"
        yield api


@pytest.fixture
def kubectl(kube_api):
    from support.kube import kubectl_for

    return kubectl_for(kube_api.kubeconfig, kube_api.kubecache)
