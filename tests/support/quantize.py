"""A checkpoint whose projections hold the float32 weights a quantized engine computes with (its reference)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from lorafleet.server.model.quantized import dequantize

QUANTIZED = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")


def dequantized_copy(folder: Path, out: Path, method: str, group_size: int = 64) -> Path:
    shutil.copytree(folder, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if QUANTIZED.search(name):
                tensors[name] = dequantize(method, tensor, group_size)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out
