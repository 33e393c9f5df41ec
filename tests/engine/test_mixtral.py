"""Mixtral-style sparse MoE: greedy tokens and logits equal transformers', and attention adapters in a mixed
batch equal peft's; adapters on the experts are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from support.engine import capture_logits, make_engine
from support.quantize import dequantized_copy
from transformers import AutoModelForCausalLM

from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.lora.adapter_format import AdapterError
from lorafleet.testing import make_lora_adapter, make_tiny_model, reference_greedy

STEPS = 6
PROMPTS = [[1] + [(11 * i + 7 * j) % 290 + 5 for j in range(n)] for i, n in enumerate([5, 13, 9, 20, 3])]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("mixtral") / "m", arch="mixtral", seed=5)


def greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:  # noqa: ANN001
    tokens, logits = reference_greedy(model, prompt, STEPS)
    return tokens, torch.stack(logits)


def test_greedy_and_logits_equal_transformers(mixtral: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()
    captured = capture_logits(monkeypatch)
    engine = make_engine(mixtral, max_batch_prefill_tokens=8)  # chunked prefill, staggered by the budget
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True)) for p in PROMPTS]
    engine.run_to_completion()
    for prompt, seq in zip(PROMPTS, seqs):
        tokens, logits = greedy(reference, prompt)
        assert seq.generated_ids == tokens
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), logits, atol=1e-4, rtol=0)
    assert engine.runner.model.is_moe and engine.runner.decode_graphs is None


def test_a_mixed_batch_of_attention_adapters_equals_peft(mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapters = {"qv": make_lora_adapter(mixtral, tmp_path / "qv", r=8, seed=1, target_modules=["q_proj", "v_proj"]),
                "qkvo": make_lora_adapter(mixtral, tmp_path / "qkvo", r=4, seed=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True)}
    rows = [None, "qv", "qkvo", None, "qv"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32), adapters["qv"], adapter_name="qv")
    model.load_adapter(adapters["qkvo"], adapter_name="qkvo")
    model.eval()
    captured = capture_logits(monkeypatch)
    engine = make_engine(mixtral, max_active_adapters=4, max_lora_rank=16)
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True), adapter=a) for p, a in zip(PROMPTS, rows)]
    engine.run_to_completion()
    for prompt, adapter, seq in zip(PROMPTS, rows, seqs):
        if adapter is None:
            with model.disable_adapter():
                tokens, logits = greedy(model, prompt)
        else:
            model.set_adapter(adapter)
            tokens, logits = greedy(model, prompt)
        assert seq.generated_ids == tokens, adapter
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), logits, atol=1e-4, rtol=0)


def test_adapters_on_the_experts_are_refused_with_the_reason(mixtral: Path, tmp_path: Path) -> None:
    """peft's layout for Mixtral's per-expert Linear modules (transformers 4.x), written exactly."""
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["w1", "w2", "w3"],
                                                            "base_model_name_or_path": str(mixtral)}))
    tensors = {f"base_model.model.model.layers.0.block_sparse_moe.experts.0.{w}.lora_{ab}.weight": torch.zeros(4, 64) if ab == "A" else torch.zeros(64, 4)
               for w in ("w1", "w2", "w3") for ab in "AB"}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    engine = make_engine(mixtral, max_active_adapters=2, max_lora_rank=16)
    with pytest.raises(AdapterError, match=r"LoRA on mixture-of-experts expert MLPs \(\['w1', 'w2', 'w3'\]\) is not served"):
        engine.load_adapter("experts", folder)
    dense_mlp = make_lora_adapter(make_tiny_model(tmp_path / "llama"), tmp_path / "mlp", r=4, target_modules=["gate_proj"])
    with pytest.raises(AdapterError, match="LoRA on 'gate_proj' is not supported; targets must be among"):
        engine.load_adapter("mlp", dense_mlp)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_mixtral_matches_its_dequantized_reference(mixtral: Path, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts are most of a MoE model's weights: they are quantized like any projection."""
    reference = AutoModelForCausalLM.from_pretrained(dequantized_copy(mixtral, tmp_path / "reference", method, 32), dtype=torch.float32).eval()
    captured = capture_logits(monkeypatch)
    full, quantized = make_engine(mixtral), make_engine(mixtral, quantize=method, quantize_group_size=32)
    assert quantized.runner.model.nbytes < full.runner.model.nbytes / (2 if method == "int8" else 2.5)  # embeddings and the head stay float32
    seq = quantized.add_request(PROMPTS[1], SamplingParams(max_new_tokens=STEPS, ignore_eos=True))
    quantized.run_to_completion()
    tokens, logits = greedy(reference, PROMPTS[1])
    assert seq.generated_ids == tokens
    torch.testing.assert_close(torch.stack(captured[seq.request_id]), logits, atol=1e-3, rtol=0)
