"""The CUDA-graph decode path's padded, static-buffer forward, run eagerly on CPU, against the eager engine.

Everything but the capture runs here (the Triton kernels through the interpreter): bucket padding,
the scratch block padded rows write into, LoRA slot -1 for base and padded rows, buffers reused
across steps and sizes, adapters swapped in slots after a bucket was first used. The capture and
replay themselves need cuda and have not run yet (bench/gpu_check.py times them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.engine import capture_logits, make_engine

from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.testing import ALL_PROJECTIONS, make_lora_adapter

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
KERNELS = dict(attention_kernel="triton", lora_kernel="triton", max_active_adapters=2)


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-adapters")
    return {
        "a": make_lora_adapter(tiny_models["llama"], root / "a", r=8, target_modules=ALL_PROJECTIONS, seed=1),
        "b": make_lora_adapter(tiny_models["llama"], root / "b", r=4, target_modules=["q_proj", "v_proj", "down_proj"], seed=2),
    }


def _run(engine, requests: list[tuple[list[int], str | None]], monkeypatch: pytest.MonkeyPatch, late: int = 2):
    """Requests arrive two at a time, one step apart, so decode steps have 1..N rows (buckets 1, 2, 4, 8)."""
    captured = capture_logits(monkeypatch)
    seqs = []
    for i, (prompt, adapter) in enumerate(requests):
        seqs.append(engine.add_request(prompt, GREEDY, adapter=adapter))
        if i % late == late - 1:
            engine.step()
    engine.run_to_completion()
    return [s.generated_ids for s in seqs], [torch.stack(captured[s.request_id]) for s in seqs]


def test_padded_static_decode_equals_the_eager_engine(tiny_models: dict[str, Path], adapters, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [([1, 5, 6, 7], "a"), ([1, 9], None), ([1] + list(range(20, 33)), "b"), ([1, 40, 41], "a"), ([1, 50, 51, 52, 53], None)]
    results = {}
    for graphs in ("off", "on"):
        engine = make_engine(tiny_models["llama"], cuda_graphs=graphs, **KERNELS)
        for name, folder in adapters.items():
            engine.load_adapter(name, folder)
        results[graphs] = _run(engine, requests, monkeypatch)
        if graphs == "on":
            # Five rows pad to a bucket of 8: three scratch rows in the same batch as the real ones.
            assert engine.runner.decode_graphs.replays > 0 and {b for b, _ in engine.runner.decode_graphs._captured} >= {8}
        else:
            assert engine.runner.decode_graphs is None
    assert results["on"][0] == results["off"][0]
    for ours, theirs in zip(results["on"][1], results["off"][1]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_adapters_loaded_after_a_bucket_was_first_used_are_applied(tiny_models: dict[str, Path], adapters, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph reads adapter weights from the slot buffers: base-only steps first, then an adapter, then another in its place."""
    base = [([1, 5, 6], None), ([1, 7, 8, 9], None)]
    results = {}
    for graphs in ("off", "on"):
        engine = make_engine(tiny_models["llama"], cuda_graphs=graphs, **{**KERNELS, "max_active_adapters": 1})
        outputs = [_run(engine, base, monkeypatch)[0]]
        engine.load_adapter("a", adapters["a"])
        outputs.append(_run(engine, [([1, 5, 6], "a"), ([1, 7, 8, 9], None)], monkeypatch)[0])
        engine.adapters.unload("a", set())
        engine.load_adapter("b", adapters["b"])
        outputs.append(_run(engine, [([1, 5, 6], "b"), ([1, 7, 8, 9], "b")], monkeypatch)[0])
        results[graphs] = outputs
    assert results["on"] == results["off"]
    assert results["on"][1][0] != results["on"][0][0] and results["on"][2][0] != results["on"][1][0]  # the adapters change tokens


def test_graphs_refuse_what_cannot_be_captured(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="Triton attention and LoRA kernels"):
        make_engine(tiny_models["llama"], cuda_graphs="on", attention_kernel="torch", lora_kernel="triton")
    assert make_engine(tiny_models["llama"], **KERNELS).runner.decode_graphs is None  # auto: off on cpu
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        make_engine(tiny_models["llama"], cuda_graphs="yes")


def test_a_failed_capture_falls_back_to_eager_steps(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that raises (a driver, a kernel, memory) is logged once; that step and every later one run eagerly."""
    requests = [([1, 5, 6, 7], None), ([1, 9], None), ([1, 30, 31], None)]
    expected = _run(make_engine(tiny_models["llama"], cuda_graphs="off", **KERNELS), requests, monkeypatch)
    engine = make_engine(tiny_models["llama"], cuda_graphs="on", **KERNELS)
    engine.runner.decode_graphs.capture = True  # as on cuda

    def failing_capture(bucket) -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(engine.runner.decode_graphs, "_capture", failing_capture)
    got = _run(engine, requests, monkeypatch)
    assert got[0] == expected[0]
    assert engine.runner.decode_graphs.broken == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert engine.runner.decode_graphs.replays == 1  # only the step whose capture failed went through the static buffers
