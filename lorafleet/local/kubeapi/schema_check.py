"""Custom objects checked against their CRD's OpenAPI v3 schema, as a real API server refuses them (422 Invalid).

Bounds that live only in a CRD (a maxLength, a pattern, an enum) protect nothing if the API the tests and
``lorafleet up`` run against stores whatever it is sent: a 1 MB ``spec.revision`` was stored with 201. jsonschema
does the checking; the Kubernetes extensions it does not know are translated first (int-or-string, nullable) or
left out (preserve-unknown-fields: jsonschema admits unknown fields anyway; CEL rules: not evaluated here, the
operator checks what they say).
"""

from __future__ import annotations

from typing import Any

import jsonschema

OBJECT_FIELDS = ("apiVersion", "kind", "metadata")  # the API server's own, never described by a CRD's schema


def _plain(schema: Any) -> Any:
    """The schema as JSON Schema: Kubernetes extensions translated or dropped, recursively."""
    if isinstance(schema, list):
        return [_plain(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    plain = {key: _plain(value) for key, value in schema.items() if not key.startswith("x-kubernetes-") and key != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        plain.pop("type", None)
        plain["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(plain.get("type"), str):
        plain["type"] = [plain["type"], "null"]
    return plain


def schema_error(kind: str, schema: dict[str, Any] | None, obj: dict[str, Any]) -> str | None:
    """The API server's 422 message naming the first field that breaks ``schema``; None when it holds or there is none."""
    if not schema:
        return None
    plain = _plain(schema)
    plain["properties"] = {k: v for k, v in (plain.get("properties") or {}).items() if k not in OBJECT_FIELDS}
    plain["required"] = [r for r in plain.get("required") or [] if r not in OBJECT_FIELDS]
    body = {k: v for k, v in obj.items() if k not in OBJECT_FIELDS}
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(plain).iter_errors(body))
    if error is None:
        return None
    field = ".".join(str(p) for p in error.absolute_path) or "<object>"
    name = (obj.get("metadata") or {}).get("name", "")
    return f'{kind} "{name}" is invalid: {field}: {_worded(error)}'


# The API server's wording per JSON Schema keyword: {shown} is the offending value cut short, {bound} the keyword's value.
WORDING = {
    "maxLength": "Too long: may not be more than {bound} bytes",
    "minLength": "Invalid value: {shown}: should be at least {bound} chars long",
    "pattern": "Invalid value: {shown}: should match '{bound}'",
    "enum": "Unsupported value: {shown}: supported values: {choices}",
    "minimum": "Invalid value: {shown}: should be greater than or equal to {bound}",
    "maximum": "Invalid value: {shown}: should be less than or equal to {bound}",
}


def _worded(error: jsonschema.ValidationError) -> str:
    """The API server's wording, with the offending value cut short (it can be a megabyte)."""
    shown = repr(error.instance) if len(repr(error.instance)) <= 64 else repr(error.instance)[:60] + "..."
    template = WORDING.get(str(error.validator))
    if template is None:
        return error.message if len(error.message) <= 300 else error.message[:300] + "..."
    bound = error.validator_value
    choices = ", ".join(repr(v) for v in bound) if isinstance(bound, list) else ""
    return template.format(shown=shown, bound=bound, choices=choices)
