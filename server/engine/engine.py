"""The engine: requests in, one ``step()`` at a time, outputs out.

``step()`` reads as nano-vllm's and vLLM's: schedule (scheduler.py: which sequences run, how many tokens each) →
run (runner.py: the batch's tensors and the forward pass) → process the output (output.py: sample, append,
finish). Adapters move between their tiers and into device slots between steps (server/adapters). Prefix caching
lives in blocks.py. Synchronous and single-threaded on purpose (tests drive it step by step, with arrivals at
chosen steps); ``AsyncEngine`` runs it in a background thread for the HTTP layer, and is the only door to it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from lorafleet.server.adapters.manager import AdapterManager
from lorafleet.server.adapters.state import AdapterSettings
from lorafleet.server.config import EngineConfig
from lorafleet.server.engine.blocks import BlockAllocator, PrefixCache
from lorafleet.server.engine.output import OutputProcessor, StepOutput
from lorafleet.server.engine.runner import ModelRunner
from lorafleet.server.engine.scheduler import Scheduler
from lorafleet.server.engine.sequence import FinishReason, SamplingParams, Sequence
from lorafleet.server.engine.speculation import NgramSpeculator
from lorafleet.server.lora.adapter_format import LoraAdapter

log = logging.getLogger(__name__)
# With only parked rows (grammar masks filling) and nothing to run: how long a step waits on a mask before it looks
# for new arrivals again.
PARKED_POLL_S = 0.005


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        config.validate()
        self.config = config
        self.runner = runner = ModelRunner(config)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(Path(config.model))
        self.tokenizer = tokenizer
        eos_ids = set(runner.model_config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.allocator = BlockAllocator(runner.num_blocks, config.block_size, caching=config.prefix_caching)
        self.adapters = AdapterManager(
            AdapterSettings(config.adapter_roots, config.adapter_cache_dir, config.adapter_disk_cache,
                            config.adapter_cpu_memory, config.adapter_cycle_time_s, max_pinned=runner.num_slots - 1),
            make_slots=runner.make_slots, parse=runner.parse_adapter,
        )
        self.prefix = PrefixCache(self.allocator, self._adapter_identity) if config.prefix_caching else None
        self.speculator = self._speculator(config, runner)
        self.scheduler = Scheduler(config, self.allocator, self._adapter_ready, self.prefix,
                                   self.speculator.draft if self.speculator is not None else None)
        self.output = OutputProcessor(tokenizer, eos_ids, self.scheduler, runner.logits, self.prefix, self.speculator)
        self._grammar: Any = None
        self._grammar_lock = threading.Lock()
        log.info("engine ready: %s %s on %s, %d KV blocks of %d tokens", runner.model_config.architecture, runner.dtype, runner.device,
                 runner.num_blocks, config.block_size)

    @staticmethod
    def _speculator(config: EngineConfig, runner: ModelRunner) -> NgramSpeculator | None:
        if config.speculative == "off":
            return None
        if runner.model.rope.length_dependent:  # a verify chunk's positions would be rotated for its end's length
            log.warning("--speculative %s is off: this model's RoPE depends on the sequence length", config.speculative)
            return None
        log.info("speculative decoding: ngram, up to %d tokens per request per step, n-grams up to %d",
                 config.speculative_tokens, config.speculative_ngram)
        return NgramSpeculator(config.speculative_tokens, config.speculative_ngram)

    # -- requests -------------------------------------------------------------------------------

    def _adapter_ready(self, adapter: str | None) -> bool:
        return adapter is None or self.adapters.is_ready(adapter)

    def _adapter_identity(self, key: str) -> bytes:
        """What an adapter adds to its blocks' hashes: its key and its weights' fingerprint (it is on the device when
        its sequences are admitted), so a reloaded adapter with new weights under the same key never meets old blocks."""
        return key.encode() + b"\0" + self.adapters.slots.adapters[key].fingerprint

    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None, request_id: str | None = None) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.config.max_total_tokens:
            raise ValueError(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.config.max_total_tokens}. "
                f"Given: {len(prompt_ids)} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`"
            )
        needed = -(-total // self.config.block_size)
        if needed > self.allocator.num_blocks:
            raise ValueError(f"the request needs {needed} KV blocks; the whole pool has {self.allocator.num_blocks}")
        seq = Sequence(list(prompt_ids), params, adapter)
        if params.response_format is not None:
            seq.constraint = self.grammar().constraint(params.response_format)
        if request_id is not None:
            seq.request_id = request_id
        self.scheduler.add(seq)
        return seq

    def grammar(self) -> Any:
        """The structured-output compiler, made on first use (it indexes the whole vocabulary)."""
        with self._grammar_lock:  # the HTTP layer's compile thread and the engine thread may both ask first
            if self._grammar is None:
                from lorafleet.server.engine.structured import GrammarCompiler

                self._grammar = GrammarCompiler(self.tokenizer, self.runner.model_config.vocab_size, sorted(self.output.eos_ids))
        return self._grammar

    def close_grammar(self) -> None:
        """Stop the schema compile processes, if any were started."""
        with self._grammar_lock:
            if self._grammar is not None:
                self._grammar.close()

    def load_adapter(self, name: str, folder: Path) -> LoraAdapter:
        """Validate a PEFT adapter folder against this base model and pin it in a device slot now."""
        return self.adapters.load_now(name, Path(folder))

    def cancel(self, seq: Sequence) -> None:
        """Mark for cancellation; the next step frees its blocks."""
        seq.cancelled = True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        outputs = [self.output.end(seq, FinishReason.CANCELLED) for seq in self.scheduler.take_cancelled()]
        outputs += self.output.unpark()  # their masks filled since the last step: they decode in this one
        outputs += self._fail_adapter_waiters()
        running, waiting = self.scheduler.adapters_in_use()
        if running or waiting or self.adapters.states:
            self.adapters.between_steps(running, waiting)
        if self.speculator is not None:
            self.speculator.begin_step(len(self.scheduler.running))
        chunks = self.scheduler.schedule()
        if not chunks:
            self.output.wait_parked(PARKED_POLL_S)
            return outputs
        self.adapters.ran({c.seq.adapter for c in chunks if c.seq.adapter is not None})
        # what a decode step's rows cost: the speculator's measure of what pays (nothing to measure without it)
        decode_only = self.speculator is not None and all(c.num_tokens == 1 and c.seq.num_computed > 0 for c in chunks)
        for chunk in chunks:  # grammar masks fill on their own threads while the forward pass runs (grammar_mask.py)
            if chunk.seq.constraint is not None and chunk.samples:
                chunk.seq.constraint.start()
        started = time.perf_counter()
        hidden = self.runner.run(chunks, self.adapters.slots)
        outputs += self.output.process(chunks, hidden)
        if decode_only:
            self.speculator.cost.observe(sum(c.width for c in chunks), time.perf_counter() - started)
        return outputs

    def _fail_adapter_waiters(self) -> list[StepOutput]:
        """Requests waiting for an adapter that failed to load get its error; nothing else is touched."""
        outputs = []
        for key, error in self.adapters.take_failed():
            waiters = [s for s in self.scheduler.waiting if s.adapter == key]
            if waiters and self.adapters.resume_cancelled(key, error):
                continue
            outputs.extend(self.output.fail(seq, error) for seq in waiters)
        return outputs

    # -- convenience for tests and benchmarks ---------------------------------------------------

    def run_to_completion(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"engine still busy after {max_steps} steps")



