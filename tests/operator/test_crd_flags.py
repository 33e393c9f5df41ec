"""Every value the BaseModel CRD admits becomes flags the replica and the gateway accept.

The CRD (YAML), the operator (which writes the containers' args) and the two parsers are written
separately; this renders BaseModels at every engine and routing field's bounds (and a few values
inside them) through the operator and parses the args with the replica's and the gateway's own
parsers, the replica's settings validated as at start-up. It found two drifts: `loadFactor: 1.0`
was admitted and the gateway refused to start, and `adapterMemory: "1.5"` matched the CRD's pattern
and failed the replica's size parser.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorafleet import __version__
from lorafleet.cli import build_parser
from lorafleet.gateway.config import GatewayConfig
from lorafleet.operator.desired import IMAGE, gateway_deployment, serve_args
from lorafleet.server.config import EngineConfig
from lorafleet.server.serve_config import ServeConfig, serve_config_from_args

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "basemodels.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
ENGINE, ROUTING = SPEC_SCHEMA["engine"], SPEC_SCHEMA["routing"]
BATCH_DEFAULT = EngineConfig.__dataclass_fields__["max_batch_total_tokens"].default
# The CRD's CEL rules, in Python (the embedded API does not evaluate CEL): a BaseModel breaking one is refused.
RULES = {
    "self.maxInputLength < self.maxTotalTokens": lambda e: e["maxInputLength"] < e["maxTotalTokens"],
    f"(has(self.maxBatchTotalTokens) ? self.maxBatchTotalTokens : {BATCH_DEFAULT}) >= self.maxTotalTokens":
        lambda e: e.get("maxBatchTotalTokens", BATCH_DEFAULT) >= e["maxTotalTokens"],
}


def setting_of(name: str) -> str:
    """``maxLoraRank`` -> ``max_lora_rank``: the field a CRD property is generated from (lorafleet/settings.py)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def parsed_value(config: ServeConfig, name: str) -> object:
    field = setting_of(name)
    return getattr(config.engine, field) if hasattr(config.engine, field) else getattr(config, field)


def samples(schema: dict) -> list:
    """The bounds a field admits, and values inside them."""
    if "enum" in schema:
        return list(schema["enum"])
    if schema.get("type") == "boolean":
        return [True, False]
    if "pattern" in schema:
        values = ["1", "1.5", "512M", "1Gi", "2GiB", "1.5T", "64KB"]
        assert all(re.fullmatch(schema["pattern"], v) for v in values)
        return values
    low = schema.get("minimum", 1)
    if schema.get("exclusiveMinimum"):
        low = low + 0.01
    high = schema.get("maximum", 1_000_000)
    return sorted({low, schema.get("default", low), high})


def with_defaults(field: str, value: object) -> dict:
    engine = {name: schema["default"] for name, schema in ENGINE["properties"].items() if "default" in schema}
    return {**engine, field: value}


def engine_cases() -> list[tuple[str, object]]:
    """Each field at each sample, the others at their defaults, where the CRD's rules admit the result
    (maxInputLength at 1,000,000 is not below the default maxTotalTokens, say: the API server refuses it)."""
    return [(name, value) for name, schema in ENGINE["properties"].items() for value in samples(schema)
            if all(rule(with_defaults(name, value)) for rule in RULES.values())]


def test_every_cel_rule_is_known_here() -> None:
    assert sorted(r["rule"] for r in ENGINE["x-kubernetes-validations"]) == sorted(RULES)


@pytest.mark.parametrize("field,value", engine_cases(), ids=[f"{n}={v}" for n, v in engine_cases()])
def test_engine_fields_become_flags_the_replica_accepts(field: str, value: object) -> None:
    engine = with_defaults(field, value)
    args = build_parser().parse_args(serve_args({"model": {"id": "org/base"}, "engine": engine}))
    config = serve_config_from_args(args, Path("/models/base"))
    config.engine.validate()
    parsed = parsed_value(config, field)
    if field == "adapterMemory":
        assert parsed > 0
    else:
        assert parsed == value


@pytest.mark.parametrize("value", samples(ROUTING["properties"]["loadFactor"]))
def test_every_load_factor_the_crd_admits_starts_a_gateway(value: float) -> None:
    container = gateway_deployment("m", "ns", {"model": {"id": "x"}, "routing": {"loadFactor": value}})["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.load_factor == value


def test_the_crds_defaults_are_the_programs_defaults() -> None:
    serve = build_parser().parse_args(["serve"])
    for name, schema in ENGINE["properties"].items():
        if "default" in schema and name != "device":  # the CRD runs on GPUs by default, `lorafleet serve` on a laptop
            parsed = getattr(serve, setting_of(name))
            assert parsed == schema["default"], name
    assert ROUTING["properties"]["loadFactor"]["default"] == GatewayConfig().load_factor
    assert SPEC_SCHEMA["image"]["default"] == IMAGE == f"ghcr.io/lorafleet/lorafleet:{__version__}"
    operator = yaml.safe_load_all((ROOT / "manifests" / "operator.yaml").read_text())
    images = [c["image"] for doc in operator if doc and doc.get("kind") == "Deployment" for c in doc["spec"]["template"]["spec"]["containers"]]
    assert images == [IMAGE]
    assert ServeConfig.__dataclass_fields__["max_concurrent_requests"].default == ENGINE["properties"]["maxConcurrentRequests"]["default"]


def test_the_crds_engine_block_is_generated_from_the_settings() -> None:
    """One declaration per setting: every CRD engine property is a declared field with that schema, and every field
    declared with a CRD schema is a property (crds/basemodels.yaml's block is written by `make chart-schema`)."""
    from lorafleet.settings import crd_properties

    assert ENGINE["properties"] == crd_properties(EngineConfig, ServeConfig)


def test_the_operators_rank_fallback_is_the_replicas_default() -> None:
    from lorafleet.operator.config import DEFAULT_MAX_LORA_RANK

    assert DEFAULT_MAX_LORA_RANK == EngineConfig.__dataclass_fields__["max_lora_rank"].default == ENGINE["properties"]["maxLoraRank"]["default"]
