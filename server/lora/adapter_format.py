"""Reading and validating a PEFT LoRA adapter folder against the base model it must fit.

The config's rules are lorafleet/adapter_rules.py (the operator checks the same ones); here the
weights are checked against the base model's shapes and ``--max-lora-rank``, with per-module ranks
and alphas (``rank_pattern``, ``alpha_pattern``), rsLoRA scaling and ``layers_to_transform``.
Everything else is refused with the reason, before the adapter reaches a device slot. The per-module scale is folded into B once here,
so the batched op is a plain ``(x·A)·B``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.adapter_rules import PROJECTIONS, AdapterRuleError, check_config

TENSOR_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(ValueError):
    """The adapter is not a LoRA this base model can serve; the message says why."""


@dataclass(slots=True)
class LoraAdapter:
    name: str
    rank: int  # the largest rank of any module
    target_modules: list[str]
    # (layer, module) -> (A as [in, r], B·scale as [r, out])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fingerprint: bytes = b""  # of the weights as served (content_fingerprint): cached KV blocks are keyed by it
    # What merging needs to undo the served form: each module's scale (alpha / r, or / sqrt(r)), the config's
    # use_rslora and the base model it names (base_model_name_or_path).
    scales: dict[tuple[int, str], float] = field(default_factory=dict)
    use_rslora: bool = False
    base_model: str | None = None

    @property
    def size_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _pattern_value(patterns: dict[str, float], module_path: str, default: float) -> float:
    """peft's rule: a pattern applies when it matches the end of the module's dotted path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def read_adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{folder} has no adapter_config.json: not a PEFT adapter")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON: {exc}") from exc
    try:
        check_config(config)
    except AdapterRuleError as exc:
        raise AdapterError(str(exc)) from None
    return config


def load_adapter(
    name: str,
    folder: Path,
    module_shapes: dict[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
    allow_pickle: bool = False,
) -> LoraAdapter:
    """Validate ``folder`` against the base model's shapes and return its weights on the CPU in float32."""
    config = read_adapter_config(folder)
    tensors = _read_tensors(folder, allow_pickle)
    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        match = TENSOR_NAME.match(tensor_name)
        outside = re.search(r"\b(embed_tokens|lm_head)\b", tensor_name)
        if outside:
            raise AdapterError(f"LoRA on {outside[1]!r} is not supported (embedding and lm_head adapters are not served)")
        if match is None:
            raise AdapterError(f"unsupported tensor {tensor_name!r}: only lora_A/lora_B of {list(PROJECTIONS)} are served")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in module_shapes:
            raise AdapterError(f"LoRA on {module!r} is not supported; targets must be among {list(PROJECTIONS)}")
        if layer >= num_layers:
            raise AdapterError(f"{tensor_name}: layer {layer} does not exist; the base model has {num_layers} layers")
        pieces.setdefault((layer, module), {})[which] = tensor
    if not pieces:
        raise AdapterError("the adapter holds no LoRA weights")
    use_rslora = bool(config.get("use_rslora"))
    alpha = float(config.get("lora_alpha", 8))
    adapter = LoraAdapter(name=name, rank=0, target_modules=sorted({m for _, m in pieces}), use_rslora=use_rslora,
                          base_model=config.get("base_model_name_or_path") or None)
    for (layer, module), pair in sorted(pieces.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        in_features, out_features = module_shapes[module]
        rank = a.shape[0]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base model's "
                f"{in_features}->{out_features} projection (expected ({rank}, {in_features}) and ({out_features}, {rank})); "
                "was the adapter trained on another base model?"
            )
        if rank > max_rank:
            raise AdapterError(f"layer {layer} {module}: rank {rank} is above --max-lora-rank {max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # NaN weights would make every forward of it NaN
            raise AdapterError(f"layer {layer} {module}: lora_A or lora_B holds NaN or infinite values")
        path = f"model.layers.{layer}.{'mlp' if module in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{module}"
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, path, alpha)
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        adapter.weights[(layer, module)] = (a.float().t().contiguous(), (b.float() * scale).t().contiguous())
        adapter.scales[(layer, module)] = scale
        adapter.rank = max(adapter.rank, rank)
    adapter.fingerprint = content_fingerprint(adapter.weights)
    return adapter


def content_fingerprint(weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    """A digest of the weights (scale applied): the same name with other contents (a re-uploaded folder,
    a new revision) never reuses KV blocks the old one computed. Hashing runs on the loader thread, at
    about a GB/s, once per parse."""
    digest = hashlib.blake2b(digest_size=16)
    for (layer, module), (a, b) in sorted(weights.items()):
        digest.update(f"{layer}.{module}".encode())
        for tensor in (a, b):
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_path = folder / "adapter_model.safetensors"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path))
        except Exception as exc:  # a truncated or corrupt file
            raise AdapterError(f"adapter_model.safetensors is unreadable: {exc}") from exc
    pickle_path = folder / "adapter_model.bin"
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterError("the adapter holds only pickle weights (adapter_model.bin); pickle can run code when loaded. Pass --allow-pickle if you trust it")
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise AdapterError(f"{folder} has no adapter_model.safetensors")
