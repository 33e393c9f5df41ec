"""A replica's start: `lorafleet serve` process start to its first /health 200, the floor of a cold start.

Two models: SmolLM2-135M-Instruct (the default) and a random 1B-shaped Llama in bfloat16 (Llama-3.2-1B's shape:
hidden 2048, 16 layers, MLP 8192, 32 heads, 8 KV heads; SmolLM2's tokenizer and vocabulary, so 1.07 B parameters,
2.1 GB of safetensors), written once into --workdir. Each start runs --runs times; the median and the spread print,
with the phases the replica logs (imports, weights, engine ready). The page cache is warm after the first run, as
on a node that already pulled the model; the first run of each model is shown apart.

    .venv/bin/python -P bench/startup.py [--runs 3] [--workdir /tmp/lorafleet-startup]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lorafleet import model_store
from lorafleet.net import free_port

ONE_B = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8}


def one_b_model(smollm2: Path, folder: Path) -> Path:
    """The 1B-shaped random checkpoint, made once (bfloat16, written tensor by tensor to keep memory low)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((smollm2 / "config.json").read_text())
    config.update(ONE_B, head_dim=64, tie_word_embeddings=True, torch_dtype="bfloat16")
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    for path in smollm2.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(path, folder / path.name)
    h, inter, kv = ONE_B["hidden_size"], ONE_B["intermediate_size"], ONE_B["num_key_value_heads"] * 64
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(config["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(ONE_B["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                        p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                        p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                        p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def start_once(model: Path, log: Path) -> float:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
                                "--admin-open"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"the replica exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorafleet-startup"))
    args = parser.parse_args()
    smollm2 = model_store.fetch("smollm2", log=lambda _: None)
    models = {"SmolLM2-135M (bfloat16 served)": smollm2, "1B-shaped random Llama, bfloat16": one_b_model(smollm2, args.workdir / "llama-1b")}
    for label, model in models.items():
        times = [start_once(model, args.workdir / "serve.log") for _ in range(args.runs + 1)]
        warm = times[1:]
        print(f"{label:<36} first {times[0]:5.2f} s; then median {statistics.median(warm):5.2f} s (min {min(warm):.2f}, max {max(warm):.2f}) "
              f"over {len(warm)}", flush=True)


if __name__ == "__main__":
    main()
