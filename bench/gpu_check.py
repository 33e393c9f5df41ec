"""GPU check: the Triton LoRA and decode-attention kernels against the torch path at 7B-like shapes, with timings.

Hidden 4096 (q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336, down 14336->4096), 32 adapters
of ranks 8..64 in bf16 slots of rank 64. For a decode batch (one token per sequence, every
sequence on its own adapter) and a prefill batch (segments of 128..512 tokens), it checks the
Triton op against the torch op and prints each one's time and the Triton kernels' effective
memory bandwidth against the GPU's peak. Under five minutes on one GPU; exits 1 on a mismatch.

    python -P bench/gpu_check.py
"""

from __future__ import annotations

import sys

import torch

from lorafleet.server.lora.ops import LoraBatch

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
NUM_SLOTS, MAX_RANK = 32, 64


class Slots:
    """Stacked A/B buffers for one module, shaped as lorafleet's LoraSlots makes them."""

    def __init__(self, in_features: int, out_features: int, kernel: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = [{"m": a}], [{"m": b}]
        self.kernel = kernel
        self.modules_of_slot = {s: {"m"} for s in range(NUM_SLOTS)}


def timed_ms(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def check_decode_attention(peak: float | None) -> int:
    """The Triton paged decode kernel vs the torch path: 64 sequences x 1,024 tokens, 32 heads over 8 kv heads, d 128, bf16."""
    from lorafleet.server.model.attention import BatchMetadata, paged_attention
    from lorafleet.server.model.attention_triton import paged_decode_attention

    batch, context, heads, kv_heads, dim, block = 64, 1024, 32, 8, 128, 16
    blocks_per_seq = context // block
    generator = torch.Generator(device="cuda").manual_seed(1)
    key_cache = torch.randn(batch * blocks_per_seq, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, device="cuda")
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    slots = tables[:, -1] * block + block - 1
    k_new = key_cache.view(-1, kv_heads, dim)[slots].clone()
    v_new = value_cache.view(-1, kv_heads, dim)[slots].clone()
    meta = BatchMetadata(slot_mapping=slots, prefills=[], decode_rows=torch.arange(batch, device="cuda"),
                         decode_block_tables=tables, decode_context_lens=lens, rope_lengths=[])
    expected = paged_attention(q, k_new, v_new, key_cache, value_cache, meta, dim**-0.5, None)
    got = paged_decode_attention(q, key_cache, value_cache, tables, lens, dim**-0.5, None)
    error = (got.float() - expected.float()).abs().max().item()
    torch_ms = timed_ms(lambda: paged_attention(q, k_new, v_new, key_cache, value_cache, meta, dim**-0.5, None))
    triton_ms = timed_ms(lambda: paged_decode_attention(q, key_cache, value_cache, tables, lens, dim**-0.5, None))
    moved = 2 * key_cache.numel() * key_cache.element_size()
    bandwidth = moved / (triton_ms / 1e3)
    share = f" = {bandwidth / peak:5.1%} of peak" if peak else ""
    ok = error < 2e-2
    print(f"decode attention 64x1024 tokens  torch {torch_ms:7.3f} ms  triton {triton_ms:7.3f} ms  speed-up {torch_ms / triton_ms:5.2f}x  "
          f"{bandwidth / 1e9:7.1f} GB/s{share}  max|diff| {error:.2e} {'ok' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU here: this check needs cuda", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)
    print(f"device: {name}; torch {torch.__version__}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    failures = 0
    for module, (k, n) in SHAPES.items():
        a = torch.zeros(NUM_SLOTS, k, MAX_RANK, device="cuda", dtype=torch.bfloat16)
        b = torch.zeros(NUM_SLOTS, MAX_RANK, n, device="cuda", dtype=torch.bfloat16)
        for s in range(NUM_SLOTS):
            r = 8 * (1 + s % 8)  # ranks 8..64
            a[s, :, :r] = torch.randn(k, r, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02
            b[s, :r, :] = torch.randn(r, n, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02
        batches = {
            "decode 32 seqs x 1 token": (list(range(NUM_SLOTS)), [1] * NUM_SLOTS),
            "decode 256 seqs x 1 token": ([s % NUM_SLOTS for s in range(256)], [1] * 256),
            "prefill 8 segments 128..512": (list(range(8)), [128, 256, 512, 384, 128, 256, 512, 384]),
        }
        for label, (seq_slots, seq_tokens) in batches.items():
            tokens = sum(seq_tokens)
            x = torch.randn(tokens, k, device="cuda", generator=generator, dtype=torch.bfloat16)
            y0 = torch.randn(tokens, n, device="cuda", generator=generator, dtype=torch.bfloat16)
            results, times = {}, {}
            for kernel in ("torch", "triton"):
                batch = LoraBatch.build(Slots(k, n, kernel, a, b), seq_slots, seq_tokens)
                y = y0.clone()
                batch.add(0, "m", x, y)
                results[kernel] = y.float() - y0.float()
                times[kernel] = timed_ms(lambda: batch.add(0, "m", x, y0.clone()))
            error = (results["triton"] - results["torch"]).abs().max().item()
            scale = results["torch"].abs().max().item()
            ok = error <= 2e-2 * max(scale, 1e-3)
            failures += not ok
            distinct = len(set(seq_slots))
            moved = 2 * (tokens * k + 2 * tokens * n) + distinct * 2 * MAX_RANK * (k + n)
            bandwidth = moved / (times["triton"] / 1e3)
            share = f" = {bandwidth / peak:5.1%} of peak" if peak else ""
            print(f"{module:<9} {label:<28} torch {times['torch']:7.3f} ms  triton {times['triton']:7.3f} ms  "
                  f"speed-up {times['torch'] / times['triton']:5.2f}x  {bandwidth / 1e9:7.1f} GB/s{share}  "
                  f"max|diff| {error:.2e} {'ok' if ok else 'MISMATCH'}", flush=True)
    failures += check_decode_attention(peak)
    print("all kernels match the torch path" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
