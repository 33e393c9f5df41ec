"""Helpers shared by the engine tests: build an engine on a folder, capture the logits it samples from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.server.config import EngineConfig
from lorafleet.server.engine import output as output_module
from lorafleet.server.engine.engine import LLMEngine


def make_engine(folder: Path, **overrides: Any) -> LLMEngine:
    """On CPU unless LORAFLEET_TEST_DEVICE says otherwise (bench/gpu_run.sh runs the parity tests on cuda)."""
    settings = dict(model=str(folder), device=os.environ.get("LORAFLEET_TEST_DEVICE", "cpu"), dtype="float32", block_size=4, kv_cache_memory=1 << 22, max_total_tokens=512, max_input_length=256)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def capture_logits(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    """Record, per request id, the logits row each of its tokens was sampled from."""
    captured: dict[str, list[torch.Tensor]] = {}
    original = output_module.sample

    def recording_sample(logits: torch.Tensor, seqs: list) -> Any:
        for row, seq in enumerate(seqs):
            captured.setdefault(seq.request_id, []).append(logits[row].detach().cpu().clone())
        return original(logits, seqs)

    monkeypatch.setattr(output_module, "sample", recording_sample)
    return captured
