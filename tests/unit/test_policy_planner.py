"""Planner decisions worked out by hand.

Shared setting: forward 0.5 s up to 256 tokens (+1/1024 s per token beyond), swap 1/4096 s
per token. The batch forwards 100 tokens with 3000 tokens of running context, so:
  swap budget   = 0.5 s / (1/4096 s) = 2048 tokens per iteration
  recompute chunk cap = 256 - 100 = 156 tokens (each chunk in the flat region: 0.5 s)
  "resumes soon" (prefetch, no swap-out) when remaining_s <= C/4096 + 0.5
WasteChunkD by context (C_other = 3000):
  C=1000: T_fwd = 0.5 + 744/1024 = 1.2265625; n = 7; 1.2265625*500 + 7*0.5*3000 = 11113.28125
  C=1500: T_fwd = 1.71484375; n = 10; 1286.1328125 + 15000 = 16286.1328125
  C=800:  T_fwd = 1.03125;    n = 6;  412.5 + 9000 = 9412.5
  C=500:  T_fwd = 0.73828125; n = 4;  184.5703125 + 6000 = 6184.5703125
  C=200:  T_fwd = 0.5;        n = 2;  50 + 3000 = 3050
"""

import pytest

from infercept.policy import (POLICY_NAMES, Action, BatchState, CostModel, Decision,
                              Intercepted, Location, Plan, make_policy)

COST = CostModel(fwd_base_s=0.5, fwd_per_token_s=1 / 1024, saturation_tokens=256,
                 swap_s_per_token=1 / 4096, kv_bytes_per_token=1000, block_size_tokens=16,
                 device_capacity_tokens=100_000, cpu_capacity_tokens=50_000)
MIN_WASTE = make_policy("min-waste")
# The paper's rule: discard whenever WasteChunkD < WastePreserve, memory pressure or not.
# min-waste applies it only under pressure, so the waste rule's cases are worked out on it.
PAPER = make_policy("min-waste-paper")


def req(request_id: str, context_tokens: int, remaining_s: float, arrival_s: float = 0.0,
        location: Location = Location.DEVICE, elapsed_s: float = 1.0,
        ttl_s: float | None = None, shared_tokens: int = 0) -> Intercepted:
    return Intercepted(request_id=request_id, context_tokens=context_tokens,
                       location=location, elapsed_s=elapsed_s, remaining_s=remaining_s,
                       arrival_s=arrival_s, ttl_s=ttl_s, shared_tokens=shared_tokens)


def batch(free_cpu_tokens: int = 50_000, free_device_tokens: int = 0,
          device_tokens_needed: int = 0) -> BatchState:
    return BatchState(running_context_tokens=3000, batch_tokens=100,
                      free_device_tokens=free_device_tokens, free_cpu_tokens=free_cpu_tokens,
                      device_tokens_needed=device_tokens_needed)


def actions(plan: Plan) -> dict[str, Action]:
    return {d.request_id: d.action for d in plan.decisions}


def test_short_tool_call_is_preserved_not_swapped():
    # remaining 0.5 s <= 1000/4096 + 0.5: it would be swapped straight back; WP = 500
    plan = MIN_WASTE.plan([req("a", 1000, 0.5)], batch(), COST)
    decision = plan.decisions[0]
    assert decision.action is Action.PRESERVE
    assert decision.waste_preserve == 500.0
    assert decision.waste_discard == 11113.28125


def test_without_cpu_space_a_moderate_call_is_preserved():
    # WP = 5 s * 1000 = 5000 < WasteChunkD 11113.28125
    plan = MIN_WASTE.plan([req("a", 1000, 5.0)], batch(free_cpu_tokens=0), COST)
    assert plan.decisions[0].action is Action.PRESERVE


def test_long_calls_are_swapped_while_the_budget_lasts_then_discarded():
    # each: WP = 30000, WasteChunkD = 11113.28125 (a tie): FCFS; 2 * 1000 <= 2048
    plan = PAPER.plan([req("c", 1000, 30.0, arrival_s=3.0),
                           req("a", 1000, 30.0, arrival_s=1.0),
                           req("b", 1000, 30.0, arrival_s=2.0)], batch(), COST)
    assert actions(plan) == {"a": Action.SWAP_OUT, "b": Action.SWAP_OUT,
                             "c": Action.DISCARD}
    assert plan.swap_tokens == 2000
    assert [d.waste_swap for d in plan.decisions[:2]] == [0.0, 0.0]
    # c could not hide: 2 * (1000/4096) * 3000
    assert plan.decisions[2].waste_swap == pytest.approx(1464.84375)
    assert [d.request_id for d in plan.decisions] == ["a", "b", "c"]


