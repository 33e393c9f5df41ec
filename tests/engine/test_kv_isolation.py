"""Nothing one sequence writes into the KV cache can change another's output.

A freed block keeps what its last owner wrote (NaN too, when that owner's activations overflowed), and a
padded decode row reads positions its own sequence never wrote: the tail of its last block, and block 0 as
padding. The third adversarial run found a poisoned merge's NaN killing concurrent streams and, through
freed blocks, later requests for minutes. Here every free block is filled with NaN, or with 1e30, before
every step; the parity suite's requests (chunked prefill mixed with decode rows of other lengths) must give
exactly the logits and tokens of a clean cache, on the torch path in float32 and bfloat16 and on the Triton
kernel (interpreted).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.engine import capture_logits, make_engine

from lorafleet.server.engine.engine import LLMEngine
from lorafleet.server.engine.sequence import SamplingParams

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1] + list(range(30, 53)), [1, 99]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def poison_free_blocks(engine: LLMEngine, value: float) -> None:
    blocks = torch.tensor(engine.allocator.blank_blocks(), dtype=torch.long)
    for cache in (*engine.runner.kv.keys, *engine.runner.kv.values):
        cache[blocks] = value


def serve(engine: LLMEngine, poison: float | None) -> list:
    """One arrival per step, so steps mix prefill chunks with decode rows padded to each other's lengths."""
    seqs, pending = [], list(PROMPTS)
    while pending or engine.has_work():
        if poison is not None:
            poison_free_blocks(engine, poison)
        if pending:
            seqs.append(engine.add_request(pending.pop(0), GREEDY))
        engine.step()
    return seqs


@pytest.mark.parametrize("poison", [float("nan"), 1e30])
@pytest.mark.parametrize(("kernel", "dtype"), [("torch", "float32"), ("torch", "bfloat16"), ("triton", "float32")])
def test_garbage_in_free_kv_blocks_changes_no_output(tiny_models: dict[str, Path], kernel: str, dtype: str, poison: float,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for fill in (None, poison):
        captured = capture_logits(monkeypatch)
        engine = make_engine(tiny_models["mistral"], attention_kernel=kernel, dtype=dtype, max_batch_prefill_tokens=6)
        seqs = serve(engine, fill)
        results.append(([s.generated_ids for s in seqs], [torch.stack(captured[s.request_id]) for s in seqs]))
    (clean_tokens, clean_logits), (tokens, logits) = results
    assert tokens == clean_tokens
    for ours, clean in zip(logits, clean_logits):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, clean, atol=0, rtol=0)


def test_a_row_whose_activations_overflow_fails_alone_and_leaves_nothing_behind(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """An adapter with finite but absurd weights (past every load check) makes its row's activations inf, then NaN:
    that request fails with its own error; its neighbours in the same steps, and requests that later take its
    freed blocks, produce exactly the tokens they produce on a clean replica."""
    from lorafleet.server.engine.sampler import SamplingError
    from lorafleet.server.engine.sequence import FinishReason
    from lorafleet.testing import make_lora_adapter

    folder = make_lora_adapter(tiny_models["mistral"], tmp_path / "overflow", seed=3, scale=1e18,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    clean = make_engine(tiny_models["mistral"])
    expected = [clean.add_request(p, GREEDY) for p in PROMPTS]
    clean.run_to_completion()

    engine = make_engine(tiny_models["mistral"], max_active_adapters=2, max_lora_rank=8)
    engine.adapters.load_now("overflow", folder)
    bad = engine.add_request([1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], SamplingParams(max_new_tokens=12, ignore_eos=True), adapter="overflow")
    beside = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.run_to_completion()
    assert bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, SamplingError)
    assert [s.generated_ids for s in beside] == [s.generated_ids for s in expected]
    later = [engine.add_request(p, GREEDY) for p in PROMPTS]  # on the blocks the overflowing row left
    engine.run_to_completion()
    assert [s.generated_ids for s in later] == [s.generated_ids for s in expected]
