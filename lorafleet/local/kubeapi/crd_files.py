"""Reading CustomResourceDefinitions from YAML files (one or several documents per file)."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_crds(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise ValueError(f"--crds {folder} is not a folder")
    crds = []
    for path in sorted(folder.glob("*.y*ml")):
        if path.name in ("kustomization.yaml", "kustomization.yml"):
            continue  # the same folder serves `kubectl apply -k`
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            if document.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{path}: expected CustomResourceDefinition documents, found {document.get('kind')!r}")
            crds.append(document)
    return crds
