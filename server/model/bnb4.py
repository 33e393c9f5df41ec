"""bitsandbytes 4-bit (NF4, FP4) projections: QLoRA's base, served from its packed tensors, or quantized at load.

A bitsandbytes 4-bit checkpoint (transformers' ``save_pretrained`` of a ``BitsAndBytesConfig(load_in_4bit=True)``
model) stores, per projection weight [N, K], the flattened weight's 4-bit codes two to a byte (element 2i in the high
nibble), one ``absmax`` per ``blocksize`` consecutive elements, the 16-value ``quant_map`` the codes index (NF4's
normal quantiles or FP4's values), and a JSON ``quant_state.bitsandbytes__nf4|fp4`` with the block size, shape and
dtype. With double quantization the absmax are themselves 8-bit codes: absmax = nested_quant_map[code] x
nested_absmax[block / nested_blocksize] + nested_offset. Every size is read from the checkpoint, never assumed.

Weight = quant_map[code] x absmax, which no affine int4 (q x s + min) can hold exactly, so these are not the int4
path's integers: a projection keeps its codes and block scales (0.5 + 4/blocksize bytes a weight, 0.5625 at 64) and
widens them per call into the activation dtype, in float32 first, as bitsandbytes' own dequantize does. So the
weights a forward pass multiplies by are exactly bitsandbytes' (tests/engine/test_bnb4.py compares with its
dequantize and with transformers' forward). Widening per call costs time on a CPU (bench/quantized.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod

import torch
import torch.nn.functional as F

from lorafleet.server.model.checkpoint import CheckpointError

# bitsandbytes' NF4 code (QLoRA, appendix E): normal quantiles scaled to [-1, 1], with an exact zero.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
       -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
QUANT_TYPES = ("nf4", "fp4")
NF4_BLOCKSIZE = 64  # --quantize nf4: QLoRA's block size


@dataclass
class Bnb4Weight:
    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # float32 [blocks]
    code: torch.Tensor  # float32 [16]
    blocksize: int
    shape: tuple[int, int]
    quant_type: str

    def __post_init__(self) -> None:
        # Each byte's two values at once (high nibble first): one gather a byte instead of unpacking and two lookups
        # (gate_up of SmolLM2: 1.5 ms a call instead of 7).
        index = torch.arange(256, device=self.code.device)
        self.pairs = torch.stack([self.code[index >> 4], self.code[index & 15]], dim=1)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], as bitsandbytes' dequantize_4bit computes it."""
        n = prod(self.shape)
        values = torch.index_select(self.pairs, 0, self.packed.int()).view(-1)
        full = n - n % self.blocksize
        if full == n == values.numel():
            return values.view(-1, self.blocksize).mul_(self.absmax[:, None]).view(self.shape)
        out = torch.empty(n, dtype=torch.float32, device=values.device)
        out[:full] = (values[:full].view(-1, self.blocksize) * self.absmax[: full // self.blocksize, None]).reshape(-1)
        if full < n:
            out[full:] = values[full:n] * self.absmax[full // self.blocksize]
        return out.view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.absmax.numel() * 4 + self.code.numel() * 4 + self.pairs.numel() * 4

    def to(self, device: torch.device) -> Bnb4Weight:
        return Bnb4Weight(self.packed.to(device), self.absmax.to(device), self.code.to(device), self.blocksize, self.shape, self.quant_type)


def quant_state_key(weights: dict[str, torch.Tensor], name: str) -> str | None:
    """The key of a weight's bitsandbytes quant_state tensor, if it is 4-bit quantized."""
    return next((f"{name}.quant_state.bitsandbytes__{t}" for t in QUANT_TYPES if f"{name}.quant_state.bitsandbytes__{t}" in weights), None)


def read_bnb4(weights: dict[str, torch.Tensor], name: str) -> Bnb4Weight:
    """A 4-bit weight (``name`` is the ``.weight`` tensor's key) from a checkpoint's tensors, which are taken out."""
    state_key = quant_state_key(weights, name)
    if state_key is None:
        raise CheckpointError(f"{name} has no bitsandbytes quant_state (quant_state.bitsandbytes__nf4 or __fp4)")
    try:
        state = json.loads(bytes(weights.pop(state_key).to(torch.uint8).tolist()).decode())
        quant_type, blocksize, shape = state["quant_type"], int(state["blocksize"]), tuple(int(s) for s in state["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{state_key} is not a bitsandbytes quant_state ({exc})") from exc
    if quant_type not in QUANT_TYPES or len(shape) != 2 or blocksize <= 0:
        raise CheckpointError(f"{name}: bitsandbytes quant_type {quant_type!r}, shape {shape}, blocksize {blocksize}: served are "
                              "nf4 and fp4 2-D weights with a positive block size")
    packed = weights.pop(name)
    packed = (packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)).reshape(-1)  # bnb_4bit_quant_storage
    code = weights.pop(name + ".quant_map").float()
    absmax = weights.pop(name + ".absmax")
    if "nested_absmax" in state or name + ".nested_absmax" in weights:
        nested_absmax, nested_code = weights.pop(name + ".nested_absmax").float(), weights.pop(name + ".nested_quant_map").float()
        nested_blocksize, offset = int(state["nested_blocksize"]), float(state["nested_offset"])
        values = nested_code[absmax.to(torch.uint8).long()]
        blocks = torch.arange(values.numel()) // nested_blocksize
        absmax = values * nested_absmax[blocks] + offset
    absmax = absmax.float()
    n = prod(shape)
    if code.numel() != 16 or packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise CheckpointError(f"{name}: {packed.numel()} packed bytes, {absmax.numel()} blocks and a {code.numel()}-value map do not "
                              f"make a {shape[0]}x{shape[1]} weight in blocks of {blocksize}")
    return Bnb4Weight(packed, absmax, code, blocksize, (shape[0], shape[1]), quant_type)


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> Bnb4Weight:
    """NF4 as bitsandbytes' quantize_4bit makes it: per block, codes of weight / absmax rounded to the nearest NF4 value."""
    code = torch.tensor(NF4)
    flat = weight.detach().float().reshape(-1).cpu()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    codes = F.pad(codes, (0, n % 2))
    return Bnb4Weight((codes[::2] << 4) | codes[1::2], absmax, code, blocksize, (weight.shape[0], weight.shape[1]), "nf4")


class Bnb4Linear:
    """A projection of one or more fused 4-bit weights (q, k, v together), widened per call."""

    def __init__(self, parts: list[Bnb4Weight], bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        self.parts, self.bias, self.dtype = [p.to(device) for p in parts], bias, dtype
        self.out_features = sum(p.shape[0] for p in parts)
        self.quant_type = parts[0].quant_type

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def widened(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts]).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.widened(x.dtype))
        return y if self.bias is None else y + self.bias
