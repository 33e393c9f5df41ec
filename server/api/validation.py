"""Validating a TGI/LoRAX generate request into engine parameters, with LoRAX's messages.

Every parameter may be absent or null (lorax-client sends every key); unknown keys are ignored.
Two departures from LoRAX, on purpose: temperature 0 means greedy (LoRAX refuses it), and top_p 1.0
is allowed (it means no cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lorafleet.adapter_ref import SOURCES, AdapterRef
from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.engine.structured import validate_response_format
from lorafleet.server.errors import ValidationError
from lorafleet.server.lora.merge import MAX_MEMBERS, MAX_WEIGHT, MIN_DENSITY, STRATEGIES, MergeSpec

MAX_SEED = 2**64 - 1
# Bounds that keep every row's arithmetic finite in float32: logits / temperature and logits x
# repetition_penalty stay far below 3.4e38 for any logit a model produces. Below them a value
# only approximates greedy decoding (which temperature 0 asks for exactly); above them, uniform noise.
TEMPERATURE_RANGE = (1e-3, 100.0)
REPETITION_PENALTY_RANGE = (1e-2, 100.0)


@dataclass(slots=True)
class Limits:
    max_input_length: int
    max_total_tokens: int
    max_stop_sequences: int = 4
    max_best_of: int = 2
    max_alternatives: int = 10
    default_adapter_source: str = "hub"
    # Registered adapters (the fleet's Adapter resources, pushed by the operator): name -> where it comes from.
    catalogue: dict[str, AdapterRef] = field(default_factory=dict)


@dataclass(slots=True)
class GenerateJob:
    inputs: str
    params: SamplingParams
    max_new_tokens: int | None  # None: whatever max_total_tokens leaves after the input
    adapter: AdapterRef | None
    api_token: str | None = None
    truncate: int | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: int = 1
    stream: bool = False
    response_format: dict | None = None
    prompt_ids: list[int] | None = None  # already tokenized (chat templates), else inputs is tokenized
    merge: MergeSpec | None = None  # merged_adapters; the service names it and sets `adapter` to its name
    failed_late: bool = False  # a stream that had started ended in an error event (counted against its version)
    name: str | None = None  # the registered name (an Adapter resource) the request asked for, when it named one


def _number(parameters: dict, name: str, kind: type, default: Any = None) -> Any:
    value = parameters.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValidationError(f"`{name}` must be a finite number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ValidationError(f"`{name}` must be an integer, got {value!r}")
    return kind(value)


def _flag(parameters: dict, name: str) -> bool:
    value = parameters.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be true or false, got {value!r}")
    return value


def parse_adapter(adapter_id: Any, adapter_source: Any, limits: Limits, revision: Any = None, chosen: dict | None = None) -> AdapterRef | None:
    """The version a request names; ``chosen``: the version of a registered name the gateway routed it by."""
    if adapter_id is None or adapter_id == "":
        return None
    if not isinstance(adapter_id, str):
        raise ValidationError(f"`adapter_id` must be a string, got {adapter_id!r}")
    if adapter_source is None and revision is None and adapter_id in limits.catalogue:
        if chosen is None:
            return limits.catalogue[adapter_id]  # a registered name needs no source
        try:  # the gateway's copy of the catalogue may differ from ours for a moment: it decides; checked as if named directly
            return AdapterRef.parse(chosen.get("id"), chosen.get("source") or "hub", chosen.get("revision") or None)
        except ValueError as exc:
            raise ValidationError(f"the version chosen for {adapter_id!r}: {exc}") from exc
    source = adapter_source if adapter_source is not None else limits.default_adapter_source
    if source not in SOURCES:
        raise ValidationError(f"`adapter_source` must be one of {', '.join(SOURCES)}. Given: {source!r}")
    try:
        return AdapterRef.parse(adapter_id, source, revision)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


def validate_generate(body: Any, limits: Limits, stream: bool = False, chosen: dict | None = None) -> GenerateJob:
    """A TGI/LoRAX generate body as a job, with TGI's own messages for what it refuses (clients match on them)."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` must be a string")
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    p = body.get("parameters") or {}
    if not isinstance(p, dict):
        raise ValidationError("`parameters` must be a JSON object")
    if "stream" in body and body["stream"] is not None:
        if not isinstance(body["stream"], bool):
            raise ValidationError("`stream` must be true or false")
        stream = stream or body["stream"]
    params, max_new_tokens = _sampling(p, limits)
    truncate = _number(p, "truncate", int)
    if truncate is not None and not 0 < truncate <= limits.max_input_length:
        raise ValidationError(f"`truncate` must be strictly positive and less than {limits.max_input_length}. Given: {truncate}")
    best_of = _number(p, "best_of", int, 1)
    _check_streaming_and_best_of(params, best_of, stream, limits)
    adapter = parse_adapter(p.get("adapter_id"), p.get("adapter_source"), limits, chosen=chosen)
    merge = _validate_merged(p["merged_adapters"], adapter, p.get("adapter_source"), limits) if p.get("merged_adapters") is not None else None
    api_token = p.get("api_token")
    if api_token is not None and not isinstance(api_token, str):
        raise ValidationError("`api_token` must be a string")
    try:
        params.response_format = validate_response_format(p.get("response_format"))
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc
    return GenerateJob(
        inputs=inputs, params=params, max_new_tokens=max_new_tokens, adapter=adapter, api_token=api_token,
        truncate=truncate, details=_flag(p, "details"), decoder_input_details=params.prefill_logprobs,
        return_full_text=_flag(p, "return_full_text"), best_of=best_of, stream=stream, merge=merge,
        name=p["adapter_id"] if adapter is not None and p.get("adapter_source") is None and p["adapter_id"] in limits.catalogue else None,
    )


