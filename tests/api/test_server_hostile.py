"""Malformed and hostile requests: each gets its status, error_type and message; none crashes the server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file
from support.server import RunningServer, running_server

from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

OK = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}


def gen(**parameters) -> dict:
    return {"inputs": "Hello", "parameters": {"max_new_tokens": 2, **parameters}}


def raw(parameter: str) -> bytes:
    """A body with one parameter written as raw JSON text: NaN and Infinity cannot come from a dict."""
    return ('{"inputs": "Hello", "parameters": {"max_new_tokens": 2, ' + parameter + "}}").encode()


# (name, path, body (dict, or bytes sent raw), headers, status, error_type, message fragment)
CASES = [
    ("bad json", "/generate", b'{"inputs": "x",', {}, 400, "validation", "not valid JSON"),
    ("wrong content type", "/generate", b"inputs=x", {"content-type": "text/plain"}, 415, "validation", "Content-Type must be application/json"),
    ("invalid utf-8", "/generate", b'{"inputs": "\xff\xfe"}', {}, 400, "validation", "not valid UTF-8"),
    ("body is a list", "/generate", [1, 2], {}, 422, "validation", "must be a JSON object"),
    ("inputs missing", "/generate", {"parameters": {}}, {}, 422, "validation", "`inputs` must be a string"),
    ("inputs empty", "/generate", {"inputs": ""}, {}, 422, "validation", "`inputs` cannot be empty"),
    ("inputs a number", "/generate", {"inputs": 42}, {}, 422, "validation", "`inputs` must be a string"),
    ("parameters a string", "/generate", {"inputs": "x", "parameters": "fast"}, {}, 422, "validation", "`parameters` must be a JSON object"),
    ("max_new_tokens 0", "/generate", gen(max_new_tokens=0), {}, 422, "validation", "`max_new_tokens` must be strictly positive"),
    ("max_new_tokens negative", "/generate", gen(max_new_tokens=-5), {}, 422, "validation", "`max_new_tokens` must be strictly positive"),
    ("max_new_tokens huge", "/generate", gen(max_new_tokens=10**9), {}, 422, "validation", "`max_new_tokens` must be < 256"),
    ("max_new_tokens a word", "/generate", gen(max_new_tokens="ten"), {}, 422, "validation", "`max_new_tokens` must be an integer"),
    ("max_new_tokens fractional", "/generate", gen(max_new_tokens=2.5), {}, 422, "validation", "`max_new_tokens` must be an integer"),
    ("temperature negative", "/generate", gen(temperature=-1), {}, 422, "validation", "`temperature` must be >= 0.0"),
    ("top_p 0", "/generate", gen(top_p=0), {}, 422, "validation", "`top_p` must be > 0.0 and <= 1.0"),
    ("top_p above 1", "/generate", gen(top_p=1.5), {}, 422, "validation", "`top_p` must be > 0.0 and <= 1.0"),
    ("top_k 0", "/generate", gen(top_k=0), {}, 422, "validation", "`top_k` must be strictly positive"),
    ("typical_p 1", "/generate", gen(typical_p=1.0), {}, 422, "validation", "`typical_p` must be > 0.0 and < 1.0"),
    ("repetition_penalty 0", "/generate", gen(repetition_penalty=0), {}, 422, "validation", "`repetition_penalty` must be strictly positive"),
    ("frequency_penalty 3", "/generate", gen(frequency_penalty=3), {}, 422, "validation", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("too many stops", "/generate", gen(stop=["a", "b", "c", "d", "e"]), {}, 422, "validation", "`stop` supports up to 4 stop sequences. Given: 5"),
    ("stop a string", "/generate", gen(stop="x"), {}, 422, "validation", "`stop` must be a list of strings"),
    ("seed negative", "/generate", gen(seed=-1), {}, 422, "validation", "`seed` must be an unsigned 64-bit integer"),
    ("truncate 0", "/generate", gen(truncate=0), {}, 422, "validation", "`truncate` must be strictly positive"),
    ("best_of 5", "/generate", gen(best_of=5, do_sample=True), {}, 422, "validation", "`best_of` must be > 0 and <= 2. Given: 5"),
    ("best_of greedy", "/generate", gen(best_of=2), {}, 422, "validation", "you must use sampling when `best_of` is > 1"),
    ("best_of with seed", "/generate", gen(best_of=2, do_sample=True, seed=1), {}, 422, "validation", "`seed` must not be set when `best_of` > 1"),
    ("best_of streaming", "/generate_stream", gen(best_of=2, do_sample=True), {}, 422, "validation", "`best_of` != 1 is not supported when streaming"),
    ("prefill details streaming", "/generate_stream", gen(decoder_input_details=True), {}, 422, "validation", "`decoder_input_details` == true is not supported when streaming"),
    ("details not a bool", "/generate", gen(details="yes"), {}, 422, "validation", "`details` must be true or false"),
    ("do_sample a string", "/generate", gen(do_sample="true"), {}, 422, "validation", "`do_sample` must be true or false"),
    ("too many alternatives", "/generate", gen(return_k_alternatives=100), {}, 422, "validation", "`return_k_alternatives` must be >= 0 and <= 10"),
    ("unknown adapter", "/generate", gen(adapter_id="nobody", adapter_source="local"), {}, 404, "not_found", "local adapter 'nobody' not found"),
    ("adapter path traversal", "/generate", gen(adapter_id="../../etc", adapter_source="local"), {}, 422, "validation", "must not contain '..'"),
    ("adapter absolute path", "/generate", gen(adapter_id="/etc", adapter_source="local"), {}, 422, "validation", "resolves outside the allowed adapter roots"),
    ("adapter source unknown", "/generate", gen(adapter_id="x", adapter_source="ftp"), {}, 422, "validation", "`adapter_source` must be one of hub, local, s3"),
    ("adapter id a number", "/generate", gen(adapter_id=5), {}, 422, "validation", "`adapter_id` must be a string"),
    ("adapter not a lora", "/generate", gen(adapter_id="not-lora", adapter_source="local"), {}, 424, "generation", "peft_type PROMPT_TUNING is not supported"),
    ("adapter with NaN weights", "/generate", gen(adapter_id="nan-weights", adapter_source="local"), {}, 424, "generation", "holds NaN or infinite values"),
    ("poison merge weight", "/generate", gen(merged_adapters={"ids": ["ok"], "weights": [1e30]}), {}, 422, "validation", "from -100 to 100"),
    ("poison merge density", "/generate", gen(merged_adapters={"ids": ["ok"], "merge_strategy": "dare_linear", "density": 1e-300}), {}, 422,
     "validation", "`merged_adapters.density` must be >= 0.01"),
    ("warm without a token", "/adapters/warm", {"adapter_id": "ok"}, {}, 401, "unauthorized", "needs the replica's warm token"),
    ("merged with adapter_id", "/generate", gen(adapter_id="x", merged_adapters={"ids": ["a"]}), {}, 422, "validation", "cannot be used together with `adapter_id`"),
    ("merge strategy unknown", "/generate", gen(merged_adapters={"ids": ["a", "b"], "merge_strategy": "average"}), {}, 422, "validation", "`merged_adapters.merge_strategy` must be one of"),
    ("merge of adapters that do not exist", "/generate", gen(merged_adapters={"ids": ["a", "b"], "weights": [0.5, 0.5]}), {}, 404, "not_found", "local adapter 'a' not found"),
    ("response_format bad type", "/generate", gen(response_format={"type": "yaml"}), {}, 422, "validation", "`response_format.type` must be json_object or json_schema"),
    ("invalid json schema", "/generate", gen(response_format={"type": "json_schema", "schema": {"type": 5}}), {}, 422, "validation", "`response_format` schema is not valid"),
    ("json_schema without schema", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, {}, 422, "validation", "needs a `schema` object"),
    ("input too long", "/generate", {"inputs": "word " * 400, "parameters": {"max_new_tokens": 1}}, {}, 422, "validation", "`inputs` must have less than 128 tokens"),
    ("input + new over total", "/generate", {"inputs": "word " * 20, "parameters": {"max_new_tokens": 250}}, {}, 422, "validation", "`inputs` tokens + `max_new_tokens` must be <= 256"),
    ("ten megabyte body", "/generate", b'{"inputs": "' + b"x" * (10 << 20) + b'"}', {}, 413, "validation", "larger than"),
    ("chat without messages", "/v1/chat/completions", {"model": ""}, {}, 422, "validation", "`messages` must be a non-empty list"),
    ("chat image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, 422, "validation", "parts must be text parts"),
    ("completions n 0", "/v1/completions", {"prompt": "x", "n": 0}, {}, 422, "validation", "`n` must be an integer from 1 to 16"),
    ("completions prompt a number", "/v1/completions", {"prompt": 7}, {}, 422, "validation", "`prompt` must be a string or a non-empty list"),
    ("completions unknown adapter", "/v1/completions", {"prompt": "x", "model": "ghost", "adapter_source": "local"}, {}, 404, "not_found", "local adapter 'ghost' not found"),
    ("tokenize without inputs", "/tokenize", {"text": "x"}, {}, 422, "validation", "`inputs` must be a string"),
    # Values that once poisoned the engine (a NaN temperature failed every stream of its batch and
    # turned /health red for good), refused with the field's name; the engine's own isolation is
    # tests/engine/test_engine_isolation.py.
    ("temperature NaN", "/generate", raw('"temperature": NaN'), {}, 422, "validation", "`parameters.temperature` must be a finite number, got nan"),
    ("temperature Infinity", "/generate", raw('"temperature": Infinity'), {}, 422, "validation", "`parameters.temperature` must be a finite number, got inf"),
    ("temperature 1e999", "/generate", raw('"temperature": 1e999'), {}, 422, "validation", "`parameters.temperature` must be a finite number, got inf"),
    ("repetition_penalty NaN", "/generate", raw('"repetition_penalty": NaN'), {}, 422, "validation", "`parameters.repetition_penalty` must be a finite number"),
    ("top_p -Infinity", "/generate", raw('"top_p": -Infinity'), {}, 422, "validation", "`parameters.top_p` must be a finite number, got -inf"),
    ("seed NaN", "/generate", raw('"seed": NaN'), {}, 422, "validation", "`parameters.seed` must be a finite number"),
    ("merge weight NaN", "/generate", raw('"merged_adapters": {"ids": ["a"], "weights": [NaN]}'), {}, 422, "validation",
     "`parameters.merged_adapters.weights[0]` must be a finite number"),
    ("temperature denormal", "/generate", gen(temperature=1e-45), {}, 422, "validation", "`temperature` must be 0 (greedy) or between 0.001 and 100.0"),
    ("temperature huge", "/generate", gen(temperature=1e6), {}, 422, "validation", "`temperature` must be 0 (greedy) or between 0.001 and 100.0"),
    ("repetition_penalty denormal", "/generate", gen(repetition_penalty=1e-45), {}, 422, "validation", "`repetition_penalty` must be between 0.01 and 100.0"),
    ("repetition_penalty huge", "/generate", gen(repetition_penalty=1e300), {}, 422, "validation", "`repetition_penalty` must be between 0.01 and 100.0"),
    ("nesting bomb", "/generate", b'{"inputs": "x", "parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "validation", "nested deeper than 32 levels"),
    ("nested too deep", "/generate", b'{"inputs": "x", "parameters": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", {}, 422, "validation", "is nested deeper than 32 levels"),
    ("lone surrogate adapter_id", "/generate", raw('"adapter_id": "\\ud800"'), {}, 422, "validation", "`parameters.adapter_id` is not valid Unicode"),
    ("lone surrogate inputs", "/generate", b'{"inputs": "a\\udfff"}', {}, 422, "validation", "`inputs` is not valid Unicode"),
    ("local id names the root", "/generate", gen(adapter_id=".", adapter_source="local"), {}, 422, "validation", "must name a folder under an adapter root"),
    ("local id ./", "/generate", gen(adapter_id="./", adapter_source="local"), {}, 422, "validation", "must name a folder under an adapter root"),
    ("openai temperature NaN", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', {}, 422, "validation", "`temperature` must be a finite number, got nan"),
    ("openai model surrogate", "/v1/completions", b'{"prompt": "x", "model": "\\ud83d"}', {}, 422, "validation", "`model` is not valid Unicode"),
    ("chat unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 422, "validation", "`messages[0].role` must be one of system, developer, user, assistant, tool. Given: 'wizard'"),
    ("chat user without content", "/v1/chat/completions", {"messages": [{"role": "user"}]}, {}, 422, "validation", "`messages[0].content` is required for a user message"),
    ("chat system null content", "/v1/chat/completions", {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]}, {}, 422, "validation",
     "`messages[0].content` is required for a system message"),
    # One body that asks for thousands of sequences counts as thousands of requests (the limit here is 2).
    ("200 prompts x n 16", "/v1/completions", {"prompt": ["x"] * 200, "n": 16}, {}, 422, "validation", "this request makes 3200 sequences (prompts x n x best_of); at most 2"),
    ("3 prompts", "/v1/completions", {"prompt": ["x", "y", "z"], "max_tokens": 1}, {}, 422, "validation", "this request makes 3 sequences"),
    ("chat n 3", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, {}, 422, "validation", "this request makes 3 sequences"),
    ("adapter id of 10 KB", "/generate", gen(adapter_id="a" * 10_000, adapter_source="local"), {}, 422, "validation", "adapter_id is 10000 characters; at most 512"),
    ("adapter id with NUL", "/generate", gen(adapter_id="a\x00b", adapter_source="local"), {}, 422, "validation", "must not contain '..' or NUL"),
    ("unknown route", "GET /nope", None, {}, 404, "not_found", "Not Found"),
    ("wrong method", "PUT /generate", None, {}, 405, "validation", "Method Not Allowed"),
]

# The OpenAI surface: /v1/completions and /v1/chat/completions.
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "x"}]
CASES += [
    ("completions body a list", "/v1/completions", [1], {}, 422, "validation", "must be a JSON object"),
    ("completions prompt empty list", "/v1/completions", {"prompt": []}, {}, 422, "validation", "`prompt` must be a string or a non-empty list"),
    ("completions prompt list with a number", "/v1/completions", {"prompt": ["x", 3]}, {}, 422, "validation", "`prompt` must be a string or a non-empty list"),
    ("completions max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, {}, 422, "validation", "`max_new_tokens` must be strictly positive"),
    ("completions max_tokens a word", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, {}, 422, "validation", "`max_new_tokens` must be an integer"),
    ("completions temperature negative", "/v1/completions", {"prompt": "x", "temperature": -1}, {}, 422, "validation", "`temperature` must be >= 0.0"),
    ("completions temperature a word", "/v1/completions", {"prompt": "x", "temperature": "hot"}, {}, 422, "validation", "`temperature` must be a number"),
    ("completions top_p 2", "/v1/completions", {"prompt": "x", "top_p": 2}, {}, 422, "validation", "`top_p` must be > 0.0 and <= 1.0"),
    ("completions n 17", "/v1/completions", {"prompt": "x", "n": 17}, {}, 422, "validation", "`n` must be an integer from 1 to 16"),
    ("completions n a word", "/v1/completions", {"prompt": "x", "n": "two"}, {}, 422, "validation", "`n` must be an integer from 1 to 16"),
    ("completions five stops", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, {}, 422, "validation", "`stop` supports up to 4"),
    ("completions stop a number", "/v1/completions", {"prompt": "x", "stop": 5}, {}, 422, "validation", "`stop` must be a list of strings"),
    ("completions logprobs 11", "/v1/completions", {"prompt": "x", "logprobs": 11}, {}, 422, "validation", "`return_k_alternatives` must be >= 0 and <= 10"),
    ("completions seed negative", "/v1/completions", {"prompt": "x", "seed": -1}, {}, 422, "validation", "`seed` must be an unsigned 64-bit integer"),
    ("completions stream two prompts", "/v1/completions", {"prompt": ["x", "y"], "stream": True}, {}, 422, "validation", "streaming supports one prompt with n = 1"),
    ("completions frequency_penalty 5", "/v1/completions", {"prompt": "x", "frequency_penalty": 5}, {}, 422, "validation", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("completions repetition_penalty 0", "/v1/completions", {"prompt": "x", "repetition_penalty": 0}, {}, 422, "validation", "`repetition_penalty` must be strictly positive"),
    ("completions model a number", "/v1/completions", {"prompt": "x", "model": 5}, {}, 422, "validation", "`model` must be a string"),
    ("completions denormal temperature", "/v1/completions", {"prompt": "x", "temperature": 1e-300}, {}, 422, "validation", "`temperature` must be 0 (greedy) or between"),
    ("chat messages a string", CHAT, {"messages": "hello"}, {}, 422, "validation", "`messages` must be a non-empty list"),
    ("chat message not an object", CHAT, {"messages": ["hello"]}, {}, 422, "validation", "`messages[0]` must be an object with a `role`"),
    ("chat content a number", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 422, "validation", "`messages[0].content` must be a string or a list of text parts"),
    ("chat tool without content", CHAT, {"messages": [*USER, {"role": "tool", "tool_call_id": "1"}]}, {}, 422, "validation", "`messages[1].content` is required for a tool message"),
    ("chat stream n 2", CHAT, {"messages": USER, "stream": True, "n": 2}, {}, 422, "validation", "streaming supports n = 1"),
    ("chat response_format yaml", CHAT, {"messages": USER, "response_format": {"type": "yaml"}}, {}, 422, "validation", "`response_format.type` must be json_object or json_schema"),
    ("chat temperature Infinity", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', {}, 422, "validation", "`temperature` must be a finite number"),
    ("chat nested too deep", CHAT, b'{"messages": ' + b"[" * 50 + b"]" * 50 + b"}", {}, 422, "validation", "]` is nested deeper than 32 levels"),
    ("chat schema too large", CHAT, {"messages": USER, "response_format": {"type": "json_schema", "schema": {"type": "object", "description": "d" * 70_000}}}, {}, 422,
     "validation", "schema is 70"),
]

# The admin surface: POST/DELETE /adapters (the fixture's admin token is "admin").
ADMIN = {"authorization": "Bearer admin"}
CASES += [
    ("admin load without a token", "/adapters", {"adapter_id": "ok"}, {}, 401, "unauthorized", "needs the replica's admin token"),
    ("admin load with a wrong token", "/adapters", {"adapter_id": "ok"}, {"authorization": "Bearer nope"}, 401, "unauthorized", "needs the replica's admin token"),
    ("admin load with a bare token", "/adapters", {"adapter_id": "ok"}, {"authorization": "admin"}, 401, "unauthorized", "needs the replica's admin token"),
    ("admin load with a basic credential", "/adapters", {"adapter_id": "ok"}, {"authorization": "Basic YWRtaW46YWRtaW4="}, 401, "unauthorized", "admin token"),
    ("admin unload without a token", "DELETE /adapters/ok", None, {}, 401, "unauthorized", "needs the replica's admin token"),
    ("admin unload with a wrong token", "DELETE /adapters/ok", None, {"authorization": "Bearer nope"}, 401, "unauthorized", "admin token"),
    ("admin load without id", "/adapters", {"pin": True}, ADMIN, 422, "validation", "`adapter_id` is required"),
    ("admin body not json", "/adapters", b"{nope", ADMIN, 400, "validation", "not valid JSON"),
    ("admin body a list", "/adapters", [1], ADMIN, 422, "validation", "must be a JSON object"),
    ("admin wrong content type", "/adapters", b"adapter_id=ok", {**ADMIN, "content-type": "text/plain"}, 415, "validation", "Content-Type must be application/json"),
    ("admin adapter_id a number", "/adapters", {"adapter_id": 3}, ADMIN, 422, "validation", "`adapter_id` must be a string"),
    ("admin adapter_id empty", "/adapters", {"adapter_id": ""}, ADMIN, 422, "validation", "`adapter_id` is required"),
    ("admin adapter_id blank", "/adapters", {"adapter_id": "   ", "adapter_source": "local"}, ADMIN, 422, "validation", "adapter_id must not be empty"),
    ("admin adapter_id surrogate", "/adapters", b'{"adapter_id": "\\udc00"}', ADMIN, 422, "validation", "`adapter_id` is not valid Unicode"),
    ("admin adapter_id of 10 KB", "/adapters", {"adapter_id": "x" * 10_000, "adapter_source": "local"}, ADMIN, 422, "validation", "at most 512"),
    ("admin source unknown", "/adapters", {"adapter_id": "ok", "adapter_source": "ftp"}, ADMIN, 422, "validation", "`adapter_source` must be one of"),
    ("admin s3 id without scheme", "/adapters", {"adapter_id": "bucket/x", "adapter_source": "s3"}, ADMIN, 422, "validation", "must look like s3://bucket/prefix"),
    ("admin pin a string", "/adapters", {"adapter_id": "ok", "pin": "yes"}, ADMIN, 422, "validation", "`pin` must be true or false"),
    ("admin api_token a number", "/adapters", {"adapter_id": "ok", "api_token": 5}, ADMIN, 422, "validation", "`api_token` must be a string"),
    ("admin traversal", "/adapters", {"adapter_id": "../x", "adapter_source": "local"}, ADMIN, 422, "validation", "must not contain '..'"),
    ("admin absolute path", "/adapters", {"adapter_id": "/etc", "adapter_source": "local"}, ADMIN, 422, "validation", "resolves outside the allowed adapter roots"),
    ("admin the root itself", "/adapters", {"adapter_id": ".", "adapter_source": "local"}, ADMIN, 422, "validation", "must name a folder under an adapter root"),
    ("admin NUL in id", "/adapters", {"adapter_id": "o\x00k", "adapter_source": "local"}, ADMIN, 422, "validation", "must not contain '..' or NUL"),
    ("admin missing adapter", "/adapters", {"adapter_id": "ghost", "adapter_source": "local"}, ADMIN, 404, "not_found", "local adapter 'ghost' not found"),
    ("admin not a lora", "/adapters", {"adapter_id": "not-lora", "adapter_source": "local"}, ADMIN, 424, "generation", "peft_type PROMPT_TUNING is not supported"),
    ("admin NaN value", "/adapters", b'{"adapter_id": "ok", "weight": NaN}', ADMIN, 422, "validation", "`weight` must be a finite number"),
    ("admin nesting bomb", "/adapters", b"[" * 100_000 + b"]" * 100_000, ADMIN, 400, "validation", "nested deeper than 32 levels"),
    ("admin ten megabyte body", "/adapters", b'{"adapter_id": "' + b"x" * (10 << 20) + b'"}', ADMIN, 413, "validation", "larger than"),
    ("admin unload unknown", "DELETE /adapters/ghost", None, ADMIN, 404, "not_found", "adapter 'ghost' is not loaded"),
    ("admin unload traversal", "DELETE /adapters/..%2F..%2Fetc", None, ADMIN, 404, "not_found", "is not loaded"),
    ("admin listing unknown tier", "GET /adapters?tier=gpu", None, {}, 422, "validation", "unknown tier gpu; tiers are device, loading, cpu, failed"),
    ("admin put", "PUT /adapters", None, ADMIN, 405, "validation", "Method Not Allowed"),
]


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile-adapters")
    make_lora_adapter(tiny_models["llama"], root / "ok", r=4)
    shutil.copytree(root / "ok", root / "nan-weights")
    weights = load_file(root / "nan-weights" / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first][0, 0] = float("nan")
    save_file(weights, root / "nan-weights" / "adapter_model.safetensors")
    (root / "not-lora").mkdir()
    (root / "not-lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    yield from running_server(tiny_models["llama"], root, tmp_path_factory.mktemp("cache"), max_concurrent_requests=2, admin_token="admin")


@pytest.mark.parametrize("name,path,body,headers,status,error_type,message", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(server, name, path, body, headers, status, error_type, message) -> None:
    method, _, path = path.rpartition(" ")
    if isinstance(body, bytes):
        response = httpx.request(method or "POST", server.url + path, content=body, headers={"content-type": "application/json", **headers}, timeout=30)
    else:
        response = httpx.request(method or "POST", server.url + path, json=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["error_type"] == error_type
    assert message in payload["error"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + "/generate", json=OK).status_code == 200


def surface(path: str) -> str:
    path = path.rpartition(" ")[2]
    return "openai" if path.startswith("/v1/") else "admin" if path.startswith("/adapters") else "tgi"


def test_every_surface_has_at_least_thirty_hostile_cases() -> None:
    counts = {kind: sum(surface(c[1]) == kind for c in CASES) for kind in ("tgi", "openai", "admin")}
    assert all(n >= 30 for n in counts.values()), counts


async def test_concurrency_limit_answers_429_at_once(server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        long = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
        streams = [client.stream("POST", "/generate_stream", json=long) for _ in range(2)]
        for s in streams:  # both slots taken by open streams
            await s.__aenter__()
        try:
            refused = await client.post("/generate", json=OK)
            assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
        finally:
            for s in streams:
                await s.__aexit__(None, None, None)


async def test_a_client_that_disconnects_cancels_its_request(server) -> None:
    engine = server.service.engine
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async with client.stream("POST", "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}) as response:
            async for _ in response.aiter_lines():
                break
    for _ in range(200):
        if not engine.scheduler.running and not engine.scheduler.waiting and server.service.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert not engine.scheduler.running and server.service.in_flight == 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


def slow_adapter(server, tiny_models, monkeypatch, name: str, seconds: float):  # noqa: ANN001, ANN201
    """A local adapter ``name``; every parse of an adapter now takes ``seconds`` more, so a request for it waits that long."""
    import time

    make_lora_adapter(tiny_models["llama"], server.service.config.engine.adapter_roots[0] / name, r=4)
    manager = server.service.engine.adapters
    real_parse = manager._parse

    def slow_parse(adapter, folder):  # noqa: ANN001, ANN202
        time.sleep(seconds)
        return real_parse(adapter, folder)

    monkeypatch.setattr(manager, "_parse", slow_parse)
    return manager


async def test_a_hang_up_before_a_plain_answer_is_a_499_not_an_error_with_a_traceback(server, tiny_models, monkeypatch, caplog) -> None:
    """The hostile soak's abandoned requests logged "Exception in ASGI application" and a traceback each."""
    import logging

    manager = slow_adapter(server, tiny_models, monkeypatch, "slow-plain", 2.0)
    caplog.set_level(logging.ERROR)
    body = {"inputs": "Hello", "parameters": {"adapter_id": "slow-plain", "max_new_tokens": 5}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        request = asyncio.ensure_future(client.post("/generate", json=body))
        await asyncio.sleep(0.5)
        assert server.service.in_flight == 1
        request.cancel()
        for _ in range(200):
            if server.service.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert server.service.in_flight == 0
        await asyncio.sleep(0.3)  # the handler's last words, if any, logged by now
        metrics = (await client.get("/metrics")).text
    manager.unload("local:slow-plain", in_use=set())
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(line.startswith("lorafleet_requests_total{") and 'route="/generate"' in line and 'status="499"' in line
               for line in metrics.splitlines()), [line for line in metrics.splitlines() if line.startswith("lorafleet_requests_total")]


def test_a_hang_up_mid_body_is_a_499_not_an_error_with_a_traceback(server, caplog) -> None:
    """A gateway that gives up on a replica (SIGSTOPped in the soak) while its request body is still arriving."""
    import logging

    def answered_499() -> int:
        metrics = httpx.get(server.url + "/metrics").text
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
                   if line.startswith("lorafleet_requests_total{") and 'route="/generate"' in line and 'status="499"' in line)

    before = answered_499()
    caplog.set_level(logging.ERROR)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inp")
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while answered_499() == before:
        assert time.monotonic() < deadline, "the hang-up was not answered as a 499"
        time.sleep(0.05)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_stream_abandoned_while_it_waits_leaves_the_queue_at_once(server, tiny_models, monkeypatch) -> None:
    """A client that hangs up before its first token (its adapter still loading) gives up its place then,
    not after the load and a whole generation nobody reads."""
    import time

    manager = slow_adapter(server, tiny_models, monkeypatch, "slow", 3.0)
    body = {"inputs": "Hello", "parameters": {"adapter_id": "slow", "max_new_tokens": 200, "ignore_eos_token": True}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for path in ("/generate_stream", "/v1/completions"):
            payload = body if path == "/generate_stream" else {"model": "slow", "prompt": "Hello", "max_tokens": 200, "stream": True}
            request = asyncio.ensure_future(client.post(path, json=payload))
            await asyncio.sleep(0.5)
            assert server.service.in_flight == 1
            request.cancel()
            gone = time.monotonic()
            while server.service.in_flight or server.service.engine.scheduler.waiting:
                assert time.monotonic() - gone < 1.5, "the abandoned request kept its place"
                await asyncio.sleep(0.02)
            manager.unload("local:slow", in_use=set())


def test_a_chunked_body_over_the_limit_is_413(server) -> None:
    def chunks():  # noqa: ANN202 - no Content-Length: the limit is found while reading
        for _ in range(12):
            yield b"x" * (1 << 20)

    response = httpx.post(server.url + "/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.json() == {"error": f"the request body is larger than {server.service.config.max_body_bytes} bytes", "error_type": "validation"}
    assert httpx.get(server.url + "/health").status_code == 200


def test_spellings_of_one_adapter_are_one_metric_label_and_one_entry(server) -> None:
    spellings = ["ok", "./ok", "ok/.", "ok/", "ok/./."]
    for spelling in spellings:
        response = httpx.post(server.url + "/generate", json=gen(adapter_id=spelling, adapter_source="local"), timeout=30)
        assert response.status_code == 200 and response.headers["x-adapter-id"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    labels = {line.split('adapter="')[1].split('"')[0] for line in metrics.splitlines() if line.startswith("lorafleet_generated_tokens_total{")}
    assert labels <= {"", "ok"}
    assert [a["key"] for a in httpx.get(server.url + "/adapters").json() if a["id"].startswith("ok") or "/ok" in a["id"]] == ["local:ok"]


def test_usage_counts_every_prompt_once(server) -> None:
    """One body with several prompts is billed for all of them (it was billed for the first only)."""
    prompts = ["Hello", "A much longer prompt with many more tokens in it"]
    lengths = [len(httpx.post(server.url + "/tokenize", json={"inputs": p}).json()) for p in prompts]
    body = {"prompt": prompts, "max_tokens": 2, "temperature": 0}
    usage = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["usage"]
    assert usage["prompt_tokens"] == sum(lengths) and usage["completion_tokens"] == 4
    one = httpx.post(server.url + "/v1/completions", json={**body, "prompt": prompts[1], "n": 2}, timeout=30).json()["usage"]
    assert one["prompt_tokens"] == lengths[1]  # n completions of one prompt share it



def test_a_hub_that_accepts_and_never_answers_fails_within_the_deadline(tiny_models, tmp_path, monkeypatch) -> None:
    """A socket that accepts and stays silent: the request gets 424 within the fetch deadline (stated: 20 s; 2 s here),
    the hub counts as down so the next hub id fails at once, and local adapters keep loading all along."""
    from lorafleet.server.adapters import sources

    monkeypatch.setattr(sources, "REMOTE_FETCH_DEADLINE_S", 2.0)
    silent, accepted = socket.socket(), []
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    def accept_and_say_nothing() -> None:
        try:
            while True:
                accepted.append(silent.accept())
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    root = tmp_path / "adapters"
    make_lora_adapter(tiny_models["llama"], root / "local-one", r=4)
    try:
        with RunningServer(tiny_models["llama"], root, tmp_path / "cache") as replica:
            started = time.monotonic()
            stuck = httpx.post(replica.url + "/generate", json=gen(adapter_id="acme/silent", adapter_source="hub"), timeout=60)
            waited = time.monotonic() - started
            assert stuck.status_code == 424 and "the hub is unreachable (no answer within 2s)" in stuck.json()["error"], stuck.text
            assert waited < 6, waited
            started = time.monotonic()
            other = httpx.post(replica.url + "/generate", json=gen(adapter_id="acme/other", adapter_source="hub"), timeout=60)
            assert other.status_code == 424 and time.monotonic() - started < 1
            assert "'acme/other'" in other.json()["error"] and "acme/silent" not in other.json()["error"]
            local = httpx.post(replica.url + "/generate", json=gen(adapter_id="local-one", adapter_source="local"), timeout=60)
            assert local.status_code == 200
    finally:
        silent.close()
        for connection, _ in accepted:  # the abandoned fetches fail now, and leave nothing running for later tests
            connection.close()
        for thread in [t for t in threading.enumerate() if t.name == "lorafleet-fetch-hub"]:
            thread.join(30)


def test_the_catalogue_takes_its_largest_size_and_reads_it_without_hashing_again(server, monkeypatch) -> None:
    """100,000 entries are admitted and fit the route's body limit (a 2 MiB limit refused ~20,000 with 413); one more
    is a 422; reads, 304s included, never hash or encode it again (that held generation up on the event loop)."""
    from lorafleet.server.api import catalogue as catalogue_module
    from lorafleet.server.api.catalogue import (
        MAX_CANARIES,
        MAX_CATALOGUE,
        MAX_CATALOGUE_BODY_BYTES,
        MAX_ID_LENGTH,
        MAX_NAME_LENGTH,
        MAX_OWNERS,
        MAX_REVISION_LENGTH,
    )

    admin = {"authorization": "Bearer admin"}
    worst = json.dumps({"name": "n" * MAX_NAME_LENGTH, "id": "i" * MAX_ID_LENGTH, "source": "local", "revision": "r" * MAX_REVISION_LENGTH,
                        "owners": MAX_OWNERS})
    canary = json.dumps({"canary": {"id": "i" * MAX_ID_LENGTH, "source": "local", "revision": "r" * MAX_REVISION_LENGTH,
                                    "weight": 33.333333333333336, "stickiness": "header", "header": "h" * 128}})
    # the largest admitted catalogue fits its body limit, with as many canaries as it admits
    assert MAX_CATALOGUE * (len(worst) + 2) + MAX_CANARIES * (len(canary) + 2) + 16 <= MAX_CATALOGUE_BODY_BYTES
    rollouts = [{"name": f"n{i}", "id": f"a{i}", "canary": {"id": f"b{i}", "weight": 5}} for i in range(MAX_CANARIES + 1)]
    too_many = httpx.put(server.url + "/adapters/catalogue", json={"adapters": rollouts}, headers=admin, timeout=120)
    assert too_many.status_code == 422 and f"at most {MAX_CANARIES} entries may carry a `canary`" in too_many.json()["error"]
    encodings = []
    real_entries = catalogue_module.catalogue_entries
    monkeypatch.setattr(catalogue_module, "catalogue_entries",
                        lambda refs, canaries, owners=None: encodings.append(len(refs)) or real_entries(refs, canaries, owners))
    entries = [{"name": f"team-{i:06d}/adapter", "id": f"org/adapter-{i}", "source": "hub", "revision": "v1"} for i in range(MAX_CATALOGUE)]
    put = httpx.put(server.url + "/adapters/catalogue", json={"adapters": entries}, headers=admin, timeout=120)
    assert put.status_code == 200 and put.json()["adapters"] == MAX_CATALOGUE, put.text[:300]
    etag = httpx.get(server.url + "/adapters/catalogue", timeout=30).headers["etag"]
    for _ in range(20):
        assert httpx.get(server.url + "/adapters/catalogue", headers={"if-none-match": etag}, timeout=30).status_code == 304
    assert len(httpx.get(server.url + "/adapters/catalogue", timeout=30).json()["adapters"]) == MAX_CATALOGUE
    assert encodings == [MAX_CATALOGUE]  # once, when it was put
    over = httpx.put(server.url + "/adapters/catalogue", json={"adapters": [*entries, entries[0]]}, headers=admin, timeout=120)
    assert over.status_code == 422 and f"at most {MAX_CATALOGUE} entries" in over.json()["error"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # a declared length past the route's limit
        raw.sendall(f"PUT /adapters/catalogue HTTP/1.1\r\nhost: x\r\nauthorization: Bearer admin\r\ncontent-type: application/json\r\n"
                    f"content-length: {MAX_CATALOGUE_BODY_BYTES + 1}\r\n\r\n".encode())
        assert raw.recv(65536).startswith(b"HTTP/1.1 413")
    assert httpx.put(server.url + "/adapters/catalogue", json={"adapters": []}, headers=admin, timeout=30).status_code == 200


def test_a_catalogue_entry_with_a_bad_owner_count_is_refused_and_a_good_one_kept(server) -> None:
    admin = {"authorization": "Bearer admin"}
    for bad in (0, -1, 1001, "3", 2.5, True):
        put = httpx.put(server.url + "/adapters/catalogue", json={"adapters": [{"name": "hot", "id": "org/hot", "owners": bad}]}, headers=admin)
        assert put.status_code == 422 and "`owners` must be an integer from 1 to 1000" in put.json()["error"], bad
    assert httpx.put(server.url + "/adapters/catalogue", json={"adapters": [{"name": "hot", "id": "org/hot", "owners": 3}]}, headers=admin).status_code == 200
    assert httpx.get(server.url + "/adapters/catalogue").json()["adapters"][0]["owners"] == 3
