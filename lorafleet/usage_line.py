"""The line a replica's stream ends with to state its usage, which the gateway reads to charge the caller's tenant.

A streamed answer's generated tokens are known only at its end, after the headers (which carry the prompt's count,
``x-prompt-tokens``) are gone; HTTP trailers do not pass through ASGI servers and proxies. So the replica writes an
SSE comment just before the stream's end — a line starting with ``:``, which every SSE client ignores by the spec
(the OpenAI and LoRAX clients included) — and the gateway looks for it in the chunks it relays.
"""

from __future__ import annotations

PREFIX = b": lorafleet-usage generated="


def usage_comment(generated: int) -> str:
    return f"{PREFIX.decode()}{generated}\n\n"


def generated_in(chunk: bytes) -> int | None:
    """The generated-token count a chunk states, if it holds the usage comment."""
    at = chunk.find(PREFIX)
    if at < 0:
        return None
    digits = chunk[at + len(PREFIX): chunk.find(b"\n", at)]
    return int(digits) if digits.isdigit() else None
