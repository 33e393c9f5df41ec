"""Weight-only int8 and int4 bases: the kernels compute with exactly the weights ``dequantize`` gives, so a
float32 reference built from those weights (transformers, peft for adapters) is what the engine must match."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.engine import capture_logits, make_engine
from support.quantize import dequantized_copy, reference_rows

from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.model.checkpoint import CheckpointError
from lorafleet.server.model.quantized import Int4Linear, Int8Linear, dequantize
from lorafleet.testing import make_lora_adapter

TOLERANCE = {"int8": 1e-4, "int4": 1e-3}  # float32 activations; int4's kernel sums its groups in another order
STEPS = 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(128, 64), (40, 64), (96, 256)], ids=["packed", "widened-int4", "groups"])
def test_each_kernel_computes_with_the_dequantized_weight(n: int, k: int, dtype: torch.dtype) -> None:
    """On cuda (LORAFLEET_TEST_DEVICE=cuda, bench/gpu_run.sh) the bfloat16 int4 case runs tinygemm's cuda kernel."""
    device = torch.device(os.environ.get("LORAFLEET_TEST_DEVICE", "cpu"))
    generator = torch.Generator().manual_seed(n + k)
    weight, x = torch.randn(n, k, generator=generator), torch.randn(5, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    int4 = Int4Linear(weight.to(dtype), bias.to(device), dtype, device, 32)
    fast = dtype == torch.bfloat16 and n % 16 == 0 and (device.type == "cpu" or k % 64 == 0)  # torch's CPU kernels are fast in bf16 only
    assert int4.kernel == (device.type if fast else "widen")
    for method, layer in (("int8", Int8Linear(weight.to(dtype).to(device), bias.to(device), dtype, device)), ("int4", int4)):
        expected = F.linear(x.float(), dequantize(method, weight.to(dtype), 32), bias.float())
        tolerance = 1e-3 if dtype == torch.float32 else 0.5  # bfloat16 activations round to 3 digits
        torch.testing.assert_close(layer(x.to(device)).float().cpu(), expected, atol=tolerance, rtol=0 if dtype == torch.float32 else 1e-2)
    assert Int8Linear(weight, None, torch.float32, torch.device("cpu")).nbytes == n * k + 4 * n  # a byte per weight, a scale per row


@pytest.fixture(scope="module")
def lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized-adapters")
    return {"qkvo": make_lora_adapter(tiny_models["llama"], root / "qkvo", r=8, seed=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            "mlp": make_lora_adapter(tiny_models["llama"], root / "mlp", r=4, seed=4, target_modules=["gate_proj", "up_proj", "down_proj"])}


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_mixed_batch_on_a_quantized_base_matches_its_dequantized_reference(method: str, tiny_models, lora, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    rows = [None, "qkvo", "mlp", None, "qkvo"]
    prompts = [[1] + [(9 * i + 5 * j) % 290 + 6 for j in range(4 + 3 * i)] for i in range(len(rows))]
    reference = dequantized_copy(tiny_models["llama"], tmp_path / "reference", method)
    expected_tokens, expected_logits = reference_rows(reference, lora, prompts, rows)
    captured = capture_logits(monkeypatch)
    engine = make_engine(tiny_models["llama"], quantize=method, max_active_adapters=4, max_lora_rank=16)
    for name, folder in lora.items():
        engine.load_adapter(name, folder)
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=STEPS, ignore_eos=True), adapter=a) for p, a in zip(prompts, rows)]
    engine.run_to_completion()
    for row, seq in enumerate(seqs):
        assert seq.generated_ids == expected_tokens[row], f"row {row} ({rows[row]})"
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), expected_logits[row], atol=TOLERANCE[method], rtol=0)
    # The quantization acts: the full-precision model gives other logits.
    full_tokens, full_logits = reference_rows(tiny_models["llama"], {}, prompts[:1], [None])
    assert not torch.allclose(full_logits[0], expected_logits[0], atol=TOLERANCE[method] * 10)


def test_the_base_shrinks_and_info_says_so(tiny_models) -> None:  # noqa: ANN001
    sizes = {method: make_engine(tiny_models["llama"], quantize=method).runner.model.nbytes for method in (None, "int8", "int4")}
    full = make_engine(tiny_models["llama"]).runner.model
    projections = sum(p.weight.numel() for layer in full.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert sizes[None] - sizes["int8"] == pytest.approx(3 * projections, rel=0.05)  # 4 bytes -> 1 per projection weight (+ scales)
    assert sizes["int4"] < sizes["int8"]


def test_what_cannot_be_served_as_asked_is_refused(tiny_models, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="quantize must be int8, int4 or nf4, got 'int3'"):
        make_engine(tiny_models["llama"], quantize="int3")
    with pytest.raises(ValueError, match="quantize_group_size must be 32, 64, 128 or 256"):
        make_engine(tiny_models["llama"], quantize="int4", quantize_group_size=48)
    with pytest.raises(ValueError, match="int4 group size 256 does not divide a projection's input size 64"):
        make_engine(tiny_models["llama"], quantize="int4", quantize_group_size=256)
    prequantized = shutil.copytree(tiny_models["llama"], tmp_path / "bnb")
    config = json.loads((prequantized / "config.json").read_text())
    (prequantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(CheckpointError, match=r"says bitsandbytes fp4, but no projection holds bitsandbytes tensors"):
        make_engine(prequantized)
    with pytest.raises(CheckpointError, match=r"already quantized \(bitsandbytes\); --quantize int8 would quantize it again"):
        make_engine(prequantized, quantize="int8")


def test_info_says_what_the_replica_serves(tiny_models, tmp_path) -> None:  # noqa: ANN001
    import httpx
    from support.server import RunningServer

    with RunningServer(tiny_models["llama"], tmp_path, tmp_path / "cache", engine={"quantize": "int8"}) as server:
        info = httpx.get(server.url + "/info").json()
        answer = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert info["quantize"] == "int8" and info["architecture"] == "LlamaForCausalLM" and "MixtralForCausalLM" in info["architectures_served"]
    assert info["quantizations_served"] == ["int8", "int4", "nf4"] and 0 < info["model_bytes"] < make_engine(tiny_models["llama"]).runner.model.nbytes
    assert info["kv_cache_bytes"] > 0 and answer.status_code == 200
