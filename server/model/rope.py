"""Rotary position embeddings, every scaling kind transformers defines for Llama-family models.

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` so that linear,
dynamic-NTK, llama3, yarn and longrope scaling agree with the reference by construction. Dynamic
and longrope depend on the sequence's length; transformers uses the longest position in the
forward pass, which for one sequence is its own length, so here each sequence gets the
frequencies for its own length and batching never changes a sequence's result.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


class RotaryEmbedding:
    def __init__(self, folder: Path, rope_type: str, device: torch.device, raw: dict[str, Any] | None = None) -> None:
        self.rope_type = rope_type
        if rope_type == "default" and raw is not None:
            # Plain RoPE needs only config.json's numbers: importing transformers' config machinery costs ~2.4 s of a
            # replica's start (issue 33: start time is the floor of a cold start), so it is left to the scaled kinds.
            self.hf_config: Any = SimpleNamespace(**raw)
            self.init_fn = default_rope_parameters
        else:
            from transformers import AutoConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self.hf_config = AutoConfig.from_pretrained(folder)
            # transformers 5 keeps plain RoPE in each model class, not in ROPE_INIT_FUNCTIONS; 4.x has it there as "default".
            self.init_fn = default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        self.device = device
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        self.original_max = (getattr(self.hf_config, "original_max_position_embeddings", None) or params.get("original_max_position_embeddings")
                             or getattr(self.hf_config, "max_position_embeddings", 2048))
        self.base_inv_freq, self.base_scaling = self.init_fn(self.hf_config, device)
        self._by_length: dict[int, tuple[torch.Tensor, float]] = {}

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in ("dynamic", "longrope")

    def _inv_freq(self, seq_len: int) -> tuple[torch.Tensor, float]:
        if not self.length_dependent or seq_len <= self.original_max:
            return self.base_inv_freq, self.base_scaling
        key = seq_len if self.rope_type == "dynamic" else self.original_max + 1
        if key not in self._by_length:
            self._by_length[key] = self.init_fn(self.hf_config, self.device, seq_len=key)
        return self._by_length[key]

    def cos_sin(self, positions: torch.Tensor, seq_lens: list[tuple[int, int, int]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for each token ([T, head_dim]), what ``apply_rotary`` takes.

        seq_lens holds (start, end, length) of each sequence's tokens. The sin's first half is negated
        once here, so rotating needs one ``roll`` per layer instead of slice, negate and concatenate.
        """
        if not self.length_dependent:
            return self._compute(positions, self.base_inv_freq, self.base_scaling, dtype)
        cos = torch.empty(positions.shape[0], self.base_inv_freq.shape[0] * 2, dtype=dtype, device=positions.device)
        sin = torch.empty_like(cos)
        for start, end, length in seq_lens:
            inv_freq, scaling = self._inv_freq(length)
            cos[start:end], sin[start:end] = self._compute(positions[start:end], inv_freq, scaling, dtype)
        return cos, sin

    @staticmethod
    def _compute(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * inv_freq.float()[None, :]
        sin = (freqs.sin() * scaling).to(dtype)
        return (torch.cat((freqs, freqs), dim=-1).cos() * scaling).to(dtype), torch.cat((-sin, sin), dim=-1)


def default_rope_parameters(config: Any, device: torch.device | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Plain RoPE's inverse frequencies, as transformers computes them (4.x and 5.x), and its scaling 1.0."""
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * (params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    return inv_freq, 1.0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; the half-rotation layout of Hugging Face Llama checkpoints.

    transformers computes x·cos + cat(-x₂, x₁)·sin; cat(x₂, x₁)·cat(-sin, sin) is the same product,
    bit for bit, in two fewer ops. Queries and keys go through together (one call per layer).
    """
    return x * cos[:, None, :] + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin[:, None, :]
