"""Pre-quantized 4-bit checkpoints users download: GPTQ and AWQ, their packed tensors read as they are.

Both store, per projection, 4-bit integers packed eight to an int32, a zero point per group and output
(packed the same way) and a float16 scale per group and output; w = (q - zero) x scale. They differ in
how they pack:

- GPTQ (``quant_method: gptq``, v1 checkpoints): ``qweight`` [K/8, N] packs eight consecutive inputs,
  input 8i + j in bits 4j..4j+3; ``qzeros`` [K/g, N/8] packs eight consecutive outputs and stores zero - 1;
  ``g_idx`` [K] gives each input's group (only the plain order, input k in group k // g, is served: act-order
  checkpoints, ``desc_act: true``, are refused).
- AWQ (``quant_method: awq``, ``version: gemm``): ``qweight`` [K, N/8] packs eight outputs in the order
  0, 2, 4, 6, 1, 3, 5, 7; ``qzeros`` [K/g, N/8] the same way, stored as is.

Unpacked, they become the engine's int4 projection (server/model/quantized.py) with min = -zero x scale:
the same integers and scales, no re-quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.server.model.checkpoint import CheckpointError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output 8c + AWQ_ORDER[i] sits in nibble i of packed column c
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class PackedFormat:
    method: str  # gptq | awq | bnb4 | bnb8
    group_size: int
    kind: str = "int4"  # what the codes are: int4, nf4, fp4, int8

    def describe(self) -> str:
        """What /info says is served: ``gptq int4``, ``bitsandbytes nf4``, ..."""
        return f"{'bitsandbytes' if self.method.startswith('bnb') else self.method} {self.kind}"


def packed_format(config: dict | None, flag: str | None) -> PackedFormat | None:
    """The checkpoint's 4-bit format, None for a full-precision one; CheckpointError for what is not served."""
    if config is None:
        return None
    method = config.get("quant_method", "unknown")
    if flag is not None:
        raise CheckpointError(f"the checkpoint is already quantized ({method}); --quantize {flag} would quantize it again: drop --quantize")
    if method == "bitsandbytes":
        return bitsandbytes_format(config)
    if method not in ("gptq", "awq"):
        raise CheckpointError(f"pre-quantized checkpoints ({method}) are not served; GPTQ, AWQ and bitsandbytes 4-bit and 8-bit are, or "
                              "serve the full-precision model with --quantize int8, int4 or nf4")
    if config.get("bits", 4) != 4:
        raise CheckpointError(f"{method} with {config.get('bits')} bits is not served; 4-bit checkpoints are")
    if method == "gptq" and config.get("desc_act"):
        raise CheckpointError("GPTQ act-order checkpoints (desc_act: true) are not served; use one quantized with desc_act: false")
    if method == "gptq" and config.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(f"GPTQ checkpoint_format {config.get('checkpoint_format')!r} is not served; the v1 'gptq' format is")
    if method == "awq" and (str(config.get("version", "gemm")).lower() != "gemm" or not config.get("zero_point", True)):
        raise CheckpointError(f"AWQ version {config.get('version')!r} with zero_point {config.get('zero_point', True)} is not served; GEMM with zero points is")
    group = int(config.get("group_size", 128))
    return PackedFormat(method, group)


def bitsandbytes_format(config: dict) -> PackedFormat:
    """bnb4 (NF4 or FP4, server/model/bnb4.py) or bnb8 (LLM.int8's int8 weights and row scales, served weight-only)."""
    if config.get("load_in_4bit") or config.get("_load_in_4bit"):
        kind = config.get("bnb_4bit_quant_type", "fp4")
        if kind not in ("nf4", "fp4"):
            raise CheckpointError(f"bitsandbytes 4-bit quant type {kind!r} is not served; nf4 and fp4 are")
        return PackedFormat("bnb4", 0, kind)
    if config.get("load_in_8bit") or config.get("_load_in_8bit"):
        if config.get("llm_int8_has_fp16_weight"):
            raise CheckpointError("bitsandbytes 8-bit with llm_int8_has_fp16_weight: true stores float weights; serve those without it")
        return PackedFormat("bnb8", 0, "int8")
    raise CheckpointError(f"a bitsandbytes quantization_config with neither load_in_4bit nor load_in_8bit: {sorted(config)}")


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., C] int32 -> [..., C, 8] values 0..15, nibble i from bits 4i..4i+3."""
    return (packed.to(torch.int32)[..., None] >> SHIFTS) & 15


def unpack(fmt: PackedFormat, take: callable, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(q uint8 [N, K], scales [N, K/g], mins [N, K/g], group size) of one projection, its tensors taken from the checkpoint."""
    qweight, qzeros, scales = take(prefix + "qweight"), take(prefix + "qzeros"), take(prefix + "scales").float()
    if fmt.method == "gptq":
        k = qweight.shape[0] * 8
        q = _nibbles(qweight.t()).reshape(qweight.shape[1], k)  # [N, K]
        zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + 1  # [K/g, N]; v1 stores zero - 1
        g_idx = take(prefix + "g_idx", optional=True)
        group = k if fmt.group_size == -1 else fmt.group_size
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
            raise CheckpointError(f"{prefix}g_idx is not in plain group order (an act-order checkpoint): not served")
    else:
        n = qweight.shape[1] * 8
        inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
        q = _nibbles(qweight)[..., inverse].reshape(qweight.shape[0], n).t()  # [N, K]
        zeros = _nibbles(qzeros)[..., inverse].reshape(qzeros.shape[0], n)  # [K/g, N]
        group = fmt.group_size
    scales, zeros = scales.t().contiguous(), zeros.t().float()  # [N, K/g]
    if q.shape[1] != group * scales.shape[1]:
        raise CheckpointError(f"{prefix}: {q.shape[1]} inputs do not make {scales.shape[1]} groups of {group}")
    return q.to(torch.uint8).contiguous(), scales, -zeros * scales, group