def test_min_waste_discards_only_under_memory_pressure():
    # the case above: a and b swap out; c is cheaper to discard (11113.28 < WP 30000),
    # but while nothing needs device memory min-waste keeps it where it is
    calls = [req("c", 1000, 30.0, arrival_s=3.0), req("a", 1000, 30.0, arrival_s=1.0),
             req("b", 1000, 30.0, arrival_s=2.0)]
    free = MIN_WASTE.plan(calls, batch(), COST)
    assert actions(free) == {"a": Action.SWAP_OUT, "b": Action.SWAP_OUT, "c": Action.PRESERVE}
    pressed = MIN_WASTE.plan(calls, batch(device_tokens_needed=1), COST)
    assert actions(pressed) == {"a": Action.SWAP_OUT, "b": Action.SWAP_OUT,
                                "c": Action.DISCARD}
    # under pressure, preserve still wins where it wastes less (remaining 11.1 s)
    short = MIN_WASTE.plan([req("a", 1000, 11.1)],
                           batch(free_cpu_tokens=0, device_tokens_needed=0), COST)
    assert actions(short) == {"a": Action.PRESERVE}


def test_largest_waste_swaps_first_and_smaller_ones_fill_the_budget():
    # min wastes: x 16286.13 > y 9412.5 > z 6184.57. x takes 1500 of 2048; y (800) does
    # not fit in the 548 left, z (500) does; y: 9412.5 < WP 24000 -> discard.
    plan = PAPER.plan([req("x", 1500, 30.0, arrival_s=9.0), req("y", 800, 30.0),
                           req("z", 500, 30.0, arrival_s=5.0)], batch(), COST)
    assert actions(plan) == {"x": Action.SWAP_OUT, "y": Action.DISCARD,
                             "z": Action.SWAP_OUT}
    assert plan.swap_tokens == 2000 <= COST.swap_budget_tokens(100)


def test_equal_wastes_go_by_arrival_then_request_id():
    same_arrival = PAPER.plan([req("b", 1500, 30.0), req("a", 1500, 30.0)], batch(),
                                  COST)
    assert actions(same_arrival) == {"a": Action.SWAP_OUT, "b": Action.DISCARD}
    earlier_b = PAPER.plan([req("b", 1500, 30.0, arrival_s=0.0),
                                req("a", 1500, 30.0, arrival_s=1.0)], batch(), COST)
    assert actions(earlier_b) == {"a": Action.DISCARD, "b": Action.SWAP_OUT}


def test_decision_flips_as_the_estimate_grows():
    # no CPU: break-even at WP = WasteChunkD, i.e. remaining 11.11328125 s
    below = PAPER.plan([req("a", 1000, 11.1)], batch(free_cpu_tokens=0), COST)
    above = PAPER.plan([req("a", 1000, 11.2)], batch(free_cpu_tokens=0), COST)
    assert actions(below) == {"a": Action.PRESERVE}
    assert actions(above) == {"a": Action.DISCARD}


def test_prefetch_brings_back_a_request_about_to_resume():
    soon = req("s", 1000, 0.5, location=Location.CPU)
    later = req("l", 1000, 10.0, location=Location.CPU)
    plan = MIN_WASTE.plan([soon, later], batch(free_device_tokens=1000), COST)
    assert actions(plan) == {"s": Action.SWAP_IN, "l": Action.KEEP_SWAPPED}
    no_room = MIN_WASTE.plan([soon], batch(free_device_tokens=999), COST)
    assert actions(no_room) == {"s": Action.KEEP_SWAPPED}
    pressure = MIN_WASTE.plan([soon], batch(free_device_tokens=5000,
                                            device_tokens_needed=1), COST)
    assert actions(pressure) == {"s": Action.KEEP_SWAPPED}


