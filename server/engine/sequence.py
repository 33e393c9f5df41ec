"""A request inside the engine: its parameters, its tokens, where its KV lives, and what it emitted."""

from __future__ import annotations

import enum
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch


class FinishReason(str, enum.Enum):  # noqa: UP042 - StrEnum would change str(member), which logs and f-strings show
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings, already validated by the API layer."""

    max_new_tokens: int = 20
    temperature: float | None = None
    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    alternatives: int = 0
    prefill_logprobs: bool = False
    response_format: dict | None = None  # {"type": json_object|json_schema, "schema": {...}}
    speculative: bool = True  # False: never propose tokens for this request (the engine's --speculative must be on for True to matter)
    cache_salt: bytes = b""  # prefix-cache partition, from a trusted hop only (lorafleet/cache_salt.py); b"": the shared one

    @property
    def sampling(self) -> bool:
        """Sampling is on when asked for, or implied by any parameter that only makes sense when sampling."""
        if self.temperature == 0:
            return False
        return bool(
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k
            or (self.top_p is not None and self.top_p < 1.0)
            or self.typical_p is not None
        )


@dataclass(slots=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False
    alternatives: list[TokenInfo] = field(default_factory=list)


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(init=False)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    error: BaseException | None = None  # why a FinishReason.ERROR sequence failed
    cancelled: bool = False
    tokens: list[TokenInfo] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    num_preemptions: int = 0
    created_at: float = field(default_factory=time.monotonic)
    first_scheduled_at: float | None = None  # queue time = first_scheduled_at - created_at
    generator: torch.Generator | None = None
    seed_used: int | None = None
    constraint: Any = None  # a structured.Constraint when the output must follow a grammar
    parked_logits: torch.Tensor | None = None  # its last pass's logits while its grammar mask is still filling (output.py)
    adapter_tier: str = ""  # the adapter's tier when the request arrived (device = hot), for headers and benchmarks
    # the adapter's load as it went (seconds per step, and where it was found), copied on the engine thread when the
    # request ends, so the HTTP layer's trace never reads the adapter state another thread writes
    adapter_load: tuple[dict[str, float], str] | None = None
    prefill_carry: torch.Tensor | None = None  # last prefill chunk's final log-softmax, for the next chunk's first token
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order (prefix caching); tokens only grow
    num_registered: int = 0  # leading blocks of its table already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    # speculative decoding (speculation.py): its decayed record of proposed tokens accepted (hits) of those judged
    # (tries), steps left before it probes again when no proposal paid, the next such wait, and its totals
    spec_hits: float = 0.0
    spec_tries: float = 0.0
    draft_pause: int = 0
    draft_backoff: int = 4  # speculation.FIRST_PAUSE (speculation.py imports this module)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        self.read_offset = len(self.prompt_ids)
        self.prefix_offset = max(0, len(self.prompt_ids) - 5)
        if self.params.sampling:
            self.seed_used = self.params.seed if self.params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(self.seed_used)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
