"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

A request is translated into the TGI parameters and validated by the same code, so both APIs
accept and refuse exactly the same things. ``model`` names the adapter; the base model's id or an
empty string means no adapter. As in OpenAI, an omitted temperature means 1.0 (sampling).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.api.deps import Service
from lorafleet.server.api.http_common import adapter_headers, chosen_version, read_json_object, trusted_cache_salt, until_disconnect
from lorafleet.server.api.service import Completion, ReplicaService, independent_copies
from lorafleet.server.api.streaming import sse, sse_events
from lorafleet.server.api.validation import GenerateJob, validate_generate
from lorafleet.server.engine.async_engine import TokenEvent
from lorafleet.server.engine.sequence import FinishReason
from lorafleet.server.errors import ValidationError

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
PASSED_THROUGH = ("top_p", "seed", "frequency_penalty", "presence_penalty", "repetition_penalty", "top_k", "adapter_source", "api_token", "speculative")


def finish_reason(reason: FinishReason | None) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def to_job(service: ReplicaService, request: Request, body: dict, inputs: str, stream: bool) -> GenerateJob:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationError("`model` must be a string")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    temperature = body.get("temperature", 1.0)
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # chat: a flag plus top_logprobs
        logprobs = body.get("top_logprobs") or 0 if logprobs else None
    parameters: dict[str, Any] = {name: body.get(name) for name in PASSED_THROUGH}
    parameters.update(
        max_new_tokens=body.get("max_tokens", body.get("max_completion_tokens")),
        temperature=temperature,
        do_sample=isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0,
        stop=stop,
        return_k_alternatives=logprobs,
        adapter_id=None if service.is_base(model) else model,
        response_format=body.get("response_format"),
    )
    job = validate_generate({"inputs": inputs, "parameters": parameters}, service.limits, stream=stream, chosen=chosen_version(request))
    request.state.job = job  # the metrics middleware counts its outcome under its version
    job.params.cache_salt = trusted_cache_salt(request, service.config.warm_token)
    return job


def _count(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16:
        raise ValidationError(f"`{name}` must be an integer from 1 to 16, got {value!r}")
    return value


async def run_all(service: ReplicaService, request: Request, jobs: list[GenerateJob]) -> list[Completion]:
    prompts = [service.prompt_ids(job) for job in jobs]  # every prompt is validated before any starts
    service.admit(len(jobs))
    try:
        return await until_disconnect(request, asyncio.gather(*(service.complete(j, p) for j, p in zip(jobs, prompts))))
    finally:
        service.release(len(jobs))


def usage(completions: list[Completion], n: int) -> dict[str, int]:
    """Every prompt's tokens once (its n completions share it), every completion's tokens."""
    prompt = sum(len(c.prompt_ids) for c in completions[::n])
    generated = sum(len(c.seq.tokens) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def logprobs_json(completion: Completion, offset: int) -> dict[str, Any]:
    tokens = completion.seq.tokens
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.text: a.logprob for a in t.alternatives} for t in tokens],
        "text_offset": offsets,
    }


async def openai_stream(service: ReplicaService, request: Request, job: GenerateJob, chunk: Any) -> Any:
    """Start one generation; return an SSE response whose chunks ``chunk(delta, finish)`` shapes, ending with [DONE]."""
    prompt_ids = service.prompt_ids(job)
    service.admit()
    started = time.perf_counter()
    try:
        first, events = await until_disconnect(request, service.stream(job, prompt_ids))
    except BaseException:
        service.release()
        raise

    def render(event: TokenEvent) -> list[str]:
        text = event.token.text if event.token is not None else ""
        if event.finished:
            return [sse(chunk(text, finish_reason(event.finish_reason)))]
        return [sse(chunk(text, None))] if text else []

    prelude = [sse(c) for c in chunk(None, None, start=True)]
    body = sse_events(service, job, first, events, started, render, prelude, epilogue=["data: [DONE]\n\n"])
    return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache", **adapter_headers(job, first.adapter_tier)})


router = APIRouter(prefix="/v1")