def test_prefetch_and_swap_out_share_the_budget():
    # prefetch takes 1000 of 2048; x needs 1500 -> discarded (16286.13 < WP 45000)
    plan = PAPER.plan([req("s", 1000, 0.5, location=Location.CPU),
                           req("x", 1500, 30.0)], batch(free_device_tokens=1000), COST)
    assert actions(plan) == {"s": Action.SWAP_IN, "x": Action.DISCARD}


def test_a_cheap_swapped_request_is_discarded_to_make_cpu_space():
    # x needs 1500 CPU tokens, 1300 are free; discarding v (200 tokens, WasteChunkD 3050)
    # costs less than x's min waste 16286.13
    plan = MIN_WASTE.plan([req("x", 1500, 30.0), req("v", 200, 100.0, location=Location.CPU)],
                          batch(free_cpu_tokens=1300), COST)
    assert actions(plan) == {"x": Action.SWAP_OUT, "v": Action.DISCARD}
    assert plan.freed_cpu_tokens == 200


def test_no_swapped_request_is_discarded_when_that_costs_as_much():
    # v's WasteChunkD (16286.13) equals x's min waste: not strictly cheaper, keep v
    plan = PAPER.plan([req("x", 1500, 30.0),
                           req("v", 1500, 100.0, location=Location.CPU)],
                          batch(free_cpu_tokens=0), COST)
    assert actions(plan) == {"x": Action.DISCARD, "v": Action.KEEP_SWAPPED}


def test_memory_pressure_evicts_the_least_extra_waste_per_token_first():
    # all three resume soon and are preserved. Extra waste per token of evicting:
    #   b: (11113.28125 - 700)/1000 = 10.41 < a: (11113.28125 - 600)/1000 = 10.51
    #   < c: (6184.5703125 - 300)/500 = 11.77.  1500 tokens needed -> b, then a.
    reqs = [req("a", 1000, 0.6), req("b", 1000, 0.7), req("c", 500, 0.6)]
    no_cpu = MIN_WASTE.plan(reqs, batch(free_cpu_tokens=0, device_tokens_needed=1500), COST)
    assert actions(no_cpu) == {"a": Action.DISCARD, "b": Action.DISCARD,
                               "c": Action.PRESERVE}
    with_cpu = MIN_WASTE.plan(reqs, batch(device_tokens_needed=1500), COST)
    assert actions(with_cpu) == {"a": Action.SWAP_OUT, "b": Action.SWAP_OUT,
                                 "c": Action.PRESERVE}
    assert with_cpu.freed_device_tokens == 2000


def test_discarded_requests_stay_discarded():
    plan = MIN_WASTE.plan([req("d", 1000, 30.0, location=Location.NONE)], batch(), COST)
    assert actions(plan) == {"d": Action.KEEP_DISCARDED}


def test_preserve_policy_evicts_latest_arrivals_under_pressure():
    reqs = [req("old", 1000, 30.0, arrival_s=1.0), req("new", 1000, 30.0, arrival_s=2.0),
            req("newer", 1000, 30.0, arrival_s=3.0)]
    policy = make_policy("preserve")
    assert set(actions(policy.plan(reqs, batch(), COST)).values()) == {Action.PRESERVE}
    plan = policy.plan(reqs, batch(free_cpu_tokens=1000, device_tokens_needed=1500), COST)
    assert actions(plan) == {"old": Action.PRESERVE, "new": Action.DISCARD,
                             "newer": Action.SWAP_OUT}


def test_discard_policy_frees_device_requests_only():
    plan = make_policy("discard").plan([req("a", 1000, 0.1),
                                        req("s", 500, 9.0, location=Location.CPU)],
                                       batch(), COST)
    assert actions(plan) == {"a": Action.DISCARD, "s": Action.KEEP_SWAPPED}


def test_swap_policy_swaps_while_cpu_space_lasts():
    reqs = [req("a", 1000, 0.1, arrival_s=0.0), req("b", 1000, 0.1, arrival_s=1.0),
            req("c", 500, 0.1, arrival_s=2.0), req("s", 700, 9.0, location=Location.CPU)]
    plan = make_policy("swap").plan(reqs, batch(free_cpu_tokens=1500), COST)
    assert actions(plan) == {"a": Action.SWAP_OUT, "b": Action.DISCARD,
                             "c": Action.SWAP_OUT, "s": Action.KEEP_SWAPPED}
    # a hides in the 2048-token budget, c (500 of the 1048 left) too
    assert [d.waste_swap for d in plan.by_action(Action.SWAP_OUT)] == [0.0, 0.0]


