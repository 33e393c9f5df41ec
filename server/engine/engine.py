"""The engine core: one ``step()`` schedules a batch, runs one forward pass, samples, and reports.

This is synchronous and single-threaded on purpose (tests drive it step by step, with arrivals
at chosen steps); ``AsyncEngine`` runs it in a background thread for the HTTP layer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet.server.adapters.manager import AdapterManager
from lorafleet.server.adapters.state import AdapterSettings
from lorafleet.server.config import EngineConfig
from lorafleet.server.engine import detokenizer
from lorafleet.server.engine.decode_graphs import DecodeGraphs, DecodeRow
from lorafleet.server.engine.kv_cache import BlockAllocator, KVCache, block_hash, cache_slot
from lorafleet.server.engine.sampler import SamplingError, sample
from lorafleet.server.engine.scheduler import ScheduledChunk, Scheduler
from lorafleet.server.engine.sequence import FinishReason, SamplingParams, Sequence, Status, TokenInfo
from lorafleet.server.lora.adapter_format import LoraAdapter, load_adapter
from lorafleet.server.lora.slots import LoraSlots, bytes_per_slot
from lorafleet.server.model.attention import BatchMetadata, PrefillSegment
from lorafleet.server.model.checkpoint import CheckpointError, load_weights, read_config
from lorafleet.server.model.linear import resolve_linear_kernel
from lorafleet.server.model.model import CausalLM
from lorafleet.server.model.prequantized import packed_format

log = logging.getLogger(__name__)
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(slots=True)
class StepOutput:
    seq: Sequence
    token: TokenInfo | None  # None when the sequence ended without a new token (cancelled)
    finished: bool


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bfloat16 GEMM runs at about twice its float32 rate there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """auto: bfloat16 on a CPU with bfloat16 units (as vLLM's CPU backend), float32 on other CPUs, the checkpoint's on cuda."""
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_bf16_units() else torch.float32
        name = checkpoint_dtype or "bfloat16"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        config.validate()
        self.config = config
        folder = Path(config.model)
        self.device = torch.device(config.device)
        self.model_config = read_config(folder)
        raw_dtype = self.model_config.raw.get("torch_dtype") or self.model_config.raw.get("dtype")
        self.dtype = resolve_dtype(config.dtype, self.device, raw_dtype)
        self.linear_kernel = resolve_linear_kernel(config.linear_kernel, self.device, self.dtype)
        self.packed_format = packed_format(self.model_config.raw.get("quantization_config"), config.quantize)
        self.model = CausalLM(folder, self.model_config, load_weights(folder, config.allow_pickle), self.dtype, self.device, self.linear_kernel,
                              config.quantize, config.quantize_group_size, self.packed_format)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(self.tokenizer, "all_special_ids", []))
        self.eos_ids = set(self.model_config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        block_bytes = KVCache.bytes_per_block(self.model_config, config.block_size, self.dtype)
        budget = config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * config.kv_cache_fraction)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // block_bytes
        self.kv_cache_bytes = num_blocks * block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {budget} bytes holds no block ({block_bytes} bytes each)")
        self.allocator = BlockAllocator(num_blocks, config.block_size, caching=config.prefix_caching)
        # Two blocks more than the allocator hands out: the scratch block padded CUDA-graph rows write into, and
        # the null block that pads decode block tables. Nothing writes the null block, so it stays zero: padding
        # never reads what another sequence left (server/model/attention.py, "Isolation").
        self.kv = KVCache(self.model_config, num_blocks + 2, config.block_size, self.dtype, self.device)
        self.null_block = num_blocks + 1
        shapes, layers = self.model.module_shapes(), self.model_config.num_layers
        # On CPU the torch path keeps slots in float32 whatever the model's dtype: decode rows multiply in float32
        # (torch's bf16 matmuls at LoRA's few-row shapes run at half the float32 speed here), prefill chunks narrow
        # their adapter to the model's dtype (many rows: the bf16 units win). A slot is small next to the base model.
        self.slot_dtype = torch.float32 if self.device.type == "cpu" and self.lora_kernel() == "torch" else self.dtype
        self.num_slots = config.max_active_adapters
        if config.adapter_memory is not None:
            per_slot = bytes_per_slot(shapes, layers, config.max_lora_rank, self.slot_dtype)
            self.num_slots = config.adapter_memory // per_slot
            if self.num_slots < 1:
                raise ValueError(f"--adapter-memory {config.adapter_memory} bytes holds no adapter slot "
                                 f"({per_slot} bytes each at --max-lora-rank {config.max_lora_rank})")
        self.adapters = AdapterManager(
            AdapterSettings(config.adapter_roots, config.adapter_cache_dir, config.adapter_disk_cache,
                            config.adapter_cpu_memory, config.adapter_cycle_time_s, max_pinned=self.num_slots - 1),
            # Slots are made on the first adapter load: they cost memory a base-only replica never uses.
            make_slots=lambda: LoraSlots(shapes, layers, self.num_slots, config.max_lora_rank, self.slot_dtype, self.device, self.lora_kernel()),
            parse=lambda name, folder: self._pinned(load_adapter(name, Path(folder), shapes, layers, config.max_lora_rank, config.allow_pickle)),
        )
        self.attention_kernel = self._kernel(config.attention_kernel)
        self.decode_graphs = self._decode_graphs(num_blocks)
        self.scheduler = Scheduler(config, self.allocator, self._adapter_ready, self._block_hashes if config.prefix_caching else None)
        self._grammar: Any = None
        self._grammar_lock = threading.Lock()
        log.info("engine ready: %s %s on %s, %d KV blocks of %d tokens", self.model_config.architecture, self.dtype, self.device, num_blocks, config.block_size)

    # -- requests -------------------------------------------------------------------------------

    def _adapter_ready(self, adapter: str | None) -> bool:
        return adapter is None or self.adapters.is_ready(adapter)

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

    def _pinned(self, adapter: LoraAdapter) -> LoraAdapter:
        """On cuda, the CPU tier holds page-locked tensors so the copy into a slot is asynchronous."""
        if self.device.type == "cuda":
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        return adapter

    def grammar(self) -> Any:
        """The structured-output compiler, made on first use (it indexes the whole vocabulary)."""
        with self._grammar_lock:  # the HTTP layer's compile thread and the engine thread may both ask first
            if self._grammar is None:
                from lorafleet.server.engine.structured import GrammarCompiler

                self._grammar = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_ids))
        return self._grammar

    def close_grammar(self) -> None:
        """Stop the schema compile processes, if any were started."""
        with self._grammar_lock:
            if self._grammar is not None:
                self._grammar.close()

    def _decode_graphs(self, scratch_block: int) -> DecodeGraphs | None:
        """auto: on cuda when every kernel a decode step runs can be captured; "on" elsewhere runs the same path eagerly."""
        choice = self.config.cuda_graphs
        capturable = (self.attention_kernel == "triton" and self.lora_kernel() == "triton" and not self.model.rope.length_dependent
                      and not self.model.is_moe)  # the experts' loop depends on the routing: not capturable
        if choice == "off" or (choice == "auto" and (self.device.type != "cuda" or not capturable)):
            return None
        if not capturable:
            raise ValueError("cuda_graphs on needs the Triton attention and LoRA kernels, a RoPE that does not depend on length and a dense MLP "
                             f"(attention {self.attention_kernel}, lora {self.lora_kernel()}, rope {self.model.rope.rope_type}, experts {self.model_config.num_experts})")
        c = self.config
        return DecodeGraphs(self.model, self.kv, scratch_block, c.block_size, min(c.max_running_requests, 256),
                            -(-c.max_total_tokens // c.block_size), capture=self.device.type == "cuda")

    def lora_kernel(self) -> str:
        return self._kernel(self.config.lora_kernel)

    def _kernel(self, choice: str) -> str:
        """auto: the Triton kernels on cuda, the torch path elsewhere."""
        if choice == "auto":
            return "triton" if self.device.type == "cuda" else "torch"
        return choice

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
        outputs = [self._end(seq, FinishReason.CANCELLED) for seq in self.scheduler.take_cancelled()]
        outputs += self._fail_adapter_waiters()
        running = {s.adapter for s in self.scheduler.running if s.adapter is not None}
        waiting = list(dict.fromkeys(s.adapter for s in self.scheduler.waiting if s.adapter is not None))
        if running or waiting or self.adapters.states:
            self.adapters.between_steps(running, waiting)
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        self.adapters.ran({c.seq.adapter for c in chunks if c.seq.adapter is not None})
        if self._graphable(chunks):
            slots = self.adapters.slots
            rows = [DecodeRow(c.seq.token_ids[c.seq.num_computed], c.seq.num_computed, c.seq.block_table,
                              slots.slot_of[c.seq.adapter] if c.seq.adapter is not None else -1) for c in chunks]
            hidden = self.decode_graphs.run(rows, slots)
        else:
            input_ids, positions, meta = self._prepare(chunks)
            hidden = self.model.forward(input_ids, positions, meta, self.kv)

        sample_rows, sample_seqs = [], []
        offset = 0
        for chunk in chunks:
            seq = chunk.seq
            end = offset + chunk.num_tokens
            if seq.params.prefill_logprobs and seq.num_computed < seq.num_prompt and seq.num_preemptions == 0:
                self._record_prefill_logprobs(seq, hidden[offset:end])
            seq.num_computed += chunk.num_tokens
            if self.allocator.caching:
                self._register_blocks(seq)
            if seq.num_computed == len(seq.token_ids):
                sample_rows.append(end - 1)
                sample_seqs.append(seq)
            offset = end
        if sample_seqs:
            logits = self.model.logits(hidden[sample_rows])
            tokens, logprobs, failed = sample(logits, sample_seqs)
            for row, (seq, token_id) in enumerate(zip(sample_seqs, tokens)):
                if row not in failed:
                    try:
                        outputs.append(self._append(seq, token_id, logprobs[row]))
                        continue
                    except Exception as exc:  # noqa: BLE001 - detokenizing or the grammar: this row's failure alone
                        failed[row] = exc
                exc = failed[row]
                log.warning("request %s failed alone (%s: %s)", seq.request_id, type(exc).__name__, exc)
                outputs.append(self._fail(seq, exc if isinstance(exc, SamplingError) else SamplingError(f"{type(exc).__name__}: {exc}")))
        return outputs

    def _block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of ``seq``'s first ``count`` full blocks, extending its chain as far as needed."""
        bs, hashes = self.config.block_size, seq.block_hashes
        if len(hashes) < count:
            adapter = b""
            if seq.adapter is not None:
                loaded = self.adapters.slots.adapters[seq.adapter]  # on the device: it is admitted only then
                adapter = seq.adapter.encode() + b"\0" + loaded.fingerprint
            for i in range(len(hashes), count):
                hashes.append(block_hash(hashes[i - 1] if i else seq.params.cache_salt, adapter, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:count]

    def _register_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly full, computed blocks to the prefix cache."""
        full = seq.num_computed // self.config.block_size
        if full > seq.num_registered:
            for i, block_hash_ in enumerate(self._block_hashes(seq, full)[seq.num_registered:], start=seq.num_registered):
                self.allocator.register(seq.block_table[i], block_hash_)
            seq.num_registered = full

    def _graphable(self, chunks: list[ScheduledChunk]) -> bool:
        """A decode-only step that fits a bucket; prefill chunks and bigger batches run eagerly."""
        graphs = self.decode_graphs
        fits = graphs is not None and graphs.broken is None and graphs.bucket_for(len(chunks)) is not None
        return fits and all(c.num_tokens == 1 and c.seq.num_computed > 0 for c in chunks)

    def _fail(self, seq: Sequence, exc: BaseException) -> StepOutput:
        """One request's own failure: it ends with the error, its blocks are freed, the batch goes on."""
        seq.error = exc
        self.scheduler.finish(seq)
        return self._end(seq, FinishReason.ERROR)

    def _fail_adapter_waiters(self) -> list[StepOutput]:
        """Requests waiting for an adapter that failed to load get its error; nothing else is touched."""
        outputs = []
        for key, error in self.adapters.take_failed():
            waiters = [s for s in self.scheduler.waiting if s.adapter == key]
            if waiters and self.adapters.resume_cancelled(key, error):
                continue
            outputs.extend(self._fail(seq, error) for seq in waiters)
        return outputs

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, BatchMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        rope_lengths: list[tuple[int, int, int]] = []
        bs = self.config.block_size
        for chunk in chunks:
            seq, start = chunk.seq, len(ids)
            first, last = seq.num_computed, seq.num_computed + chunk.num_tokens
            ids.extend(seq.token_ids[first:last])
            positions.extend(range(first, last))
            slots.extend(cache_slot(seq.block_table, p, bs) for p in range(first, last))
            rope_lengths.append((start, len(ids), last))
            if chunk.num_tokens == 1 and first > 0:
                decode_rows.append(start)
                decode_tables.append(seq.block_table)
                decode_lens.append(last)
            else:
                table = torch.tensor(seq.block_table[: -(-last // bs)], dtype=torch.long, device=self.device)
                prefills.append(PrefillSegment(start, len(ids), last, table))
        width = max((len(t) for t in decode_tables), default=0)
        device = self.device
        meta = BatchMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_block_tables=torch.tensor([t + [self.null_block] * (width - len(t)) for t in decode_tables],
                                             dtype=torch.long, device=device).reshape(len(decode_tables), width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=device),
            rope_lengths=rope_lengths,
            attention_kernel=self.attention_kernel,
        )
        if self.adapters.slots is not None:
            meta.lora = self.adapters.slots.batch_for([(c.seq.adapter, c.num_tokens) for c in chunks])
        return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(positions, dtype=torch.long, device=device), meta

    def _record_prefill_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Log-probability of each prompt token given the ones before it (the first has none)."""
        logprobs = self.model.logits(hidden).log_softmax(-1)
        first = seq.num_computed
        if first == 0:
            seq.prefill.append(TokenInfo(seq.prompt_ids[0], self._token_text(seq.prompt_ids[0]), None))
        elif seq.prefill_carry is not None:
            token = seq.prompt_ids[first]
            seq.prefill.append(TokenInfo(token, self._token_text(token), float(seq.prefill_carry[token])))
        for i in range(logprobs.shape[0] - 1):
            token = seq.prompt_ids[first + i + 1]
            seq.prefill.append(TokenInfo(token, self._token_text(token), float(logprobs[i, token])))
        seq.prefill_carry = logprobs[-1]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _append(self, seq: Sequence, token_id: int, logprobs: torch.Tensor) -> StepOutput:
        seq.token_ids.append(token_id)
        if seq.constraint is not None:
            seq.constraint.accept(token_id)
        seq.num_computed = len(seq.token_ids) - 1
        special = token_id in self.special_ids
        alternatives = []
        if seq.params.alternatives:
            top = torch.topk(logprobs, seq.params.alternatives)
            alternatives = [TokenInfo(int(i), self._token_text(int(i)), float(lp), int(i) in self.special_ids) for lp, i in zip(top.values, top.indices)]
        text = detokenizer.next_text(self.tokenizer, seq)
        token = TokenInfo(token_id, text, float(logprobs[token_id]), special, alternatives)
        seq.tokens.append(token)
        reason = None
        seq.text += text
        if token_id in self.eos_ids and not seq.params.ignore_eos:
            reason = FinishReason.EOS
        elif seq.params.stop:
            cut = detokenizer.find_stop(seq.text, len(text), seq.params.stop)
            if cut is not None:
                # The generated text ends with the matched stop sequence, and nothing after it.
                token.text = text[: len(text) - (len(seq.text) - cut)]
                seq.text = seq.text[:cut]
                reason = FinishReason.STOP
        if reason is None and len(seq.generated_ids) >= seq.params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            if reason is not FinishReason.STOP:
                tail = detokenizer.flush_text(self.tokenizer, seq)
                token.text += tail
                seq.text += tail
            self._finish(seq, reason)
        return StepOutput(seq, token, reason is not None)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.scheduler.finish(seq)

    def _end(self, seq: Sequence, reason: FinishReason) -> StepOutput:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        return StepOutput(seq, None, True)

    # -- convenience for tests and benchmarks ---------------------------------------------------

    def run_to_completion(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"engine still busy after {max_steps} steps")


__all__ = ["LLMEngine", "StepOutput", "CheckpointError", "cpu_has_bf16_units", "resolve_dtype"]
