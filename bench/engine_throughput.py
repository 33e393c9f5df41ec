"""Generated tokens/s of lorafleet's engine vs transformers' batched generate, side by side.

Both run the same requests (SmolLM2-135M-Instruct, CPU, float32, mixed prompt lengths, max_new_tokens
16..128) at 1, 8 and 32 concurrent. transformers pads each batch and holds it until its longest
request ends; only the tokens each request asked for count as useful for either. lorafleet keeps
at most `concurrency` requests in flight and admits the next as soon as one finishes.

    .venv/bin/python -P bench/engine_throughput.py [--concurrency 1 8 32] [--requests-per-level N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, workload  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.server.engine.sequence import SamplingParams  # noqa: E402


def run_lorafleet(engine: LLMEngine, requests: list[tuple[list[int], int]], concurrency: int) -> int:
    pending = list(requests)
    in_flight = []
    produced = 0
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            prompt, new = pending.pop(0)
            in_flight.append(engine.add_request(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True)))
        engine.step()
        for seq in [s for s in in_flight if s.finished]:
            produced += len(seq.generated_ids)
            in_flight.remove(seq)
    return produced


def run_transformers(model, tokenizer, requests: list[tuple[list[int], int]], concurrency: int) -> int:
    produced = 0
    for i in range(0, len(requests), concurrency):
        batch = requests[i : i + concurrency]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        produced += sum(n for _, n in batch)  # only what each request asked for is useful
    return produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 3 x concurrency): a stream, as real traffic is")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_store.resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 30), tokenizer=tokenizer)
    print(f"SmolLM2-135M-Instruct, cpu float32, {args.threads} threads; tokens/s of useful generated tokens")
    print(f"{'concurrent':>10} {'requests':>8} {'lorafleet':>10} {'transformers':>12} {'ratio':>6}")
    for concurrency in args.concurrency:
        requests = workload(tokenizer, args.requests_per_level or max(4, 3 * concurrency), seed=concurrency)
        ours, ours_s = timed(lambda: run_lorafleet(engine, requests, concurrency))
        theirs, theirs_s = timed(lambda: run_transformers(model, tokenizer, requests, concurrency))
        ours_rate, theirs_rate = ours / ours_s, theirs / theirs_s
        print(f"{concurrency:>10} {len(requests):>8} {ours_rate:>10.1f} {theirs_rate:>12.1f} {ours_rate / theirs_rate:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
