"""Per-adapter metrics stay bounded however many adapter ids clients send, and residency is what routers read."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from support.metrics import metric_values
from support.server import RunningServer, ThreadedApp

from lorafleet.adapter_labels import OTHER, TopAdapters
from lorafleet.gateway.app import create_gateway_app
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.server.api.metrics import ServerMetrics
from lorafleet.testing import make_lora_adapter
from lorafleet.traffic_split import VARIANT_HEADER

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

LABELS = 3
ADAPTERS = [f"m{i}" for i in range(6)]


def adapter_labels(text: str) -> set[str]:
    """Adapter label values of the traffic series (residency, lorafleet_adapter_loaded, is bounded by the tiers instead)."""
    traffic = "\n".join(line for line in text.splitlines() if not line.startswith("lorafleet_adapter_loaded"))
    return set(re.findall(r'[{,]adapter="([^"]*)"', traffic))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_busiest_adapters_keep_their_labels_and_the_rest_are_other() -> None:
    clock, dropped = Clock(), []
    top = TopAdapters(2, rerank_s=60, on_drop=dropped.append, clock=clock)
    assert [top.label(a) for a in ("a", "b", "c", "")] == ["a", "b", OTHER, ""]  # the first two seen, then other; "" is the base
    for _ in range(50):
        top.label("c")  # c becomes the busiest
    clock.now = 61
    assert top.label("c") == "c" and dropped == ["b"]  # at the rerank c takes a place (a and b had 1 request each: ties go by name)
    assert top.label("b") == OTHER and top.labelled == {"a", "c"}
    for i in range(10_000):
        top.label(f"x{i}")
    assert len(top.counts) <= top.capacity and len(top.labelled) == 2


def test_ten_thousand_adapters_do_not_grow_the_replica_or_gateway_metrics() -> None:
    server = ServerMetrics(lambda: {"waiting": 0, "running": 0, "kv_usage": 0.0, "prefix_cache": (0, 0), "speculative": (0, 0, 0), "max_lora": 4, "running_adapters": [], "waiting_adapters": [],
                                    "timestamp": 0.0, "adapters_per_tier": {}, "bytes_per_tier": {}, "adapter_events": {}, "residency": []},
                           adapter_labels=LABELS)
    gateway = GatewayMetrics(adapter_labels=LABELS)

    def traffic(ids: list[str]) -> None:
        for i, adapter in enumerate(ids):
            server.requests.labels("/generate", "200", *server.labels(None, adapter)).inc()
            server.observe_generation(None, adapter, "device" if i % 2 else "cpu", 5, 0.01, 0.04)
            gateway.adapter_requests.labels(gateway.adapters.label(adapter), "owner").inc()

    traffic([f"org/a{i}" for i in range(100)])
    sizes = len(server.render().splitlines()), len(generate(gateway))
    traffic([f"org/b{i}" for i in range(10_000)])
    assert (len(server.render().splitlines()), len(generate(gateway))) == sizes
    assert adapter_labels(server.render().decode()) == {"org/a0", "org/a1", "org/a2", OTHER}
    counted = metric_values(server.render().decode())
    assert counted['lorafleet_generated_tokens_total{adapter="other",version="other"}'] == 5 * (10_100 - 3)  # nothing is lost, only pooled
    assert counted['lorafleet_time_to_first_token_seconds_count{adapter="other",cache="cold",version="other"}'] == 48 + 5_000  # every other one was cold; a0 and a2 have their own


def generate(gateway: GatewayMetrics) -> list[str]:
    from prometheus_client import generate_latest

    return generate_latest(gateway.registry).decode().splitlines()


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("metric-adapters")
    for i, name in enumerate(ADAPTERS):
        make_lora_adapter(tiny_models["llama"], root / name, r=4, seed=i)
    with RunningServer(tiny_models["llama"], root, tmp_path_factory.mktemp("cache"), metrics_adapter_labels=LABELS) as replica:
        gateway_app = create_gateway_app([replica.url], None, GatewayConfig(metrics_adapter_labels=LABELS))
        with ThreadedApp(gateway_app) as gateway:
            yield replica, gateway


def test_unknown_and_real_adapters_over_http_keep_metrics_bounded(fleet) -> None:
    """3,000 distinct adapter ids through the gateway to a replica (10,000 take 70 s here; the test above sends
    10,000 through the same metric objects): none of the unknown ones becomes a label on either, and of the six
    real ones only LABELS have series of their own."""
    replica, gateway = fleet
    for name in ADAPTERS:
        response = httpx.post(gateway.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": name, "max_new_tokens": 2}}, timeout=60)
        assert response.status_code == 200, response.text

    async def unknown(ids: range) -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                async with gate:
                    body = {"inputs": "hi", "parameters": {"adapter_id": f"nobody-{i}", "max_new_tokens": 1}}
                    return (await client.post(gateway.url + "/generate", json=body)).status_code

            return await asyncio.gather(*(one(i) for i in ids))

    assert set(asyncio.run(unknown(range(10)))) == {404}  # the 404 series exist from here on
    before = len(httpx.get(replica.url + "/metrics").text.splitlines()), len(httpx.get(gateway.url + "/metrics").text.splitlines())
    assert set(asyncio.run(unknown(range(10, 3_000)))) == {404}
    replica_text, gateway_text = httpx.get(replica.url + "/metrics").text, httpx.get(gateway.url + "/metrics").text
    # The same series (a status code seen for the first time, e.g. the probes' 304, may add one): none per adapter id.
    assert len(replica_text.splitlines()) - before[0] < 5 and len(gateway_text.splitlines()) - before[1] < 5
    assert adapter_labels(replica_text) - {"", OTHER} <= set(ADAPTERS) and len(adapter_labels(replica_text) & set(ADAPTERS)) == LABELS
    assert adapter_labels(gateway_text) == {*ADAPTERS[:LABELS], OTHER}
    assert not any("nobody" in line for line in (replica_text + gateway_text).splitlines())


def test_residency_is_published_for_routers(fleet) -> None:
    """vllm:lora_requests_info: running = adapters on the device, max_lora = slots (one series per scrape);
    lorafleet_adapter_loaded says each adapter's tier."""
    replica, _ = fleet
    for name in ADAPTERS[:2]:
        assert httpx.post(replica.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": name, "max_new_tokens": 1}}, timeout=60).status_code == 200
    text = httpx.get(replica.url + "/metrics").text
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info[0]))
    on_device = {a["id"] for a in httpx.get(replica.url + "/adapters").json() if a["tier"] == "device"}
    assert labels["max_lora"] == "4" and set(labels["running_lora_adapters"].split(",")) == on_device and labels["waiting_lora_adapters"] == ""
    assert set(ADAPTERS[:2]) <= on_device and len(on_device) == 4  # six adapters, four slots
    loaded = {(a, t) for a, t in re.findall(r'lorafleet_adapter_loaded\{adapter="([^"]*)",tier="([^"]*)"\} 1\.0', text)}
    assert {a for a, t in loaded if t == "device"} == on_device
    assert {a for a, _ in loaded} == set(ADAPTERS)  # the two evicted ones are in CPU memory
    assert {t for a, t in loaded if a not in on_device} == {"cpu"}


