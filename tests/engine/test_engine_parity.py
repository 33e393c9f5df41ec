"""The engine's logits and greedy tokens against transformers, alone and inside mixed batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.engine import capture_logits, make_engine
from transformers import AutoModelForCausalLM

from lorafleet.server.engine import runner as runner_module
from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.model import linear as linear_module
from lorafleet.server.model.checkpoint import CheckpointError
from lorafleet.testing import make_tiny_model, reference_greedy

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1] + list(range(30, 53)), [1, 99]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("linear_kernel", ["torch", "onednn"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "llama-tied"])
def test_every_step_logits_match_transformers(tiny_models: dict[str, Path], arch: str, linear_kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both weight layouts: F.linear (cuda's) and oneDNN's packed weights (CPU's default), qwen2's biases included."""
    captured = capture_logits(monkeypatch)
    monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)  # the fixtures' layers are below the packing threshold
    # max_batch_prefill_tokens=16 forces chunked prefill of the long prompt
    engine = make_engine(tiny_models[arch], max_batch_prefill_tokens=16, linear_kernel=linear_kernel)
    packed = linear_module.OneDnnLinear if linear_kernel == "onednn" else linear_module.DenseLinear
    assert engine.runner.linear_kernel == linear_kernel and isinstance(engine.runner.model.layers[0].qkv, packed) and isinstance(engine.runner.model.lm_head, packed)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.run_to_completion()
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    for prompt, seq in zip(PROMPTS, seqs):
        tokens, logits = reference_greedy(reference, prompt, GREEDY.max_new_tokens)
        assert seq.generated_ids == tokens
        for ours, theirs in zip(captured[seq.request_id], logits):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_logits_are_within_tolerance_of_transformers(tiny_models: dict[str, Path], arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 (what `--dtype auto` picks on CPUs with AMX): the same mixed, chunked batch as above.

    Rounding differs from transformers' op for op, so tokens may diverge; the check is on the logits
    of the tokens this engine chose, teacher-forced through transformers in bfloat16. Measured: at most
    0.034 apart with logits up to 3.4 in size; the tolerance is 0.08 (float32 paths are at 1e-4).
    """
    captured = capture_logits(monkeypatch)
    engine = make_engine(tiny_models[arch], dtype="bfloat16", max_batch_prefill_tokens=16)
    assert engine.runner.dtype == torch.bfloat16 and engine.runner.kv.keys[0].dtype == torch.bfloat16
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.run_to_completion()
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.bfloat16)
    for prompt, seq in zip(PROMPTS, seqs):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + seq.generated_ids])).logits[0].float()
        theirs = logits[len(prompt) - 1 : len(prompt) - 1 + GREEDY.max_new_tokens]
        torch.testing.assert_close(torch.stack(captured[seq.request_id]), theirs, atol=0.08, rtol=0)


def test_a_sliding_window_that_acts_matches_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture's window (4096) never acts on short prompts; a window of 6 acts in prefill (whole and chunked) and decode."""
    folder = make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=6)
    captured = capture_logits(monkeypatch)
    engine = make_engine(folder, max_batch_prefill_tokens=8)  # the 24-token prompt is prefilled in chunks
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.run_to_completion()
    windowed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for prompt, seq in zip(PROMPTS, seqs):
        tokens, logits = reference_greedy(windowed, prompt, GREEDY.max_new_tokens)
        assert seq.generated_ids == tokens
        for ours, theirs in zip(captured[seq.request_id], logits):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # The window really acts: without it the long prompt's logits differ.
    unwindowed = make_tiny_model(tmp_path / "full", arch="mistral", sliding_window=None)
    _, full_logits = reference_greedy(AutoModelForCausalLM.from_pretrained(unwindowed, dtype=torch.float32), PROMPTS[2], 1)
    assert not torch.allclose(full_logits[0], captured[seqs[2].request_id][0], atol=1e-3)


@pytest.mark.parametrize(("units", "picked", "why"), [
    ({"_is_amx_tile_supported", "_is_avx512_bf16_supported"}, torch.bfloat16, "AMX"),
    ({"_is_avx512_bf16_supported"}, torch.float32, "AVX512-BF16 but no AMX"),  # this machine: bfloat16 measured 0.83x float32
    (set(), torch.float32, "no bfloat16 units"),
])
def test_dtype_auto_picks_bfloat16_only_where_the_cpu_has_amx(monkeypatch: pytest.MonkeyPatch, units: set[str], picked: torch.dtype,
                                                               why: str) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runner_module, "cpu_probe", lambda name: name in units)
    dtype, reason = runner_module.resolve_dtype("auto", cpu, "float32")
    assert dtype == picked and why in reason
    assert runner_module.resolve_dtype("float32", cpu, None) == (torch.float32, "--dtype")
    assert runner_module.resolve_dtype("bfloat16", cpu, None)[0] == torch.bfloat16  # forced either way
    assert runner_module.resolve_dtype("auto", cuda, "float16")[0] == torch.float16
    assert runner_module.resolve_dtype("auto", cuda, None)[0] == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        runner_module.resolve_dtype("fp8", cpu, None)


def test_arrivals_at_different_steps_do_not_change_greedy_tokens(tiny_models: dict[str, Path]) -> None:
    alone = []
    for prompt in PROMPTS:
        engine = make_engine(tiny_models["llama"])
        seq = engine.add_request(prompt, GREEDY)
        engine.run_to_completion()
        alone.append(seq.generated_ids)
    engine = make_engine(tiny_models["llama"])
    seqs = []
    for prompt in PROMPTS:  # one new arrival every two steps, joining a running batch
        seqs.append(engine.add_request(prompt, GREEDY))
        engine.step()
        engine.step()
    engine.run_to_completion()
    assert [s.generated_ids for s in seqs] == alone


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ],
    ids=lambda s: s["rope_type"],
)
def test_rope_scaling_kinds_match_transformers(tmp_path: Path, rope_scaling: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # A short max_position_embeddings so that dynamic scaling really kicks in past 16 tokens.
    folder = make_tiny_model(tmp_path / "m", arch="llama", max_position_embeddings=16, rope_scaling=rope_scaling)
    captured = capture_logits(monkeypatch)
    engine = make_engine(folder)
    prompt = [1] + list(range(40, 52))
    seq = engine.add_request(prompt, GREEDY)
    engine.run_to_completion()
    tokens, logits = reference_greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), prompt, 12)
    assert seq.generated_ids == tokens
    for ours, theirs in zip(captured[seq.request_id], logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_unsupported_architecture_and_rope_kind_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "gpt"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture \\['GPT2LMHeadModel'\\]"):
        make_engine(folder)
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "su", "factor": 2.0}}))
    with pytest.raises(CheckpointError, match="unsupported rope_scaling type 'su'"):
        make_engine(folder)


def test_pickle_checkpoints_need_allow_pickle(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        make_engine(folder)
    engine = make_engine(folder, allow_pickle=True)
    seq = engine.add_request(PROMPTS[0], GREEDY)
    engine.run_to_completion()
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    assert seq.generated_ids == reference_greedy(reference, PROMPTS[0], 12)[0]


def test_sharded_checkpoint_loads(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_models["qwen2"] / name).exists():
            shutil.copy(tiny_models["qwen2"] / name, tmp_path / "sharded" / name)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    engine = make_engine(tmp_path / "sharded")
    seq = engine.add_request(PROMPTS[0], GREEDY)
    engine.run_to_completion()
    assert seq.generated_ids == reference_greedy(model, PROMPTS[0], 12)[0]
