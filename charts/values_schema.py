"""Keeps the chart's values.schema.json in step with the CRDs: ``python -P charts/values_schema.py``.

The chart's own knobs are written by hand in the schema file; the shape of ``baseModel.spec`` and of each
adapter's ``spec`` is the CRDs' OpenAPI schema, turned into JSON Schema here (closed objects, so a typo
fails ``helm install`` instead of being pruned by the API server). ``--check`` only compares, for tests and CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "charts" / "lorafleet" / "values.schema.json"


def crd_spec_schema(crd_file: Path) -> dict[str, Any]:
    crd = yaml.safe_load(crd_file.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (Kubernetes' structural schema) to JSON Schema draft 7.

    Objects with declared properties are closed unless Kubernetes keeps unknown fields; boolean
    exclusiveMinimum/Maximum become numbers; CEL rules (x-kubernetes-validations) stay with the API server.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
        elif out.get(exclusive) is False:
            del out[exclusive]
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def generated_defs() -> dict[str, Any]:
    adapter = to_json_schema(crd_spec_schema(ROOT / "crds" / "adapters.yaml"))
    # In values the adapter's baseModel defaults to baseModel.name.
    adapter["required"] = [field for field in adapter.get("required", []) if field != "baseModel"]
    return {"baseModelSpec": to_json_schema(crd_spec_schema(ROOT / "crds" / "basemodels.yaml")), "adapterSpec": adapter}


def rendered() -> str:
    schema = json.loads(SCHEMA.read_text())
    schema["$defs"] = {**schema.get("$defs", {}), **generated_defs()}
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = rendered()
    if SCHEMA.read_text() == text:
        return 0
    if "--check" in argv:
        print(f"{SCHEMA} is out of date with crds/: run make chart-schema", file=sys.stderr)
        return 1
    SCHEMA.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
