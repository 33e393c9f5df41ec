"""The batched LoRA op: the torch paths and the Triton kernels against the one-token-at-a-time reference.

The Triton kernels run on CPU here under TRITON_INTERPRET=1 (set in conftest before triton is
imported); on a GPU, bench/gpu_check.py runs the same comparison at 7B-like shapes.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.server.lora import ops as lora_ops
from lorafleet.server.lora.ops import LoraBatch, SlotBuffers, lora_reference

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`


def stacked(a: torch.Tensor, b: torch.Tensor, kernel: str) -> SlotBuffers:
    """One layer and one module ("m") of stacked buffers, each slot's rank read from its nonzero columns."""
    slots = SlotBuffers([{"m": a}], [{"m": b}], kernel, a.shape[2])
    slots.modules_of_slot = {s: {"m"} for s in range(a.shape[0])}
    # Each slot's true rank, so the torch path's slicing to the batch's largest rank acts.
    slots.rank_of_slot = {s: int((a[s].abs().sum(0) > 0).nonzero().max()) + 1 for s in range(a.shape[0])}
    return slots


def make_case(rank: int, dtype: torch.dtype, seq_slots: list[int], seq_tokens: list[int], in_features=48, out_features=80, num_slots=16,
              width: int = 64):
    generator = torch.Generator().manual_seed(rank)
    a = torch.zeros(num_slots, in_features, width, dtype=dtype)
    b = torch.zeros(num_slots, width, out_features, dtype=dtype)
    # Each slot gets its own rank up to `rank`, zero-padded to the buffers' width, as real slots are.
    for s in range(num_slots):
        r = max(1, rank - s)
        a[s, :, :r] = (torch.randn(in_features, r, generator=generator) * 0.3).to(dtype)
        b[s, :r, :] = (torch.randn(r, out_features, generator=generator) * 0.3).to(dtype)
    tokens = sum(seq_tokens)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    token_slots = torch.tensor([s for s, n in zip(seq_slots, seq_tokens) for _ in range(n)])
    return a, b, x, token_slots


BATCHES = {
    "prefill+decode mixed": ([0, -1, 3, 3, 5, -1, 1], [7, 3, 1, 1, 20, 1, 1]),
    "decode over many adapters": ([0, 1, 2, 3, 4, 5, -1, 2], [1] * 8),
    "one adapter": ([2, 2, 2, 2], [1, 1, 5, 1]),
    "contiguous decode rows": ([4, 0, 3, 1, 2, 5], [1] * 6),  # slots 0..5 once each: read in place, no padding
    "decode rows in slot order": ([0, 1, 2, 3, 4, 5], [1] * 6),  # nor any gather of x or of the delta
    "decode over slots with gaps": ([6, 2, 4, 8, 4, 9, -1], [1] * 7),  # slots 2..9, some empty, one twice: padded
    "decode over scattered slots": ([0, 15, 7, 12, 3, -1, 15], [1] * 7),  # five of sixteen slots: gathered
    "two adapters side by side": ([1, 1, 1, 4, 4, -1], [1] * 6),  # grouped rows as slices
    "adjacent prefill chunks on one adapter": ([3, 3, 3, -1, 3, 2], [4, 6, 2, 3, 5, 4]),  # merged segments
    "long prefill chunks": ([2, -1, 5, 1], [70, 3, 80, 1]),  # 64 rows and more: the transposed shrink below rank 16
    "prefill among decode rows of many adapters": ([0, 3, 1, 2, 4, 5, 2, 3], [1, 9, 1, 1, 12, 1, 1, 1]),  # segments and a span
}


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("rank,dtype", [(4, torch.float32), (16, torch.float32), (64, torch.float32), (8, torch.bfloat16), (64, torch.float16)])
def test_lora_op_matches_reference(batch_name: str, kernel: str, rank: int, dtype: torch.dtype) -> None:
    """Every path against the plain reference. Not reachable here: the SGMV kernels' bfloat16 branch that feeds
    bf16 tiles to tl.dot (the interpreter multiplies bf16 wrongly, so it takes the upcasting branch instead);
    it runs on a GPU in bench/gpu_check.py and in bench/gpu_run.sh's parity step."""
    seq_slots, seq_tokens = BATCHES[batch_name]
    a, b, x, token_slots = make_case(rank, dtype, seq_slots, seq_tokens)
    # The output is a strided slice of a wider tensor, as q/k/v are slices of the fused projection.
    wide = torch.randn(x.shape[0], 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = wide.clone()
    y = wide[:, 10:90]
    LoraBatch.build(stacked(a, b, kernel), seq_slots, seq_tokens).add(0, "m", x, y)
    expected = lora_reference(x, a, b, token_slots)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(wide[:, 10:90].float(), before[:, 10:90].float() + expected, atol=tol, rtol=tol)
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 90:], before[:, 90:])
    base_rows = token_slots < 0
    assert torch.equal(wide[base_rows], before[base_rows])  # rows with no adapter are untouched


