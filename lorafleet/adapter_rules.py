"""What makes an adapter_config.json one this engine can serve: the rules, written once.

The replica applies them to an adapter folder before reading its tensors; the operator applies
them to the config alone before warming (it never imports torch). Only what the engine applies
exactly passes: LoRA (not DoRA, not IA3 or prompt tuning), on the seven Llama-family
projections, without modules_to_save, within a rank limit when one is given.
"""

from __future__ import annotations

from typing import Any

# How long an adapter reference may be, for the replicas, the catalogue and the operator alike (the CRDs say the same).
MAX_ID_LENGTH = 512  # hub ids are at most 96 characters; a path under a root or an S3 prefix fits with room
MAX_REVISION_LENGTH = 255  # a branch, a tag or a commit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PROJECTIONS = ("w1", "w2", "w3", "gate_up_proj")  # Mixtral's experts (hub layout, and transformers 5's fused one)


class AdapterRuleError(ValueError):
    """The adapter is not a LoRA this engine can serve; the message says which rule it breaks."""


def check_config(config: dict[str, Any], max_rank: int | None = None, rank_limit: str = "--max-lora-rank") -> tuple[int, list[str]]:
    """(declared rank, target projections) of a config that passes every rule; AdapterRuleError otherwise.

    ``rank_limit`` names the limit in the message (a flag for a replica, a BaseModel field for the operator).
    """
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterRuleError(f"peft_type {peft_type} is not supported; only LORA adapters are served")
    if config.get("use_dora"):
        raise AdapterRuleError("DoRA adapters (use_dora=true) are not supported")
    if config.get("modules_to_save"):
        raise AdapterRuleError(f"modules_to_save {config['modules_to_save']} is not supported: the adapter would replace whole base modules")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        unknown = [t for t in targets if str(t).split(".")[-1] not in PROJECTIONS]
        experts = [t for t in unknown if str(t).split(".")[-1] in EXPERT_PROJECTIONS or "experts" in str(t)]
        if experts:
            raise AdapterRuleError(f"LoRA on mixture-of-experts expert MLPs ({experts}) is not served; "
                                   "adapters on a MoE model may target the attention projections (q_proj, k_proj, v_proj, o_proj)")
        if unknown:
            raise AdapterRuleError(f"LoRA on {unknown} is not supported (embedding and lm_head LoRA included); targets must be among {list(PROJECTIONS)}")
        projections = sorted({str(t).split(".")[-1] for t in targets})
    else:  # a regex over module names: which projections it hits is known only from the weights
        projections = [str(targets)]
    try:
        rank = max([int(config.get("r", 8)), *[int(r) for r in (config.get("rank_pattern") or {}).values()]])
    except (TypeError, ValueError) as exc:
        raise AdapterRuleError(f"r and rank_pattern must be integers: {exc}") from exc
    if max_rank is not None and rank > max_rank:
        raise AdapterRuleError(f"rank {rank} is above {rank_limit} {max_rank}")
    return rank, projections
