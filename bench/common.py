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