@pytest.mark.parametrize("batch_name", BATCHES)
def test_float32_slots_under_a_bfloat16_model(batch_name: str) -> None:
    """The CPU engine keeps slots in float32 under a bf16 model: decode rows are widened and their delta narrowed
    into y; prefill chunks narrow their adapter's A and B to bf16."""
    seq_slots, seq_tokens = BATCHES[batch_name]
    a, b, x, token_slots = make_case(8, torch.float32, seq_slots, seq_tokens)
    wide = torch.randn(x.shape[0], 100, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = wide.clone()
    LoraBatch.build(stacked(a, b, "torch"), seq_slots, seq_tokens).add(0, "m", x.to(torch.bfloat16), wide[:, 10:90])
    expected = lora_reference(x.to(torch.bfloat16), a, b, token_slots)
    torch.testing.assert_close(wide[:, 10:90].float(), before[:, 10:90].float() + expected, atol=3e-2, rtol=3e-2)
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 90:], before[:, 90:])


@pytest.mark.parametrize("batch_name", ["prefill+decode mixed", "decode over many adapters"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_wide_shapes_loop_over_k_tile_n_and_mask_the_rank(batch_name: str, kernel: str) -> None:
    """K=160 loops over K blocks (32 and 64 wide), N=300 spans several output tiles (64 and 128 wide), and
    24-wide buffers leave the kernels' 32-wide rank block partly masked: the shapes the 48x80x64 cases never reach."""
    seq_slots, seq_tokens = BATCHES[batch_name]
    a, b, x, token_slots = make_case(24, torch.float32, seq_slots, seq_tokens, in_features=160, out_features=300, width=24)
    y = torch.zeros(x.shape[0], 300)
    LoraBatch.build(stacked(a, b, kernel), seq_slots, seq_tokens).add(0, "m", x, y)
    torch.testing.assert_close(y, lora_reference(x, a, b, token_slots), atol=1e-4, rtol=1e-4)


def test_many_adapters_take_the_gathered_path_and_few_the_grouped_one() -> None:
    a, b, _, _ = make_case(8, torch.float32, [0], [1])
    many = LoraBatch.build(stacked(a, b, "torch"), [0, 1, 2, 3, 4, 5], [1] * 6)
    few = LoraBatch.build(stacked(a, b, "torch"), [0, 1, 0, 1, 0, 1], [1] * 6)
    assert many.rows.numel() == 6 and many.groups == [] and many.span == (0, 6, 1) and many.positions is None
    # Rows of many adapters are read in place while their slots are dense, and gathered when they are scattered.
    gaps = LoraBatch.build(stacked(a, b, "torch"), *BATCHES["decode over slots with gaps"])
    assert gaps.span == (2, 8, 2) and gaps.positions.tolist() == [0, 4, 5, 8, 12, 14]
    # Contiguous rows take the delta back by one index_select (each row's place, in row order), or as it is.
    assert gaps.row_range == slice(0, 6) and gaps.back.tolist() == [8, 0, 4, 12, 5, 14]
    assert many.row_range == slice(0, 6) and many.back is None
    scattered = LoraBatch.build(stacked(a, b, "torch"), *BATCHES["decode over scattered slots"])
    assert scattered.span is None and scattered.row_slots.tolist() == [0, 15, 7, 12, 3, 15]
    assert len(few.groups) == 2 and few.rows.numel() == 0
    # The switch is at GROUP_LIMIT distinct adapters among decode rows: that many are grouped, one more is gathered.
    at_limit = LoraBatch.build(stacked(a, b, "torch"), list(range(lora_ops.GROUP_LIMIT)) * 2, [1] * 2 * lora_ops.GROUP_LIMIT)
    past_limit = LoraBatch.build(stacked(a, b, "torch"), list(range(lora_ops.GROUP_LIMIT + 1)), [1] * (lora_ops.GROUP_LIMIT + 1))
    assert len(at_limit.groups) == lora_ops.GROUP_LIMIT and at_limit.rows.numel() == 0
    assert past_limit.groups == [] and past_limit.rows.numel() == lora_ops.GROUP_LIMIT + 1
    # Adjacent prefill chunks on one adapter become one segment (one matmul pair); a base row in between splits them.
    merged = LoraBatch.build(stacked(a, b, "torch"), [3, 3, 3, -1, 3, 2], [4, 6, 2, 3, 5, 4])
    assert merged.segments == [(0, 12, 3), (15, 20, 3), (20, 24, 2)]


def test_the_slot_view_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Views are keyed by rank and by slot or span of slots, which traffic varies without end: the cache is emptied
    at its limit, and a view made after that is still the right one."""
    monkeypatch.setattr(lora_ops, "VIEW_CACHE_LIMIT", 8)
    a, b, _, _ = make_case(8, torch.float32, [0], [1])
    slots = stacked(a, b, "torch")
    for first in range(6):
        for stop in range(first + 1, 7):
            slots.view(0, "m", 4, (first, stop))
            assert len(slots._views) <= 8
    got_a, got_b = slots.view(0, "m", 3, (2, 5))
    assert torch.equal(got_a, a[2:5, :, :3]) and torch.equal(got_b, b[2:5, :3])

