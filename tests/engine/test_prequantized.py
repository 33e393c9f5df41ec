"""GPTQ and AWQ 4-bit checkpoints load from their packed tensors and match the float weights they encode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.engine import capture_logits, make_engine
from support.prequantized import write
from support.quantize import reference_rows

from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.model.checkpoint import CheckpointError
from lorafleet.testing import make_lora_adapter

STEPS = 5
PROMPTS = [[1] + [(13 * i + 3 * j) % 290 + 4 for j in range(3 + 4 * i)] for i in range(4)]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_packed_checkpoint_with_adapters_matches_the_weights_it_encodes(method: str, tiny_models, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    packed, reference = write(tiny_models["llama"], tmp_path, method, group=32)
    adapter = make_lora_adapter(tiny_models["llama"], tmp_path / "qlora", r=8, seed=7, target_modules=["q_proj", "v_proj", "down_proj"])
    rows = [None, "qlora", None, "qlora"]  # an adapter trained on a 4-bit base (QLoRA) is a plain LoRA adapter
    expected_tokens, expected_logits = reference_rows(reference, {"qlora": adapter}, PROMPTS, rows, STEPS)
    captured = capture_logits(monkeypatch)
    engine = make_engine(packed, max_active_adapters=2, max_lora_rank=16)
    engine.load_adapter("qlora", adapter)
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True), adapter=a) for p, a in zip(PROMPTS, rows)]
    engine.run_to_completion()
    for row, seq in enumerate(seqs):
        assert seq.generated_ids == expected_tokens[row], f"row {row}"
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits[row], atol=1e-3, rtol=0)
    # The projections shrink 8x; the tiny model is half embedding and head, which stay float32.
    assert engine.runner.packed_format.method == method and engine.runner.model.nbytes < 0.6 * make_engine(tiny_models["llama"]).runner.model.nbytes
    # The packing is read, not guessed: the unquantized model gives other logits.
    _, full_logits = reference_rows(tiny_models["llama"], {}, PROMPTS[:1], [None], STEPS)
    assert not torch.allclose(full_logits[0], expected_logits[0], atol=1e-2)


@pytest.mark.parametrize(("change", "message"), [
    ({"bits": 8}, r"gptq with 8 bits is not served"),
    ({"desc_act": True}, r"act-order checkpoints \(desc_act: true\) are not served"),
    ({"checkpoint_format": "gptq_v2"}, r"checkpoint_format 'gptq_v2' is not served"),
])
def test_gptq_variants_not_served_are_refused(change: dict, message: str, tiny_models, tmp_path) -> None:  # noqa: ANN001
    packed, _ = write(tiny_models["llama"], tmp_path, "gptq", group=32)
    config = json.loads((packed / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps({**config, "quantization_config": {**config["quantization_config"], **change}}))
    with pytest.raises(CheckpointError, match=message):
        make_engine(packed)
    with pytest.raises(CheckpointError, match=r"already quantized \(gptq\); --quantize int4 would quantize it again"):
        make_engine(packed, quantize="int4")


def test_an_awq_gemv_checkpoint_is_refused(tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    packed, _ = write(tiny_models["llama"], tmp_path, "awq", group=32)
    config = json.loads((packed / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps({**config, "quantization_config": {**config["quantization_config"], "version": "gemv"}}))
    with pytest.raises(CheckpointError, match="AWQ version 'gemv' with zero_point True is not served"):
        make_engine(packed)
