"""TGI/LoRAX routes: ``/`` (what lorax-client uses), ``/generate``, ``/generate_stream``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafleet.server.api.deps import Service
from lorafleet.server.api.http_common import adapter_headers, chosen_version, read_json, trusted_cache_salt, until_disconnect
from lorafleet.server.api.service import Completion, ReplicaService
from lorafleet.server.api.streaming import sse, sse_events
from lorafleet.server.api.validation import GenerateJob, validate_generate
from lorafleet.server.engine.async_engine import TokenEvent
from lorafleet.server.engine.sequence import TokenInfo


def token_json(token: TokenInfo) -> dict[str, Any]:
    body: dict[str, Any] = {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special, "skipped": False}
    if token.alternatives:
        body["alternative_tokens"] = [{"id": a.id, "text": a.text, "logprob": a.logprob} for a in token.alternatives]
    return body


def prefill_json(completion: Completion, job: GenerateJob) -> list[dict]:
    if not job.decoder_input_details:
        return []
    return [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in completion.seq.prefill]


def generated_text(completion: Completion, job: GenerateJob) -> str:
    return (job.inputs + completion.seq.text) if job.return_full_text else completion.seq.text


def response_json(completion: Completion, job: GenerateJob) -> dict[str, Any]:
    seq = completion.seq
    body: dict[str, Any] = {"generated_text": generated_text(completion, job)}
    if job.details or job.decoder_input_details:
        body["details"] = {
            "finish_reason": completion.finish_reason.value,
            "prompt_tokens": len(completion.prompt_ids),
            "generated_tokens": len(seq.tokens),
            "skipped_tokens": 0,
            "seed": seq.seed_used,
            "prefill": prefill_json(completion, job),
            "tokens": [token_json(t) for t in seq.tokens],
        }
        if completion.best_of:
            body["details"]["best_of_sequences"] = [
                {"generated_text": generated_text(c, job), "finish_reason": c.finish_reason.value, "generated_tokens": len(c.seq.tokens),
                 "seed": c.seq.seed_used, "prefill": prefill_json(c, job), "tokens": [token_json(t) for t in c.seq.tokens]}
                for c in completion.best_of
            ]
    return body


def completion_headers(completion: Completion, job: GenerateJob) -> dict[str, str]:
    generated = max(1, len(completion.seq.tokens))
    return {
        "x-prompt-tokens": str(len(completion.prompt_ids)),
        "x-generated-tokens": str(len(completion.seq.tokens)),
        "x-queue-time": f"{completion.queue_s * 1000:.0f}",
        "x-inference-time": f"{completion.inference_s * 1000:.0f}",
        "x-time-per-token": f"{completion.inference_s * 1000 / generated:.0f}",
        **adapter_headers(job, completion.seq.adapter_tier),
    }


async def prepared(service: ReplicaService, request: Request, stream: bool) -> tuple[GenerateJob, list[int]]:
    job = validate_generate(await read_json(request), service.limits, stream=stream, chosen=chosen_version(request))
    request.state.job = job  # the metrics middleware counts its outcome under its version
    job.params.cache_salt = trusted_cache_salt(request, service.config.warm_token)
    return job, service.prompt_ids(job)


def stream_lines(job: GenerateJob, prompt_ids: list[int]) -> Callable[[TokenEvent], list[str]]:
    """TGI's SSE: one event per token; the last carries generated_text (and details when asked)."""

    def render(event: TokenEvent) -> list[str]:
        if event.finished and event.seq is not None:
            seq = event.seq
            details = None
            if job.details:
                details = {"finish_reason": seq.finish_reason.value, "prompt_tokens": len(prompt_ids),
                           "generated_tokens": len(seq.tokens), "seed": seq.seed_used}
            text = (job.inputs + seq.text) if job.return_full_text else seq.text
            token = event.token or (seq.tokens[-1] if seq.tokens else TokenInfo(0, "", 0.0, True))
            return [sse({"token": token_json(token), "generated_text": text, "details": details})]
        if event.token is not None:
            return [sse({"token": token_json(event.token), "generated_text": None, "details": None})]
        return []

    return render


async def generate(service: ReplicaService, request: Request, mode: str) -> Any:
    """mode: generate (one object), stream (SSE), root (``/``: a list of one object, or SSE with stream)."""
    job, prompt_ids = await prepared(service, request, stream=mode == "stream")
    service.admit(job.best_of)
    started = time.perf_counter()
    if job.stream or mode == "stream":
        try:  # a client that leaves while its request waits (for a slot, a load) gives up its place at once
            first, events = await until_disconnect(request, service.stream(job, prompt_ids))
        except BaseException:
            service.release()
            raise
        headers = {"x-prompt-tokens": str(len(prompt_ids)), **adapter_headers(job, first.adapter_tier), "cache-control": "no-cache"}
        body = sse_events(service, job, first, events, started, stream_lines(job, prompt_ids))
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    try:
        completion = await until_disconnect(request, service.complete(job, prompt_ids))
    finally:
        service.release(job.best_of)
    body = response_json(completion, job)
    return JSONResponse([body] if mode == "root" else body, headers=completion_headers(completion, job))


router = APIRouter()


@router.post("/", summary="Generate (LoRAX compatible: a list of one response, or SSE when stream is true)")
async def root(request: Request, service: Service) -> Any:
    return await generate(service, request, "root")


@router.post("/generate", summary="Generate one response")
async def generate_route(request: Request, service: Service) -> Any:
    return await generate(service, request, "generate")


@router.post("/generate_stream", summary="Generate, streaming tokens as Server-Sent Events")
async def generate_stream(request: Request, service: Service) -> Any:
    return await generate(service, request, "stream")
