"""The Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, and Mixtral's experts) written for the paged KV cache.

Read it top to bottom like gpt-fast's model: weights are plain tensors, the forward pass is a
flat batch of tokens with their positions and a ``BatchMetadata``. Q/K/V and gate/up are fused
into one matmul each (the CPU and GPU both prefer one larger GEMM); a LoRA delta is added onto
each fused output's slice, so adapters still see the q/k/v/gate/up projections peft defines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.server.model.attention import BatchMetadata, paged_attention
from lorafleet.server.model.bnb4 import Bnb4Linear, quant_state_key, read_bnb4
from lorafleet.server.model.checkpoint import CheckpointError, ModelConfig
from lorafleet.server.model.kv import KVCache
from lorafleet.server.model.linear import Linear, make_linear, tensor_bytes
from lorafleet.server.model.moe import Expert, MixtureOfExperts
from lorafleet.server.model.prequantized import PackedFormat, unpack
from lorafleet.server.model.quantized import Int4Linear, Int8Linear
from lorafleet.server.model.rope import RotaryEmbedding, apply_rotary


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear | None  # the dense MLP; None in a mixture-of-experts layer
    down: Linear | None
    moe: MixtureOfExperts | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the Hugging Face reference: normalised in float32, rounded to x's dtype, then scaled.

    torch's fused kernel accumulates in float32 whatever x's dtype, so one call (two in half
    precision, where the rounding comes before the weight) replaces the reference's seven ops.
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


class CausalLM:
    def __init__(self, folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 linear_kernel: str = "torch", quantize: str | None = None, group_size: int = 32, packed: PackedFormat | None = None) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.rope = RotaryEmbedding(folder, config.rope_type, device, config.raw)

        def raw(name: str, optional: bool = False) -> torch.Tensor | None:
            """A checkpoint tensor as stored (packed integers stay integers)."""
            if name not in weights:
                if optional:
                    return None
                raise CheckpointError(f"checkpoint is missing tensor {name!r}")
            return weights.pop(name)

        def take(name: str) -> torch.Tensor:
            return raw(name).to(device=device, dtype=dtype)

        def projection(names: list[str], bias: torch.Tensor | None = None) -> Linear:
            """One matmul for the named projections (fused along their outputs): packed 4-bit from a GPTQ or AWQ
            checkpoint, else the float weights, quantized when asked."""
            if packed is None:
                return make_linear(torch.cat([take(n + ".weight") for n in names]), bias, linear_kernel, quantize, group_size)
            if packed.method == "bnb4":
                if all(quant_state_key(weights, n + ".weight") for n in names):
                    quantized.append(names[0])
                    return Bnb4Linear([read_bnb4(weights, n + ".weight") for n in names], bias, dtype, device)
                # A module bitsandbytes left whole (llm_int8_skip_modules): as stored.
                return make_linear(torch.cat([take(n + ".weight") for n in names]), bias, linear_kernel)
            if packed.method == "bnb8":
                if not all(n + ".SCB" in weights for n in names):
                    return make_linear(torch.cat([take(n + ".weight") for n in names]), bias, linear_kernel)
                quantized.append(names[0])
                for n in names:
                    weights.pop(n + ".weight_format", None)
                q = torch.cat([raw(n + ".weight").to(torch.int8) for n in names])
                scales = torch.cat([raw(n + ".SCB").float() / 127 for n in names])  # LLM.int8: w = q x SCB / 127, per output row
                return Int8Linear.from_quantized(q, scales, bias, dtype, device)
            parts = [unpack(packed, raw, n + ".") for n in names]
            q, scales, mins = (torch.cat([part[i] for part in parts]) for i in range(3))
            return Int4Linear.from_quantized(q, scales, mins, parts[0][3], bias, dtype, device)

        quantized: list[str] = []  # bitsandbytes projections read packed
        self.embed = take("model.embed_tokens.weight")
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            bias = None
            if config.qkv_bias:
                bias = torch.cat([take(attn + f"{m}_proj.bias") for m in "qkv"])
            moe = None
            if config.num_experts:  # Mixtral's experts: w1 (gate), w3 (up), w2 (down)
                block = p + "block_sparse_moe."
                experts = [Expert(projection([f"{block}experts.{e}.w1", f"{block}experts.{e}.w3"]), projection([f"{block}experts.{e}.w2"]))
                           for e in range(config.num_experts)]
                moe = MixtureOfExperts(take(block + "gate.weight"), experts, config.experts_per_token, config.intermediate_size)
            self.layers.append(
                LayerWeights(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=projection([attn + f"{m}_proj" for m in "qkv"], bias),
                    o=projection([attn + "o_proj"]),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=None if moe else projection([mlp + "gate_proj", mlp + "up_proj"]),
                    down=None if moe else projection([mlp + "down_proj"]),
                    moe=moe,
                )
            )
        self.norm = take("model.norm.weight")
        if packed is not None and packed.method.startswith("bnb") and not quantized:
            raise CheckpointError(f"the quantization_config says bitsandbytes {packed.kind}, but no projection holds bitsandbytes tensors "
                                  "(a quant_state, or SCB for 8-bit)")
        if self.embed.shape != (config.vocab_size, config.hidden_size):
            raise CheckpointError(f"embed_tokens has shape {tuple(self.embed.shape)}, config says ({config.vocab_size}, {config.hidden_size})")
        # A tied head shares the embedding's tensor when dense; packed, it is its own reordered copy.
        tied = config.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = make_linear(self.embed if tied else take("lm_head.weight"), None, linear_kernel)  # never quantized

    @property
    def nbytes(self) -> int:
        """Memory the base model's weights take on the device, as stored (quantized projections included)."""
        tensors = [self.embed, self.norm, *(t for layer in self.layers for t in (layer.input_norm, layer.post_norm))]
        linears = [self.lm_head, *(p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down) if p is not None)]
        linears += [p for layer in self.layers if layer.moe for e in layer.moe.experts for p in (e.gate_up, e.down)]
        tensors += [layer.moe.router for layer in self.layers if layer.moe]
        tied = getattr(self.lm_head, "weight", None) is self.embed
        return sum(map(tensor_bytes, tensors)) + sum(p.nbytes for p in linears) - (self.lm_head.nbytes if tied else 0)

    @property
    def is_moe(self) -> bool:
        return bool(self.config.num_experts)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every projection an adapter may target: the attention projections,
        and the dense MLP's where there is one (a mixture of experts has none; its experts take no adapter here)."""
        c = self.config
        shapes = {
            "q_proj": (c.hidden_size, self.q_size),
            "k_proj": (c.hidden_size, self.kv_size),
            "v_proj": (c.hidden_size, self.kv_size),
            "o_proj": (self.q_size, c.hidden_size),
        }
        if not self.is_moe:
            shapes.update({"gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
                           "down_proj": (c.intermediate_size, c.hidden_size)})
        return shapes

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: BatchMetadata, kv: KVCache) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        c = self.config
        lora = meta.lora
        cos, sin = self.rope.cos_sin(positions, meta.rope_lengths, self.dtype)
        hidden = F.embedding(input_ids, self.embed)
        for index, layer in enumerate(self.layers):
            x = rms_norm(hidden, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if lora is not None:
                lora.add(index, "q_proj", x, q)
                lora.add(index, "k_proj", x, k)
                lora.add(index, "v_proj", x, v)
            # q and k are adjacent in the fused output (LoRA deltas already added): rotated in one call.
            qk = qkv[:, : self.q_size + self.kv_size].view(-1, c.num_heads + c.num_kv_heads, c.head_dim)
            qk = apply_rotary(qk, cos, sin)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
            v = v.reshape(-1, c.num_kv_heads, c.head_dim)
            attended = paged_attention(q, k, v, kv.keys[index], kv.values[index], meta, self.scale, c.sliding_window)
            attended = attended.reshape(-1, self.q_size)
            out = layer.o(attended)
            if lora is not None:
                lora.add(index, "o_proj", attended, out)
            hidden = hidden + out

            x = rms_norm(hidden, layer.post_norm, c.rms_norm_eps)
            if layer.moe is not None:
                hidden = hidden + layer.moe(x)
                continue
            gate_up = layer.gate_up(x)
            gate, up = gate_up.split([c.intermediate_size, c.intermediate_size], dim=-1)
            if lora is not None:
                lora.add(index, "gate_proj", x, gate)
                lora.add(index, "up_proj", x, up)
            act = F.silu(gate) * up
            out = layer.down(act)
            if lora is not None:
                lora.add(index, "down_proj", act, out)
            hidden = hidden + out
        return rms_norm(hidden, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