@router.get("/models", summary="the base model, the registered adapters, and the others this replica holds")
async def models(service: Service) -> dict:
    created, base = int(time.time()), service.base_name
    data = [{"id": base, "object": "model", "created": created, "owned_by": "lorafleet", "root": service.config.model_id, "parent": None}]
    catalogue = service.limits.catalogue
    for name, ref in sorted(catalogue.items()):
        data.append({"id": name, "object": "model", "created": created, "owned_by": "lorafleet", "root": ref.id, "parent": base})
    registered = set(catalogue.values())
    known = {AdapterRef(a["source"], a["id"], a["revision"]) for a in await service.list_adapters()}  # read on the engine thread
    for ref in sorted(known - registered, key=lambda r: r.key):
        data.append({"id": ref.id, "object": "model", "created": created, "owned_by": "lorafleet", "root": ref.id, "parent": base})
    return {"object": "list", "data": data}


@router.post("/completions", summary="OpenAI completions; `model` is the adapter id")
async def completions(service: Service, request: Request) -> Any:
    body = await read_json_object(request)
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValidationError("`prompt` must be a string or a non-empty list of strings")
    n = _count(body, "n", 1)
    stream = bool(body.get("stream"))
    body.setdefault("max_tokens", 16)
    jobs = [c for p in prompts for c in independent_copies(to_job(service, request, body, p, stream), n)]
    model = body.get("model") or service.base_name
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = bool(body.get("echo"))
    if stream:
        if len(jobs) != 1:
            raise ValidationError("streaming supports one prompt with n = 1")

        def chunk(text: str | None, finish: str | None, start: bool = False) -> Any:
            if start:
                return [{"id": ident, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": 0, "text": prompts[0], "logprobs": None, "finish_reason": None}]}] if echo else []
            return {"id": ident, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        return await openai_stream(service, request, jobs[0], chunk)
    results = await run_all(service, request, jobs)
    choices = []
    for index, (job, completion) in enumerate(zip(jobs, results)):
        prefix = job.inputs if echo else ""
        choices.append({
            "index": index, "text": prefix + completion.seq.text,
            "logprobs": logprobs_json(completion, len(prefix)) if job.params.alternatives or body.get("logprobs") == 0 else None,
            "finish_reason": finish_reason(completion.seq.finish_reason),
        })
    return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": usage(results, n)},
                        headers=adapter_headers(jobs[0], results[0].seq.adapter_tier))


@router.post("/chat/completions", summary="OpenAI chat completions with the tokenizer's chat template")
async def chat(service: Service, request: Request) -> Any:
    body = await read_json_object(request)
    prompt_ids = chat_prompt(service, body.get("messages"))
    n = _count(body, "n", 1)
    stream = bool(body.get("stream"))
    job = to_job(service, request, body, service.tokenizer.decode(prompt_ids), stream)
    job.prompt_ids = prompt_ids
    jobs = independent_copies(job, n)
    model = body.get("model") or service.base_name
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if stream:
        if n != 1:
            raise ValidationError("streaming supports n = 1")

        def chunk(text: str | None, finish: str | None, start: bool = False) -> Any:
            base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            if start:
                return [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}]
            delta = {"content": text} if text else {}
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        return await openai_stream(service, request, job, chunk)
    results = await run_all(service, request, jobs)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": c.seq.text}, "logprobs": None, "finish_reason": finish_reason(c.seq.finish_reason)}
        for i, c in enumerate(results)
    ]
    return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage(results, n)},
                        headers=adapter_headers(jobs[0], results[0].seq.adapter_tier))


def chat_prompt(service: ReplicaService, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ValidationError("`messages` must be a non-empty list")
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValidationError(f"`messages[{i}]` must be an object with a `role`")
        if message["role"] not in CHAT_ROLES:
            raise ValidationError(f"`messages[{i}].role` must be one of {', '.join(CHAT_ROLES)}. Given: {message['role']!r}")
        content = message.get("content")
        if content is None and not (message["role"] == "assistant" and message.get("tool_calls")):
            raise ValidationError(f"`messages[{i}].content` is required for a {message['role']} message")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValidationError(f"`messages[{i}].content` parts must be text parts ({{\"type\": \"text\", \"text\": ...}})")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValidationError(f"`messages[{i}].content` must be a string or a list of text parts")
        flat.append({"role": message["role"], "content": content})
    if service.tokenizer.chat_template is None:
        raise ValidationError("this model's tokenizer has no chat template; use /v1/completions")
    try:
        ids = service.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:
        raise ValidationError(f"the chat template could not render these messages: {exc}") from exc
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)
