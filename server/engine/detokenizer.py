"""Incremental detokenization and stop-sequence matching on decoded text.

A byte-level tokenizer can split one character over several tokens; decoding each token alone
would stream replacement characters. Each step decodes a short window of recent tokens and emits
only the text that has become final (the windowed approach of TGI and vLLM), so a stream never
carries broken UTF-8. Stop sequences are matched on the text, so they are found even when they
span token boundaries.
"""

from __future__ import annotations

from typing import Any

from lorafleet.server.engine.sequence import Sequence


def next_text(tokenizer: Any, seq: Sequence) -> str:
    """The new, complete text that the sequence's latest token adds (possibly empty)."""
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return full[len(prefix) :]
    return ""


def flush_text(tokenizer: Any, seq: Sequence) -> str:
    """Whatever text is still held back when the sequence ends (an incomplete character, decoded as is)."""
    ids = seq.token_ids
    if seq.read_offset >= len(ids):
        return ""
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
    seq.prefix_offset = seq.read_offset = len(ids)
    return full[len(prefix) :]


def find_stop(text: str, new_len: int, stops: list[str]) -> int | None:
    """End index of the earliest stop sequence that the last ``new_len`` characters completed."""
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        start = max(0, len(text) - new_len - len(stop) + 1)
        found = text.find(stop, start)
        if found >= 0 and (best is None or found + len(stop) < best):
            best = found + len(stop)
    return best
