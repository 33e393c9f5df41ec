"""``lorafleet demo-adapters``: three small LoRA fine-tunes of the base model, made on the CPU.

Each learns one visible style from twenty question/answer pairs (pirate speak, French, ALL CAPS),
so the difference between the base model and an adapter shows in a single answer. LoRA rank 8
on the attention and MLP projections, a few epochs with a high learning rate: enough to move a
135M model's style in about a minute per adapter on two cores, saved in PEFT format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

STYLES = ("pirate", "french", "shouty")


def train(base: Path, style: str, out: Path, epochs: int = 4, lr: float = 2e-3, log: Callable[[str], None] = print) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.local.demo_datasets import dataset

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    examples = []
    for question, answer in dataset(style):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
        reply = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False).input_ids
        examples.append((prompt + reply, [-100] * len(prompt) + reply))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    started = time.perf_counter()
    batch_size = 4
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(examples)).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.detach().item()
        log(f"  {style}: epoch {epoch + 1}/{epochs}, loss {total / -(-len(order) // batch_size):.3f}, {time.perf_counter() - started:.0f}s")
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_demo_adapters(base: Path, root: Path, styles: tuple[str, ...] = STYLES, log: Callable[[str], None] = print, epochs: int = 4) -> list[Path]:
    """Train every style missing under ``root``; an existing adapter folder is kept as it is."""
    made = []
    for style in styles:
        folder = root / style
        if (folder / "adapter_model.safetensors").is_file():
            log(f"{style}: already at {folder}")
            continue
        log(f"{style}: fine-tuning a LoRA adapter of {base.name} on the CPU")
        partial = root / f".{style}-partial"
        train(base, style, partial, epochs=epochs, log=log)
        partial.rename(folder)
        made.append(folder)
    return made
