"""Mixtral's sparse MoE block: a router picks ``top_k`` of the layer's expert MLPs per token.

As the Hugging Face reference: router logits in the activation dtype, softmax in float32, the top-k
probabilities renormalised to sum to one and rounded back, then each expert runs on the tokens routed to
it (gathered rows, one fused gate/up matmul and one down matmul, like the dense MLP) and its output is
added back weighted. The experts loop over the ones actually chosen in this batch, so a decode step of a
few tokens runs a few experts; that data-dependent loop is why MoE models run decode eagerly (no CUDA
graph). LoRA adapters act on the attention projections of MoE models (see CausalLM.module_shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafleet.server.model.linear import Linear


@dataclass(slots=True)
class Expert:
    gate_up: Linear  # w1 (gate) and w3 (up), fused
    down: Linear  # w2


@dataclass(slots=True)
class MixtureOfExperts:
    router: torch.Tensor  # [num_experts, hidden]
    experts: list[Expert]
    top_k: int
    intermediate_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = F.softmax(F.linear(x, self.router), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probabilities, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for index in chosen.unique().tolist():
            rows, rank = (chosen == index).nonzero(as_tuple=True)
            expert = self.experts[index]
            gate, up = expert.gate_up(x[rows]).split([self.intermediate_size, self.intermediate_size], dim=-1)
            out.index_add_(0, rows, expert.down(F.silu(gate) * up) * weights[rows, rank, None])
        return out
