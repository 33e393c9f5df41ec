"""Tiny real checkpoints and PEFT adapters for tests and benchmarks.

Every engine test compares against transformers (+ peft) as the reference, so the fixtures are
real Hugging Face folders — config.json, safetensors, a tokenizer — just small enough (hidden 64,
two layers, grouped-query attention) that a test runs in seconds. The tokenizer is a byte-level
BPE trained in-process, so multi-byte UTF-8 characters really are split across tokens.
Imports of torch, transformers and peft stay inside the functions: the gateway and the operator
import ``lorafleet`` and must never pay for torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorafleet.adapter_rules import PROJECTIONS

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world! Bonjour le monde, ça va très bien. Grüße aus München.",
    "日本語のテキストと中文文本 and emoji 🙂🚀 mixed with ASCII text.",
    "def add(a, b):\n    return a + b\n",
    "Low-rank adapters fine-tune a large language model cheaply.",
    "Kubernetes operators reconcile desired state into running objects.",
]
ALL_PROJECTIONS = list(PROJECTIONS)  # every projection a LoRA may target


def write_tokenizer(folder: Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE tokenizer in-process and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(folder)
    return wrapped


def tiny_config(arch: str, vocab_size: int, bos_id: int, eos_id: int, **overrides: Any) -> Any:
    """A two-layer config of the given architecture with GQA (4 query heads over 2 kv heads)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        initializer_range=0.1,
    )
    if arch == "llama":
        config = LlamaConfig(**{**common, "tie_word_embeddings": False, **overrides})
    elif arch == "llama-tied":
        config = LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    elif arch == "mistral":
        config = MistralConfig(**{**common, "sliding_window": 4096, "tie_word_embeddings": False, **overrides})
    elif arch == "qwen2":
        config = Qwen2Config(**{**common, "tie_word_embeddings": True, "use_sliding_window": False, **overrides})
    elif arch == "mixtral":  # four experts of 96, two per token
        config = MixtralConfig(**{**common, "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None,
                                  "tie_word_embeddings": False, **overrides})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, llama-tied, mistral, qwen2 or mixtral")
    return config


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **config_overrides: Any) -> Path:
    """Write a random tiny checkpoint of ``arch`` (float32 safetensors + tokenizer) into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder)
    # A vocabulary larger than the tokenizer's is allowed (bench/gpu_throughput.py: SmolLM2's 49,152); ids past it decode to nothing.
    vocab_size = config_overrides.pop("vocab_size", len(tokenizer))
    config = tiny_config(arch, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers initialises norm weights to one and biases to zero; random ones prove the engine applies them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_lora_adapter(
    base_folder: Path,
    folder: Path,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: Iterable[str] | str = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    scale: float = 0.2,
    **config_overrides: Any,
) -> Path:
    """Write a random PEFT LoRA adapter with peft's own ``save_pretrained``.

    peft initialises B to zero (an adapter that changes nothing); here both A and B are random
    so that a wrong scale, slot or transpose shows up in the logits.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **config_overrides,
    )
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    folder = Path(folder)
    peft_model.save_pretrained(folder, safe_serialization=True)
    # Record what the adapter was made from, for humans reading a test's tmp folder.
    (folder / "lorafleet-fixture.json").write_text(json.dumps({"base": str(base_folder), "seed": seed}))
    return folder


def reference_greedy(model: Any, prompt: list[int], max_new_tokens: int, **forward_kwargs: Any) -> tuple[list[int], list[Any]]:
    """Greedy decoding with a transformers (or peft) model and its own KV cache, EOS not special.

    ``generate`` would suppress or stop at EOS depending on its settings; this loop is the plain
    reference: the logits of every step and the argmax tokens.
    """
    import torch

    tokens: list[int] = []
    step_logits = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True, **forward_kwargs)
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True, **forward_kwargs)
    return tokens, step_logits
