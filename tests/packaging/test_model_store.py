"""The model store: a folder counts as done only when its manifest checks out."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet import model_store


def test_manifest_detects_truncation_and_corruption(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert "no lorafleet-manifest.json" in model_store.verify_manifest(tmp_path)
    model_store.write_manifest(tmp_path)
    assert model_store.verify_manifest(tmp_path) is None

    (tmp_path / "model.safetensors").write_bytes(b"x" * 999)
    assert "has 999 bytes, expected 1000" in model_store.verify_manifest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 1000)
    assert "does not match its recorded sha256" in model_store.verify_manifest(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert "is missing" in model_store.verify_manifest(tmp_path)


def test_resolve_refuses_an_unfinished_known_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lorafleet models fetch smollm2"):
        model_store.resolve_model("smollm2")
    assert model_store.resolve_model("/some/folder") == Path("/some/folder")


def test_fetch_is_a_no_op_when_complete(smollm2_path: Path) -> None:
    logged: list[str] = []
    assert model_store.fetch("smollm2", log=logged.append) == smollm2_path
    assert logged == []


def test_smollm2_answers_paris_with_transformers(smollm2_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
