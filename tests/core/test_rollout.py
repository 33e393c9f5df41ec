"""Canary rollouts without any server: the split a gateway draws, the analysis, and the step machine (operator/rollout.py)."""

from __future__ import annotations

import random

import pytest

from lorafleet.adapter_ref import AdapterRef
from lorafleet.operator.rollout import Analysis, Policy, Rollout, advance, judge, parse_duration, update_window
from lorafleet.traffic_split import Split, VersionCounts

STABLE, CANARY = AdapterRef("hub", "acme/fr", "v1"), AdapterRef("hub", "acme/fr", "v2")


def counts(requests: int, errors: int = 0, ttft_s: float | None = 0.05) -> VersionCounts:
    c = VersionCounts(requests, errors)
    for _ in range(requests - errors if ttft_s is not None else 0):
        c.observe_ttft(ttft_s)
    return c


def test_a_ten_percent_canary_takes_ten_percent_of_a_thousand_requests_give_or_take_three():
    random.seed(7)
    split = Split(CANARY, 10.0)
    taken = sum(split.takes("fr", None) for _ in range(1000))
    assert 70 <= taken <= 130
    sticky = Split(CANARY, 10.0, "apiKey")
    assert 70 <= sum(sticky.takes("fr", f"key-{i}") for i in range(1000)) <= 130


def test_a_sticky_caller_never_flips_and_a_growing_weight_only_moves_callers_to_the_canary():
    callers = [f"key-{i}" for i in range(500)]
    at_10 = {c: Split(CANARY, 10.0, "apiKey").takes("fr", c) for c in callers}
    assert all(Split(CANARY, 10.0, "apiKey").takes("fr", c) == side for c, side in at_10.items() for _ in range(3))
    at_50 = {c: Split(CANARY, 50.0, "apiKey").takes("fr", c) for c in callers}
    assert all(at_50[c] for c, side in at_10.items() if side)  # nobody on the canary at 10 % goes back at 50 %
    assert sum(at_50.values()) > sum(at_10.values())


def test_the_split_survives_the_catalogue_wire_and_refuses_nonsense():
    split = Split(CANARY, 25.0, "header", "x-user")
    assert Split.from_entry(split.entry()) == split
    for bad in ({**split.entry(), "weight": 101}, {**split.entry(), "stickiness": "cookie"}, {**split.entry(), "weight": True}, "x"):
        with pytest.raises(ValueError):
            Split.from_entry(bad)


def test_the_p95_read_from_the_buckets_is_within_a_quarter_of_the_true_one():
    c = VersionCounts()
    values = [0.010 * (1 + i / 100) for i in range(100)]  # 10 ms .. 20 ms
    for v in values:
        c.observe_ttft(v)
    true_p95 = sorted(values)[94]
    assert true_p95 <= c.ttft_quantile(0.95) <= true_p95 * 1.25


def test_the_analysis_fails_a_canary_on_errors_or_latency_and_says_the_numbers():
    analysis = Analysis(max_error_ratio=0.05, max_ttft_p95_ratio=2.0, min_requests=20)
    assert judge(counts(10), counts(100), analysis)[0] == "wait"
    verdict, reason, message = judge(counts(40, errors=8), counts(360, errors=2), analysis)
    assert (verdict, reason) == ("fail", "ErrorRatio")
    assert "0.200 (8/40)" in message and "0.006 (2/360)" in message
    assert judge(counts(40, errors=2), counts(360, errors=18), analysis)[0] == "pass"  # 5 % vs 5 %: the fleet's, not the canary's
    verdict, reason, message = judge(counts(40, ttft_s=0.5), counts(360, ttft_s=0.05), analysis)
    assert (verdict, reason) == ("fail", "TtftP95") and "maxTtftP95Ratio 2.0, ttftSlack 0.05s" in message
    assert judge(counts(40, ttft_s=0.06), counts(360, ttft_s=0.05), analysis)[0] == "pass"
    assert judge(counts(40, ttft_s=0.056), counts(360, ttft_s=0.015), analysis)[0] == "pass"  # 3.8x of almost nothing: within the slack


def test_the_steps_run_in_order_and_the_last_one_promotes():
    policy = Policy.from_spec({"steps": [{"weight": 10, "pause": "30s"}, {"weight": 50, "pause": "1m"}], "analysis": {"minRequests": 5}})
    rollout = Rollout(STABLE, CANARY)
    assert not advance(rollout, policy, 0.0, canary_hot=False, action=None) and rollout.phase == "Warming"
    assert rollout.split(policy) is None  # not a request goes to a version that is not hot everywhere
    advance(rollout, policy, 1.0, canary_hot=True, action=None)
    assert (rollout.phase, rollout.weight(policy)) == ("Progressing", 10.0)
    rollout.window = (counts(3), counts(30))
    advance(rollout, policy, 40.0, True, None)
    assert rollout.step == 0 and "3/5 canary requests" in rollout.message  # the pause is over but too few requests
    rollout.window = (counts(6), counts(60))
    advance(rollout, policy, 41.0, True, None)
    assert (rollout.step, rollout.weight(policy), rollout.split(policy).weight) == (1, 50.0, 50.0)
    rollout.window = (counts(50), counts(50))
    advance(rollout, policy, 60.0, True, None)
    assert rollout.phase == "Progressing"  # 19 s of a 60 s pause
    advance(rollout, policy, 102.0, True, None)
    assert rollout.phase == "Promoted" and rollout.weight(policy) == 100.0 and rollout.split(policy) is None


