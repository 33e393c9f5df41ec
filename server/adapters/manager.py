"""Which adapters are where, and moving them between tiers without ever stalling the engine loop.

A request names an adapter; ``request`` registers it and, if no tier holds it, starts a fetch and
parse in a worker thread, which hands the outcome back on a queue: only the engine thread changes the
adapter states (``settle``, at the start of every step and whenever a loader wakes it). Between steps
the engine thread calls ``between_steps``, which copies adapters that are ready in CPU memory into free
device slots, evicting the least recently used adapter that no running request uses and that is not pinned. When every slot is busy and other
adapters have been waiting, the adapter that has held its slot longest past ``cycle_time_s``
drains: its running requests finish, new ones wait, and its slot goes to the next in line — so
no adapter starves (LoRAX's rotation, with the same default of 2 s).

An adapter brought into a slot keeps it until one of its requests has run a step, or for
``cycle_time_s`` if none can: otherwise two waiting adapters evict each other every step while
the scheduler admits neither (seen: 35 swaps a second for minutes, nothing served).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.adapters.admission import LoadAdmission
from lorafleet.server.adapters.cache import CpuCache, DiskCache
from lorafleet.server.adapters.loading import TierReads
from lorafleet.server.adapters.merged import MergedAdapters
from lorafleet.server.adapters.sources import AdapterNotFound, resolve_local
from lorafleet.server.adapters.state import AdapterSettings, AdapterState, digest_of, retry_delay
from lorafleet.server.background import lower_this_threads_priority
from lorafleet.server.errors import Conflict
from lorafleet.server.lora.adapter_format import LoraAdapter
from lorafleet.server.lora.merge import MergeCancelled
from lorafleet.server.lora.slots import LoraSlots

log = logging.getLogger(__name__)
MAX_FAILED_REMEMBERED = 256  # failed ids kept for their error and back-off; older ones are forgotten
# Merges run on a pool of their own (a merge is seconds of CPU; fetches are network waits): a flood of merge specs
# never holds up other clients' hub adapters. Each is cancelled once no request waits for it.
MERGE_THREADS = 1
MAX_MERGED_STATES = 64  # merged adapters remembered (tier, errors); older ones nobody uses are forgotten (recomputable)
MERGED_CPU_SHARE = 0.25  # of the CPU tier: merged adapters never evict more than this of everyone's real adapters
# Of the device slots (at least one): merged specs take turns in these and never hold more of the real adapters' slots.
# A client sending a new spec every request (each its own adapter) otherwise evicted every tenant's adapter in turn.
MERGED_SLOT_SHARE = 0.25


class AdapterManager(TierReads):
    def __init__(self, settings: AdapterSettings, make_slots: Callable[[], LoraSlots], parse: Callable[[str, Path], LoraAdapter]) -> None:
        self.settings = settings
        self.disk = DiskCache(settings.cache_dir, settings.disk_bytes)
        self.cpu = CpuCache(settings.cpu_bytes, merged_bytes=int(settings.cpu_bytes * MERGED_CPU_SHARE))
        self._make_slots = make_slots
        self._parse = parse
        self.slots: LoraSlots | None = None
        self.states: dict[str, AdapterState] = {}
        self._failed: list[tuple[str, BaseException]] = []
        # Loader threads hand each load's outcome (the parsed adapter, or why it failed) back here; the engine thread
        # applies them (settle), so it alone changes the adapter states.
        self._outcomes: queue.SimpleQueue[tuple[AdapterState, LoraAdapter | BaseException]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._local_pool = ThreadPoolExecutor(settings.load_threads, thread_name_prefix="lorafleet-adapter-local")
        self._remote_pool = ThreadPoolExecutor(settings.remote_load_threads, thread_name_prefix="lorafleet-adapter-remote")
        self._merge_pool = ThreadPoolExecutor(MERGE_THREADS, thread_name_prefix="lorafleet-adapter-merge", initializer=lower_this_threads_priority)
        self.admission = LoadAdmission()  # bounded fetch and merge queues, sources known down (admission.py)
        self._merged_keys: dict[str, None] = {}  # merged adapters with a state, oldest first (engine thread)
        # What waits for an adapter, published by the engine thread each step: a merge nobody waits for stops.
        self._wanted: frozenset[str] = frozenset()
        self._wanted_generation = 0
        self._failed_keys: dict[str, None] = {}  # insertion-ordered: the oldest failure first
        # Called with (step, seconds) for each tier move: source_to_disk, disk_to_cpu, cpu_to_device.
        self.on_timing: Callable[[str, float], None] = lambda step, seconds: None
        self.on_settled: Callable[[], None] = lambda: None  # a load ended (either way): the engine loop wakes to look
        self._pinned: set[str] = set()
        self._draining: set[str] = set()
        self.counts: dict[str, int] = {"device_hit": 0, "cpu_hit": 0, "disk_hit": 0, "local_read": 0, "source_fetch": 0, "device_evictions": 0,
                                       "rotations": 0, "merges": 0, "load_failures": 0}
        self._counts_lock = threading.Lock()
        self.merges = MergedAdapters()

    def _count(self, event: str) -> None:
        """Counted from the engine thread and the loader threads: under a lock, or increments are lost."""
        with self._counts_lock:
            self.counts[event] += 1

    def close(self) -> None:
        for pool in (self._local_pool, self._remote_pool, self._merge_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, state: AdapterState, local_folder: Path | None, token: str | None, caller: bytes = b"") -> None:
        if state.ref.source == "local":
            self._local_pool.submit(self._load, state, local_folder, token)
            return
        if state.ref.source == "merged":
            self.admission.merge_started(caller)
            self._merge_pool.submit(self._merge, state, token, self._wanted_generation, caller)
            return
        self.admission.fetch_started()
        self._remote_pool.submit(self._fetch, state, token)

    # -- requests (engine thread) ---------------------------------------------------------------

    def request(self, ref: AdapterRef, token: str | None = None, pin: bool = False, caller: bytes = b"") -> str:
        """Register a use of ``ref``; start loading it if no tier holds it. Raises at once for a bad id or a recent failure."""
        self.settle()
        folder = None
        known = self.states.get(ref.key)
        if known is None or known.status == "failed":  # the filesystem only on a miss, never per request on this thread
            ref, folder = self._resolve(ref)
        key = ref.key
        now = time.monotonic()
        with self._lock:
            state = self.states.get(key)
            # A token may open a private repo that answered "not found" without one: that retries at once.
            retry_with_token = token is not None and isinstance(state.error if state else None, AdapterNotFound)
            if state is not None and state.status == "failed" and now < state.retry_at and not retry_with_token:
                raise state.error  # type: ignore[misc]
            if pin and key not in self._pinned:
                self._check_pin_room(key)
            if state is None or state.status == "failed":
                if ref.source == "merged":
                    self.admission.admit_merge(caller)
                    self._merged_keys[key] = None
                elif ref.source != "local":
                    self.admission.admit_fetch(ref.source, ref.id)
                state = self.states[key] = AdapterState(ref, failures=state.failures if state else 0)
                self._failed_keys.pop(key, None)
                self._submit(state, folder, token, caller)
            elif state.status == "device":
                self._count("device_hit")
            state.last_used = now
            if pin:
                self._pinned.add(key)
            state.pinned = state.pinned or pin
        return key

    def canonical(self, ref: AdapterRef) -> AdapterRef:
        """The one name of the adapter ``ref`` names: every tier, metric label and header uses it, so
        spellings of one folder ("./a0", "a0/.", a symlink) are one adapter, not one each."""
        return self._resolve(ref)[0]

    def _resolve(self, ref: AdapterRef) -> tuple[AdapterRef, Path | None]:
        """The canonical ref, and for a local adapter its folder under the roots (raises for a bad or missing one)."""
        if ref.source != "local":
            return ref, None
        folder = resolve_local(ref.id, self.settings.roots)
        return AdapterRef("local", self._canonical_local_id(folder), ref.revision), folder

    def _canonical_local_id(self, folder: Path) -> str:
        for root in self.settings.roots:
            resolved = root.resolve()
            if resolved in folder.parents:
                return folder.relative_to(resolved).as_posix()
        return folder.as_posix()  # pragma: no cover - resolve_local only returns folders under a root

    def _check_pin_room(self, key: str) -> None:
        """Pins never take the last slot: adapters nobody pinned must still be able to take turns."""
        limit = self.settings.max_pinned
        if limit is not None and len(self._pinned) >= limit:
            raise Conflict(f"cannot pin {key}: {len(self._pinned)} adapters are pinned and at most {limit} may be "
                           f"(one device slot always stays free of pins); unpin one first (DELETE /adapters/ID)")

    def is_ready(self, key: str) -> bool:
        state = self.states.get(key)
        return state is not None and state.status == "device" and not state.draining

    def take_failed(self) -> list[tuple[str, BaseException]]:
        """Loads that failed since the last call, for the engine to fail their waiting requests; a failure that a newer
        attempt at the same adapter has replaced is left out (it must not fail the newer attempt's requests)."""
        self.settle()
        with self._lock:
            failed, self._failed = self._failed, []
            return [(key, exc) for key, exc in failed if key not in self.states or self.states[key].error is exc]

    def resume_cancelled(self, key: str, error: BaseException) -> bool:
        """A merge cancelled while a request came to wait for it after all (between the step that saw nobody and the
        cancel) starts again instead of failing that request."""
        state = self.states.get(key)
        if not isinstance(error, MergeCancelled) or state is None or state.error is not error:
            return False
        with self._lock:
            state.status, state.error = "loading", None
        self._submit(state, None, None)
        return True

    def load_now(self, name: str, folder: Path, pin: bool = True) -> LoraAdapter:
        """Parse a folder and put it straight into a slot (tests, benchmarks, and start-up preloads)."""
        adapter = self._parse(name, folder)
        state = AdapterState(AdapterRef("local", name), status="cpu", pinned=pin, rank=adapter.rank, size_bytes=adapter.size_bytes,
                             digest=digest_of(adapter.fingerprint))
        self.states[name] = state
        if pin:
            self._pinned.add(name)
        self.cpu.put(name, adapter)
        self._to_device(name, state, adapter, running=set(), waited_for=set())
        state.ran_since_load = True  # no request waits for it: it needs no protection from eviction
        return adapter

    def unpin(self, key: str) -> None:
        state = self.states.get(key)
        self._pinned.discard(key)
        if state is not None:
            state.pinned = False

    def unload(self, key: str, in_use: set[str]) -> bool:
        """Drop an adapter from every tier but disk; False when requests use it, running or waiting for it (a waiting
        request whose adapter state vanished would wait for ever)."""
        if key in in_use:
            return False
        with self._lock:
            state = self.states.pop(key, None)
        self._pinned.discard(key)
        self._draining.discard(key)
        if state is not None and self.slots is not None and self.slots.is_resident(key):
            self.slots.unload(key)
        self.cpu.drop(key)
        return state is not None

    # -- outcomes of the loader threads (engine thread) -----------------------------------------

    def settle(self) -> None:
        """Apply what the loader threads handed back (engine thread): the one place a load's outcome becomes the
        adapter's state, so nothing else writes the states another thread iterates."""
        while True:
            try:
                state, outcome = self._outcomes.get_nowait()
            except queue.Empty:
                return
            key = state.ref.key
            if isinstance(outcome, MergeCancelled):
                state.status, state.error, state.retry_at = "failed", outcome, 0.0
                self._failed.append((key, outcome))
            elif isinstance(outcome, BaseException):
                state.status, state.error = "failed", outcome
                state.failures += 1
                self._count("load_failures")
                state.retry_at = time.monotonic() + retry_delay(outcome, state.failures)
                self._failed.append((key, outcome))
                self._failed_keys[key] = None
                while len(self._failed_keys) > MAX_FAILED_REMEMBERED:
                    oldest = next(iter(self._failed_keys))
                    del self._failed_keys[oldest]
                    if oldest in self.states and self.states[oldest].status == "failed":
                        del self.states[oldest]
            else:
                state.rank, state.size_bytes, state.digest = outcome.rank, outcome.size_bytes, digest_of(outcome.fingerprint)
                state.status, state.failures = "cpu", 0

    # -- device slots (engine thread, between steps) --------------------------------------------

    def between_steps(self, running: set[str], waiting: list[str]) -> None:
        """Move adapters wanted by waiting requests (oldest first) and pinned ones into device slots."""
        self.settle()
        self._wanted, self._wanted_generation = frozenset(waiting), self._wanted_generation + 1
        if len(self._merged_keys) > MAX_MERGED_STATES:
            self._forget_merged(running, set(waiting))
        # Only what waits, and pinned adapters not yet on the device: never a scan of every known adapter.
        pinned = [k for k in self._pinned if k in self.states and self.states[k].status != "device"]
        wanted = list(dict.fromkeys([*waiting, *pinned]))
        waited_for = set(waiting)
        for key in wanted:
            state = self.states.get(key)
            if state is None:
                continue
            if state.status == "device":
                continue
            if state.status != "cpu":
                continue
            adapter = self.cpu.get(key)
            if adapter is None:  # evicted from CPU memory since it loaded: load it again
                with self._lock:
                    state.status = "loading"
                self._submit(state, self._resolve(state.ref)[1], None)
                continue
            if not self._to_device(key, state, adapter, running, waited_for):
                if key in self._merged_keys:  # waits for a merged adapter's slot; real adapters behind it go on
                    self._rotate(running, waiting, among=self._merged_keys)
                    continue
                self._rotate(running, waiting)
                break
        self._end_draining(running, wanted)

    def _forget_merged(self, running: set[str], waiting: set[str]) -> None:
        """Forget the oldest merged adapters nobody uses (outside a slot, not loading): a merge is recomputable from
        its spec, so a stream of distinct specs must not grow the replica's state without bound."""
        for key in list(self._merged_keys):
            if len(self._merged_keys) <= MAX_MERGED_STATES:
                return
            state = self.states.get(key)
            if state is not None and (state.status in ("device", "loading") or key in running or key in waiting):
                continue
            with self._lock:
                self.states.pop(key, None)
            self.cpu.drop(key)
            del self._merged_keys[key]

    def _end_draining(self, running: set[str], wanted: list[str]) -> None:
        """A drained adapter serves again once it left the device, or once its own requests are done and
        no adapter ready in CPU memory waits for its slot: draining for nobody blocked its new requests forever."""
        if not self._draining:
            return
        someone_ready = any(k in self.states and self.states[k].status == "cpu" for k in wanted)
        for key in list(self._draining):
            state = self.states.get(key)
            if state is None or state.status != "device" or (key not in running and not someone_ready):
                self._draining.discard(key)
                if state is not None:
                    state.draining = False

    def _to_device(self, key: str, state: AdapterState, adapter: LoraAdapter, running: set[str], waited_for: set[str]) -> bool:
        if self.slots is None:
            self.slots = self._make_slots()
        merged_share = max(1, int(self.slots.num_slots * MERGED_SLOT_SHARE))
        merged_full = key in self._merged_keys and sum(k in self._merged_keys for k in self.slots.slot_of) >= merged_share
        if merged_full or not self.slots.free_slots:
            now = time.monotonic()
            victims = [k for k in self.slots.slot_of if k not in running and k not in self._pinned and self._evictable(k, now, waited_for)
                       and (not merged_full or k in self._merged_keys)]
            if not victims:
                return False
            # A drained adapter gave up its slot for this: it goes first, then the least recently used.
            victim = min(victims, key=lambda k: (k not in self._draining, self.states[k].last_used if k in self.states else 0.0))
            self.slots.unload(victim)
            if victim in self.states:
                self.states[victim].status = "cpu"
            self._count("device_evictions")
        start = time.perf_counter()
        self.slots.load(adapter)
        state.load_seconds["cpu_to_device"] = time.perf_counter() - start
        self.on_timing("cpu_to_device", state.load_seconds["cpu_to_device"])
        state.status = "device"
        state.resident_since = time.monotonic()
        state.ran_since_load = False
        return True

    def _evictable(self, key: str, now: float, waited_for: set[str]) -> bool:
        """Not an adapter just brought in for requests that wait and have not run yet (unless they could not for a whole
        cycle). Once nobody waits for it (its clients left), it protects nothing: abandoned merged specs each held a
        slot for a whole cycle, and normal clients' adapters waited behind them (stream TTFT 13x in the hostile soak)."""
        state = self.states.get(key)
        return (state is None or key not in waited_for or state.ran_since_load
                or now - state.resident_since >= self.settings.cycle_time_s)

    def ran(self, keys: set[str]) -> None:
        """Adapters whose requests ran this step: from now on their slots may go to others."""
        for key in keys:
            state = self.states.get(key)
            if state is not None:
                state.ran_since_load = True

    def _rotate(self, running: set[str], waiting: list[str], among: dict[str, None] | None = None) -> None:
        """Every slot (``among`` those, when given) is used by running requests: drain the one resident longest past the
        cycle time."""
        if self._draining:
            return
        now = time.monotonic()
        candidates = [
            k for k in (self.slots.slot_of if self.slots else {})
            if k in self.states and k not in self._pinned and (among is None or k in among)
            and now - self.states[k].resident_since >= self.settings.cycle_time_s
        ]
        if candidates:
            victim = min(candidates, key=lambda k: self.states[k].resident_since)
            self.states[victim].draining = True
            self._draining.add(victim)
            self._count("rotations")
            log.info("adapter %s drains after %.1fs so waiting adapters get a slot", victim, now - self.states[victim].resident_since)

    # -- reporting ------------------------------------------------------------------------------

    def describe(self, in_flight: dict[str, int]) -> list[dict]:
        """Every known adapter; on the engine thread (GET /adapters reaches it through AsyncEngine.call)."""
        self.settle()
        now = time.monotonic()
        return [
            {
                "id": s.ref.id, "source": s.ref.source, "revision": s.ref.revision, "key": k,
                "tier": s.status, "pinned": s.pinned, "rank": s.rank, "size_bytes": s.size_bytes, "digest": s.digest,
                "in_flight": in_flight.get(k, 0), "last_used_s_ago": round(now - s.last_used, 3),
                "load_seconds": {n: round(v, 4) for n, v in s.load_seconds.items()},
                "error": str(s.error) if s.error else None,
            }
            for k, s in self.states.items()
        ]
