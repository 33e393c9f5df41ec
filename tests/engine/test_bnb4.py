"""bitsandbytes checkpoints (QLoRA's NF4 base, FP4, double quantization, LLM.int8) and --quantize nf4, against
bitsandbytes itself: its dequantize, and transformers' forward on the same quantized model (peft's for adapter rows).

Tolerance: the engine and bitsandbytes multiply by the same float32 weights (bitsandbytes' float32 path dequantizes
and calls F.linear), so logits differ only by the order float32 sums are taken in: 1e-4 on logits of magnitude ~1 is
two orders above what that gives here and two below what one wrongly decoded code gives. On a CPU with AVX512-BF16
bitsandbytes' Linear4bit switches itself to a kernel that rounds the weights to bfloat16 (logits 0.01-0.03 away from
its own float32 path); the reference turns that off (tests/support/quantize.py) so what is compared is the decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.bnb import bnb_checkpoint, requantized
from support.engine import capture_logits, make_engine
from support.quantize import reference_rows

from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.model.bnb4 import NF4, quantize_nf4, read_bnb4
from lorafleet.server.model.checkpoint import CheckpointError
from lorafleet.testing import make_lora_adapter

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test extra (make setup installs it)")

STEPS = 5
PROMPTS = [[1] + [(13 * i + 3 * j) % 290 + 4 for j in range(3 + 4 * i)] for i in range(4)]
VARIANTS = {"nf4": {"quant_type": "nf4"}, "nf4-double": {"quant_type": "nf4", "double_quant": True}, "fp4": {"quant_type": "fp4"}}


@pytest.fixture(scope="module")
def bnb_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb")
    made = {name: bnb_checkpoint(tiny_models["llama"], root / name, **kwargs) for name, kwargs in VARIANTS.items()}
    made["nf4-block32"] = requantized(made["nf4"], root / "nf4-block32", blocksize=32)
    made["nf4-block128"] = requantized(made["nf4"], root / "nf4-block128", blocksize=128)  # a block spans two rows of the tiny model
    made["int8"] = bnb_checkpoint(tiny_models["llama"], root / "int8", bits=8)
    return made


@pytest.mark.parametrize("variant", ["nf4", "nf4-double", "fp4", "nf4-block32", "nf4-block128"])
def test_packed_weights_decode_exactly_as_bitsandbytes_does(variant: str, bnb_models) -> None:
    """Against bitsandbytes' reference dequantize (its default backend, in torch). Its native CPU kernel agrees where a
    block lies within a row; where a block spans rows (blocksize 128 on the tiny model's 64-wide q_proj) it decodes
    other weights (0.14 from the float weights where the quantization error is 0.04), so it is not the reference."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    tensors = load_file(str(bnb_models[variant] / "model.safetensors"))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        state = bnbf.QuantState.from_dict({k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")},
                                          device=torch.device("cpu"))
        absmax = state.absmax if state.state2 is None else bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        expected = _dequantize_4bit_compute(tensors[name].reshape(-1), absmax, state.code, state.blocksize, state.shape, torch.float32)
        weight = read_bnb4(dict(tensors), name)
        assert weight.blocksize == {"nf4-block32": 32, "nf4-block128": 128}.get(variant, 64) and weight.quant_type == variant[:3]
        assert torch.equal(weight.dequantize(), expected)
        if variant != "nf4-block128" or "down_proj" in name:
            assert torch.equal(weight.dequantize(), bnbf.dequantize_4bit(tensors[name], state))  # its CPU kernel too


@pytest.mark.parametrize("variant", ["nf4", "nf4-double", "fp4", "nf4-block32"])
def test_a_bitsandbytes_base_with_a_qlora_adapter_matches_transformers_and_peft_on_it(variant: str, bnb_models, tiny_models, tmp_path,
                                                                                      monkeypatch) -> None:
    folder = bnb_models[variant]
    adapter = make_lora_adapter(tiny_models["llama"], tmp_path / "qlora", r=8, seed=7, target_modules=["q_proj", "v_proj", "down_proj"])
    rows = [None, "qlora", None, "qlora"]  # a QLoRA adapter is a plain LoRA adapter of the quantized base
    expected_tokens, expected_logits = reference_rows(folder, {"qlora": adapter}, PROMPTS, rows, STEPS)
    captured = capture_logits(monkeypatch)
    engine = make_engine(folder, max_active_adapters=2, max_lora_rank=16)
    engine.load_adapter("qlora", adapter)
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True), adapter=a) for p, a in zip(PROMPTS, rows)]
    engine.run_to_completion()
    for row, seq in enumerate(seqs):
        assert seq.generated_ids == expected_tokens[row], f"row {row}"
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits[row], atol=1e-4, rtol=0)
    assert engine.runner.packed_format.describe() == f"bitsandbytes {variant[:3]}"
    assert engine.runner.model.nbytes < 0.6 * make_engine(tiny_models["llama"]).runner.model.nbytes  # projections at ~0.56 bytes a weight


