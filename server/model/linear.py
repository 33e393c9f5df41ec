"""The base model's projections, with their weights laid out once for the matmul that runs them.

A decode step multiplies a handful of rows by every weight of the model, so on CPU it is bound by
how fast the GEMM streams weights from memory. MKL's sgemm on a plain row-major weight streams at
about 6.5 GB/s on this project's 2-core CI machine; the same weight reordered once at load into
oneDNN's blocked layout (what inductor's CPU freezing pass does) streams at about 18 GB/s, so a
SmolLM2 decode step's matmuls drop from ~86 ms to ~31 ms (numbers in bench/engine_throughput.py).
The packed weight is opaque: nothing may slice it, which the model never does (LoRA deltas are
added to output slices, never to weights).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from lorafleet.server.model.bnb4 import Bnb4Linear, quantize_nf4
from lorafleet.server.model.quantized import Int4Linear, Int8Linear

PACK_BATCH_HINT = 64  # oneDNN picks its blocking for about this many rows; decode batches are 1..256
# Below this many weight elements oneDNN's per-call cost (~30 us vs ~20 us for F.linear, 2 cores) outweighs the
# streaming it saves: the test fixtures' 64-wide layers stay on F.linear, SmolLM2's smallest (192 x 576) is packed.
PACK_MIN_ELEMENTS = 1 << 16


class Linear(Protocol):
    out_features: int

    @property
    def nbytes(self) -> int:
        """Memory the weight takes, as stored."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class DenseLinear:
    """The reference: ``F.linear`` on the checkpoint's own layout (cuda, and CPUs without oneDNN)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class OneDnnLinear:
    """A weight reordered once for oneDNN's CPU GEMM; the dense copy is dropped."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
        self.bias = bias

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.packed)  # opaque, as many elements as the weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed linear exists in this torch build and computes what F.linear does, here."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.linspace(-1, 1, 48).reshape(6, 8).to(dtype)
        x = torch.linspace(1, -1, 16).reshape(2, 8).to(dtype)
        return torch.allclose(OneDnnLinear(weight)(x).float(), F.linear(x, weight).float(), atol=1e-2)
    except (RuntimeError, AttributeError):  # a torch without the op (or its mkldnn namespace)
        return False


def resolve_linear_kernel(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto: oneDNN's packed weights on CPU where the build has them, plain F.linear elsewhere."""
    if choice == "auto":
        return "onednn" if onednn_available(device, dtype) else "torch"
    if choice == "onednn" and not onednn_available(device, dtype):
        raise ValueError(f"--linear-kernel onednn needs a CPU torch build with oneDNN and float32 or bfloat16 (device {device}, {dtype})")
    return choice


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, kernel: str, quantize: str | None = None, group_size: int = 32) -> Linear:
    """A projection as the engine runs it: weight-only quantized (server/model/quantized.py), oneDNN-packed or dense."""
    if quantize == "int8":
        return Int8Linear(weight, bias, weight.dtype, weight.device)
    if quantize == "int4":
        return Int4Linear(weight, bias, weight.dtype, weight.device, group_size)
    if quantize == "nf4":  # QLoRA's base: NF4 in blocks of 64, as bitsandbytes quantizes (server/model/bnb4.py)
        return Bnb4Linear([quantize_nf4(weight)], bias, weight.dtype, weight.device)
    if kernel == "onednn" and weight.numel() >= PACK_MIN_ELEMENTS:
        return OneDnnLinear(weight, bias)
    return DenseLinear(weight, bias)
