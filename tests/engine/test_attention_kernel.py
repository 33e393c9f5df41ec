"""The Triton paged decode-attention kernel against the torch path (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.server.model.attention import BatchMetadata, paged_attention
from lorafleet.server.model.attention_triton import paged_decode_attention

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`


@pytest.mark.parametrize("dtype,block_size,head_dim", [(torch.float32, 4, 16), (torch.float16, 4, 16), (torch.bfloat16, 4, 16),
                                                        (torch.float32, 16, 64), (torch.bfloat16, 16, 128)])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 2, None), (8, 8, None), (9, 3, None), (4, 1, 5)])
def test_triton_decode_matches_torch_path(dtype: torch.dtype, block_size: int, head_dim: int, heads: int, kv_heads: int, window: int | None) -> None:
    """Half precisions and the production block (16) and head sizes (64, 128) beside the small ones."""
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    num_blocks = 40
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    lens = [1, 7, 13, 4] if block_size == 4 else [1, 17, 40, 33]  # several blocks per sequence at either size
    tables = [torch.randperm(num_blocks, generator=generator)[: -(-n // block_size)].tolist() for n in lens]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), heads, head_dim, generator=generator).to(dtype)
    # The torch path writes the new token's k/v first; here the cache already holds them, so write them back unchanged.
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)])
    k_new = key_cache.view(-1, kv_heads, head_dim)[slots].clone()
    v_new = value_cache.view(-1, kv_heads, head_dim)[slots].clone()
    meta = BatchMetadata(slot_mapping=slots, prefills=[], decode_rows=torch.arange(len(lens)), decode_block_tables=padded,
                         decode_context_lens=torch.tensor(lens), rope_lengths=[])
    expected = paged_attention(q, k_new, v_new, key_cache, value_cache, meta, head_dim**-0.5, window)
    got = paged_decode_attention(q, key_cache, value_cache, padded.to(torch.int32), torch.tensor(lens, dtype=torch.int32), head_dim**-0.5, window)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_engine_with_the_triton_decode_kernel_matches_the_torch_path(tiny_models, monkeypatch) -> None:
    from support.engine import capture_logits, make_engine

    from lorafleet.server.engine.sequence import SamplingParams

    prompts = [[1, 5, 6, 7, 8], [1, 9, 10], [1] + list(range(20, 31))]
    results = {}
    for kernel in ("torch", "triton"):
        captured = capture_logits(monkeypatch)
        engine = make_engine(tiny_models["mistral"], attention_kernel=kernel, max_batch_prefill_tokens=6)
        seqs = []
        for prompt in prompts:  # one arrival per step: steps mix decode rows with (chunked) prefill
            seqs.append(engine.add_request(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True)))
            engine.step()
        engine.run_to_completion()
        results[kernel] = ([s.generated_ids for s in seqs], [torch.stack(captured[s.request_id]) for s in seqs])
    assert results["torch"][0] == results["triton"][0]
    for ours, theirs in zip(*(results[k][1] for k in ("torch", "triton"))):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
