"""The bytes a replica spends, by what holds them: reported in /info and as ``lorafleet_memory_bytes{kind}``.

Sizing a fleet is a memory question (how many slots, how much KV, how large a CPU tier next to the base weights), and
the allocator's own view on cuda says what is left. Read on the engine thread: the slots and tiers change under it.
"""

from __future__ import annotations

from typing import Any

from lorafleet.server.lora.slots import bytes_per_slot


def memory_bytes(engine: Any) -> dict[str, int]:
    runner, manager = engine.runner, engine.adapters
    allocator, slots = engine.allocator, manager.slots
    per_slot = bytes_per_slot(runner.shapes, runner.layers, runner.config.max_lora_rank, runner.slot_dtype)
    used_blocks = allocator.num_blocks - allocator.num_free
    found = {
        "base_weights": runner.model.nbytes,
        "kv_cache_allocated": runner.kv_cache_bytes,
        "kv_cache_used": runner.kv_cache_bytes * used_blocks // max(1, allocator.num_blocks),
        "adapter_slots_allocated": per_slot * runner.num_slots if slots is not None else 0,  # made on the first adapter load
        "adapter_slots_used": per_slot * len(slots.slot_of) if slots is not None else 0,
        "cpu_tier": manager.cpu.used_bytes(),
        "disk_tier": manager.disk.used_bytes(),
    }
    if runner.device.type == "cuda":  # not run here (no GPU): the allocator's reserved and free bytes
        import torch

        free, _ = torch.cuda.mem_get_info(runner.device)
        found |= {"cuda_reserved": torch.cuda.memory_reserved(runner.device), "cuda_allocated": torch.cuda.memory_allocated(runner.device),
                  "cuda_free": free}
    return found
