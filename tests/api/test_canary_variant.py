"""A replica serves the version of a name the gateway chose, and counts each version's outcomes for the analysis."""

from __future__ import annotations

import json

import httpx
import pytest
from support.server import RunningServer

from lorafleet.testing import make_lora_adapter
from lorafleet.traffic_split import VARIANT_HEADER

pytestmark = pytest.mark.slow  # real replicas with a tiny model: over ~5 s


def generate(url: str, adapter: str, headers: dict | None = None) -> httpx.Response:
    body = {"inputs": "The capital of France is", "parameters": {"adapter_id": adapter, "max_new_tokens": 4}}
    return httpx.post(url + "/generate", json=body, headers=headers or {}, timeout=120)


def chosen(adapter_id: str) -> dict:
    return {VARIANT_HEADER: json.dumps({"id": adapter_id, "source": "local", "revision": None})}


def test_the_version_header_picks_the_names_canary_and_each_version_is_counted(tiny_models, tmp_path) -> None:
    adapters = tmp_path / "adapters"
    make_lora_adapter(tiny_models["llama"], adapters / "fr-v1", r=4, seed=1, scale=2.0)
    make_lora_adapter(tiny_models["llama"], adapters / "fr-v2", r=4, seed=2, scale=2.0)
    make_lora_adapter(tiny_models["llama"], adapters / "fr-broken", r=4, seed=3, scale=1e18)  # finite weights, non-finite logits
    with RunningServer(tiny_models["llama"], adapters, tmp_path / "cache") as replica:
        entries = [{"name": "fr", "id": "fr-v1", "source": "local", "canary": {"id": "fr-v2", "source": "local", "weight": 10}},
                   {"name": "bad", "id": "fr-v1", "source": "local", "canary": {"id": "fr-broken", "source": "local", "weight": 10}}]
        assert httpx.put(replica.url + "/adapters/catalogue", json={"adapters": entries}, timeout=30).status_code == 200
        catalogue = httpx.get(replica.url + "/adapters/catalogue", timeout=30).json()
        assert catalogue["adapters"][1]["canary"]["id"] == "fr-v2" and catalogue["adapters"][1]["canary"]["weight"] == 10

        stable = generate(replica.url, "fr")
        canary = generate(replica.url, "fr", chosen("fr-v2"))
        direct = generate(replica.url, "fr-v2")
        assert (stable.headers["x-adapter-id"], canary.headers["x-adapter-id"]) == ("fr-v1", "fr-v2")
        assert canary.json() == direct.json() != stable.json()  # the canary's own tokens, not stable's
        other = generate(replica.url, "fr-v1", chosen("fr-v2"))  # an id, not a registered name: served as named
        assert other.headers["x-adapter-id"] == "fr-v1"
        garbage = generate(replica.url, "fr", {VARIANT_HEADER: "canary"})
        assert garbage.status_code == 400 and VARIANT_HEADER in garbage.json()["error"]
        escape = generate(replica.url, "fr", chosen("../outside"))
        assert escape.status_code in (400, 404, 422), escape.text  # checked as if the caller had named it

        broken = generate(replica.url, "bad", chosen("fr-broken"))
        assert broken.status_code == 424, broken.text
        refused = httpx.post(replica.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "fr", "max_new_tokens": -1}}, timeout=30)
        assert refused.status_code == 422  # the caller's mistake: not counted against the version

        stats = httpx.get(replica.url + "/adapters/stats", params=[("version", v) for v in ("fr-v1", "fr-v2", "fr-broken", "nobody")],
                          timeout=30).json()["versions"]
    assert set(stats) == {"fr-v1", "fr-v2", "fr-broken"}
    assert (stats["fr-v1"]["requests"], stats["fr-v1"]["errors"], sum(stats["fr-v1"]["ttft"])) == (2, 0, 2)
    assert (stats["fr-v2"]["requests"], stats["fr-v2"]["errors"], sum(stats["fr-v2"]["ttft"])) == (2, 0, 2)
    assert (stats["fr-broken"]["requests"], stats["fr-broken"]["errors"], sum(stats["fr-broken"]["ttft"])) == (1, 1, 0)


def test_a_malformed_canary_is_refused_with_the_entry_named(tiny_models, tmp_path) -> None:
    with RunningServer(tiny_models["llama"], tmp_path / "adapters", tmp_path / "cache") as replica:
        entries = [{"name": "fr", "id": "fr-v1", "source": "local", "canary": {"id": "fr-v2", "source": "local", "weight": 150}}]
        response = httpx.put(replica.url + "/adapters/catalogue", json={"adapters": entries}, timeout=30)
    assert response.status_code == 422
    assert "entry 'fr'" in response.json()["error"] and "weight" in response.json()["error"]