def test_ttl_policy_preserves_until_the_time_to_live():
    reqs = [req("young", 1000, 30.0, elapsed_s=4.9, ttl_s=5.0),
            req("expired", 1000, 30.0, elapsed_s=5.0, ttl_s=5.0),
            req("unknown", 1000, 30.0, elapsed_s=99.0)]
    plan = make_policy("ttl").plan(reqs, batch(), COST)
    assert actions(plan) == {"young": Action.PRESERVE, "expired": Action.DISCARD,
                             "unknown": Action.PRESERVE}


def test_plan_helpers():
    plan = PAPER.plan([req("x", 1500, 30.0), req("z", 500, 30.0),
                           req("s", 300, 0.1, location=Location.CPU)],
                          batch(free_device_tokens=300), COST)
    assert plan.swap_in_tokens == 300
    assert plan.swap_out_tokens == 1500
    assert plan.swap_tokens == 1800
    assert plan.action_of("z") is Action.DISCARD
    assert [d.request_id for d in plan.by_action(Action.SWAP_IN)] == ["s"]
    with pytest.raises(KeyError):
        plan.action_of("missing")


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        MIN_WASTE.plan([req("a", 10, 1.0), req("a", 20, 1.0)], batch(), COST)
    with pytest.raises(ValueError):
        req("a", -1, 1.0)
    with pytest.raises(ValueError):
        req("a", 10, float("inf"))
    with pytest.raises(ValueError):
        req("a", 10, 1.0, arrival_s=float("nan"))
    with pytest.raises(ValueError):
        BatchState(running_context_tokens=0, batch_tokens=-1, free_device_tokens=0,
                   free_cpu_tokens=0)
    with pytest.raises(ValueError):
        Decision("a", Action.SWAP_IN, 0.0, 0.0, 0.0, "", Location.DEVICE, 10, 10)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")


def test_a_shared_prefix_costs_nothing_to_keep_move_or_free():
    # 1500 tokens of context, 1000 of them a system prompt other requests hold too: every
    # waste is the 500-token request's (WP = 10 s * 500; WasteChunkD at C=500 above).
    shared = req("a", 1500, 10.0, shared_tokens=1000)
    [decision] = MIN_WASTE.plan([shared], batch(), COST).decisions
    assert (decision.context_tokens, decision.own_tokens) == (1500, 500)
    assert decision.waste_preserve == 5000.0
    assert decision.waste_discard == 6184.5703125
    # CPU space for its own 500 tokens is enough to swap it (1500 would not fit).
    swap = make_policy("swap").plan([shared], batch(free_cpu_tokens=600), COST)
    assert actions(swap) == {"a": Action.SWAP_OUT} and swap.swap_out_tokens == 500
    # Under pressure, swapping or discarding it frees only its own 500 tokens: relieving
    # 600 tokens takes the next request too.
    plan = make_policy("preserve").plan(
        [shared, req("b", 200, 10.0, arrival_s=-1.0)],
        batch(free_cpu_tokens=0, device_tokens_needed=600), COST)
    assert actions(plan) == {"a": Action.DISCARD, "b": Action.DISCARD}
    assert plan.freed_device_tokens == 700


def test_a_request_all_shared_frees_nothing():
    # Its whole context is held by others: evicting it would free no memory.
    plan = make_policy("preserve").plan(
        [req("a", 1000, 10.0, shared_tokens=1000), req("b", 300, 10.0, arrival_s=-1.0)],
        batch(free_cpu_tokens=0, device_tokens_needed=200), COST)
    assert actions(plan) == {"a": Action.PRESERVE, "b": Action.DISCARD}
    with pytest.raises(ValueError, match="shared_tokens"):
        req("c", 10, 1.0, shared_tokens=11)


def test_registry_names():
    assert POLICY_NAMES == ("preserve", "discard", "swap", "min-waste", "min-waste-paper", "ttl")
    assert all(make_policy(name).name == name for name in POLICY_NAMES)
