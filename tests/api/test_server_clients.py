"""The replica through the clients users already have: lorax-client, openai, text-generation.

Greedy outputs through each client must equal the engine's own output for the same request.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from support.engine import make_engine
from support.metrics import metric_values
from support.server import running_server

from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.testing import make_lora_adapter

PROMPT = "Hello world"


@pytest.fixture(scope="module")
def adapter_root(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served-adapters")
    make_lora_adapter(tiny_models["llama"], root / "pirate", r=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=3)
    make_lora_adapter(tiny_models["llama"], root / "french", r=4, target_modules=["o_proj"], seed=4, use_rslora=True)
    return root


@pytest.fixture(scope="module")
def server(tiny_models, adapter_root, tmp_path_factory):
    yield from running_server(tiny_models["llama"], adapter_root, tmp_path_factory.mktemp("cache"))


def engine_text(tiny_models, adapter_root: Path, prompt_ids: list[int], adapter: str | None, new_tokens: int) -> tuple[str, list[int]]:
    engine = make_engine(tiny_models["llama"], max_lora_rank=16)
    if adapter:
        engine.load_adapter(adapter, adapter_root / adapter)
    seq = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=new_tokens), adapter)
    engine.run_to_completion()
    return seq.text, seq.generated_ids


@pytest.fixture(scope="module")
def expected(tiny_models, adapter_root, server):
    ids = server.service.tokenizer(PROMPT).input_ids
    return {name: engine_text(tiny_models, adapter_root, ids, name, 8) for name in (None, "pirate", "french")}


@pytest.mark.parametrize("adapter", [None, "pirate", "french"])
def test_lorax_client_generate_and_stream(server, expected, adapter) -> None:
    from lorax import Client

    client = Client(server.url)
    response = client.generate(PROMPT, adapter_id=adapter, adapter_source="local", max_new_tokens=8, details=True)
    text, ids = expected[adapter]
    assert response.generated_text == text
    assert [t.id for t in response.details.tokens] == ids
    assert response.details.generated_tokens == 8 and response.details.finish_reason.value == "length"
    streamed = list(client.generate_stream(PROMPT, adapter_id=adapter, adapter_source="local", max_new_tokens=8, details=True))
    assert [r.token.id for r in streamed] == ids
    assert streamed[-1].generated_text == text and streamed[-1].details.generated_tokens == 8


async def test_lorax_async_client(server, expected) -> None:
    from lorax import AsyncClient

    client = AsyncClient(server.url)
    response = await client.generate(PROMPT, adapter_id="pirate", adapter_source="local", max_new_tokens=8)
    assert response.generated_text == expected["pirate"][0]
    tokens = [r.token.id async for r in client.generate_stream(PROMPT, adapter_id="pirate", adapter_source="local", max_new_tokens=8)]
    assert tokens == expected["pirate"][1]


def test_lorax_client_errors_map_to_its_exceptions(server) -> None:
    from lorax import Client
    from lorax.errors import GenerationError, ValidationError

    client = Client(server.url)
    with pytest.raises(ValidationError, match="`max_new_tokens` must be < 256. Given: 300"):
        client.generate(PROMPT, max_new_tokens=300)
    with pytest.raises(ValidationError, match="`stop` supports up to 4 stop sequences. Given: 5"):
        client.generate(PROMPT, stop_sequences=["a", "b", "c", "d", "e"])
    with pytest.raises(Exception, match="local adapter 'missing' not found"):
        client.generate(PROMPT, adapter_id="missing", adapter_source="local")
    bad = server.service.config.engine.adapter_roots[0] / "broken"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    with pytest.raises(GenerationError, match="DoRA adapters"):
        client.generate(PROMPT, adapter_id="broken", adapter_source="local")


def test_text_generation_client(server, expected) -> None:
    from text_generation import Client

    client = Client(server.url)
    response = client.generate(PROMPT, max_new_tokens=8)
    assert response.generated_text == expected[None][0]
    tokens = [r.token.id for r in client.generate_stream(PROMPT, max_new_tokens=8)]
    assert tokens == expected[None][1]


def test_openai_completions_and_chat(server, expected, tiny_models, adapter_root) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    completion = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text == expected["pirate"][0]
    assert completion.object == "text_completion" and completion.usage.completion_tokens == 8
    assert completion.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="pirate", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected["pirate"][0]
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    assert base.choices[0].text == expected[None][0]

    messages = [{"role": "user", "content": "Say hi"}]
    chat_ids = server.service.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    text, _ = engine_text(tiny_models, adapter_root, list(chat_ids), "french", 6)
    chat = client.chat.completions.create(model="french", messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == text and chat.object == "chat.completion"
    stream = list(client.chat.completions.create(model="french", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert stream[-1].choices[0].finish_reason == "length"
    models = {m.id for m in client.models.list().data}
    assert {"tiny-llama", "pirate", "french"} <= models


def test_admin_routes_prewarm_pin_and_unload(server) -> None:
    httpx.delete(server.url + "/adapters/french")  # whatever earlier tests left resident: this load must copy it in
    copies = 'lorafleet_adapter_load_seconds_count{step="cpu_to_device"}'
    before = metric_values(httpx.get(server.url + "/metrics").text).get(copies, 0.0)
    loaded = httpx.post(server.url + "/adapters", json={"adapter_id": "french", "adapter_source": "local", "pin": True}).json()
    assert loaded["tier"] == "device" and loaded["pinned"] is True and loaded["rank"] == 4
    assert metric_values(httpx.get(server.url + "/metrics").text)[copies] == before + 1  # one copy into a slot, timed
    listed = {a["id"]: a for a in httpx.get(server.url + "/adapters").json()}
    assert listed["french"]["pinned"] is True
    assert "french" in {a["id"] for a in httpx.get(server.url + "/adapters", params={"tier": ["device", "loading"]}).json()}
    assert "french" not in {a["id"] for a in httpx.get(server.url + "/adapters", params={"tier": "cpu"}).json()}
    bogus = httpx.get(server.url + "/adapters", params={"tier": "gpu"})
    assert bogus.status_code == 422 and bogus.json() == {"error": "unknown tier gpu; tiers are device, loading, cpu, failed",
                                                         "error_type": "validation"}
    assert httpx.delete(server.url + "/adapters/french").json() == {"unloaded": ["local:french"]}
    assert "french" not in {a["id"] for a in httpx.get(server.url + "/adapters").json()}
    assert httpx.delete(server.url + "/adapters/french").status_code == 404
    missing = httpx.post(server.url + "/adapters", json={"adapter_id": "missing"})
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"


def test_info_health_metrics_and_tokenize(server) -> None:
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == "tiny-llama" and info["max_total_tokens"] == 256 and info["max_stop_sequences"] == 4
    assert httpx.get(server.url + "/health").status_code == 200
    served = 'lorafleet_requests_total{adapter="",route="/generate",status="200",version=""}'
    before = metric_values(httpx.get(server.url + "/metrics").text).get(served, 0.0)
    httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    metrics = httpx.get(server.url + "/metrics").text
    for name in ('lorafleet_adapter_events{event="device_hit"}', "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info", served):
        assert name in metrics
    values = metric_values(metrics)
    assert values[served] == before + 1  # by value: this request, counted once
    assert values["vllm:num_requests_waiting"] == 0 and values["vllm:num_requests_running"] == 0  # nothing left in flight
    tokens = httpx.post(server.url + "/tokenize", json={"inputs": "Hello world"}).json()
    assert "".join(t["text"] for t in tokens) == "Hello world" and tokens[0]["start"] == 0
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"] == "lorafleet replica"


def test_generate_options_best_of_full_text_truncate_and_prefill_details(server) -> None:
    url = server.url + "/generate"
    best = httpx.post(url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "best_of": 2, "do_sample": True, "details": True}}, timeout=60).json()
    assert len(best["details"]["best_of_sequences"]) == 1
    chosen = sum(t["logprob"] for t in best["details"]["tokens"])
    other = sum(t["logprob"] for t in best["details"]["best_of_sequences"][0]["tokens"])
    assert chosen >= other  # the kept sequence is the more likely one
    response = httpx.post(url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "return_full_text": True}})
    assert {"x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens"} <= set(response.headers)
    assert response.headers["x-generated-tokens"] == "3"
    full = response.json()
    plain = httpx.post(url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json()
    assert full["generated_text"] == PROMPT + plain["generated_text"]
    truncated = httpx.post(url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "truncate": 2, "details": True}})
    assert truncated.status_code == 200 and truncated.json()["details"]["prompt_tokens"] == 2
    prefill = httpx.post(url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}).json()
    ids = server.service.tokenizer(PROMPT).input_ids
    assert [t["id"] for t in prefill["details"]["prefill"]] == ids and prefill["details"]["prefill"][0]["logprob"] is None
    seeded = [httpx.post(url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "do_sample": True, "seed": 42}}).json()["generated_text"] for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("path,body", [
    ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": True}),
], ids=["tgi", "openai-completions", "openai-chat"])
def test_every_stream_is_in_the_latency_metrics(server, path, body) -> None:
    """Both APIs stream through one loop: each finished stream is one time-to-first-token observation."""
    def observed() -> float:
        line = next(x for x in httpx.get(server.url + "/metrics").text.splitlines() if x.startswith("lorafleet_time_to_first_token_seconds_count{adapter=\"\",cache=\"hot\",version=\"\"}"))
        return float(line.split()[-1])

    before = observed()
    with httpx.stream("POST", server.url + path, json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and not any('"error"' in line for line in lines)
    assert observed() == before + 1
