"""The autoscaler's decision (operator/autoscaler.py; pure): samples in, replicas out, damped."""

from __future__ import annotations

import random

from lorafleet.operator.autoscaler import Decision, Policy, Sample, decide

POLICY = Policy(min_replicas=1, max_replicas=10, target_requests=8, scale_down_s=300, idle_to_zero_s=900, interval_s=15)


def run(policy: Policy, loads: list[dict], start: int = 1) -> list[Decision]:
    """Feed one sample per interval (each a dict of Sample fields besides ``at`` and ``replicas``); replicas follow the decisions."""
    current, history, last_request, decisions = start, [], None, []
    for i, load in enumerate(loads):
        fields = {"requests": 0.0, "kv_usage": 0.1, "cold_loads_per_slot_per_minute": 0.0, "served": 0.0, **load}
        sample = Sample(at=i * policy.interval_s, replicas=current, **fields)
        if sample.requests or sample.served:
            last_request = sample.at
        decision = decide(policy, current, history, sample, last_request)
        history = [(s, w) for s, w in history if sample.at - s.at <= policy.scale_down_s] + [(sample, decision.wanted)]
        decisions.append(decision)
        current = decision.replicas
    return decisions


def test_a_steady_noisy_load_settles_and_never_flaps() -> None:
    rng = random.Random(0)
    loads = [{"requests": 20 + rng.uniform(-5, 5), "served": 100} for _ in range(120)]  # 30 minutes around 20 in flight
    replicas = [d.replicas for d in run(POLICY, loads)]
    changes = [i for i in range(1, len(replicas)) if replicas[i] != replicas[i - 1]]
    # 3 for the first loads, 4 once one passes 24 (2.5 minutes in, here), then never again: no step down and up.
    assert replicas[0] == 3 and replicas[-1] == 4 and len(changes) == 1


def test_a_load_just_under_a_threshold_with_spikes_over_it_does_not_step_down_and_up() -> None:
    """22 in flight (3 replicas' worth at 8) with a spike to 24.5 every six minutes: without the 10 % tolerance the
    fleet would go 3 -> 4 at each spike and back to 3 five minutes later."""
    loads = [{"requests": 24.5 if i % 25 == 0 else 22.0, "served": 100} for i in range(120)]
    replicas = [d.replicas for d in run(POLICY, loads, start=3)]
    assert replicas[0] == 4 and set(replicas) == {4}


def test_a_burst_scales_up_at_once_by_at_most_double_or_four_and_down_only_after_the_delay() -> None:
    loads = [{"requests": 80, "served": 50}] * 4 + [{"requests": 4, "served": 10}] * 30
    decisions = run(POLICY, loads, start=2)
    assert [d.replicas for d in decisions[:3]] == [6, 10, 10]  # 2 -> 6 (+4) -> 10 (the max), not 2 -> 10 at once
    assert decisions[0].reason.startswith("up: 80 requests in flight or queued")
    down_at = next(i for i, d in enumerate(decisions) if i > 2 and d.replicas < 10)
    assert (down_at - 4) * POLICY.interval_s >= POLICY.scale_down_s - POLICY.interval_s  # the last 80 stays in the window 300 s
    assert decisions[down_at].replicas == 1 and decisions[down_at].reason.startswith("down:")


def test_an_idle_fleet_goes_to_zero_only_with_min_zero_and_after_idle_to_zero() -> None:
    idle = [{"requests": 0, "served": 0}] * 70
    loads = [{"requests": 3, "served": 5}] + idle
    kept = run(POLICY, loads)
    assert {d.replicas for d in kept} == {1}  # minReplicas 1: never zero
    zero = Policy(**{**POLICY.__dict__, "min_replicas": 0})
    decisions = run(zero, loads)
    first_zero = next(i for i, d in enumerate(decisions) if d.replicas == 0)
    assert first_zero * zero.interval_s >= zero.idle_to_zero_s and (first_zero - 1) * zero.interval_s < zero.idle_to_zero_s + zero.interval_s
    assert "no request for 900 s" in decisions[first_zero].reason
    woken = run(zero, [{"requests": 0, "served": 0}, {"requests": 0, "served": 1}], start=0)  # a request seen (at a gateway)
    assert [d.replicas for d in woken] == [0, 1]


def test_kv_saturation_and_slot_thrash_ask_for_replicas_that_request_counts_do_not() -> None:
    full = run(POLICY, [{"requests": 6, "kv_usage": 0.95, "served": 10}], start=2)[0]
    assert full.replicas == 3 and "KV usage 95% over 80%" in full.reason
    thrash = run(POLICY, [{"requests": 6, "cold_loads_per_slot_per_minute": 5.0, "served": 10}], start=2)[0]
    assert thrash.replicas == 3 and "5.0 cold loads a slot a minute over 2" in thrash.reason


def test_scale_up_stabilization_waits_for_the_demand_to_last() -> None:
    damped = Policy(**{**POLICY.__dict__, "scale_up_s": 30})
    blip = run(damped, [{"requests": 40, "served": 5}] + [{"requests": 2, "served": 5}] * 5, start=1)
    assert {d.replicas for d in blip} == {1} and blip[0].reason.startswith("holding for scaleUpStabilization")
    lasting = run(damped, [{"requests": 40, "served": 5}] * 4, start=1)
    assert [d.replicas for d in lasting] == [1, 1, 5, 5]  # the third sample is 30 s after the first
