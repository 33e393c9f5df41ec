"""merged_adapters: logits equal peft's add_weighted_adapter for every strategy, merged once, bad specs refused."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from support.engine import capture_logits, make_engine
from support.metrics import metric_values
from support.server import RunningServer
from transformers import AutoModelForCausalLM

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.lora.merge import MergeSpec
from lorafleet.testing import make_lora_adapter, reference_greedy

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

STEPS = 5
PROMPT = [1] + [(7 * j) % 290 + 9 for j in range(11)]
MEMBERS = {  # one rank, different modules, alphas and scalings: what the merge must undo and redo
    "m0": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "m1": dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], use_rslora=True),
    "m2": dict(r=8, lora_alpha=8, target_modules=["v_proj", "gate_proj", "down_proj"], scale=2.0),
}
SPECS = [
    ("linear", [1.0, 0.6, -0.4], 1.0, "total"),
    ("ties", [2.0, 0.3, 0.7], 0.4, "total"),
    ("ties", [1.0, 1.0, 1.0], 0.6, "frequency"),
    ("dare_linear", [0.5, 1.5, 1.0], 0.5, "total"),
    ("dare_ties", [1.0, 0.8, 1.2], 0.3, "frequency"),
]


@pytest.fixture(scope="module")
def members(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge-members")
    for i, (name, spec) in enumerate(MEMBERS.items()):
        make_lora_adapter(tiny_models["llama"], root / name, seed=10 + i, **spec)
    make_lora_adapter(tiny_models["llama"], root / "rank4", r=4, seed=20)
    make_lora_adapter(tiny_models["llama"], root / "huge", seed=30, scale=3e4)  # finite, but its merge is out of bounds
    shutil.copytree(root / "m0", root / "elsewhere")  # the same weights, said to be trained on another base model
    config = json.loads((root / "elsewhere" / "adapter_config.json").read_text())
    (root / "elsewhere" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/another-base"}))
    return root


def peft_reference(base: Path, root: Path, spec: MergeSpec) -> tuple[list[int], torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [m.id for m in spec.members]
    model = PeftModel.from_pretrained(model, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    # DARE draws its masks from torch's default generator, after peft initialises the new adapter's weights
    # (which draws too): seed it where the merging starts, as ours is seeded.
    tuner = model.base_model
    merge_one_module = tuner._generalized_task_arithmetic_weighted_adapter
    seeded = []

    def seeded_merge(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not seeded:
            torch.manual_seed(spec.seed)
            seeded.append(True)
        return merge_one_module(*args, **kwargs)

    tuner._generalized_task_arithmetic_weighted_adapter = seeded_merge
    model.add_weighted_adapter(names, list(spec.weights), "merged", combination_type=spec.strategy, density=spec.density,
                               majority_sign_method=spec.majority_sign_method)
    model.set_adapter("merged")
    model.eval()
    tokens, logits = reference_greedy(model, PROMPT, STEPS)
    return tokens, torch.stack(logits)


def serve(engine, ref: AdapterRef, timeout: float = 60):  # noqa: ANN001, ANN201
    seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=STEPS, ignore_eos=True), engine.adapters.request(ref))
    deadline = time.monotonic() + timeout
    while not seq.finished:
        assert time.monotonic() < deadline, "the merged adapter did not serve in time"
        if not engine.step():
            time.sleep(0.002)
    return seq


@pytest.mark.parametrize(("strategy", "weights", "density", "sign"), SPECS, ids=[f"{s[0]}-{s[3]}-{s[2]}" for s in SPECS])
def test_a_merged_adapter_matches_peft(strategy, weights, density, sign, tiny_models, members, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    spec = MergeSpec(tuple(AdapterRef("local", n) for n in MEMBERS), tuple(weights), strategy, density, sign)
    expected_tokens, expected_logits = peft_reference(tiny_models["llama"], members, spec)
    captured = capture_logits(monkeypatch)
    engine = make_engine(tiny_models["llama"], adapter_roots=[members], adapter_cache_dir=tmp_path / "cache", max_active_adapters=4, max_lora_rank=16)
    seq = serve(engine, engine.adapters.merges.define(spec))
    assert seq.error is None and seq.generated_ids == expected_tokens
    torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits, atol=1e-4, rtol=0)
    # The merge changes the output: the first member alone gives other logits.
    alone = serve(engine, AdapterRef("local", "m0"))
    assert not torch.allclose(torch.stack(captured[alone.request_id]), expected_logits, atol=1e-3)


def test_the_same_spec_merges_once_and_another_spec_again(tiny_models, members, tmp_path) -> None:  # noqa: ANN001
    engine = make_engine(tiny_models["llama"], adapter_roots=[members], adapter_cache_dir=tmp_path / "cache", max_active_adapters=4, max_lora_rank=16)
    refs = tuple(AdapterRef("local", n) for n in MEMBERS)
    first = MergeSpec(refs, (1.0, 0.5, 0.5), "dare_ties", 0.5)
    outputs = [serve(engine, engine.adapters.merges.define(first)).generated_ids for _ in range(3)]
    assert outputs[0] == outputs[1] == outputs[2] and engine.adapters.counts["merges"] == 1
    serve(engine, engine.adapters.merges.define(MergeSpec(refs, (1.0, 0.5, 0.6), "dare_ties", 0.5)))
    assert engine.adapters.counts["merges"] == 2
    assert first.ref == MergeSpec(refs, (1.0, 0.5, 0.5), "dare_ties", 0.5).ref != MergeSpec(refs, (1.0, 0.5, 0.5), "dare_ties", 0.6).ref


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], members: Path, tmp_path_factory: pytest.TempPathFactory):
    with RunningServer(tiny_models["llama"], members, tmp_path_factory.mktemp("cache")) as running:
        yield running


def generate(server, merged: dict) -> httpx.Response:  # noqa: ANN001
    return httpx.post(server.url + "/generate", json={"inputs": "hello there", "parameters": {"max_new_tokens": 3, "merged_adapters": merged}}, timeout=60)


def test_merged_requests_over_http_are_served_and_counted(server) -> None:  # noqa: ANN001
    merged = {"ids": ["m0", "m1", "m2"], "weights": [2.0, 0.3, 0.7], "merge_strategy": "ties", "density": 0.2, "majority_sign_method": "total"}
    answers = [generate(server, merged) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200] and answers[0].json() == answers[1].json()
    assert answers[0].headers["x-adapter-id"].startswith("merged-")
    values = metric_values(httpx.get(server.url + "/metrics").text)
    assert values['lorafleet_adapter_events{event="merges"}'] == 1.0


@pytest.mark.parametrize(("merged", "status", "message"), [
    ({"ids": ["m0", "m1"], "merge_strategy": "average"}, 422, "`merged_adapters.merge_strategy` must be one of linear, ties, dare_linear, dare_ties"),
    ({"ids": ["m0", "m1"], "weights": [1.0]}, 422, "`merged_adapters.weights` must be a list of numbers from -100 to 100, one per id"),
    ({"ids": ["m0", "m1"], "merge_strategy": "ties", "density": 0}, 422, "`merged_adapters.density` must be >= 0.01 and <= 1.0"),
    ({"ids": ["m0", "m1"], "merge_strategy": "ties", "density": 1.5}, 422, "`merged_adapters.density` must be >= 0.01 and <= 1.0"),
    # The poison merges of the third adversarial run: each made NaN activations that reached other clients' requests.
    ({"ids": ["m0"], "weights": [1e30]}, 422, "`merged_adapters.weights` must be a list of numbers from -100 to 100"),
    ({"ids": ["m0"], "weights": [1.7e308]}, 422, "`merged_adapters.weights` must be a list of numbers from -100 to 100"),
    ({"ids": ["m0", "m1"], "weights": [1e300, 1]}, 422, "`merged_adapters.weights` must be a list of numbers from -100 to 100"),
    ({"ids": ["m0", "m1"], "weights": [1e30, -1e30], "merge_strategy": "ties"}, 422, "must be a list of numbers from -100 to 100"),
    ({"ids": ["m0", "m1"], "merge_strategy": "dare_linear", "density": 1e-300}, 422, "`merged_adapters.density` must be >= 0.01"),
    ({"ids": ["huge", "m1"]}, 422, "beyond the bound of 10000; use smaller weights or a larger density"),
    ({"ids": ["m0", "m1"], "majority_sign_method": "most"}, 422, "`merged_adapters.majority_sign_method` must be total or frequency"),
    ({"ids": [f"m{i}" for i in range(17)]}, 422, "`merged_adapters.ids` may name at most 16 adapters. Given: 17"),
    ({"ids": ["m0", "m0"]}, 422, "names an adapter more than once"),
    ({"ids": ["m0", "rank4"]}, 422, "needs members of one rank (it combines A and B element by element); ranks: m0=8, rank4=4"),
    ({"ids": ["m1", "elsewhere"]}, 422, "members were trained on different base models"),
    ({"ids": ["m0", "nobody"]}, 404, "local adapter 'nobody' not found"),
])
def test_a_bad_merge_spec_is_refused_with_its_reason(server, merged: dict, status: int, message: str) -> None:  # noqa: ANN001
    response = generate(server, merged)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert generate(server, {"ids": ["m0", "m2"]}).status_code == 200  # the replica goes on


def test_lorax_client_merged_adapters(server) -> None:  # noqa: ANN001
    """The real client's MergedAdapters, as LoRAX's guide writes it, against the direct HTTP answer."""
    from lorax import Client, MergedAdapters

    merged = MergedAdapters(ids=["m0", "m1", "m2"], weights=[2.0, 0.3, 0.7], merge_strategy="ties", density=0.2, majority_sign_method="total")
    response = Client(server.url).generate("hello there", max_new_tokens=3, merged_adapters=merged)
    direct = generate(server, {"ids": ["m0", "m1", "m2"], "weights": [2.0, 0.3, 0.7], "merge_strategy": "ties", "density": 0.2,
                               "majority_sign_method": "total"}).json()
    assert response.generated_text == direct["generated_text"] and response.details.generated_tokens == 3
