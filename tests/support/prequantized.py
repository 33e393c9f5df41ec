"""Format-exact GPTQ (v1) and AWQ (GEMM) 4-bit checkpoints of a float one, and the float reference they encode.

No GPTQ or AWQ library runs on a CPU-only machine, so the packing is written here from the formats' own
definitions (AutoGPTQ's and AutoAWQ's packers): GPTQ packs eight consecutive inputs per int32 along the
input dimension and stores zero - 1; AWQ packs eight outputs per int32 in the order 0, 2, 4, 6, 1, 3, 5, 7.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from support.quantize import PROJECTION_WEIGHT

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize(weight: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] 0..15, zeros [N, K/g] integers, scales [N, K/g] float16) with w ~ (q - zero) x scale."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group, group)
    if symmetric:  # GPTQ's sym=True: zero 8, scale from the largest magnitude
        scales = (groups.abs().amax(-1) / 7.5).clamp(min=1e-6).half()
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp(min=1e-6).half()
        zeros = (-low / scales.float()).round().clamp(0, 15).to(torch.int32)
    q = (groups / scales.float()[..., None]).round() + zeros[..., None]
    return q.clamp(0, 15).to(torch.int32).reshape(n, k), zeros, scales


def dequantized(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    return ((q.reshape(n, k // group, group) - zeros[..., None]) * scales.float()[..., None]).reshape(n, k)


def pack_columns(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C] 0..15 -> [R, C/8] int32, value 8c + order[i] in nibble i of column c."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, j in enumerate(order):
        packed |= (values[:, j::8].to(torch.int64) & 15) << (4 * i)
    return as_int32(packed)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 0..15 -> [R/8, C] int32, value of row 8r + j in nibble j of row r (GPTQ's qweight)."""
    packed = torch.zeros(values.shape[0] // 8, values.shape[1], dtype=torch.int64)
    for j in range(8):
        packed |= (values[j::8].to(torch.int64) & 15) << (4 * j)
    return as_int32(packed)


def as_int32(packed: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns as the int32 tensors the formats store."""
    return packed.where(packed < 2**31, packed - 2**32).to(torch.int32)


def write(folder: Path, out: Path, method: str, group: int) -> tuple[Path, Path]:
    """(the packed checkpoint, a float32 checkpoint of the weights it encodes)."""
    packed_dir, reference_dir = shutil.copytree(folder, out / method), shutil.copytree(folder, out / f"{method}-reference")
    for path in folder.glob("*.safetensors"):
        tensors, packed, reference = load_file(str(path)), {}, {}
        for name, tensor in tensors.items():
            match = PROJECTION_WEIGHT.match(name)
            if match is None:
                packed[name] = reference[name] = tensor
                continue
            prefix = match.group(1)
            q, zeros, scales = quantize(tensor, group, symmetric=method == "gptq")
            reference[name] = dequantized(q, zeros, scales, group)
            if method == "gptq":
                packed[prefix + ".qweight"] = pack_rows(q.t())
                packed[prefix + ".qzeros"] = pack_columns(zeros.t() - 1)
                packed[prefix + ".g_idx"] = torch.arange(q.shape[1], dtype=torch.int32) // group
            else:
                packed[prefix + ".qweight"] = pack_columns(q.t().contiguous(), AWQ_ORDER)
                packed[prefix + ".qzeros"] = pack_columns(zeros.t(), AWQ_ORDER)
            packed[prefix + ".scales"] = scales.t().contiguous()
        save_file(packed, str(packed_dir / path.name), metadata={"format": "pt"})
        save_file(reference, str(reference_dir / path.name), metadata={"format": "pt"})
    config = json.loads((packed_dir / "config.json").read_text())
    quantization = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
                    if method == "gptq" else {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True})
    (packed_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return packed_dir, reference_dir
