"""bitsandbytes checkpoints made the way users make them: transformers + BitsAndBytesConfig on the CPU, save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def bnb_checkpoint(folder: Path, out: Path, bits: int = 4, quant_type: str = "nf4", double_quant: bool = False) -> Path:
    """The float checkpoint ``folder`` quantized by bitsandbytes and saved with save_pretrained into ``out``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                 bnb_4bit_compute_dtype=torch.float32) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32, device_map="cpu")
    model.save_pretrained(out)
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (folder / extra).is_file() and not (out / extra).is_file():
            (out / extra).write_bytes((folder / extra).read_bytes())
    return out


def requantized(folder: Path, out: Path, blocksize: int) -> Path:
    """A 4-bit checkpoint re-quantized with another block size, each quant_state saying so (transformers' config
    cannot choose one; bitsandbytes' own quantize_4bit can)."""
    import bitsandbytes.functional as bnbf

    out.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.suffix != ".safetensors":
            (out / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".quant_state.bitsandbytes__nf4")]:
        name = key.removesuffix(".quant_state.bitsandbytes__nf4")
        state = json.loads(bytes(tensors[key].tolist()).decode())
        weight = bnbf.dequantize_4bit(tensors[name], bnbf.QuantState.from_dict(
            {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}, device=torch.device("cpu")))
        assert tuple(weight.shape) == tuple(state["shape"])
        packed, quant_state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
        for k in [k for k in tensors if k.startswith(name + ".")]:
            del tensors[k]
        tensors[name] = packed
        tensors.update({f"{name}.{k}": v for k, v in quant_state.as_dict(packed=True).items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
