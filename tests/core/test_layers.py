"""The rooms are layers: every import between rooms points down this list, so no two rooms import each other.

The review of round 3 found three cycles (engine<->model through the KV cache, adapters<->lora through AdapterRef,
errors<->adapters); this holds the fix. Imports are read from the source (ast), so a function-level import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"server": "lorafleet.server", "gateway": "lorafleet.gateway", "operator": "lorafleet.operator", "lorafleet": "lorafleet"}
# Lowest first. A room may import only rooms above it in this list (and itself). "core" is lorafleet/*.py: torch-free,
# shared by all three processes.
LAYERS = [
    ["core"],
    ["server.config", "server.errors", "server.background", "gateway", "operator"],
    ["server.model", "server.serve_config", "local"],
    ["server.lora"],
    ["server.adapters"],
    ["server.engine"],
    ["server.api"],
    ["server.main"],
    ["cli", "testing"],
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
TOP_LEVEL = {"cli": "cli", "__main__": "cli", "testing": "testing"}


def room_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["lorafleet", "server"] and len(parts) > 2:
        return f"server.{parts[2]}"
    if len(parts) > 1 and parts[1] in ("gateway", "operator", "local"):
        return parts[1]
    if len(parts) > 1 and parts[1] in TOP_LEVEL:
        return TOP_LEVEL[parts[1]]
    return "core"


def imports() -> list[tuple[str, str, str]]:
    """(importing room, imported room, file) for every lorafleet import that crosses rooms."""
    found = []
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            if folder == "lorafleet" and relative.parts[0] in ("server", "gateway", "operator"):
                continue
            source = room_of(".".join([package, *relative.parts]))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafleet"):
                    targets = [f"{node.module}.{a.name}" for a in node.names] if node.module.count(".") < 2 else [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.startswith("lorafleet")]
                else:
                    continue
                for target in targets:
                    room = room_of(target)
                    if room != source:
                        found.append((source, room, str(path.relative_to(ROOT))))
    return found


def test_every_import_between_rooms_points_down_the_layers() -> None:
    edges = imports()
    assert edges  # the walk found the imports
    unknown = sorted({room for edge in edges for room in edge[:2] if room not in RANK})
    assert not unknown, f"rooms missing from LAYERS: {unknown}"
    upward = sorted(f"{file}: {source} imports {target}" for source, target, file in edges if RANK[target] >= RANK[source])
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