def test_the_metrics_follow_the_model_server_protocol(fleet) -> None:
    """What the Gateway API Inference Extension's endpoint picker reads (its model-server protocol): gauges under
    vLLM's names, and vllm:lora_requests_info with max_lora, comma-separated adapter lists and a timestamp value."""
    import time

    replica, _ = fleet
    text = httpx.get(replica.url + "/metrics").text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info"):
        assert types[name] == "gauge", name
    values = metric_values(text)
    assert 0.0 <= values["vllm:kv_cache_usage_perc"] <= 1.0 and values["vllm:gpu_cache_usage_perc"] == values["vllm:kv_cache_usage_perc"]
    (line,) = [key for key in values if key.startswith("vllm:lora_requests_info{")]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    assert set(labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} and labels["max_lora"].isdigit()
    for listed in (labels["running_lora_adapters"], labels["waiting_lora_adapters"]):
        assert listed == "" or all(name and name == name.strip() for name in listed.split(","))
    assert abs(values[line] - time.time()) < 60  # the picker keeps the newest series by this value


def test_the_inference_pool_sample_selects_the_replicas_the_operator_makes() -> None:
    import yaml

    from lorafleet.operator.desired import REPLICA_PORT, fleet_objects

    pool, route = yaml.safe_load_all((Path(__file__).resolve().parents[2] / "manifests" / "samples" / "inferencepool.yaml").read_text())
    objects = fleet_objects("smollm2", "default", {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}}, "token", "warm")
    replica_pods = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "smollm2-replicas")["spec"]["template"]["metadata"]["labels"]
    gateway_pods = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "smollm2")["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= replica_pods.items() and not selector.items() <= gateway_pods.items()
    assert pool["spec"]["targetPorts"] == [{"number": REPLICA_PORT}]
    assert route["spec"]["rules"][0]["backendRefs"][0] == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "smollm2"}


