"""Generated tokens/s of lorafleet's engine vs transformers (and, optionally, vLLM's CPU build), side by side.

Three workloads, each measured in one run so the ratios share the machine's noise:

- ``uniform`` (issue 18's): SmolLM2-135M-Instruct, 64 prompts of 64 tokens, 32 new tokens each, greedy, at
  most 16 running; base, one adapter and 32 adapters (random rank-8 on q/k/v/o). lorafleet in float32 with
  oneDNN-packed weights, in float32 with plain F.linear (the engine before packing), and with ``--dtype auto``;
  transformers (peft for adapters) in float32; vLLM when ``--vllm-python`` names a venv that has it.
- ``mixed``: chat prompts of mixed lengths, max_new_tokens 16..128, at 1, 8 and 32 concurrent (transformers
  pads each batch and holds it until its longest request ends; only requested tokens count).
- ``overhead``: milliseconds per decode step of models whose compute is ~0 (hidden size 64, 2 and 30 layers):
  what the host spends per step, the cost CUDA graphs remove on a GPU.

    .venv/bin/python -P bench/engine_throughput.py [--workload uniform mixed overhead] [--rounds 3] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rates_in_turns, timed, workload  # noqa: E402
from lora_overhead import write_adapters  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.server.engine.sequence import SamplingParams  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def run_lorafleet(engine: LLMEngine, requests: list[tuple[list[int], int]], concurrency: int, adapters: list[str | None] | None = None) -> int:
    """Keep at most ``concurrency`` requests in flight, admitting the next as soon as one finishes."""
    pending = list(zip(requests, adapters or [None] * len(requests)))
    in_flight = []
    produced = 0
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            (prompt, new), adapter = pending.pop(0)
            in_flight.append(engine.add_request(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), adapter=adapter))
        engine.step()
        for seq in [s for s in in_flight if s.finished]:
            produced += len(seq.generated_ids)
            in_flight.remove(seq)
    return produced


def run_transformers(model, pad_id: int, requests: list[tuple[list[int], int]], concurrency: int, adapters: list[str] | None = None) -> int:
    produced = 0
    for i in range(0, len(requests), concurrency):
        batch = requests[i : i + concurrency]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        extra = {"adapter_names": adapters[i : i + concurrency]} if adapters else {}
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=pad_id, **extra)
        produced += sum(n for _, n in batch)  # only what each request asked for is useful
    return produced


def uniform(args: argparse.Namespace, folder: Path, tokenizer) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    requests = [([rng.randrange(1000, 40000) for _ in range(64)], 32) for _ in range(64)]
    running = 16
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_adapters(folder, Path(tmp), 32, 8, QKVO)
        cases = {"base": None, "one adapter": ["a0"] * 64, "32 adapters": [f"a{i % 32}" for i in range(64)]}
        engines = {
            "lorafleet fp32": dict(dtype="float32"),
            "fp32 F.linear": dict(dtype="float32", linear_kernel="torch"),
            "lorafleet auto": dict(dtype="auto"),
        }
        table: dict[str, dict[str, float]] = {}
        for label, settings in engines.items():
            engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 30, max_active_adapters=32, max_lora_rank=8, **settings), tokenizer=tokenizer)
            for i, adapter in enumerate(folders):
                engine.load_adapter(f"a{i}", adapter)
            label = f"{label} ({str(engine.runner.dtype).removeprefix('torch.')})" if label.endswith("auto") else label
            runs = {case: (lambda names=names: run_lorafleet(engine, requests, running, names)) for case, names in cases.items()}
            table[label] = {case: statistics.median(rates) for case, rates in rates_in_turns(runs, args.rounds).items()}
            _print_row(label, table[label])
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        pad = tokenizer.pad_token_id
        row = {"base": _per_s(lambda: run_transformers(model, pad, requests, running))}
        model = PeftModel.from_pretrained(model, folders[0], adapter_name="a0")
        for i, adapter in enumerate(folders[1:], start=1):
            model.load_adapter(adapter, adapter_name=f"a{i}")
        model.eval()
        for case in ("one adapter", "32 adapters"):
            row[case] = _per_s(lambda: run_transformers(model, pad, requests, running, cases[case]))
        table["transformers+peft fp32"] = row
        _print_row("transformers+peft fp32", row)
        if args.vllm_python:
            table["vLLM cpu fp32"] = _vllm(args.vllm_python, folder, folders, requests, running)
            _print_row("vLLM cpu fp32", table["vLLM cpu fp32"])
    ours, auto = table["lorafleet fp32"], next(v for k, v in table.items() if k.startswith("lorafleet auto"))
    hf = table["transformers+peft fp32"]
    print("goals (one run):")
    _goal("base fp32 >= transformers fp32 x 1.3", ours["base"] / hf["base"], 1.3)
    _goal("base auto >= transformers fp32 x 1.3", auto["base"] / hf["base"], 1.3)
    _goal("one adapter >= 0.9 x base (fp32)", ours["one adapter"] / ours["base"], 0.9)
    _goal("32 adapters / one adapter (fp32, rank 8 q/k/v/o)", ours["32 adapters"] / ours["one adapter"], 0.85)
    if "vLLM cpu fp32" in table:
        _goal("base fp32 >= vLLM base", ours["base"] / table["vLLM cpu fp32"]["base"], 1.0)


def _per_s(run) -> float:
    tokens, seconds = timed(run)
    return tokens / seconds


def _print_row(label: str, row: dict[str, float]) -> None:
    print(f"  {label:<28}" + "".join(f" {case} {rate:7.1f}" for case, rate in row.items()), flush=True)


def _goal(label: str, value: float, bar: float) -> None:
    print(f"  {label}: {value:.2f} ({'met' if value >= bar else 'NOT met'}, goal {bar})")


def _vllm(python: str, folder: Path, adapters: list[Path], requests, running: int) -> dict[str, float]:
    """vLLM's offline LLM in its own venv (never a dependency): the same prompts, adapters and concurrency."""
    spec = {"model": str(folder), "adapters": [str(a) for a in adapters], "prompts": [p for p, _ in requests], "new_tokens": 32, "max_num_seqs": running}
    script = Path(__file__).with_name("vllm_peer.py")
    done = subprocess.run([python, str(script)], input=json.dumps(spec), capture_output=True, text=True,
                          env={"VLLM_CPU_OMP_THREADS_BIND": "0-1", "PATH": "/usr/bin:/bin"}, timeout=3600)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def mixed(args: argparse.Namespace, folder: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=1 << 30), tokenizer=tokenizer)
    print("mixed chat workload, float32 both; tokens/s of useful generated tokens")
    print(f"{'concurrent':>10} {'requests':>8} {'lorafleet':>10} {'transformers':>12} {'ratio':>6}")
    for concurrency in args.concurrency:
        requests = workload(tokenizer, max(4, 3 * concurrency), seed=concurrency)
        ours, ours_s = timed(lambda: run_lorafleet(engine, requests, concurrency))
        theirs, theirs_s = timed(lambda: run_transformers(model, tokenizer.pad_token_id, requests, concurrency))
        ours_rate, theirs_rate = ours / ours_s, theirs / theirs_s
        print(f"{concurrency:>10} {len(requests):>8} {ours_rate:>10.1f} {theirs_rate:>12.1f} {ours_rate / theirs_rate:>5.2f}x", flush=True)


