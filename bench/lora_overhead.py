"""What LoRA costs: one batch of 32 requests on no adapter, one adapter, and 32 different adapters.

SmolLM2-135M-Instruct on CPU, float32, 32 concurrent requests, 64 new tokens each, rank-16 adapters
on all seven projections. Printed side by side from one run, with the same 32-adapter workload
through peft's mixed-batch ``generate(adapter_names=...)`` for comparison.

    .venv/bin/python -P bench/lora_overhead.py [--requests 32] [--new-tokens 64] [--rank 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rates_in_turns, timed, workload  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.server.engine.sequence import SamplingParams  # noqa: E402
from lorafleet.testing import ALL_PROJECTIONS  # noqa: E402


def write_adapters(base_folder: Path, out: Path, count: int, rank: int, target_modules: list[str] = ALL_PROJECTIONS) -> list[Path]:
    """``count`` random rank-``rank`` PEFT adapters (all projections unless told), from one peft model re-randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), task_type="CAUSAL_LM"),
    )
    folders = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        folders.append(out / f"adapter-{i:02d}")
        model.save_pretrained(folders[-1])
    return folders


def run_engine(engine: LLMEngine, requests, adapters: list[str | None], new_tokens: int) -> int:
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), adapter=a) for (p, _), a in zip(requests, adapters)]
    engine.run_to_completion()
    return sum(len(s.generated_ids) for s in seqs)


def run_peft(base_folder: Path, folders: list[Path], tokenizer, requests, new_tokens: int) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.eval()
    width = max(len(p) for p, _ in requests)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p, _ in requests])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in requests])
    names = [f"a{i % len(folders)}" for i in range(len(requests))]

    def go(new: int = new_tokens) -> int:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id, adapter_names=names)
        return new * len(requests)

    go(4)  # warmed as lorafleet's engine is before its timed runs
    return timed(go)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="turns each case takes; its median is reported")
    parser.add_argument("--dtype", default="float32", help="the engine's dtype (peft runs in float32): float32, bfloat16 or auto")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = model_store.resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    requests = workload(tokenizer, args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_adapters(folder, Path(tmp), args.requests, args.rank)
        engine = LLMEngine(EngineConfig(model=str(folder), dtype=args.dtype, kv_cache_memory=1 << 30, max_active_adapters=args.requests, max_lora_rank=args.rank), tokenizer=tokenizer)
        for i, adapter_folder in enumerate(folders):
            engine.load_adapter(f"a{i}", adapter_folder)
        n = len(requests)
        cases = {
            "base only": [None] * n,
            "one adapter": ["a0"] * n,
            f"{n} adapters": [f"a{i}" for i in range(n)],
        }
        rates = {}
        dtype = str(engine.runner.dtype).removeprefix("torch.")
        print(f"SmolLM2-135M-Instruct, cpu {dtype} (linear {engine.runner.linear_kernel}), {torch.get_num_threads()} threads, {n} concurrent, {args.new_tokens} new tokens, rank {args.rank} on all 7 projections")
        runs = {label: (lambda adapters=adapters: run_engine(engine, requests, adapters, args.new_tokens)) for label, adapters in cases.items()}
        samples = rates_in_turns(runs, args.rounds)
        for label, rounds in samples.items():
            rates[label] = statistics.median(rounds)
            print(f"  lorafleet {label:<14} {rates[label]:8.1f} tokens/s  (rounds: {', '.join(f'{r:.1f}' for r in rounds)})", flush=True)
        many = rates[f"{n} adapters"]
        ratio = many / rates["one adapter"]
        print(f"  {n} adapters / one adapter: {ratio:.2f}x (goal >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})"
              f"   one adapter / base: {rates['one adapter'] / rates['base only']:.2f}x")
        if not args.skip_peft:
            tokens, seconds = run_peft(folder, folders, tokenizer, requests, args.new_tokens)
            peft_rate = tokens / seconds
            print(f"  peft      {n} adapters    {peft_rate:8.1f} tokens/s")
            print(f"  lorafleet / peft ({n} adapters): {many / peft_rate:.2f}x")


if __name__ == "__main__":
    main()
