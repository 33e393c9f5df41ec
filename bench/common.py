"""Workloads shared by the benchmarks: realistic mixed prompts and output lengths, seeded."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "Explain how a hash table works, including collisions and resizing, to a new programmer.",
    "Give me three tips for a job interview.",
    "Summarize the plot of a heist movie in which nothing goes according to plan, in a few sentences.",
    "Why is the sky blue?",
    "Describe the water cycle step by step for a ten year old, with an example from everyday life.",
    "Name a famous painting.",
]


def workload(tokenizer: Any, count: int, seed: int = 0, min_new: int = 16, max_new: int = 128) -> list[tuple[list[int], int]]:
    """(prompt ids, max_new_tokens) pairs: mixed prompt lengths, output lengths spread over [min_new, max_new]."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        requests.append((ids, rng.randint(min_new, max_new)))
    return requests


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start


def rates_in_turns(cases: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Tokens/s of each case, the cases taking turns round after round (each run once first, untimed, to warm).

    This VM's speed drifts by 10-20 % within a minute; measured in turns, a drift falls on every case alike
    instead of showing up as a ratio. Report the median of each list.
    """
    for run in cases.values():
        run()
    samples: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(rounds):
        for label, run in cases.items():
            tokens, seconds = timed(run)
            samples[label].append(tokens / seconds)
    return samples


def closed_loop(engine: Any, requests: list[tuple[list[int], str | None]], concurrency: int, params: Any,
                own_rates: list[float] | None = None) -> tuple[list[list[int]], float, list[float]]:
    """``concurrency`` users, each sending its next (prompt ids, adapter) when its last request ends, through the
    engine's own step loop: the outputs in request order, generated tokens/s, and each request's time to first token;
    ``own_rates`` (when given) gets each request's tokens over its arrival-to-end time."""
    queue = list(enumerate(requests))
    live: dict[int, tuple[int, Any, float]] = {}  # id(seq) -> (index, seq, added at)
    outputs: dict[int, list[int]] = {}
    ttft: list[float] = []
    tokens = 0
    start = time.perf_counter()
    while queue or live:
        while queue and len(live) < concurrency:
            index, (prompt, adapter) = queue.pop(0)
            seq = engine.add_request(prompt, params, adapter=adapter)
            live[id(seq)] = (index, seq, time.perf_counter())
        for output in engine.step():
            index, seq, added = live[id(output.seq)]
            if output.token is not None:
                tokens += 1
                if len(seq.tokens) == 1:
                    ttft.append(time.perf_counter() - added)
            if output.finished:
                outputs[index] = seq.generated_ids
                if own_rates is not None:
                    own_rates.append(len(seq.generated_ids) / (time.perf_counter() - added))
                del live[id(output.seq)]
    return [outputs[i] for i in range(len(requests))], tokens / (time.perf_counter() - start), ttft