def test_quantize_nf4_makes_bitsandbytes_codes_and_serves_what_transformers_nf4_computes(tiny_models, bnb_models, monkeypatch) -> None:
    weight = torch.randn(96, 160) * 0.05
    mine = quantize_nf4(weight)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(mine.packed, packed.reshape(-1)) and torch.equal(mine.absmax, state.absmax) and torch.equal(mine.code, state.code)
    assert torch.equal(torch.tensor(NF4), state.code)
    # The whole base, quantized at load, against transformers' NF4 model of the same float checkpoint.
    expected_tokens, expected_logits = reference_rows(bnb_models["nf4"], {}, PROMPTS, [None] * 4, STEPS)
    captured = capture_logits(monkeypatch)
    engine = make_engine(tiny_models["llama"], quantize="nf4")
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True)) for p in PROMPTS]
    engine.run_to_completion()
    for row, seq in enumerate(seqs):
        assert seq.generated_ids == expected_tokens[row]
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits[row], atol=1e-4, rtol=0)


def test_an_llm_int8_checkpoint_serves_its_int8_weights(bnb_models, tiny_models, tmp_path, monkeypatch) -> None:
    """LLM.int8 is served weight-only: the stored int8 rows times SCB / 127, activations unquantized (bitsandbytes' own
    forward also quantizes activations, so its logits carry that error too; the reference here is its weights)."""
    tensors = load_file(str(bnb_models["int8"] / "model.safetensors"))
    dequantized = {k.removesuffix(".SCB") + ".weight": tensors[k.removesuffix(".SCB") + ".weight"].float() * (tensors[k] / 127)[:, None]
                   for k in tensors if k.endswith(".SCB")}
    reference = tmp_path / "int8-dequantized"
    reference.mkdir()
    float_tensors = load_file(str(tiny_models["llama"] / "model.safetensors"))
    save_file({**float_tensors, **dequantized}, str(reference / "model.safetensors"), metadata={"format": "pt"})
    for path in tiny_models["llama"].iterdir():
        if path.suffix != ".safetensors":
            (reference / path.name).write_bytes(path.read_bytes())
    expected_tokens, expected_logits = reference_rows(reference, {}, PROMPTS, [None] * 4, STEPS)
    captured = capture_logits(monkeypatch)
    engine = make_engine(bnb_models["int8"])
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True)) for p in PROMPTS]
    engine.run_to_completion()
    for row, seq in enumerate(seqs):
        assert seq.generated_ids == expected_tokens[row]
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits[row], atol=1e-4, rtol=0)
    assert engine.runner.packed_format.describe() == "bitsandbytes int8"


def test_bitsandbytes_variants_not_served_are_refused_with_what_was_found(bnb_models, tmp_path) -> None:
    folder = bnb_models["nf4"]
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"already quantized \(bitsandbytes\); --quantize nf4 would quantize it again"):
        make_engine(folder, quantize="nf4")
    changed = tmp_path / "odd"
    changed.mkdir()
    for path in folder.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "config.json").write_text(json.dumps({**config, "quantization_config": {**config["quantization_config"], "bnb_4bit_quant_type": "int4"}}))
    with pytest.raises(CheckpointError, match=r"bitsandbytes 4-bit quant type 'int4' is not served; nf4 and fp4 are"):
        make_engine(changed)


def test_lorafleet_serve_says_what_it_serves(bnb_models, tmp_path) -> None:
    import httpx
    from support.server import RunningServer

    with RunningServer(bnb_models["nf4-double"], tmp_path, tmp_path / "cache") as server:
        info = httpx.get(server.url + "/info").json()
        answer = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert info["quantize"] == "bitsandbytes nf4" and info["quantize_group_size"] is None and answer.status_code == 200


@pytest.mark.slow
def test_smollm2_as_bitsandbytes_makes_it_and_quantized_at_load_agrees_with_transformers_nf4(smollm2_path, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False))
               for q in ("What is the capital of France?", "List three prime numbers.")]
    steps = 8
    for folder, quantize in ((bnb_checkpoint(smollm2_path, tmp_path / "double", double_quant=True), None),
                             (smollm2_path, "nf4")):  # the reference for --quantize nf4: transformers' NF4 of the float model
        reference = folder if quantize is None else bnb_checkpoint(smollm2_path, tmp_path / "nf4")
        expected_tokens, expected_logits = reference_rows(reference, {}, prompts, [None] * len(prompts), steps)
        captured = capture_logits(monkeypatch)
        engine = make_engine(folder, quantize=quantize, kv_cache_memory=1 << 24)
        seqs = [engine.add_request(p, SamplingParams(max_new_tokens=steps, ignore_eos=True)) for p in prompts]
        engine.run_to_completion()
        for row, seq in enumerate(seqs):
            assert seq.generated_ids == expected_tokens[row], (quantize, row)
            # Logits of magnitude ~20 summed over 576 and 1536 inputs in another order: 1e-3.
            torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits[row], atol=1e-3, rtol=0)
        assert engine.runner.model.nbytes < 0.6 * 651e6
