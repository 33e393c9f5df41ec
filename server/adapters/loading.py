"""What the loader threads do: read an adapter into the CPU tier from wherever it is (the CPU tier itself, its local
folder, the disk tier, its source) or merge one from its members, and hand the outcome back to the engine thread.

A mixin of AdapterManager (manager.py), kept apart because everything here runs on the loader and merge threads while
the rest of the manager runs on the engine thread: nothing here changes an adapter's state; ``settle`` does, there.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.adapters.admission import LoadAdmission
from lorafleet.server.adapters.cache import CpuCache, DiskCache
from lorafleet.server.adapters.merged import MergedAdapters
from lorafleet.server.adapters.sources import SourceUnreachable, fetch_hub, fetch_s3
from lorafleet.server.adapters.state import AdapterState
from lorafleet.server.lora.adapter_format import LoraAdapter
from lorafleet.server.lora.merge import MergeCancelled

log = logging.getLogger(__name__)


class TierReads:
    """The manager's attributes these methods use (set by AdapterManager.__init__)."""

    cpu: CpuCache
    disk: DiskCache
    merges: MergedAdapters
    admission: LoadAdmission
    states: dict[str, AdapterState]
    _parse: Callable[[str, Path], LoraAdapter]
    _pinned: set[str]
    _wanted: frozenset[str]
    _wanted_generation: int
    _outcomes: queue.SimpleQueue
    on_timing: Callable[[str, float], None]
    on_settled: Callable[[], None]

    def _count(self, event: str) -> None:
        raise NotImplementedError

    def _resolve(self, ref: AdapterRef) -> tuple[AdapterRef, Path | None]:
        raise NotImplementedError

    def _fetch(self, state: AdapterState, token: str | None) -> None:
        try:
            self._load(state, None, token, recheck_source=True)
        finally:
            self.admission.fetch_ended()

    def _merge(self, state: AdapterState, token: str | None, generation: int, caller: bytes) -> None:
        key = state.ref.key

        def wanted() -> bool:  # no step has run since it was asked for, or a request still waits for it
            return self._wanted_generation == generation or key in self._wanted

        try:
            self._load(state, None, token, wanted=wanted)
        finally:
            self.admission.merge_ended(caller)

    def _load(self, state: AdapterState, local_folder: Path | None, token: str | None, recheck_source: bool = False,
              wanted: Callable[[], bool] = lambda: True) -> None:
        key = state.ref.key
        started = time.perf_counter()
        try:
            if recheck_source:  # queued behind fetches that found the source down: fail now rather than wait a deadline too
                down = self.admission.source_down(state.ref.source, state.ref.id)
                if down is not None and self.cpu.get(key) is None and self.disk.get(key) is None:
                    raise down
            adapter = self.cpu.get(key)
            if adapter is not None:
                state.tier_hit = "cpu"
                self._count("cpu_hit")
            elif state.ref.source == "merged":
                state.tier_hit = "merge"
                merge_start = time.perf_counter()
                adapter = self.merges.build(state.ref, lambda member: self._member(member, token), wanted)
                self._count("merges")
                self.on_timing("merge", time.perf_counter() - merge_start)
                self.cpu.put(key, adapter, protect=set(self._pinned))
            else:
                adapter = self._read(state, local_folder, token)
            state.load_seconds["total_to_cpu"] = time.perf_counter() - started
            if state.tier_hit == "source":
                self.admission.mark_up(state.ref.source)  # it answered: it is up
            self._outcomes.put((state, adapter))
        except MergeCancelled as exc:  # nobody waits: no failure to count or back off from; a later request merges again
            log.info("%s", exc)
            self._outcomes.put((state, exc))
        except BaseException as exc:  # every failure reaches the waiting requests
            if isinstance(exc, SourceUnreachable):  # at once: the other loader threads' queued fetches read it
                self.admission.mark_down(state.ref.source, exc)
            log.warning("adapter %s failed to load (%s: %s)", key, type(exc).__name__, exc)
            self._outcomes.put((state, exc))
        finally:
            self.on_settled()


    def _read(self, state: AdapterState, local_folder: Path | None, token: str | None) -> LoraAdapter:
        """Parse an adapter from its local folder, or from the disk tier (fetched from its source first if
        needed), into the CPU tier."""
        if local_folder is not None:
            state.tier_hit = "local"
            self._count("local_read")  # read from its folder: as cold as the disk tier
        folder = local_folder or self._disk_copy(state, token)
        parse_start = time.perf_counter()
        adapter = self._parse(state.ref.key, folder)
        state.load_seconds["disk_to_cpu"] = time.perf_counter() - parse_start
        self.on_timing("disk_to_cpu", state.load_seconds["disk_to_cpu"])
        self.cpu.put(state.ref.key, adapter, protect=set(self._pinned))
        return adapter

    def _member(self, ref: AdapterRef, token: str | None) -> LoraAdapter:
        """One member of a merged adapter, from the CPU tier or read into it like any adapter."""
        ref, folder = self._resolve(ref)
        return self.cpu.get(ref.key) or self._read(AdapterState(ref), folder, token)

    def _disk_copy(self, state: AdapterState, token: str | None) -> Path:
        key = state.ref.key
        folder = self.disk.get(key)
        if folder is not None:
            state.tier_hit = "disk"
            self._count("disk_hit")
            return folder
        state.tier_hit = "source"
        self._count("source_fetch")
        fetch_start = time.perf_counter()
        ref = state.ref
        fetch = (lambda dest: fetch_hub(ref, dest, token)) if ref.source == "hub" else (lambda dest: fetch_s3(ref, dest))
        # A loader thread: the engine thread may add states meanwhile, so read a copy (one C-level call under the GIL).
        folder = self.disk.put(key, fetch, protect={k for k, s in list(self.states.items()) if s.status in ("loading", "device")})
        state.load_seconds["source_to_disk"] = time.perf_counter() - fetch_start
        self.on_timing("source_to_disk", state.load_seconds["source_to_disk"])
        return folder
