"""Reading a Hugging Face checkpoint folder into a config and a dict of tensors.

Only safetensors by default: a pickle checkpoint can run code when loaded, so ``.bin`` files are
refused unless the operator of the replica opts in with ``--allow-pickle``. An architecture this
engine does not implement is refused here, at start-up, rather than served wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}


class CheckpointError(ValueError):
    """The checkpoint cannot be served by this engine; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    raw: dict[str, Any]  # the config.json, for the rotary embedding's scaling parameters
    num_experts: int = 0  # Mixtral: expert MLPs per layer (0: a dense MLP)
    experts_per_token: int = 0  # Mixtral: experts each token is routed to

    @property
    def rope_type(self) -> str:
        # transformers 4.x writes rope_scaling (absent for plain RoPE); 5.x writes rope_parameters, always with a rope_type.
        scaling = self.raw.get("rope_scaling") or self.raw.get("rope_parameters") or {}
        return scaling.get("rope_type") or scaling.get("type") or "default"


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    raw = json.loads(path.read_text())
    architectures = raw.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"unsupported architecture {architectures or raw.get('model_type')!r}; "
            f"this engine serves {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    config = ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        sliding_window=_sliding_window(arch, raw),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
        raw=raw,
        num_experts=raw.get("num_local_experts", 0) if arch == "MixtralForCausalLM" else 0,
        experts_per_token=raw.get("num_experts_per_tok", 2) if arch == "MixtralForCausalLM" else 0,
    )
    if config.num_experts and not 0 < config.experts_per_token <= config.num_experts:
        raise CheckpointError(f"num_experts_per_tok {config.experts_per_token} must be between 1 and num_local_experts {config.num_experts}")
    if config.rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"unsupported rope_scaling type {config.rope_type!r}; supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))}"
        )
    if raw.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
    return config


def _sliding_window(arch: str, raw: dict[str, Any]) -> int | None:
    if arch == "Qwen2ForCausalLM":
        if raw.get("use_sliding_window"):
            raise CheckpointError("Qwen2 use_sliding_window=true is not supported")
        return None
    return raw.get("sliding_window")


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def checkpoint_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files to read: single or sharded safetensors; pickle only when allowed."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in model.safetensors.index.json are missing: {missing}")
        return [folder / s for s in shards]
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({pickles[0].name}); pickle can run code when loaded. "
            "Convert it to safetensors, or pass --allow-pickle if you trust it"
        )
    if pickles:
        return pickles
    raise CheckpointError(f"{folder} has no model weights (*.safetensors)")


def load_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder, allow_pickle):
        if path.suffix == ".safetensors":
            weights.update(load_file(str(path)))
        else:
            weights.update(torch.load(path, map_location="cpu", weights_only=False))
    return weights
