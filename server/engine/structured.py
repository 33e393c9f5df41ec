"""Structured output: decoding constrained to a JSON schema (or to any JSON object).

Built on xgrammar, the grammar engine vLLM, SGLang and TensorRT-LLM use: it compiles a JSON
schema against the tokenizer's vocabulary once, then per step fills a bitmask of the tokens that
keep the output valid, cheaply enough to run on every step of a CPU batch. Its own
implementation is well tested against JSON Schema; writing our own would not be.
Whitespace is kept compact so a small model cannot wander off into endless indentation.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from lorafleet.server.engine.grammar_mask import MASK_BUDGET_S, Constraint, GrammarTooCostly
from lorafleet.server.engine.grammar_worker import CompileTimeout, GrammarWorkers

TIMED_OUT_REMEMBERED = 1024
TOO_COSTLY_REMEMBERED = 1024


class GrammarCompiler:
    """Compiles response formats for one tokenizer; keeps the last few compiled schemas."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = 64) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        self._info = info
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._timed_out: OrderedDict[str, None] = OrderedDict()  # schemas that ran past their budget: refused at once
        self._too_costly: OrderedDict[str, None] = OrderedDict()  # grammars whose masks ran past MASK_BUDGET_S: likewise
        self._workers: GrammarWorkers | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _key(response_format: dict) -> str:
        if response_format.get("type") == "json_object" and not response_format.get("schema"):
            return "json_object"
        return json.dumps(response_format.get("schema"), sort_keys=True)

    def compile_isolated(self, response_format: dict, timeout: float, workers: int = 2) -> Any:
        """Compile in a worker process within ``timeout`` (killed past it: CompileTimeout), so a schema that compiles
        for minutes never holds a thread; the HTTP layer calls this before a request reaches the engine."""
        import xgrammar as xgr

        key = self._key(response_format)
        with self._lock:
            self._refuse_if_too_costly(key)
            compiled = self._cached(key)
            if compiled is not None:
                return compiled
            if key in self._timed_out:
                raise CompileTimeout(f"did not compile within {timeout:g}s before (refused without trying again)")
            if self._workers is None:
                self._workers = GrammarWorkers(self._info.serialize_json(), workers)
        schema = '{"type": "object"}' if key == "json_object" else key
        try:
            serialized = self._workers.compile(schema, timeout)
        except CompileTimeout:
            with self._lock:
                self._timed_out[key] = None
                while len(self._timed_out) > TIMED_OUT_REMEMBERED:
                    self._timed_out.popitem(last=False)
            raise
        except ValueError as exc:
            raise ValueError(f"`response_format` schema is not valid: {exc}") from exc
        return self._remember(key, xgr.CompiledGrammar.deserialize_json(serialized, self._info))

    def _cached(self, key: str) -> Any:
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
        return compiled

    def _remember(self, key: str, compiled: Any) -> Any:
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()

    def compile(self, response_format: dict) -> Any:
        """The compiled grammar of a response format, from the cache when it was compiled before.

        Compiling can take seconds for a hostile schema, so the HTTP layer calls this in a worker
        thread before the request reaches the engine; the engine thread then only finds it here.
        """
        key = self._key(response_format)
        with self._lock:
            compiled = self._cached(key)
            if compiled is not None:
                return compiled
        try:
            # json_object means an object (OpenAI's contract), not any JSON value.
            schema = '{"type": "object"}' if key == "json_object" else key
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as exc:  # xgrammar reports schema errors as RuntimeError
            raise ValueError(f"`response_format` schema is not valid: {str(exc).splitlines()[-1]}") from exc
        return self._remember(key, compiled)

    def constraint(self, response_format: dict) -> Constraint:
        key = self._key(response_format)
        with self._lock:
            self._refuse_if_too_costly(key)
        return Constraint(self.compile(response_format), self.vocab_size, lambda: self._remember_too_costly(key))

    def _refuse_if_too_costly(self, key: str) -> None:
        if key in self._too_costly:
            raise GrammarTooCostly(f"the response_format's grammar took more than {MASK_BUDGET_S * 1000:.0f} ms a token before "
                                   "(refused without trying again): simplify its patterns")

    def _remember_too_costly(self, key: str) -> None:
        with self._lock:
            self._too_costly[key] = None
            while len(self._too_costly) > TOO_COSTLY_REMEMBERED:
                self._too_costly.popitem(last=False)


def validate_response_format(value: Any) -> dict | None:
    """Normalise TGI's ``{"type", "schema"}`` and OpenAI's ``{"type": "json_schema", "json_schema": {"schema"}}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("`response_format` must be a JSON object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise ValueError(f"`response_format.type` must be json_object or json_schema. Given: {kind!r}")
    schema = value.get("schema")
    if schema is None and isinstance(value.get("json_schema"), dict):
        schema = value["json_schema"].get("schema")
    if kind == "json_schema" and not isinstance(schema, dict):
        raise ValueError("`response_format` of type json_schema needs a `schema` object")
    if schema is not None and not isinstance(schema, dict):
        raise ValueError("`response_format.schema` must be a JSON object")
    return {"type": kind, "schema": schema}
