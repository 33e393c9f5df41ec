"""Per-request adapter merging (LoRAX's ``merged_adapters``) with peft's ``add_weighted_adapter`` semantics.

For every projection any member adapts, the members' A matrices are combined into one A and their B
matrices into one B, each member weighted by sqrt(|weight x its scale|) (the sign on A only), by one of:

- ``linear``: the weighted sum;
- ``ties``: each member keeps its ``density`` largest magnitudes, a sign is elected per element
  (``majority_sign_method``: the sum, or the count of signs), and members agreeing with it are averaged;
- ``dare_linear``: each member keeps a random ``density`` of its elements, rescaled by 1/density, then summed;
- ``dare_ties``: DARE's random pruning, then TIES' election and averaging.

All members must have one rank (these strategies combine A and B element by element); the merged adapter has
that rank and scale 1 (sqrt(r) when the first member uses rsLoRA), as peft sets lora_alpha = r. DARE's
random masks come from a generator seeded by the whole spec, so a spec always merges to the same adapter.
The work follows peft's order (layers, then q/k/v/o/gate/up/down, A before B), so with the same seed in
torch's default generator peft draws the same masks (tests/adapters/test_merged_adapters.py compares the two).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafleet.adapter_ref import AdapterRef
from lorafleet.adapter_rules import PROJECTIONS
from lorafleet.server.lora.adapter_format import LoraAdapter, content_fingerprint

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAX_MEMBERS = 16
# Bounds that keep a merge finite in every slot dtype (float16's largest is 65504): a weight scales A and B by
# its square root, DARE rescales by 1/density, and a merged value past MAX_MERGED_VALUE is no fine-tune anyone
# trained but a way to make activations overflow. Real merges use weights near 1 and densities of 0.1 to 1.
MAX_WEIGHT = 100.0
MIN_DENSITY = 0.01
MAX_MERGED_VALUE = 1e4
# The work a merge may cost: the members' LoRA parameters together (ties sorts each tensor; 16 rank-8 SmolLM2 adapters
# on every projection are about 55M). Past it the request is refused before any member is combined.
MAX_MERGE_PARAMETERS = 64_000_000


class MergeCancelled(RuntimeError):
    """Nobody waits for this merge any more: its requests were cancelled or their clients left."""


class MergeError(ValueError):
    """The members cannot be merged as asked (ranks, modules, base models): the request's to fix."""


@dataclass(frozen=True)
class MergeSpec:
    members: tuple[AdapterRef, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    def canonical(self) -> str:
        return json.dumps({"members": [[m.source, m.id, m.revision] for m in self.members], "weights": list(self.weights),
                           "strategy": self.strategy, "density": self.density, "sign": self.majority_sign_method}, sort_keys=True)

    @property
    def ref(self) -> AdapterRef:
        """The merged adapter's own name in every tier: one per spec (members with revisions, weights, parameters)."""
        return AdapterRef("merged", "merged-" + hashlib.blake2b(self.canonical().encode(), digest_size=8).hexdigest())

    @property
    def seed(self) -> int:
        return int.from_bytes(hashlib.blake2b(self.canonical().encode(), digest_size=8, person=b"dare-seed").digest(), "big") >> 1


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator) / density


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec, strategy: str, generator: torch.Generator) -> torch.Tensor:
    if strategy in ("ties", "dare_ties", "dare_linear"):
        if strategy == "ties":
            tensors = [_prune_magnitude(t, spec.density) for t in tensors]
        else:
            tensors = [_prune_random(t, spec.density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if strategy in ("linear", "dare_linear"):
        return weighted.sum(0)
    sign = stacked.sign()
    magnitude = stacked.sum(0) if spec.majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def merge_adapters(name: str, members: list[LoraAdapter], spec: MergeSpec, wanted: Callable[[], bool] = lambda: True) -> LoraAdapter:
    """The merged adapter, in the served form (A as [in, r], B·scale as [r, out]); MergeError when impossible,
    MergeCancelled as soon as ``wanted`` says nobody waits for it (checked between layers)."""
    parameters = sum(a.numel() + b.numel() for m in members for a, b in m.weights.values())
    if parameters > MAX_MERGE_PARAMETERS:
        raise MergeError(f"`merged_adapters`: the members hold {parameters:,} LoRA parameters together; a merge may combine at most "
                         f"{MAX_MERGE_PARAMETERS:,} (fewer members, or members of lower rank)")
    ranks = {m.rank for m in members}
    if len(ranks) != 1:
        raise MergeError(f"`merged_adapters` with {spec.strategy!r} needs members of one rank (it combines A and B element by element); "
                         f"ranks: {', '.join(f'{ref.id}={m.rank}' for ref, m in zip(spec.members, members))}")
    bases = {m.base_model for m in members if m.base_model}
    if len(bases) > 1:
        raise MergeError(f"`merged_adapters` members were trained on different base models: {', '.join(sorted(bases))}")
    rank = ranks.pop()
    strategy = spec.strategy if len(members) > 1 else "linear"  # as peft: one member is only weighted
    scale = math.sqrt(rank) if members[0].use_rslora else 1.0  # peft: lora_alpha = r for the merged adapter
    generator = torch.Generator().manual_seed(spec.seed)
    layers = sorted({layer for m in members for layer, _ in m.weights})
    merged = LoraAdapter(name=name, rank=rank, target_modules=sorted({t for m in members for t in m.target_modules}),
                         use_rslora=members[0].use_rslora, base_model=next(iter(bases), None))
    for layer in layers:
        if not wanted():
            raise MergeCancelled(f"merge of {name} cancelled: no request waits for it")
        for module in PROJECTIONS:
            a_list, b_list, weights_a, weights_b = [], [], [], []
            for member, weight in zip(members, spec.weights):
                if (layer, module) not in member.weights:
                    continue
                a, b = member.weights[(layer, module)]
                member_scale = member.scales.get((layer, module), 1.0)
                if a.shape[1] != rank:
                    raise MergeError(f"`merged_adapters`: {member.name} has rank {a.shape[1]} on layer {layer} {module}, not {rank}; "
                                     f"{spec.strategy!r} cannot combine different ranks")
                a_list.append(a.t())  # peft's lora_A: [r, in]
                b_list.append(b.t() / member_scale)  # peft's lora_B without the scale: [out, r]
                scaled = weight * member_scale
                weights_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
                weights_b.append(math.sqrt(abs(scaled)))
            if not a_list:
                continue
            new_a = _combine(a_list, torch.tensor(weights_a), spec, strategy, generator)
            new_b = _combine(b_list, torch.tensor(weights_b), spec, strategy, generator)
            merged.weights[(layer, module)] = (new_a.t().contiguous(), (new_b * scale).t().contiguous())
            merged.scales[(layer, module)] = scale
    _check_bounded(merged, spec)
    merged.fingerprint = content_fingerprint(merged.weights)
    return merged


def _check_bounded(merged: LoraAdapter, spec: MergeSpec) -> None:
    """Refuse a result that is not finite or is out of bounds before it is cached or reaches a slot: members
    with extreme values can still combine into one that overflows a half-precision forward pass."""
    for (layer, module), (a, b) in merged.weights.items():
        for name, tensor in (("A", a), ("B", b)):
            largest = tensor.abs().max().item() if tensor.numel() else 0.0
            if not math.isfinite(largest) or largest > MAX_MERGED_VALUE:
                raise MergeError(f"`merged_adapters` ({spec.strategy}) gives {name} of layer {layer} {module} a value of {largest:.3g}, "
                                 f"beyond the bound of {MAX_MERGED_VALUE:g}; use smaller weights or a larger density")
