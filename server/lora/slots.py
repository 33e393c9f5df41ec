"""Device slots: the adapters resident on the device, stacked so one kernel call serves a batch.

For each layer and projection there is one A buffer [slots, in, r_max] and one B buffer
[slots, r_max, out]; an adapter of a smaller rank is zero-padded, so padded ranks add nothing.
Rows of the batch that use no adapter have no slot and cost nothing.
"""

from __future__ import annotations

import logging

import torch

from lorafleet.server.lora.adapter_format import LoraAdapter
from lorafleet.server.lora.ops import LoraBatch, SlotBuffers

log = logging.getLogger(__name__)


def bytes_per_slot(module_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int, dtype: torch.dtype) -> int:
    """Device bytes one slot costs: A and B of every projection of every layer, at the padded rank."""
    element = torch.empty((), dtype=dtype).element_size()
    return num_layers * sum(i + o for i, o in module_shapes.values()) * max_rank * element


class LoraSlots(SlotBuffers):
    def __init__(self, module_shapes: dict[str, tuple[int, int]], num_layers: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, kernel: str = "torch") -> None:
        super().__init__(
            [{m: torch.zeros(num_slots, i, max_rank, dtype=dtype, device=device) for m, (i, o) in module_shapes.items()} for _ in range(num_layers)],
            [{m: torch.zeros(num_slots, max_rank, o, dtype=dtype, device=device) for m, (i, o) in module_shapes.items()} for _ in range(num_layers)],
            kernel, max_rank,
        )
        self.num_slots = num_slots
        self.slot_of: dict[str, int] = {}
        self.adapters: dict[str, LoraAdapter] = {}

    @property
    def free_slots(self) -> list[int]:
        used = set(self.slot_of.values())
        return [s for s in range(self.num_slots) if s not in used]

    def is_resident(self, name: str) -> bool:
        return name in self.slot_of

    def load(self, adapter: LoraAdapter) -> int:
        """Copy an adapter into a free slot (zeroing it first) and return the slot."""
        if adapter.name in self.slot_of:
            return self.slot_of[adapter.name]
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank}, above the slots' max rank {self.max_rank}")
        free = self.free_slots
        if not free:
            raise RuntimeError(f"all {self.num_slots} adapter slots are in use")
        slot = free[0]
        for layer in range(len(self.a)):
            for module in self.a[layer]:
                self.a[layer][module][slot].zero_()
                self.b[layer][module][slot].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            rank = a.shape[1]
            self.a[layer][module][slot, :, :rank].copy_(a, non_blocking=True)
            self.b[layer][module][slot, :rank, :].copy_(b, non_blocking=True)
        self.slot_of[adapter.name] = slot
        self.adapters[adapter.name] = adapter
        self.modules_of_slot[slot] = set(adapter.target_modules)
        self.rank_of_slot[slot] = adapter.rank
        log.info("adapter %s (rank %d, %s) in slot %d", adapter.name, adapter.rank, ",".join(adapter.target_modules), slot)
        return slot

    def unload(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        self.adapters.pop(name)
        self.modules_of_slot.pop(slot, None)
        self.rank_of_slot.pop(slot, None)

    def batch_for(self, rows: list[tuple[str | None, int]]) -> LoraBatch | None:
        """The per-step LoRA metadata for a batch given as (adapter name or None, number of tokens) per sequence."""
        if all(name is None for name, _ in rows):
            return None
        slots = [self.slot_of[name] if name is not None else -1 for name, _ in rows]
        return LoraBatch.build(self, slots, [n for _, n in rows])
