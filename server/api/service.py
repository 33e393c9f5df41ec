"""One replica's serving state: the engine, admission (concurrency limit, draining), tokenizing
and the generate flow shared by the TGI/LoRAX and OpenAI routes.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lorafleet import __version__
from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.adapters.state import TIERS
from lorafleet.server.api.catalogue import Catalogue
from lorafleet.server.api.memory import memory_bytes
from lorafleet.server.api.metrics import ServerMetrics
from lorafleet.server.api.request_spans import record_generation
from lorafleet.server.api.validation import GenerateJob, Limits
from lorafleet.server.config import QUANTIZATIONS
from lorafleet.server.engine.async_engine import AsyncEngine, TokenEvent
from lorafleet.server.engine.engine import LLMEngine
from lorafleet.server.engine.grammar_worker import CompileTimeout
from lorafleet.server.engine.sequence import FinishReason, Sequence
from lorafleet.server.errors import Conflict, Overloaded, RequestError, Unhealthy, ValidationError
from lorafleet.server.model.checkpoint import SUPPORTED_ARCHITECTURES
from lorafleet.server.serve_config import ServeConfig
from lorafleet.settings import public
from lorafleet.tracing import setup_tracing

MAX_DISK_RESIDENCY = 256  # disk-tier adapters listed in lorafleet_adapter_loaded: the disk may hold thousands

log = logging.getLogger(__name__)
MAX_SCHEMA_BYTES = 64 << 10  # a response_format schema, as JSON text
GRAMMAR_TIMEOUT_S = 10.0  # compile budget per schema: past it the worker process compiling it is killed (422)
GRAMMAR_WORKERS = 2  # compile processes; a compile waits for a free one, each busy one ends within its budget
MAX_QUEUED_COMPILES = 8  # compiles running or waiting for a worker; past it a new schema gets 429


@dataclass(slots=True)
class Completion:
    """A finished generation, with what responses and headers report."""

    seq: Sequence
    prompt_ids: list[int]
    queue_s: float
    inference_s: float
    first_token_s: float
    best_of: list[Completion] = field(default_factory=list)

    @property
    def finish_reason(self) -> FinishReason:
        return self.seq.finish_reason or FinishReason.LENGTH


def independent_copies(job: GenerateJob, n: int) -> list[GenerateJob]:
    """n independent samples of one request (OpenAI's ``n``, TGI's ``best_of``): each its own seed,
    derived from the request's when it has one, random when sampling without one."""
    if n == 1:
        return [job]
    out = []
    for i in range(n):
        clone = copy.copy(job)
        clone.params = copy.copy(job.params)
        clone.best_of = 1
        if job.params.seed is not None:
            clone.params.seed = job.params.seed + i
        elif job.params.sampling:
            clone.params.seed = random.getrandbits(63)
        out.append(clone)
    return out