def _sampling(p: dict, limits: Limits) -> tuple[SamplingParams, int | None]:
    """The sampling parameters, each checked against its range; (params, max_new_tokens as given)."""
    temperature = _number(p, "temperature", float)
    if temperature is not None and temperature < 0:
        raise ValidationError("`temperature` must be >= 0.0")
    low, high = TEMPERATURE_RANGE
    if temperature and not low <= temperature <= high:
        raise ValidationError(f"`temperature` must be 0 (greedy) or between {low} and {high}. Given: {temperature!r}")
    repetition_penalty = _number(p, "repetition_penalty", float)
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    low, high = REPETITION_PENALTY_RANGE
    if repetition_penalty is not None and not low <= repetition_penalty <= high:
        raise ValidationError(f"`repetition_penalty` must be between {low} and {high}. Given: {repetition_penalty!r}")
    penalties = {name: _number(p, name, float, 0.0) for name in ("frequency_penalty", "presence_penalty")}
    for name, value in penalties.items():
        if not -2.0 <= value <= 2.0:
            raise ValidationError(f"`{name}` must be >= -2.0 and <= 2.0")
    top_k = _within(p, "top_k", int, lambda v: v > 0, "`top_k` must be strictly positive")
    top_p = _within(p, "top_p", float, lambda v: 0.0 < v <= 1.0, "`top_p` must be > 0.0 and <= 1.0")
    typical_p = _within(p, "typical_p", float, lambda v: 0.0 < v < 1.0, "`typical_p` must be > 0.0 and < 1.0")
    max_new_tokens = _within(p, "max_new_tokens", int, lambda v: v > 0, "`max_new_tokens` must be strictly positive")
    if max_new_tokens is not None and max_new_tokens >= limits.max_total_tokens:
        raise ValidationError(f"`max_new_tokens` must be < {limits.max_total_tokens}. Given: {max_new_tokens}")
    seed = _number(p, "seed", int)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValidationError(f"`seed` must be an unsigned 64-bit integer. Given: {seed}")
    stop = p.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValidationError("`stop` must be a list of strings")
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}")
    alternatives = _number(p, "return_k_alternatives", int, 0)
    if not 0 <= alternatives <= limits.max_alternatives:
        raise ValidationError(f"`return_k_alternatives` must be >= 0 and <= {limits.max_alternatives}. Given: {alternatives}")
    params = SamplingParams(
        max_new_tokens=max_new_tokens or 1, temperature=temperature, do_sample=_flag(p, "do_sample"), top_k=top_k, top_p=top_p,
        typical_p=typical_p, repetition_penalty=repetition_penalty, frequency_penalty=penalties["frequency_penalty"],
        presence_penalty=penalties["presence_penalty"], seed=seed, stop=list(stop), ignore_eos=_flag(p, "ignore_eos_token"),
        alternatives=alternatives, prefill_logprobs=_flag(p, "decoder_input_details"),
        speculative=p.get("speculative") is None or _flag(p, "speculative"),
    )
    return params, max_new_tokens


def _within(p: dict, name: str, kind: type, ok: Any, message: str) -> Any:
    """An optional number that, when given, must pass ``ok``."""
    value = _number(p, name, kind)
    if value is not None and not ok(value):
        raise ValidationError(message)
    return value


def _check_streaming_and_best_of(params: SamplingParams, best_of: int, stream: bool, limits: Limits) -> None:
    if not 0 < best_of <= limits.max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
    if best_of > 1:
        if not params.sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if params.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if params.prefill_logprobs and stream:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")


def _validate_merged(merged: Any, adapter: AdapterRef | None, adapter_source: Any, limits: Limits) -> MergeSpec:
    """LoRAX's `merged_adapters`: ids (each resolved as an `adapter_id` with this request's `adapter_source`),
    weights (default 1 each), merge_strategy, density, majority_sign_method."""
    if adapter is not None:
        raise ValidationError("`merged_adapters` cannot be used together with `adapter_id`")
    if not isinstance(merged, dict):
        raise ValidationError("`merged_adapters` must be a JSON object")
    ids, weights = merged.get("ids"), merged.get("weights")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise ValidationError("`merged_adapters.ids` must be a non-empty list of adapter ids")
    if len(ids) > MAX_MEMBERS:
        raise ValidationError(f"`merged_adapters.ids` may name at most {MAX_MEMBERS} adapters. Given: {len(ids)}")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(ids)
                                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and abs(w) <= MAX_WEIGHT for w in weights)):
        raise ValidationError(f"`merged_adapters.weights` must be a list of numbers from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, one per id")
    strategy = merged.get("merge_strategy", "linear")
    if strategy not in STRATEGIES:
        raise ValidationError(f"`merged_adapters.merge_strategy` must be one of {', '.join(STRATEGIES)}. Given: {strategy!r}")
    density = merged.get("density", 1.0)
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not MIN_DENSITY <= density <= 1.0:
        raise ValidationError(f"`merged_adapters.density` must be >= {MIN_DENSITY:g} and <= 1.0 (DARE rescales by 1/density)")
    sign = merged.get("majority_sign_method", "total")
    if sign not in ("total", "frequency"):
        raise ValidationError(f"`merged_adapters.majority_sign_method` must be total or frequency. Given: {sign!r}")
    members = tuple(parse_adapter(i, adapter_source, limits) for i in ids)
    if len(set(members)) != len(members):
        raise ValidationError("`merged_adapters.ids` names an adapter more than once; give it one weight instead")
    return MergeSpec(members, tuple(float(w) for w in (weights or [1.0] * len(ids))), strategy, float(density), sign)
