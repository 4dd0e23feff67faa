"""Invariants of every policy, property-tested with hypothesis."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from infercept.policy import (POLICY_NAMES, VALID_ACTIONS, Action, BatchState, CostModel,
                              DurationEstimator, Intercepted, Location, make_policy)
from infercept.policy.planner import EVICTED

costs = st.builds(
    CostModel,
    fwd_base_s=st.floats(1e-4, 1.0),
    fwd_per_token_s=st.one_of(st.just(0.0), st.floats(1e-7, 1e-3)),
    saturation_tokens=st.integers(0, 4096),
    swap_s_per_token=st.one_of(st.floats(1e-7, 1e-2), st.just(math.inf), st.just(0.0)),
    kv_bytes_per_token=st.integers(1, 1 << 20),
    block_size_tokens=st.sampled_from([1, 16, 32]),
    device_capacity_tokens=st.integers(0, 100_000),
    cpu_capacity_tokens=st.integers(0, 100_000),
)

batches = st.builds(
    BatchState,
    running_context_tokens=st.integers(0, 50_000),
    batch_tokens=st.integers(0, 8192),
    free_device_tokens=st.integers(0, 20_000),
    free_cpu_tokens=st.integers(0, 20_000),
    device_tokens_needed=st.one_of(st.just(0), st.integers(0, 20_000)),
)


@st.composite
def intercepted_lists(draw):
    ids = draw(st.lists(st.text("abcdef", min_size=1, max_size=3), unique=True, max_size=24))
    requests = []
    for request_id in ids:
        context_tokens = draw(st.integers(0, 5000))
        requests.append(Intercepted(
            request_id=request_id,
            context_tokens=context_tokens,
            # a prefix shared with other requests, often none
            shared_tokens=draw(st.one_of(st.just(0), st.integers(0, context_tokens))),
            location=draw(st.sampled_from(list(Location))),
            elapsed_s=draw(st.floats(0.0, 100.0)),
            # few distinct values, so that wastes and arrivals tie often
            remaining_s=draw(st.one_of(st.sampled_from([0.0, 0.5, 30.0]),
                                       st.floats(0.0, 100.0))),
            arrival_s=float(draw(st.integers(0, 4))),
            ttl_s=draw(st.one_of(st.none(), st.floats(0.0, 50.0))),
        ))
    return requests


policy_names = st.sampled_from(POLICY_NAMES)


def device_tokens(intercepted) -> int:
    return sum(r.own_tokens for r in intercepted if r.location is Location.DEVICE)


@settings(max_examples=150, deadline=None)
@given(policy_names, intercepted_lists(), batches, costs)
def test_every_request_gets_one_valid_decision(name, intercepted, batch, cost):
    plan = make_policy(name).plan(intercepted, batch, cost)
    by_id = {r.request_id: r for r in intercepted}
    assert sorted(d.request_id for d in plan.decisions) == sorted(by_id)
    for d in plan.decisions:
        request = by_id[d.request_id]
        assert d.location is request.location
        assert (d.context_tokens, d.own_tokens) == (request.context_tokens, request.own_tokens)
        assert d.action in VALID_ACTIONS[request.location]
        for waste in (d.waste_preserve, d.waste_discard, d.waste_swap):
            assert waste >= 0 and not math.isnan(waste)


@settings(max_examples=150, deadline=None)
@given(policy_names, intercepted_lists(), batches, costs)
def test_memory_is_never_overcommitted(name, intercepted, batch, cost):
    plan = make_policy(name).plan(intercepted, batch, cost)
    # swap-ins use only device space free at the start of the iteration
    assert plan.swap_in_tokens <= batch.free_device_tokens
    assert plan.swap_in_tokens <= batch.free_device_tokens + plan.freed_device_tokens
    assert plan.swap_out_tokens <= batch.free_cpu_tokens + plan.freed_cpu_tokens


@settings(max_examples=150, deadline=None)
@given(policy_names, intercepted_lists(), batches, costs)
def test_memory_pressure_is_relieved_when_it_can_be(name, intercepted, batch, cost):
    plan = make_policy(name).plan(intercepted, batch, cost)
    assert plan.freed_device_tokens >= min(batch.device_tokens_needed,
                                           device_tokens(intercepted))
    if batch.device_tokens_needed > 0:
        assert plan.swap_in_tokens == 0


@settings(max_examples=150, deadline=None)
@given(intercepted_lists(), batches, costs)
def test_min_waste_stays_within_the_swap_budget(intercepted, batch, cost):
    plan = make_policy("min-waste").plan(intercepted, batch, cost)
    assert plan.swap_tokens <= cost.swap_budget_tokens(batch.batch_tokens)
    assert all(d.waste_swap == 0.0 for d in plan.decisions
               if d.action in (Action.SWAP_OUT, Action.SWAP_IN))


@settings(max_examples=150, deadline=None)
@given(intercepted_lists(), batches, costs)
def test_min_waste_keeps_the_cheaper_of_preserve_and_discard(intercepted, batch, cost):
    """The paper's rule (``min-waste-paper`` always, ``min-waste`` under pressure): a
    device request it does not move keeps the cheaper of preserve and chunked discard.
    Without pressure ``min-waste`` discards no device request at all."""
    unpressured = BatchState(batch.running_context_tokens, batch.batch_tokens,
                             batch.free_device_tokens, batch.free_cpu_tokens)
    plans = [make_policy("min-waste-paper").plan(intercepted, unpressured, cost)]
    if batch.device_tokens_needed > 0:
        plans.append(make_policy("min-waste").plan(intercepted, batch, cost))
    for plan in plans:
        for d in plan.decisions:
            if d.reason == EVICTED:
                continue
            if d.action is Action.PRESERVE:
                assert d.waste_discard >= d.waste_preserve
            if d.action is Action.DISCARD and d.location is Location.DEVICE:
                assert d.waste_discard < d.waste_preserve
    ours = make_policy("min-waste").plan(intercepted, unpressured, cost)
    assert not [d for d in ours.decisions
                if d.action is Action.DISCARD and d.location is Location.DEVICE]


@settings(max_examples=150, deadline=None)
@given(st.data(), policy_names, intercepted_lists(), batches, costs)
def test_plans_are_deterministic_and_ignore_input_order(data, name, intercepted, batch,
                                                        cost):
    policy = make_policy(name)
    plan = policy.plan(intercepted, batch, cost)
    assert make_policy(name).plan(list(intercepted), batch, cost) == plan
    shuffled = data.draw(st.permutations(intercepted))
    assert policy.plan(shuffled, batch, cost) == plan


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", None]), st.floats(0.0, 60.0)),
                max_size=40),
       st.sampled_from(["a", "b", "c", None]), st.floats(0.0, 80.0),
       st.one_of(st.none(), st.floats(0.0, 80.0)))
def test_estimates_are_non_negative_and_repeatable(observations, tool, elapsed_s, hint_s):
    first, second = DurationEstimator(window=16), DurationEstimator(window=16)
    for observed_tool, duration_s in observations:
        first.observe(observed_tool, duration_s)
        second.observe(observed_tool, duration_s)
    remaining_s = first.remaining_s(tool, elapsed_s, hint_s)
    assert remaining_s >= 0
    assert remaining_s == second.remaining_s(tool, elapsed_s, hint_s)