class ReplicaService:
    def __init__(self, config: ServeConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else LLMEngine(config.engine)
        self.tokenizer = self.engine.tokenizer
        self.runner = AsyncEngine(self.engine)
        self.limits = Limits(
            max_input_length=config.engine.max_input_length, max_total_tokens=config.engine.max_total_tokens,
            max_stop_sequences=config.max_stop_sequences, max_best_of=config.max_best_of,
            default_adapter_source=config.adapter_source,
        )
        self.catalogue = Catalogue.of({}, self.base_name)  # the GET answer for limits.catalogue, made when it changes
        self.metrics = ServerMetrics(self.snapshot, config.metrics_adapter_labels)
        self.tracing = setup_tracing("lorafleet-replica", config.otlp_endpoint)
        self.engine.adapters.on_timing = lambda step, seconds: self.metrics.adapter_load.labels(step).observe(seconds)
        self.in_flight = 0
        self.draining = False
        self.started = False
        # Threads that wait on the compile processes (they only block on pipes), one per compile admitted.
        self._grammar_pool = ThreadPoolExecutor(MAX_QUEUED_COMPILES, thread_name_prefix="lorafleet-grammar")
        self._compiles = 0  # running or waiting (event loop only)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.runner.start()
        self.started = True

    async def preload(self) -> None:
        for adapter_id in self.config.preload_adapters:
            ref = AdapterRef.parse(adapter_id, self.config.adapter_source)
            await self.load_adapter(ref, pin=True)
            log.info("preloaded and pinned adapter %s", ref.key)

    def stop(self) -> None:
        self.runner.stop()
        self.engine.adapters.close()
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close_grammar()
        if self.tracing is not None:
            self.tracing.shutdown()  # flush the last spans

    @property
    def healthy(self) -> bool:
        return self.started and not self.draining and self.runner.healthy

    # -- admission ------------------------------------------------------------------------------

    def admit(self, sequences: int = 1) -> None:
        """Count a request by the sequences it makes (prompts x n x best_of): one body asking for
        3,200 completions takes 3,200 places, as 3,200 requests would."""
        limit = self.config.max_concurrent_requests
        if self.draining:
            raise Unhealthy("the server is shutting down")
        if not self.started:
            raise Unhealthy("the engine is not ready")
        if sequences > limit:
            raise ValidationError(f"this request makes {sequences} sequences (prompts x n x best_of); at most {limit} may run at once")
        if self.in_flight + sequences > limit:
            raise Overloaded(f"Model is overloaded: {self.in_flight} sequences in flight, the limit is {limit}")
        self.in_flight += sequences
        self.metrics.in_flight.set(self.in_flight)

    def release(self, sequences: int = 1) -> None:
        self.in_flight -= sequences
        self.metrics.in_flight.set(self.in_flight)

    # -- tokens ---------------------------------------------------------------------------------

    def prompt_ids(self, job: GenerateJob) -> list[int]:
        """Tokenize, truncate (keep the last ``truncate`` tokens), and settle max_new_tokens: absent, it is
        whatever max_total_tokens leaves after the input; input longer than max_input_length is refused."""
        ids = job.prompt_ids if job.prompt_ids is not None else self.tokenizer(job.inputs).input_ids
        if job.truncate is not None:
            ids = ids[-job.truncate :]
        limits = self.limits
        if len(ids) > limits.max_input_length:
            raise ValidationError(f"`inputs` must have less than {limits.max_input_length} tokens. Given: {len(ids)}")
        room = limits.max_total_tokens - len(ids)
        new = job.max_new_tokens if job.max_new_tokens is not None else room
        if new > room:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. Given: {len(ids)} `inputs` tokens and {new} `max_new_tokens`"
            )
        job.params.max_new_tokens = new
        return ids

    # -- generation -----------------------------------------------------------------------------

    async def compile_grammar(self, job: GenerateJob) -> None:
        """Compile the response format off the engine thread, within a size and a time budget.

        The engine thread then finds it compiled; a schema that compiles slowly makes its own request
        wait (and fail after GRAMMAR_TIMEOUT_S), never the other streams.
        """
        response_format = job.params.response_format
        if response_format is None:
            return
        size = len(json.dumps(response_format.get("schema")))
        if size > MAX_SCHEMA_BYTES:
            raise ValidationError(f"`response_format` schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
        if self._compiles >= MAX_QUEUED_COMPILES:
            raise Overloaded(f"{self._compiles} `response_format` schemas are compiling or waiting to; try again shortly")
        self._compiles += 1
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._grammar_pool, lambda: self.engine.grammar().compile_isolated(response_format, GRAMMAR_TIMEOUT_S, GRAMMAR_WORKERS))
        except CompileTimeout as exc:
            raise ValidationError(f"`response_format` schema {exc}; simplify it") from None
        finally:
            self._compiles -= 1

    async def stream(self, job: GenerateJob, prompt_ids: list[int]) -> tuple[TokenEvent, AsyncIterator[TokenEvent]]:
        """Start a generation and wait for its first event, so errors before it still get their HTTP status."""
        await self.compile_grammar(job)
        if job.merge is not None:  # named by its whole spec, members by their one canonical name each
            manager = self.engine.adapters
            job.adapter = manager.merges.define(dataclasses.replace(job.merge, members=tuple(manager.canonical(m) for m in job.merge.members)))
        elif job.adapter is not None:
            job.adapter = self.engine.adapters.canonical(job.adapter)
        events = self.runner.generate(prompt_ids, job.params, job.adapter, job.api_token).__aiter__()
        try:
            first = await events.__anext__()
        except StopAsyncIteration as exc:  # pragma: no cover - the engine always ends with an event
            raise RuntimeError("generation ended without output") from exc
        return first, events

    async def complete(self, job: GenerateJob, prompt_ids: list[int]) -> Completion:
        if job.best_of > 1:
            return await self._best_of(job, prompt_ids)
        start = time.perf_counter()
        first, events = await self.stream(job, prompt_ids)
        first_at = time.perf_counter()
        last = first
        async for event in events:
            last = event
        done = time.perf_counter()
        assert last.seq is not None
        self.observe(job, last.seq, first_at - start, done - first_at)
        seq = last.seq
        queued = (seq.first_scheduled_at or seq.created_at) - seq.created_at
        return Completion(seq, prompt_ids, queue_s=queued, inference_s=done - start - queued, first_token_s=first_at - start)

    async def _best_of(self, job: GenerateJob, prompt_ids: list[int]) -> Completion:
        """n sampled candidates with different seeds; the one with the highest total log-probability wins."""
        jobs = independent_copies(job, job.best_of)  # best_of needs sampling and no seed: each gets a random one
        results = await asyncio.gather(*(self.complete(j, prompt_ids) for j in jobs))
        best = max(results, key=lambda c: sum(t.logprob or 0.0 for t in c.seq.tokens))
        best.best_of = [c for c in results if c is not best]
        return best

    def observe(self, job: GenerateJob, seq: Sequence, first_token_s: float, rest_s: float) -> None:
        adapter = job.adapter.ring_key if job.adapter else ""  # the version: id, and @revision when pinned to one
        self.metrics.observe_generation(job.name, adapter, seq.adapter_tier, len(seq.tokens), first_token_s, rest_s)
        if self.tracing is not None:
            load_seconds, source = seq.adapter_load or ({}, "")
            record_generation(self.tracing, seq, adapter, load_seconds, source, first_token_s, rest_s)

    # -- adapters (admin) -----------------------------------------------------------------------

    async def load_adapter(self, ref: AdapterRef, pin: bool, token: str | None = None, timeout_s: float = 300.0) -> dict:
        """Load an adapter to the device (and pin it if asked); report where it ended up."""
        key = await self.runner.call(self.engine.adapters.request, ref, token, pin)
        try:
            await asyncio.wait_for(self.runner.adapter_on_device(key), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"adapter {ref.key} did not reach a device slot within {timeout_s}s (all slots busy?)") from None
        return await self.describe_adapter(key)

    async def unload_adapter(self, named: str) -> list[str]:
        """Unpin and unload every version ``named`` names (a key names one, an id all of its versions), on the engine
        thread, which iterates the pins between steps. 404 when none is known; 409 for one still serving requests."""
        manager, scheduler = self.engine.adapters, self.engine.scheduler

        def drop() -> tuple[list[str], list[str]]:
            keys = [k for k, s in manager.states.items() if named in (k, s.ref.id)]
            running, waiting = scheduler.adapters_in_use()
            in_use = running | set(waiting)
            busy = []
            for key in keys:
                manager.unpin(key)
                if not manager.unload(key, in_use):
                    busy.append(key)
            return keys, busy

        keys, busy = await self.runner.call(drop)
        if not keys:
            raise RequestError(f"adapter {named!r} is not loaded", 404, "not_found")
        if busy:
            raise RequestError(f"adapter {named!r} is serving requests; unpinned, it will be evicted when idle", 409, "overloaded")
        return keys

    @property
    def base_name(self) -> str:
        """The base model's name for clients: --served-model-name, else --model's value."""
        return self.config.served_model_name or self.config.model_id

    def is_base(self, model: str | None) -> bool:
        return model in (None, "", self.config.model_id, self.config.served_model_name)

    def in_flight_by_adapter(self) -> dict[str, int]:
        """Requests per adapter; on the engine thread (the scheduler's queues change under any other)."""
        counts: dict[str, int] = {}
        for seq in [*self.engine.scheduler.admitted, *self.engine.scheduler.waiting]:
            if seq.adapter:
                counts[seq.adapter] = counts.get(seq.adapter, 0) + 1
        return counts

    async def list_adapters(self) -> list[dict]:
        """Every known adapter and its tier, read on the engine thread, which owns the adapter states."""
        return await self.runner.call(lambda: self.engine.adapters.describe(self.in_flight_by_adapter()))

    async def describe_adapter(self, key: str) -> dict:
        found = [a for a in await self.list_adapters() if a["key"] == key]
        if not found:  # unloaded by another admin call between its load and this listing
            raise Conflict(f"adapter {key} was unloaded while loading")
        return found[0]

    # -- reporting ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        scheduler, manager = self.engine.scheduler, self.engine.adapters
        allocator = self.engine.allocator
        tiers = dict.fromkeys(TIERS, 0)
        for state in list(manager.states.values()):
            tiers[state.status] += 1
        slots = manager.slots
        return {
            "waiting": len(scheduler.waiting),
            "running": len(scheduler.admitted),
            "kv_usage": 1.0 - allocator.num_free / allocator.num_blocks,
            "prefix_cache": (prefix.queried_tokens, prefix.hit_tokens) if (prefix := self.engine.prefix) is not None else (0, 0),
            "speculative": (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) if (spec := self.engine.speculator) else (0, 0, 0),
            "max_lora": self.engine.runner.num_slots,
            **self._lora_residency(),
            "timestamp": time.time(),
            "adapters_per_tier": tiers,
            "bytes_per_tier": {
                "device": sum(a.size_bytes for a in (slots.adapters.values() if slots else [])),
                "cpu": manager.cpu.used_bytes(),
                "disk": manager.disk.used_bytes(),
            },
            "memory": memory_bytes(self.engine),
            "adapter_events": {**manager.counts, "cpu_evictions": manager.cpu.evictions, "disk_evictions": manager.disk.evictions,
                               "disk_corrupt_dropped": manager.disk.corrupt_dropped},
        }

    def _lora_residency(self) -> dict[str, Any]:
        """Adapters by the ids clients call them: resident on the device (running), wanted by waiting requests
        but not resident (waiting), and each known adapter's tier (device and cpu complete, disk the most
        recently used MAX_DISK_RESIDENCY), which routers read to prefer a CPU hit over a disk one."""
        manager = self.engine.adapters
        states = sorted(list(manager.states.items()), key=lambda item: -item[1].last_used)
        on_device = {key for key, state in states if state.status == "device"}
        waiting = {s.adapter for s in list(self.engine.scheduler.waiting) if s.adapter and s.adapter not in on_device}
        residency, on_disk = [], 0
        for key, state in states:
            tier = state.status if state.status in ("device", "cpu") else None
            if tier is None and on_disk < MAX_DISK_RESIDENCY and (state.ref.source == "local" or manager.disk.folder_for(key).is_dir()):
                tier, on_disk = "disk", on_disk + 1
            if tier is not None:
                residency.append((state.ref.id, tier))
        ids = {key: state.ref.id for key, state in states}
        return {"running_adapters": sorted(ids[k] for k in on_device), "waiting_adapters": sorted(ids.get(k, k) for k in waiting),
                "residency": residency}

    def info(self) -> dict[str, Any]:
        """TGI's fields (clients read them), every declared setting as parsed (lorafleet/settings.py: secrets left
        out), then what the replica found at start (dtype, slots, kernels, sizes), which wins where both speak."""
        c, e, runner = self.config, self.config.engine, self.engine.runner
        packed = runner.packed_format
        return {
            "model_id": c.model_id, "model_sha": None, "model_pipeline_tag": "text-generation", "waiting_served_ratio": None,
            "max_waiting_tokens": None, "validation_workers": 1, "version": __version__, "sha": None, "docker_label": None,
            "request_logger_url": None, "eager_prefill": None,
            **public(c), **public(e),
            "served_model_name": self.base_name,
            "model_dtype": str(runner.dtype).removeprefix("torch."),
            "model_dtype_reason": runner.dtype_reason,
            "model_device_type": runner.device.type,
            "max_active_adapters": runner.num_slots,
            "architecture": runner.model_config.architecture,
            "architectures_served": sorted(SUPPORTED_ARCHITECTURES),
            "quantizations_served": list(QUANTIZATIONS),
            "quantize": e.quantize or (packed.describe() if packed else None),
            "quantize_group_size": (packed.group_size or None) if packed else e.quantize_group_size if e.quantize == "int4" else None,
            "model_bytes": runner.model.nbytes,
            "kv_cache_bytes": runner.kv_cache_bytes,
            "lora_kernel": runner.lora_kernel,
            "attention_kernel": runner.attention_kernel,
            "linear_kernel": runner.linear_kernel,
            "admin_auth": c.admin_token is not None,
            "max_pinned_adapters": self.engine.adapters.settings.max_pinned,
        }
