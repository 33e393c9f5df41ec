"""A checkpoint whose projections hold the float32 weights a quantized engine computes with (its reference)."""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafleet.server.model.quantized import dequantize
from lorafleet.testing import reference_greedy

# The weights a quantized engine quantizes (the projections, and Mixtral's experts); group 1 is the name before ".weight".
PROJECTION_WEIGHT = re.compile(r"^(.*\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123]))\.weight$")


def dequantized_copy(folder: Path, out: Path, method: str, group_size: int = 32) -> Path:
    shutil.copytree(folder, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if PROJECTION_WEIGHT.match(name):
                tensors[name] = dequantize(method, tensor, group_size)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out


def reference_rows(folder: Path, adapters: dict[str, Path], prompts: list[list[int]], rows: list[str | None],
                   steps: int = 5) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers (peft for adapter rows) in float32, greedy: tokens and the logits of each step, per row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for module in model.modules():  # bitsandbytes 4-bit: its float32 path (dequantize, F.linear), not the AVX512-BF16
        if hasattr(module, "support_avx512bf16_for_cpu"):  # CPU kernel, which rounds the weights to bfloat16
            module.support_avx512bf16_for_cpu = False
    if adapters:
        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    all_tokens, all_logits = [], []
    for prompt, adapter in zip(prompts, rows):
        if adapters and adapter is not None:
            model.set_adapter(adapter)
        with model.disable_adapter() if adapters and adapter is None else contextlib.nullcontext():
            tokens, logits = reference_greedy(model, prompt, steps)
        all_tokens.append(tokens)
        all_logits.append(torch.stack(logits))
    return all_tokens, all_logits
