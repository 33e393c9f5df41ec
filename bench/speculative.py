"""Prompt-lookup speculative decoding on SmolLM2-135M-Instruct: speculation on vs off, side by side in one run.

Two workloads, each at 1, 4 and 16 concurrent requests (closed loop: a user sends its next request when its last
ends), for the base model and for 8 random rank-8 adapters (q/k/v/o) spread over the requests:

- ``copy``: copy-heavy, the output repeats the input: "copy this ~300-token document" (one of four), 96 new tokens.
- ``free``: no copying: the short chat questions of the other benchmarks, 64 new tokens.

Both engines are loaded once and run each case in turns (off, on, off, on ...), so the machine's drift falls on
both alike. Printed per case: generated tokens/s of the whole run, each request's own tokens/s (its tokens over its
arrival-to-end time; median), the on/off ratios, and the acceptance rate (accepted / proposed tokens). Greedy, so
the outputs must be identical; the script checks it.

    .venv/bin/python -P bench/speculative.py [--rounds 2] [--concurrency 1 4 16] [--workloads copy free]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTIONS, closed_loop  # noqa: E402
from lora_overhead import write_adapters  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.server.config import EngineConfig  # noqa: E402
from lorafleet.server.engine.engine import LLMEngine  # noqa: E402
from lorafleet.server.engine.sequence import SamplingParams  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
DOCUMENTS = [
    "The river town of Alder Bend grew up around a ferry crossing in the early eighteen hundreds. Farmers from the "
    "eastern hills brought grain, wool and timber down to the landing, and traders from the coast brought salt, iron "
    "tools and cloth. By the middle of the century the ferry had been replaced by a wooden bridge, the bridge by a "
    "stone one, and the town had a mill, two churches, a school and a weekly market that drew people from a day's "
    "walk in every direction. The railway arrived in eighteen seventy and changed everything: the market moved to the "
    "station yard, the mill began shipping flour to the city, and the old landing was left to fishermen and children. "
    "Today the town keeps a small museum in the former customs house, where visitors can see the ferryman's ledger, "
    "a model of the first bridge and photographs of the great flood that closed the railway for a month.",
    "To replace the filter in the kitchen water purifier, first turn off the cold water supply under the sink and open "
    "the tap to release the pressure. Place a towel under the housing, because a little water will spill. Unscrew the "
    "housing by turning it to the left; if it is tight, use the plastic wrench that came with the unit, never a metal "
    "one. Remove the old cartridge and throw it away with household waste. Rinse the housing with warm water, check "
    "that the rubber ring is seated in its groove, and insert the new cartridge with the arrow pointing up. Screw the "
    "housing back by hand until it stops, then turn the water supply on slowly and look for drips. Let the tap run for "
    "five minutes to flush the new cartridge before drinking the water, and write the date on the sticker so you know "
    "when the next change is due, which is normally after six months or three thousand litres.",
    "Minutes of the neighbourhood garden committee, third meeting of the spring. Present were the chair, the treasurer, "
    "the secretary and six members. The treasurer reported that the seed order had arrived and cost slightly less than "
    "planned, leaving enough to buy a second water butt. The committee agreed to place it next to the tool shed. The "
    "secretary reported that four new families had asked for plots; there are two free plots, so the committee agreed "
    "to split the larger of them and to put the fourth family first on the waiting list. A member raised the problem "
    "of snails in the lettuce beds; after some discussion the committee agreed to try copper tape before anything "
    "else. The chair reminded everyone that the open day will be held on the first Saturday of June, and asked for "
    "volunteers to bake, to run the plant stall and to give short tours. The meeting closed at half past eight.",
    "Our support policy covers every product bought directly from the shop. If an item arrives damaged, send us a "
    "photograph within seven days and we will send a replacement at no cost, or refund the full price if no "
    "replacement is available. If an item stops working within the first year, contact us with the order number and "
    "a short description of the fault; most problems can be solved by following the steps we send back, and if not, "
    "we will arrange a free collection and repair. Items that have been opened, modified or repaired by someone else "
    "are not covered. Batteries, filters and other parts that wear out in normal use are covered for three months. "
    "Refunds are paid to the card used for the purchase within five working days of our receiving the returned item. "
    "For anything this policy does not answer, write to the support address and a person will reply within two days.",
]


def chat(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def requests_for(tokenizer, workload: str, count: int) -> tuple[list[list[int]], int]:  # noqa: ANN001
    if workload == "copy":
        prompts = [chat(tokenizer, "Copy the following document exactly, word for word:\n\n" + DOCUMENTS[i % len(DOCUMENTS)]) for i in range(count)]
        return prompts, 96
    return [chat(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(count)], 64


def measured(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], concurrency: int, new_tokens: int):
    """(outputs in order, generated tokens/s, each request's own tokens/s, tokens accepted, tokens proposed)."""
    spec = engine.speculator
    before = (spec.num_accepted_tokens, spec.num_draft_tokens) if spec else (0, 0)
    own_rates: list[float] = []
    outputs, rate, _ = closed_loop(engine, list(zip(prompts, adapters)), concurrency, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), own_rates)
    after = (spec.num_accepted_tokens, spec.num_draft_tokens) if spec else (0, 0)
    return outputs, rate, own_rates, after[0] - before[0], after[1] - before[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workloads", nargs="+", default=["copy", "free"], choices=["copy", "free"])
    parser.add_argument("--speculative-tokens", type=int, default=4)
    args = parser.parse_args()
    folder = model_store.resolve_model("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        adapter_folders = write_adapters(folder, Path(tmp), 8, 8, QKVO)
        engines = {}
        for mode in ("off", "ngram"):
            engines[mode] = LLMEngine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=512 << 20, max_total_tokens=1024,
                                                   max_input_length=768, speculative=mode, speculative_tokens=args.speculative_tokens))
            for i, adapter in enumerate(adapter_folders):
                engines[mode].load_adapter(f"a{i}", adapter)
        tokenizer = engines["off"].tokenizer
        warm, _ = requests_for(tokenizer, "copy", 2)
        for engine in engines.values():  # first steps pay for oneDNN's kernel selection and the allocator's growth
            measured(engine, warm, [None, "a0"], 2, 16)
        print(f"SmolLM2-135M-Instruct float32 on CPU, speculative tokens {args.speculative_tokens}, {args.rounds} rounds in turns; medians")
        print(f"{'workload':8} {'adapters':8} {'conc':>4} | {'tok/s off':>9} {'tok/s on':>9} {'ratio':>6} | {'per-req off':>11} "
              f"{'per-req on':>10} {'ratio':>6} | accepted")
        for workload in args.workloads:
            for with_adapters in (False, True):
                for concurrency in args.concurrency:
                    count = max(2, 2 * concurrency)
                    prompts, new_tokens = requests_for(tokenizer, workload, count)
                    adapters = [f"a{i % 8}" for i in range(count)] if with_adapters else [None] * count
                    rates = {m: [] for m in engines}
                    own = {m: [] for m in engines}
                    outputs, accepted, proposed = {}, 0, 0
                    for _ in range(args.rounds):
                        for mode, engine in engines.items():
                            out, rate, own_rates, acc, prop = measured(engine, prompts, adapters, concurrency, new_tokens)
                            outputs.setdefault(mode, out)
                            rates[mode].append(rate)
                            own[mode].append(statistics.median(own_rates))
                            accepted, proposed = accepted + acc, proposed + prop
                    assert outputs["ngram"] == outputs["off"], "speculation changed a greedy output"
                    off, on = statistics.median(rates["off"]), statistics.median(rates["ngram"])
                    own_off, own_on = statistics.median(own["off"]), statistics.median(own["ngram"])
                    print(f"{workload:8} {'8' if with_adapters else 'base':8} {concurrency:4} | {off:9.1f} {on:9.1f} {on / off:5.2f}x | "
                          f"{own_off:11.1f} {own_on:10.1f} {own_on / own_off:5.2f}x | {accepted / max(proposed, 1):.2f} of {proposed}", flush=True)


if __name__ == "__main__":
    main()