def test_a_failing_canary_is_rolled_back_even_while_paused():
    policy = Policy.from_spec({"steps": [{"weight": 10, "pause": "1h"}], "paused": True, "analysis": {"minRequests": 10}})
    rollout = Rollout(STABLE, CANARY)
    advance(rollout, policy, 0.0, True, None)
    advance(rollout, policy, 1.0, True, None)
    assert rollout.phase == "Paused"
    rollout.window = (counts(20, errors=20), counts(200))
    advance(rollout, policy, 2.0, True, None)
    assert (rollout.phase, rollout.reason) == ("RolledBack", "ErrorRatio")
    assert "rolled back to acme/fr@v1" in rollout.message and rollout.split(policy) is None


def test_promote_and_abort_end_a_rollout_and_a_promote_waits_for_the_canary_to_be_hot():
    policy = Policy.from_spec({"steps": [{"weight": 10, "pause": "1h"}]})
    rollout = Rollout(STABLE, CANARY)
    assert not advance(rollout, policy, 0.0, canary_hot=False, action="promote") and rollout.phase == "Warming"
    assert advance(rollout, policy, 1.0, canary_hot=True, action="promote") and rollout.phase == "Promoted"
    aborted = Rollout(STABLE, CANARY)
    advance(aborted, policy, 0.0, True, None)
    assert advance(aborted, policy, 1.0, True, "abort") and (aborted.phase, aborted.reason) == ("Aborted", "Aborted")
    assert advance(aborted, policy, 2.0, True, "promote") and aborted.phase == "Aborted"  # an ended rollout stays ended


def test_a_step_window_counts_from_its_start_and_a_restarted_replica_from_zero():
    rollout = Rollout(STABLE, CANARY, phase="Progressing")
    before = {"r0": {CANARY.ring_key: counts(5), STABLE.ring_key: counts(50)}, "r1": {STABLE.ring_key: counts(20)}}
    update_window(rollout, before)
    assert rollout.window[0].requests == 0 and rollout.window[1].requests == 0
    after = {"r0": {CANARY.ring_key: counts(12), STABLE.ring_key: counts(80)}, "r1": {STABLE.ring_key: counts(4)},  # r1 restarted
             "r2": {CANARY.ring_key: counts(3)}}  # joined during the step
    update_window(rollout, after)
    assert (rollout.window[0].requests, rollout.window[1].requests) == (7 + 3, 30 + 4)


def test_durations_read_as_kubernetes_writes_them():
    assert [parse_duration(v, 0) for v in ("500ms", "90s", "2m", "1.5h", 7)] == [0.5, 90.0, 120.0, 5400.0, 7.0]
    with pytest.raises(ValueError):
        parse_duration("2 minutes", 0)


def test_an_operator_restart_picks_a_rollout_up_where_its_status_left_it():
    """The phase and step come back from status.rollout (the step's pause starts again); an ended rollout stays ended,
    so a rolled-back canary is not tried again until the spec names another version."""
    from lorafleet.operator.adapter_status import AdapterRecord
    from lorafleet.operator.book import AdapterBook
    from lorafleet.operator.canaries import Canaries

    def record(status: dict) -> AdapterRecord:
        return AdapterRecord.from_body({"metadata": {"name": "fr", "uid": "u1", "generation": 3},
                                        "spec": {"baseModel": "smol", "id": "acme/fr", "revision": "v2", "rollout": {"steps": [{"weight": 10}, {"weight": 50}]}},
                                        "status": status})

    progressing = {"serving": STABLE.entry("fr"), "rollout": {"phase": "Progressing", "canary": "acme/fr@v2", "step": 2, "reason": "Progressing"}}
    book = AdapterBook(serving=STABLE)
    rollout = Canaries().current(record(progressing), book, now=100.0)
    assert (rollout.phase, rollout.step, rollout.step_started, rollout.stable, rollout.canary) == ("Progressing", 1, 100.0, STABLE, CANARY)
    rolled_back = {"serving": STABLE.entry("fr"), "rollout": {"phase": "RolledBack", "canary": "acme/fr@v2", "step": 1, "reason": "ErrorRatio"}}
    canaries, book = Canaries(), AdapterBook(serving=STABLE)
    again = canaries.current(record(rolled_back), book, now=5.0)
    assert again.phase == "RolledBack" and not canaries.step(record(rolled_back), again, canary_hot=True, now=6.0)
    assert again.phase == "RolledBack" and canaries.catalogue_canaries([record(rolled_back)]) == {}  # no traffic to it
    other = {"serving": STABLE.entry("fr"), "rollout": {"phase": "RolledBack", "canary": "acme/fr@v1.5", "step": 1}}
    assert Canaries().current(record(other), AdapterBook(serving=STABLE), now=0.0).phase == "Warming"  # another canary: a new rollout
