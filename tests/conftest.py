"""Shared fixtures: tiny real checkpoints and adapters, and the converted default model."""

from __future__ import annotations

from pathlib import Path

import pytest

import os

# The Triton LoRA kernels are checked on CPU through the interpreter; it must be chosen before
# triton is first imported, which is why this is the one setting made at import time here.
os.environ.setdefault("TRITON_INTERPRET", "1")

from lorafleet import model_store
from lorafleet.testing import make_tiny_model

TINY_ARCHS = ["llama", "mistral", "qwen2"]


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
