"""Prefix caching on a chat workload: time to first token and throughput with caching on vs off, side by side.

SmolLM2-135M-Instruct on this CPU; a shared system prompt of ``--system-tokens`` (512) tokens, then a short
user turn; 4 random rank-8 adapters (q/k/v/o) and the base model take turns; ``--concurrency`` (4) users each
send their next request when the previous one ends (closed loop), 16 new tokens each, greedy. The engines
are measured one after the other in one run (off, on, off again), and both must produce the same tokens.

    .venv/bin/python -P bench/prefix_cache.py [--requests 40] [--concurrency 4] [--system-tokens 512] [--dtype float32]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import closed_loop  # noqa: E402
from lora_overhead import write_adapters  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.server.engine.sequence import SamplingParams  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TURNS = ["What are your opening hours?", "Can I return a bike after a month?", "Do you sell electric bikes?",
         "How much is a tune-up?", "Is there parking nearby?", "Do you repair carbon frames?"]


def conversation(tokenizer, system_tokens: int, count: int) -> list[tuple[list[int], str | None]]:  # noqa: ANN001
    """(prompt ids, adapter) per request: one shared system prompt of exactly system_tokens, then a user turn."""
    rng = random.Random(0)
    system = tokenizer.apply_chat_template([{"role": "system", "content": "You answer for a bicycle shop. " * 200}], tokenize=True, return_dict=False)
    system = list(system)[:system_tokens]
    adapters = [None, "a0", "a1", "a2", "a3"]
    requests = []
    for i in range(count):
        turn = tokenizer.apply_chat_template([{"role": "user", "content": f"{rng.choice(TURNS)} (ticket {i})"}], tokenize=True,
                                             return_dict=False, add_generation_prompt=True)
        requests.append((system + list(turn), adapters[i % len(adapters)]))
    return requests


def run(engine: LLMEngine, requests: list[tuple[list[int], str | None]], concurrency: int, new_tokens: int) -> dict:
    """Closed loop: ``concurrency`` users; returns TTFTs, tokens/s and the outputs."""
    outputs, rate, ttft = closed_loop(engine, requests, concurrency, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return {"ttft": ttft, "tokens_per_s": rate, "outputs": outputs,
            "hit_ratio": engine.prefix.hit_tokens / max(1, engine.prefix.queried_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = model_store.model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    requests = conversation(tokenizer, args.system_tokens, args.requests)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(folder, Path(tmp), 4, 8, QKVO)
        for label, caching in (("off", False), ("on", True), ("off again", False)):
            engine = LLMEngine(EngineConfig(model=str(folder), dtype=args.dtype, kv_cache_memory=1 << 30, max_active_adapters=4, max_lora_rank=8,
                                            max_input_length=1024, max_total_tokens=2048, prefix_caching=caching), tokenizer=tokenizer)
            for i, adapter in enumerate(adapters):
                engine.load_adapter(f"a{i}", adapter)
            run(engine, requests[:2], 2, 2)  # warm-up (its blocks are not reused: other outputs follow)
            engine.prefix.queried_tokens = engine.prefix.hit_tokens = 0
            result = results[label] = run(engine, requests, args.concurrency, args.new_tokens)
            q = statistics.quantiles(result["ttft"], n=100)
            print(f"caching {label:<9} TTFT p50 {q[49] * 1e3:7.1f} ms  p90 {q[89] * 1e3:7.1f} ms   {result['tokens_per_s']:6.1f} tokens/s   "
                  f"prompt tokens from the cache {result['hit_ratio']:.0%}", flush=True)
    off_p50 = min(statistics.median(results[k]["ttft"]) for k in ("off", "off again"))
    off_rate = max(results[k]["tokens_per_s"] for k in ("off", "off again"))
    same = results["on"]["outputs"] == results["off"]["outputs"] == results["off again"]["outputs"]
    ratio = off_p50 / statistics.median(results["on"]["ttft"])
    print(f"TTFT p50 off / on: {ratio:.1f}x (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'}); "
          f"throughput on / off: {results['on']['tokens_per_s'] / off_rate:.2f}x; same tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
