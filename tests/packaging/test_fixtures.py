"""The tiny fixtures are real Hugging Face folders that transformers and peft load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.testing import make_lora_adapter


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "llama-tied"])
def test_tiny_model_loads_and_generates(tiny_models: dict[str, Path], arch: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_tokenizer_splits_multibyte_characters(tiny_models: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = "emoji 🚀 Grüße"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces), "no token boundary inside a multi-byte character"
    assert tokenizer.decode(ids) == text


def test_adapter_changes_the_logits(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    adapter = make_lora_adapter(tiny_models["llama"], tmp_path / "a", r=4, target_modules=["q_proj", "down_proj"], use_rslora=True)
    assert (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, adapter)
    assert peft_model.peft_config["default"].use_rslora
    assert not torch.allclose(peft_model(ids).logits, base_logits, atol=1e-3)
