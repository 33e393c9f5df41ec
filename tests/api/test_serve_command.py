"""`lorafleet serve` as a process: the default model answers, and SIGTERM drains before exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from support.metrics import metric
from support.server import free_port
from support.waiting import wait_until

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries


def start_serve(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "lorafleet", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lorafleet serve exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("lorafleet serve did not become healthy")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_serve_default_model_answers_paris(smollm2_path: Path, tmp_path: Path) -> None:
    process, url = start_serve("--model", "smollm2", "--adapter-cache-dir", str(tmp_path / "cache"))
    try:
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0,
        })
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        assert httpx.get(url + "/info").json()["model_id"] == "smollm2"
        schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}}, "required": ["capital"]}
        structured = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in JSON."}], "max_tokens": 24, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        })
        assert structured.status_code == 200, structured.text
        assert "Paris" in json.loads(structured.json()["choices"][0]["message"]["content"])["capital"]
    finally:
        stop(process)


def test_flags_come_from_the_environment_and_bad_values_exit_2(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-P", "-m", "lorafleet", "serve", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--port: must be > 0, got 0" in bad.stderr
    env_bad = subprocess.run([sys.executable, "-P", "-m", "lorafleet", "serve", "--help"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LORAFLEET_MAX_INPUT_LENGTH": "lots"})
    assert env_bad.returncode == 2 and "LORAFLEET_MAX_INPUT_LENGTH='lots'" in env_bad.stderr
    process, url = start_serve("--model", str(tiny_models["llama"]), "--adapter-cache-dir", str(tmp_path / "cache"),
                               env={"LORAFLEET_MAX_INPUT_LENGTH": "100", "LORAFLEET_MAX_TOTAL_TOKENS": "300"})
    try:
        info = httpx.get(url + "/info").json()
        assert info["max_input_length"] == 100 and info["max_total_tokens"] == 300
    finally:
        stop(process)


def sigterm_during(process: subprocess.Popen, url: str, max_new_tokens: int) -> tuple[threading.Thread, dict]:
    """Start a long request in a thread, then SIGTERM the server while it runs; the thread fills ``result``."""
    result: dict = {}

    def long_request() -> None:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
        result["response"] = httpx.post(url + "/generate", timeout=60, json=body)

    def running() -> bool:
        return metric(url, "vllm:num_requests_running") >= 1

    worker = threading.Thread(target=long_request)
    worker.start()
    wait_until(running, timeout=30, what="the long request running")  # not a fixed sleep: the signal must find it in flight
    process.send_signal(signal.SIGTERM)
    return worker, result


def test_sigterm_drains_running_requests_then_exits_0(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    process, url = start_serve("--model", str(tiny_models["llama"]), "--adapter-cache-dir", str(tmp_path / "cache"), "--grace-period-s", "30")
    try:
        worker, result = sigterm_during(process, url, max_new_tokens=1500)
        time.sleep(0.2)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["error_type"] == "unhealthy"
        refused = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=5)
        assert refused.status_code == 503
        worker.join(60)
        assert result["response"].status_code == 200
        assert result["response"].headers["x-generated-tokens"] == "1500"
        assert process.wait(30) == 0
    finally:
        stop(process)


def test_a_request_past_the_grace_period_ends_with_a_503_and_the_process_exits_in_time(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The pod is killed at its grace period: a request still running then gets a 503 (which a gateway
    retries elsewhere) rather than a cut connection, and the process is gone well before the kill."""
    process, url = start_serve("--model", str(tiny_models["llama"]), "--adapter-cache-dir", str(tmp_path / "cache"), "--grace-period-s", "1",
                               "--max-total-tokens", "100000", "--max-batch-total-tokens", "200000")
    try:
        worker, result = sigterm_during(process, url, max_new_tokens=90000)
        signalled = time.monotonic()
        worker.join(30)
        response = result["response"]
        assert response.status_code == 503 and "shut down before this request finished" in response.json()["error"]
        assert process.wait(15) == 0
        assert time.monotonic() - signalled < 10  # grace (1 s) + cancellation + uvicorn's own shutdown
    finally:
        stop(process)
