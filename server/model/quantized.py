"""Weight-only quantized projections: int8 per output channel and int4 in groups along the input.

Decode is bound by streaming weights (see linear.py), so a base stored in 1 or 0.5 bytes per weight
instead of 4 (2 in bfloat16) both fits a smaller device and streams faster. Activations, LoRA deltas,
norms, embeddings and the head stay in the activation dtype; only the projections an adapter may target
(q/k/v/o, gate/up/down) are quantized, as in gpt-fast.

- int8: symmetric per output channel, q = round(w / s) in [-128, 127], s = max|w_row| / 127. CPU in bfloat16
  runs torch's ``_weight_int8pack_mm``; elsewhere the weight is widened per call (F.linear, then the scales).
- int4: asymmetric per group of ``group_size`` inputs, q = round((w - min) / s) in [0, 15], s = (max - min) / 15.
  CPU in bfloat16 runs torch's ``_weight_int4pack_mm_for_cpu`` (tinygemm's layout: zero = min + 8 s); cuda in bfloat16
  runs ``_weight_int4pack_mm`` (unverified here: no GPU in CI); anything else (and CPU layers whose output
  size is not a multiple of 16) keeps two nibbles per byte and widens per call.

``dequantize`` gives back exactly the weights the kernels compute with, so a reference model built from it
(tests/engine/test_quantized.py) isolates the kernels and the packing from the quantization error itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.server.config import INT4_GROUP_SIZES


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales float32 [N]) for a float weight [N, K]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8), scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 values 0..15 [N, K], scales [N, K/g], mins [N, K/g]) for a float weight [N, K]."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide a projection's input size {k}; choose one of "
                         f"{[g for g in INT4_GROUP_SIZES if k % g == 0] or 'none that fits'} with --quantize-group-size")
    groups = weight.float().reshape(n, k // group_size, group_size)
    mins, maxs = groups.amin(-1), groups.amax(-1)
    scales = ((maxs - mins) / 15).clamp(min=1e-12)
    q = ((groups - mins[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scales, mins


def dequantize(method: str, weight: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """The float32 weight the quantized kernels compute with."""
    if method == "int8":
        q, scales = quantize_int8(weight)
        return q.float() * scales[:, None]
    q, scales, mins = quantize_int4(weight, group_size)
    n, k = q.shape
    return (q.float().reshape(n, k // group_size, group_size) * scales[..., None] + mins[..., None]).reshape(n, k)


class Int8Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        self._build(*quantize_int8(weight), bias, dtype, device)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> Int8Linear:
        """From int8 weights already quantized per output row (a bitsandbytes LLM.int8 checkpoint): w = q x scale."""
        linear = cls.__new__(cls)
        linear._build(q, scales, bias, dtype, device)
        return linear

    def _build(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        self.out_features = q.shape[0]
        self.q, self.scales, self.bias = q.to(device), scales.to(device=device, dtype=dtype), bias
        # torch's CPU int8 GEMM is fast only for bfloat16 activations (float32: 15 ms vs 0.6 ms widened, 32 x 576 x 1536).
        self.packed = device.type == "cpu" and dtype == torch.bfloat16

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * self.scales.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scales).reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.q.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias


class Int4Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device, group_size: int) -> None:
        self._build(*quantize_int4(weight, group_size), group_size, bias, dtype, device)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                       dtype: torch.dtype, device: torch.device) -> Int4Linear:
        """From integers already quantized (a GPTQ or AWQ checkpoint): w = q x scale + min, per group of inputs."""
        linear = cls.__new__(cls)
        linear._build(q, scales, mins, group_size, bias, dtype, device)
        return linear

    def _build(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, bias: torch.Tensor | None,
               dtype: torch.dtype, device: torch.device) -> None:
        n, k = q.shape
        self.out_features, self.group_size, self.bias, self.dtype = n, group_size, bias, dtype
        # tinygemm's [K/g, N, 2] of (scale, zero) with zero = min + 8 s: it computes (q - 8) s + zero.
        scale_zero = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous().to(device=device, dtype=dtype)
        self.kernel = "widen"
        # As for int8: the CPU int4 GEMM is fast for bfloat16 activations only (float32: 25 ms vs 0.35 ms at 32 x 576 x 1536).
        if device.type == "cpu" and dtype == torch.bfloat16 and n % 16 == 0 and group_size in INT4_GROUP_SIZES:
            self.kernel, self.scale_zero = "cpu", scale_zero
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        elif device.type == "cuda" and dtype == torch.bfloat16 and n % 8 == 0 and k % 64 == 0 and group_size in INT4_GROUP_SIZES:
            self.kernel, self.scale_zero = "cuda", scale_zero
            self.packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(device), 8)
        else:
            self.nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(device)
            self.scales, self.mins = scales.to(device=device, dtype=dtype), mins.to(device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.scale_zero] if self.kernel != "widen" else [self.nibbles, self.scales, self.mins]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _widened(self, dtype: torch.dtype) -> torch.Tensor:
        q = torch.stack([self.nibbles >> 4, self.nibbles & 15], dim=-1).reshape(self.out_features, -1).to(dtype)
        n, k = q.shape
        g = self.group_size
        return (q.reshape(n, k // g, g) * self.scales[..., None].to(dtype) + self.mins[..., None].to(dtype)).reshape(n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_zero)
        elif self.kernel == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scale_zero)
        else:
            y = F.linear(flat, self._widened(flat.dtype))
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias
