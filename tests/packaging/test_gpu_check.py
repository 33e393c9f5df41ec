"""bench/gpu_check.py's decode-step check runs end to end on CPU at tiny shapes (no capture there).

The first session with a GPU has minutes, not hours: this keeps the script in step with the engine's
internals it builds on (CausalLM, KVCache, LoraSlots, DecodeGraphs) so that session measures instead of repairing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`


def test_decode_step_check_runs_on_cpu_at_tiny_shapes(capsys) -> None:
    failures = gpu_check.check_decode_step(None, torch.device("cpu"), hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=128,
                                           rows=5, context=20, repeat=1)
    line = capsys.readouterr().out
    assert failures == 0, line
    assert "decode step tiny shapes, 5 rows" in line and "max|diff| 0.00e+00 ok" in line