def overhead(args: argparse.Namespace) -> None:
    """ms per decode step where compute is ~0: the host's share of every step, on any device."""
    from transformers import AutoModelForCausalLM

    from lorafleet.testing import make_tiny_model

    print("decode step of near-zero-compute models (hidden 64), ms per step: lorafleet vs transformers generate")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (2, 30):
            folder = make_tiny_model(Path(tmp) / f"tiny{layers}", "llama", num_hidden_layers=layers)
            engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=1 << 28))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            for rows in (16, 64):
                ours = _decode_step_ms(engine, rows)
                ids = torch.randint(5, 90, (rows, 64))
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=41, min_new_tokens=41, do_sample=False, pad_token_id=0)
                    middle = time.perf_counter()
                    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
                    theirs = ((middle - start) - (time.perf_counter() - middle)) / 40 * 1000
                note = f"  (goal <= 3 ms: {'met' if ours <= 3 else 'NOT met'})" if rows == 16 else ""
                print(f"  {layers:>2} layers, {rows:>2} rows: lorafleet {ours:6.2f}   transformers {theirs:6.2f}{note}", flush=True)


def _decode_step_ms(engine: LLMEngine, rows: int, steps: int = 40) -> float:
    rng = random.Random(rows)
    for _ in range(rows):
        engine.add_request([rng.randrange(5, 90) for _ in range(64)], SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
    engine.step()
    engine.step()  # prefill, then one decode step to warm up
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    engine.run_to_completion()
    return elapsed / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", nargs="+", default=["uniform", "mixed", "overhead"], choices=["uniform", "mixed", "overhead"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels of the mixed workload")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3, help="uniform: turns each lorafleet case takes; its median is reported")
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds vLLM's column to the uniform workload")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    folder = model_store.resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    print(f"SmolLM2-135M-Instruct on cpu, {args.threads} threads, torch {torch.__version__}")
    if "uniform" in args.workload:
        print("uniform: 64 prompts x 64 tokens, 32 new, greedy, 16 running; tokens/s")
        uniform(args, folder, tokenizer)
    if "mixed" in args.workload:
        mixed(args, folder, tokenizer)
    if "overhead" in args.workload:
        overhead(args)


if __name__ == "__main__":
    main()
