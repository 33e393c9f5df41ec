"""SmolLM2-shaped throughput on a device: 1, 32 and 128 concurrent; base, one adapter and 32 adapters; CUDA graphs off and on.

The real SmolLM2 cannot travel to the lent GPU machine (its GGUF is 98 MB, over what a run carries), and
tokens/s does not depend on weight values: the model here has SmolLM2-135M's shapes (30 layers, hidden 576,
9 heads over 3, vocabulary 49,152, tied head) with random weights, the test fixtures' tokenizer, greedy
decoding with EOS ignored, and 32 random rank-16 adapters on all seven projections. One line per setting.

    python -P bench/gpu_throughput.py [--device cuda] [--concurrency 1 32 128] [--new-tokens 64]
    python -P bench/gpu_throughput.py --device cpu --concurrency 1 4 --new-tokens 8   # the dry run's size
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import run_lorafleet  # noqa: E402
from lora_overhead import write_adapters  # noqa: E402

from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.testing import make_tiny_model  # noqa: E402

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--graphs", nargs="+", default=None, help="cuda_graphs settings to compare (default: off and on on cuda, off on cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: needs cuda (run with --device cpu for the dry run)")
        return 2
    graphs = args.graphs or (["off", "on"] if device.type == "cuda" else ["off"])
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model(Path(tmp) / "smollm2-shape", "llama-tied", **SMOLLM2_SHAPE)
        adapters = write_adapters(folder, Path(tmp) / "adapters", 32, 16)
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        print(f"SmolLM2-135M shapes, random weights, {device} {dtype}, {args.new_tokens} new tokens, rank-16 adapters on all projections", flush=True)
        for setting in graphs:
            engine = LLMEngine(EngineConfig(model=str(folder), device=device.type, dtype=dtype, cuda_graphs=setting, max_active_adapters=32,
                                            max_lora_rank=16, kv_cache_memory=(8 << 30) if device.type == "cuda" else (1 << 28)))
            for i, adapter in enumerate(adapters):
                engine.load_adapter(f"a{i}", adapter)
            for concurrency in args.concurrency:
                count = max(8, 2 * concurrency)
                requests = [([rng.randrange(1, 380) for _ in range(64)], args.new_tokens) for _ in range(count)]
                cases = {"base": None, "one adapter": ["a0"] * count, "32 adapters": [f"a{i % 32}" for i in range(count)]}
                run_lorafleet(engine, requests[:2], 2)  # warm-up (and, with graphs on, the first captures)
                rates = {}
                for case, names in cases.items():
                    start = time.perf_counter()
                    tokens = run_lorafleet(engine, requests, concurrency, names)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rates[case] = tokens / (time.perf_counter() - start)
                print(f"cuda_graphs {setting:<3} {concurrency:>4} concurrent: " + "  ".join(f"{c} {r:8.1f}" for c, r in rates.items())
                      + " tokens/s", flush=True)
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