def test_openai_traffic_is_counted_under_its_adapter(fleet) -> None:
    """The OpenAI routes say which adapter served them (x-adapter-id, x-adapter-tier) as the TGI routes do, so
    the replica's per-adapter request counter sees them."""
    replica, _ = fleet
    label = f'lorafleet_requests_total{{adapter="{ADAPTERS[0]}",route="/v1/chat/completions",status="200",version="{ADAPTERS[0]}"}}'
    before = metric_values(httpx.get(replica.url + "/metrics").text).get(label, 0.0)
    for stream in (False, True):
        body = {"model": ADAPTERS[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
        response = httpx.post(replica.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.headers["x-adapter-id"] == ADAPTERS[0]
        assert response.headers["x-adapter-tier"] in ("device", "cpu", "loading")
    completion = httpx.post(replica.url + "/v1/completions", json={"model": ADAPTERS[0], "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert completion.headers["x-adapter-id"] == ADAPTERS[0]
    assert metric_values(httpx.get(replica.url + "/metrics").text)[label] == before + 2


def test_a_registered_name_is_counted_under_its_name_and_each_version_apart(tiny_models, tmp_path) -> None:
    """A request by an Adapter's name is labelled by that name (not by the folder or id it points at), with the
    version served beside it (id@revision): two revisions of one adapter in a rollout have series of their own."""
    make_lora_adapter(tiny_models["llama"], tmp_path / "adapters" / "m0", r=4, seed=3)
    with RunningServer(tiny_models["llama"], tmp_path / "adapters", tmp_path / "cache") as replica:
        entries = [{"name": "bot", "id": "m0", "source": "local", "revision": "v2"}]
        assert httpx.put(replica.url + "/adapters/catalogue", json={"adapters": entries}, timeout=30).status_code == 200
        for _ in range(2):
            response = httpx.post(replica.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "bot", "max_new_tokens": 2}}, timeout=60)
            assert response.status_code == 200 and (response.headers["x-adapter-id"], response.headers["x-adapter-name"]) == ("m0@v2", "bot")
        plain = httpx.post(replica.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "m0", "max_new_tokens": 2}}, timeout=60)
        assert plain.headers["x-adapter-id"] == "m0" and "x-adapter-name" not in plain.headers
        chosen = {VARIANT_HEADER: json.dumps({"id": "m0", "source": "local", "revision": "v3"})}  # the canary, as a gateway names it
        canary = httpx.post(replica.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "bot", "max_new_tokens": 2}},
                            headers=chosen, timeout=60)
        assert (canary.headers["x-adapter-id"], canary.headers["x-adapter-name"]) == ("m0@v3", "bot")
        values = metric_values(httpx.get(replica.url + "/metrics").text)
    assert values['lorafleet_requests_total{adapter="bot",route="/generate",status="200",version="m0@v2"}'] == 2
    assert values['lorafleet_requests_total{adapter="bot",route="/generate",status="200",version="m0@v3"}'] == 1
    assert values['lorafleet_requests_total{adapter="m0",route="/generate",status="200",version="m0"}'] == 1
    assert sum(values.get(f'lorafleet_time_to_first_token_seconds_count{{adapter="bot",cache="{c}",version="m0@v3"}}', 0) for c in ("hot", "cold")) == 1
