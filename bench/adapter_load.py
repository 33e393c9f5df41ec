"""Adapter load time per tier: source/disk -> CPU (parse and validate), CPU -> device slot, and the
first-token latency of a request on a cold adapter vs a hot one.

Adapters of about 10 MB and 100 MB: rank 16 and 64 on SmolLM2-135M (all seven projections), and
the same ranks on 7B-shaped projections (hidden 4096, intermediate 11008, 32 layers; only the
adapter exists, the 7B base is not loaded). On a CPU-only machine the "device" is CPU memory too.

    .venv/bin/python -P bench/adapter_load.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet import model_store
from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.config import EngineConfig
from lorafleet.server.engine.engine import LLMEngine
from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.lora.adapter_format import load_adapter
from lorafleet.server.lora.slots import LoraSlots
from lorafleet.testing import ALL_PROJECTIONS

SEVEN_B = dict(hidden=4096, kv=1024, intermediate=11008, layers=32)


def shapes_for(hidden: int, kv: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


def write_adapter(folder: Path, shapes: dict[str, tuple[int, int]], layers: int, rank: int, dtype: torch.dtype) -> int:
    """A PEFT-format adapter written directly (peft would need the base model in memory)."""
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in shapes.items():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in) * 0.01).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank) * 0.01).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ALL_PROJECTIONS}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return (folder / "adapter_model.safetensors").stat().st_size


def median_s(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tier_times(root: Path, label: str, shapes, layers: int, rank: int, device: torch.device) -> None:
    folder = root / f"{label}-r{rank}"
    size = write_adapter(folder, shapes, layers, rank, torch.bfloat16)
    parsed = {}
    disk_to_cpu = median_s(lambda: parsed.setdefault("a", load_adapter("a", folder, shapes, layers, rank)))
    adapter = parsed["a"]
    slots = LoraSlots(shapes, layers, 2, rank, torch.bfloat16 if device.type == "cuda" else torch.float32, device)

    def to_device() -> None:
        slots.slot_of.clear()
        slots.load(adapter)

    cpu_to_device = median_s(to_device)
    print(f"{label:<10} rank {rank:<3} {size / 1e6:7.1f} MB on disk   disk->CPU {disk_to_cpu * 1e3:8.1f} ms   CPU->{device.type} {cpu_to_device * 1e3:8.1f} ms", flush=True)


def first_token_latency(root: Path, device: torch.device) -> None:
    folder = model_store.resolve_model("smollm2")
    engine = LLMEngine(EngineConfig(model=str(folder), device=device.type, kv_cache_memory=256 << 20, adapter_roots=[root],
                                    adapter_cache_dir=root / "cache", max_lora_rank=64, max_active_adapters=4))
    config = engine.runner.model_config
    shapes = engine.runner.model.module_shapes()
    for rank in (16, 64):
        write_adapter(root / f"smol-cold-r{rank}", shapes, config.num_layers, rank, torch.bfloat16)
    prompt = engine.tokenizer("What is the capital of France?").input_ids

    def first_token(adapter_id: str) -> float:
        key = engine.adapters.request(AdapterRef("local", adapter_id))
        start = time.perf_counter()
        seq = engine.add_request(prompt, SamplingParams(max_new_tokens=1), key)
        while not seq.finished:
            if not engine.step():
                time.sleep(0.0005)
        return time.perf_counter() - start

    warm = engine.add_request(prompt, SamplingParams(max_new_tokens=1))  # the engine's own first-step costs are not the adapter's
    engine.run_to_completion()
    assert warm.finished
    print("(the adapters were just written: their 'disk' reads come from the page cache; a cold disk adds its read time)")
    for rank in (16, 64):
        cold = first_token(f"smol-cold-r{rank}")
        hot = first_token(f"smol-cold-r{rank}")
        print(f"SmolLM2 rank {rank:<3} first token: cold adapter {cold * 1e3:8.1f} ms   hot {hot * 1e3:8.1f} ms   cold adds {(cold - hot) * 1e3:8.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        smol = shapes_for(576, 192, 1536)
        for rank in (16, 64):
            tier_times(root, "SmolLM2", smol, 30, rank, device)
        seven = shapes_for(SEVEN_B["hidden"], SEVEN_B["kv"], SEVEN_B["intermediate"])
        for rank in (16, 64):
            tier_times(root, "7B-shaped", seven, SEVEN_B["layers"], rank, device)
        first_token_latency(root, device)


if __name__ == "__main__":
    sys.exit(main())
