"""Merged adapters in the tiers: their specs by name, and how one is built from its members.

A merged adapter is named by its whole spec (``MergeSpec.ref``), so the same request merges once: the
result is kept in the CPU tier and takes a device slot like any adapter (and is evicted like one). Members
load through the normal tiers (the CPU cache, the disk cache, their source) and stay cached for other uses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.adapters.sources import AdapterNotFound
from lorafleet.server.lora.adapter_format import LoraAdapter
from lorafleet.server.lora.merge import MergeCancelled, MergeSpec, merge_adapters

MAX_SPECS = 4096  # specs remembered by name; a request always registers its own again


class MergedAdapters:
    def __init__(self) -> None:
        self._specs: OrderedDict[str, MergeSpec] = OrderedDict()
        self._lock = threading.Lock()

    def define(self, spec: MergeSpec) -> AdapterRef:
        """Remember ``spec`` under its name; the name is what requests, tiers and slots use."""
        ref = spec.ref
        with self._lock:
            self._specs[ref.id] = spec
            self._specs.move_to_end(ref.id)
            while len(self._specs) > MAX_SPECS:
                self._specs.popitem(last=False)
        return ref

    def spec(self, ref: AdapterRef) -> MergeSpec:
        with self._lock:
            spec = self._specs.get(ref.id)
        if spec is None:
            raise AdapterNotFound(f"merged adapter {ref.id!r} is not defined here; send its `merged_adapters` spec")
        return spec

    def build(self, ref: AdapterRef, member: Callable[[AdapterRef], LoraAdapter], wanted: Callable[[], bool]) -> LoraAdapter:
        """Load every member (through the tiers) and merge them, on the merge pool (never the engine's thread), giving
        up as soon as ``wanted`` says nobody waits for the result."""
        spec = self.spec(ref)
        members = []
        for m in spec.members:
            if not wanted():
                raise MergeCancelled(f"merge of {ref.key} cancelled: no request waits for it")
            members.append(member(m))
        return merge_adapters(ref.key, members, spec, wanted)
