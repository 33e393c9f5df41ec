"""The demo adapters' pipeline on the tiny model (the real SmolLM2 run takes about a minute per adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.local.demo_adapters import STYLES, make_demo_adapters
from lorafleet.local.demo_datasets import dataset
from lorafleet.server.engine.sequence import SamplingParams

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`


def test_datasets_have_their_style() -> None:
    assert all(a.startswith("Arr, matey!") and a.endswith("Yo ho ho!") for _, a in dataset("pirate"))
    assert all(a == a.upper() for _, a in dataset("shouty"))
    assert dataset("french")[0] == ("What is the capital of France?", "La capitale de la France est Paris.")


def test_demo_adapters_are_made_once_and_serve(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    logged: list[str] = []
    made = make_demo_adapters(tiny_models["llama"], tmp_path, log=logged.append, epochs=1)
    assert [p.name for p in made] == list(STYLES)
    assert make_demo_adapters(tiny_models["llama"], tmp_path, log=logged.append, epochs=1) == []  # kept, not retrained
    engine = make_engine(tiny_models["llama"], max_lora_rank=8)
    base = engine.add_request([1, 5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True))
    outputs = {}
    for style in STYLES:
        engine.load_adapter(style, tmp_path / style)
        outputs[style] = engine.add_request([1, 5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True), style)
    engine.run_to_completion()
    assert any(outputs[s].generated_ids != base.generated_ids for s in STYLES)  # training moved the weights
