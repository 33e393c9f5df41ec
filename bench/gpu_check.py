"""GPU check: the Triton LoRA and decode-attention kernels against the torch path at 7B-like shapes, with timings.

Hidden 4096 (q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336, down 14336->4096), 32 adapters
of ranks 8..64 in bf16 slots of rank 64. For a decode batch (one token per sequence, every
sequence on its own adapter) and a prefill batch (segments of 128..512 tokens), it checks the
Triton op against the torch op and prints each one's time and the Triton kernels' effective
memory bandwidth against the GPU's peak. Then one decode step of a 7B-shaped model, eager vs replayed
from a CUDA graph, against its memory roofline. Under five minutes on one GPU; exits 1 on a mismatch.

    python -P bench/gpu_check.py
"""

from __future__ import annotations

import sys
import time

import torch

from lorafleet.server.lora.ops import LoraBatch, SlotBuffers

# What only this script (and bench/gpu_run.sh) runs: the SGMV kernels' bfloat16 tensor-core branch (CI's Triton
# interpreter takes the upcasting one), real Triton compilation of every kernel, and the CUDA-graph capture.

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
NUM_SLOTS, MAX_RANK = 32, 64


def stacked(kernel: str, a: torch.Tensor, b: torch.Tensor) -> SlotBuffers:
    """Stacked A/B buffers for one module ("m"), as lorafleet's LoraSlots holds them."""
    slots = SlotBuffers([{"m": a}], [{"m": b}], kernel, MAX_RANK)
    slots.modules_of_slot = {s: {"m"} for s in range(NUM_SLOTS)}
    slots.rank_of_slot = {s: MAX_RANK for s in range(NUM_SLOTS)}  # the torch path's rank slicing off: same work as the kernels
    return slots


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


def timed_ms_cpu(fn, repeat: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


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


def check_decode_step(peak: float | None, device: torch.device = torch.device("cuda"), hidden: int = 4096, intermediate: int = 14336,
                      layers: int = 32, heads: int = 32, kv_heads: int = 8, vocab: int = 32000, rows: int = 32, context: int = 512,
                      repeat: int = 10) -> int:
    """A 7B-shaped random-weight Llama in bf16: one decode step of 32 rows (512 cached tokens each, 16 of them on
    8 rank-16 adapters over all projections), eager vs replayed from a CUDA graph, against the step's memory roofline
    (every weight and cached key/value read once). The two must produce the same hidden states.

    On CPU (tests/packaging/test_gpu_check.py, at tiny shapes, Triton interpreted) both runs are eager: what that
    keeps working is everything around the capture, so a GPU session measures instead of repairing."""
    import tempfile
    from pathlib import Path

    from transformers import LlamaConfig

    from lorafleet.server.engine.decode_graphs import DecodeGraphs, DecodeRow
    from lorafleet.server.lora.slots import LoraSlots
    from lorafleet.server.model.checkpoint import read_config
    from lorafleet.server.model.kv import KVCache
    from lorafleet.server.model.model import CausalLM

    dtype, block = torch.bfloat16 if device.type == "cuda" else torch.float32, 16
    with tempfile.TemporaryDirectory() as tmp:
        LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, architectures=["LlamaForCausalLM"]).save_pretrained(tmp)
        config = read_config(Path(tmp))
        weights = random_llama_weights(config, dtype, device)
        weight_bytes = sum(t.numel() * t.element_size() for name, t in weights.items() if "embed" not in name and "lm_head" not in name)
        model = CausalLM(Path(tmp), config, weights, dtype, device, "torch")
    per_seq = context // block + 1
    kv = KVCache(config, rows * per_seq + 1, block, dtype, device)
    slots = LoraSlots(model.module_shapes(), config.num_layers, 8, 16, dtype, device, "triton")
    for layer in range(config.num_layers):
        for module in slots.a[layer]:
            slots.a[layer][module].normal_(0, 0.02)
            slots.b[layer][module].normal_(0, 0.02)
    step_rows = [DecodeRow(token=i + 7, position=context, block_table=list(range(i * per_seq, (i + 1) * per_seq)),
                           lora_slot=i % 8 if i % 2 else -1) for i in range(rows)]
    eager = DecodeGraphs(model, kv, rows * per_seq, block, 256, per_seq, capture=False)
    graphed = DecodeGraphs(model, kv, rows * per_seq, block, 256, per_seq, capture=device.type == "cuda")
    expected = eager.run(step_rows, slots).clone()
    got = graphed.run(step_rows, slots)
    error = (got.float() - expected.float()).abs().max().item()
    timer = timed_ms if device.type == "cuda" else timed_ms_cpu
    eager_ms = timer(lambda: eager.run(step_rows, slots), repeat=repeat)
    graph_ms = timer(lambda: graphed.run(step_rows, slots), repeat=repeat)
    kv_bytes = 2 * config.num_layers * rows * (context + 1) * config.num_kv_heads * config.head_dim * 2
    line = f"decode step {'7B' if hidden == 4096 else 'tiny'} shapes, {rows} rows  eager {eager_ms:7.3f} ms  cuda graph {graph_ms:7.3f} ms  speed-up {eager_ms / graph_ms:5.2f}x"
    if peak:
        roofline_ms = (weight_bytes + kv_bytes) / peak * 1e3
        line += f"  roofline {roofline_ms:6.3f} ms  graph / roofline {graph_ms / roofline_ms:5.2f}x"
    ok = error < 5e-2
    print(f"{line}  max|diff| {error:.2e} {'ok' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


def random_llama_weights(config, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor CausalLM takes, random (scaled so activations stay finite), made on the device."""
    h, inter, q, kv = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                   p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    return {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, device=device, dtype=dtype) * shape[-1] ** -0.5).to(device, dtype)
            for name, shape in shapes.items()}


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
                batch = LoraBatch.build(stacked(kernel, a, b), seq_slots, seq_tokens)
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
    failures += check_decode_step(peak)
    print("all kernels match the torch path" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
