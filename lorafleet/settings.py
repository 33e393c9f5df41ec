"""Settings declared once, as dataclass fields, and everything else read from those declarations. Torch-free.

A field made with ``setting(...)`` carries its help text, its parser and, when a BaseModel may set it, its CRD schema.
From that one declaration come the command's flag (``--max-lora-rank``), its environment variable
(``LORAFLEET_MAX_LORA_RANK``, parsed exactly as the flag is), the value the config object gets, what ``/info``
reports, and the CRD property (``maxLoraRank``) that ``make crd-schema`` writes into crds/basemodels.yaml; the
operator turns that property back into the flag by the same naming rule (``flag_for_property``). Adding a setting
is one field. Before this, one engine setting took seven hand edits (the field, a flag table row, the args-to-config
list, ``/info``, the CRD, the operator's flag map and a test's map).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any

ENV_PREFIX = "LORAFLEET_"


def setting(default: Any = MISSING, *, help: str, parse: Callable[[str], Any] | None = str, flag: str | None = None,  # noqa: A002
            multiple: bool = False, crd: dict[str, Any] | None = None, secret: bool = False, default_factory: Any = MISSING) -> Any:
    """A dataclass field that is also a flag. ``parse=None`` makes a switch (``--x``, and ``--no-x`` when on by default);
    ``multiple`` a repeatable flag (a comma-separated list in the environment); ``crd`` the BaseModel's schema for it
    (under ``spec.engine``); ``secret`` keeps it out of ``/info``."""
    metadata = {"help": help, "parse": parse, "flag": flag, "multiple": multiple, "crd": crd, "secret": secret}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def declared(config: type) -> list[Field]:
    """The fields of ``config`` made with ``setting``."""
    return [f for f in fields(config) if "help" in f.metadata]


def flag_of(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def env_of(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, *configs: type) -> None:
    """One flag per declared field of ``configs``, each with its LORAFLEET_ variable (which the command line overrides)."""
    for config in configs:
        for f in declared(config):
            _add_flag(parser, f)


def _add_flag(parser: argparse.ArgumentParser, f: Field) -> None:
    flag, parse, multiple, default = flag_of(f), f.metadata["parse"], f.metadata["multiple"], default_of(f)
    env = env_of(flag)
    raw = os.environ.get(env)
    if parse is None:  # a switch
        value = raw.lower() in ("1", "true", "yes") if raw is not None else default
        action, shown = (argparse.BooleanOptionalAction, " (default: on)") if default else ("store_true", "")
        parser.add_argument(flag, dest=f.name, action=action, default=value, help=f"{f.metadata['help']}{shown} [env {env}]")
        return
    value = default
    if raw is not None:
        try:
            value = [parse(v) for v in raw.split(",") if v] if multiple else parse(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{env}={raw!r}: {exc}")
    shown = f" (default: {default})" if default not in (None, []) else ""
    if multiple:
        parser.add_argument(flag, dest=f.name, type=parse, action="append", default=None, help=f"{f.metadata['help']}{shown} [env {env}]")
        parser.set_defaults(**{f.name: value or []})
    else:
        parser.add_argument(flag, dest=f.name, type=parse, default=value, help=f"{f.metadata['help']}{shown} [env {env}]")


def values(config: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``config`` that its flags parsed (a repeated flag given once or never is a list)."""
    found = {}
    for f in declared(config):
        value = getattr(args, f.name)
        found[f.name] = list(value or []) if f.metadata["multiple"] else value
    return found


def public(config: Any) -> dict[str, Any]:
    """The declared settings of a config object as ``/info`` shows them: paths as text, secrets left out."""
    shown = {}
    for f in declared(type(config)):
        if f.metadata["secret"]:
            continue
        value = getattr(config, f.name)
        shown[f.name] = [str(v) for v in value] if isinstance(value, list) else value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return shown


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def crd_properties(*configs: type) -> dict[str, dict[str, Any]]:
    """The BaseModel's ``spec.engine`` properties: every declared field with a ``crd`` schema, by its camelCase name."""
    return {camel(f.name): f.metadata["crd"] for config in configs for f in declared(config) if f.metadata["crd"] is not None}


def flag_for_property(name: str) -> str:
    """``maxLoraRank`` -> ``--max-lora-rank``: the inverse of ``camel`` for a setting's flag (the operator's side)."""
    return "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


# -- parsers ------------------------------------------------------------------------------------


def size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024); "1.5G", "512Mi", "2GiB" and "1.5" all parse,
    as the BaseModel CRD's pattern for engine.adapterMemory admits them."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def non_negative_of(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """As ``positive``, with 0 allowed (NaN is not)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


non_negative = non_negative_of(int)


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    parse.__name__ = "choice"
    return parse


def optional(text: str) -> str | None:
    """A string where an empty one means unset (an environment variable set to "" from an absent Secret key)."""
    return text or None
