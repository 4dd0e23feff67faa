"""The trace generator: Table 1 statistics, scale factors, structure, seeds, save/load."""

import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from infercept.bench.workload import (
    AUGMENTATIONS, FLOOR_FRACTION_OF_MEAN, GENERATE_FRACTION, PROMPT_FRACTION, TABLE_1,
    ClippedNormal, Trace, generate_trace, poisson_arrivals_s, split_context)

SHARED_STATS = Path("/work/shared/workloads/augmentations.json")
NUM_REQUESTS = 2000
MAX_STANDARD_ERRORS = 4


def _durations_s(trace):
    return [s.tool_s for r in trace.requests for s in r.segments[:-1]]


def _assert_mean_near(sample, expected_mean, what):
    mean = statistics.fmean(sample)
    standard_error = statistics.stdev(sample) / math.sqrt(len(sample))
    assert abs(mean - expected_mean) <= MAX_STANDARD_ERRORS * standard_error, (
        f"{what}: sample mean {mean:.6g} vs table {expected_mean:.6g} (SE {standard_error:.3g})")


@pytest.fixture(scope="module")
def traces():
    return {a: generate_trace(a, NUM_REQUESTS, rate=1.0, seed=7) for a in AUGMENTATIONS}


@pytest.mark.skipif(not SHARED_STATS.exists(), reason="shared workload stats not present")
def test_embedded_table_matches_shared_file():
    raw = json.loads(SHARED_STATS.read_text())["augmentations"]
    assert {a: {k: tuple(v) for k, v in s.items()} for a, s in raw.items()} == TABLE_1


# ---------------------------------------------------------------- distributions

def test_clipped_normal_mean_formula_matches_numeric_integration():
    dist = ClippedNormal(mean=5.0, sd=4.0, floor=1.0)
    loc, step = 2.0, 1e-3
    # E[max(floor, X)] by a Riemann sum over +-10 sd.
    xs = [loc - 40 + i * step for i in range(int(80 / step))]
    density = [math.exp(-0.5 * ((x - loc) / 4.0) ** 2) / (4.0 * math.sqrt(2 * math.pi)) for x in xs]
    numeric = sum(max(1.0, x) * p * step for x, p in zip(xs, density))
    assert dist.expected(loc) == pytest.approx(numeric, rel=1e-4)


def test_integer_clipped_normal_mean_formula_matches_direct_sum():
    dist = ClippedNormal(mean=2.52, sd=1.73, floor=1, integer=True)
    loc = 1.3
    cdf = lambda x: 0.5 * math.erfc(-(x - loc) / (1.73 * math.sqrt(2)))
    # P(round X = k) = cdf(k + 1/2) - cdf(k - 1/2); everything below 1.5 becomes 1.
    direct = cdf(1.5) + sum(k * (cdf(k + 0.5) - cdf(k - 0.5)) for k in range(2, 40))
    assert dist.expected(loc) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("integer", [False, True])
def test_clipped_normal_centre_is_shifted_to_keep_the_mean(integer):
    dist = ClippedNormal(mean=4.45, sd=1.96, floor=1, integer=integer)
    assert dist.loc < dist.mean
    assert dist.expected(dist.loc) == pytest.approx(dist.mean, rel=1e-9)


# ---------------------------------------------------------------- Table 1 statistics

@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_statistics_match_table(traces, augmentation):
    trace, table = traces[augmentation], TABLE_1[augmentation]
    _assert_mean_near(_durations_s(trace), table["interception_s"][0], "interception_s")
    _assert_mean_near([r.num_interceptions for r in trace.requests],
                      table["interceptions_per_request"][0], "interceptions_per_request")
    _assert_mean_near([r.context_tokens for r in trace.requests],
                      table["context_tokens"][0], "context_tokens")


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_draws_respect_floors_and_split_fractions(traces, augmentation):
    trace, table = traces[augmentation], TABLE_1[augmentation]
    assert min(_durations_s(trace)) >= FLOOR_FRACTION_OF_MEAN * table["interception_s"][0]
    assert min(r.num_interceptions for r in trace.requests) >= 1
    assert min(r.context_tokens for r in trace.requests) >= round(
        FLOOR_FRACTION_OF_MEAN * table["context_tokens"][0])
    contexts = sum(r.context_tokens for r in trace.requests)
    assert sum(r.prompt_tokens for r in trace.requests) / contexts == pytest.approx(
        PROMPT_FRACTION, abs=0.01)
    assert sum(r.output_tokens for r in trace.requests) / contexts == pytest.approx(
        GENERATE_FRACTION, abs=0.01)


def test_scale_factors_keep_ratios():
    base = generate_trace("mix", 600, rate=1.0, seed=3)
    scaled = generate_trace("mix", 600, rate=1.0, seed=3, time_scale=0.25, length_scale=1 / 6)
    for b, s in zip(base.requests, scaled.requests):
        assert s.num_interceptions == b.num_interceptions
        assert [x.tool_s for x in s.segments] == pytest.approx(
            [0.25 * x.tool_s for x in b.segments], rel=1e-12)
    base_tokens = sum(r.context_tokens for r in base.requests)
    scaled_tokens = sum(r.context_tokens for r in scaled.requests)
    assert scaled_tokens / base_tokens == pytest.approx(1 / 6, rel=0.01)
    for part in ("prompt_tokens", "output_tokens", "tool_return_tokens"):
        assert sum(getattr(r, part) for r in scaled.requests) / scaled_tokens == pytest.approx(
            sum(getattr(r, part) for r in base.requests) / base_tokens, abs=0.01)


def test_max_context_caps_contexts_and_drops_calls_that_cannot_fit():
    trace = generate_trace("virtual_env", 200, rate=1.0, seed=1, max_context_tokens=512)
    assert max(r.context_tokens for r in trace.requests) == 512
    tiny = generate_trace("virtual_env", 200, rate=1.0, seed=1, max_context_tokens=9)
    assert max(r.context_tokens for r in tiny.requests) <= 9
    assert max(r.num_interceptions for r in tiny.requests) == 3  # 1 + 4 generated + 3 returned


# ---------------------------------------------------------------- request structure

@pytest.mark.parametrize("length_scale", [1.0, 1 / 6])
def test_segments_are_well_formed(length_scale):
    trace = generate_trace("mix", 300, rate=2.0, seed=5, length_scale=length_scale)
    for request in trace.requests:
        first, *middle, last = request.segments
        assert first.prompt_tokens >= 1
        assert all(s.prompt_tokens == 0 for s in request.segments[1:])
        assert all(s.generate_tokens >= 1 for s in request.segments)
        assert all(s.tool_s > 0 and s.tool_return_tokens >= 1 for s in request.segments[:-1])
        assert (last.tool_s, last.tool_return_tokens) == (0.0, 0)


@settings(deadline=None)  # timing is not the property: no per-example deadline on a shared machine
@given(context_tokens=st.integers(2, 5000), num_interceptions=st.integers(0, 80))
def test_split_context_gives_every_part_a_token_and_sums_exactly(context_tokens,
                                                                 num_interceptions):
    if context_tokens < 2 * num_interceptions + 2:
        with pytest.raises(ValueError):
            split_context(context_tokens, num_interceptions)
        return
    prompt, generated, returned = split_context(context_tokens, num_interceptions)
    assert prompt + sum(generated) + sum(returned) == context_tokens
    assert (len(generated), len(returned)) == (num_interceptions + 1, num_interceptions)
    assert min([prompt, *generated, *returned]) >= 1
    assert max(generated) - min(generated) <= 1
    if context_tokens >= 10 * (2 * num_interceptions + 2):  # no minimum binds
        assert abs(prompt - PROMPT_FRACTION * context_tokens) <= 0.5
        if num_interceptions:
            assert abs(sum(generated) - GENERATE_FRACTION * context_tokens) <= 0.5


# ---------------------------------------------------------------- seeds, arrivals, save/load

def test_trace_is_deterministic_per_seed():
    assert generate_trace("mix", 50, 1.0, seed=11) == generate_trace("mix", 50, 1.0, seed=11)
    assert generate_trace("mix", 50, 1.0, seed=11) != generate_trace("mix", 50, 1.0, seed=12)


def test_same_seed_at_another_rate_replays_the_same_requests_later_or_sooner():
    slow = generate_trace("mix", 100, rate=0.5, seed=4, vocab_size=1000)
    fast = generate_trace("mix", 100, rate=2.0, seed=4, vocab_size=1000)
    for s, f in zip(slow.requests, fast.requests):
        assert (s.request_id, s.segments, s.prompt_token_ids) == (
            f.request_id, f.segments, f.prompt_token_ids)
        assert f.arrival_s == pytest.approx(s.arrival_s / 4, rel=1e-12)


def test_longer_trace_extends_shorter_one():
    short = generate_trace("mix", 20, rate=1.0, seed=9)
    long = generate_trace("mix", 40, rate=1.0, seed=9)
    assert long.requests[:20] == short.requests


def test_poisson_arrivals_have_the_requested_mean_rate():
    rate, n = 5.0, NUM_REQUESTS
    arrivals_s = poisson_arrivals_s(n, rate, seed=2)
    gaps_s = [b - a for a, b in zip([0.0] + arrivals_s, arrivals_s)]
    assert arrivals_s == sorted(arrivals_s)
    _assert_mean_near(gaps_s, 1 / rate, "inter-arrival gap")
    # Exponential gaps: standard deviation equals the mean.
    assert statistics.stdev(gaps_s) / statistics.fmean(gaps_s) == pytest.approx(1.0, abs=0.1)


def test_save_load_round_trip(tmp_path):
    trace = generate_trace("mix", 30, rate=3.0, seed=6, length_scale=0.5, max_context_tokens=900,
                           vocab_size=500, excluded_token_ids=[0, 1, 2])
    path = tmp_path / "trace.json"
    trace.save(path)
    assert Trace.load(path) == trace
    no_calls = trace.without_interceptions()
    no_calls.save(path)
    assert Trace.load(path) == no_calls


@pytest.mark.skipif(not SHARED_STATS.exists(), reason="shared workload stats not present")
def test_stats_path_reads_the_shared_file():
    assert generate_trace("qa", 20, 1.0, 0, stats_path=SHARED_STATS) == generate_trace(
        "qa", 20, 1.0, 0)


# ---------------------------------------------------------------- token ids, mix, variants

def test_token_ids_follow_the_lengths_and_avoid_excluded_ids():
    excluded = {0, 1, 2, 49}
    trace = generate_trace("qa", 100, rate=1.0, seed=8, length_scale=0.2, vocab_size=50,
                           excluded_token_ids=excluded)
    plain = generate_trace("qa", 100, rate=1.0, seed=8, length_scale=0.2)
    seen = set()
    for request, plain_request in zip(trace.requests, plain.requests):
        assert len(request.prompt_token_ids) == request.prompt_tokens
        seen.update(request.prompt_token_ids)
        for segment in request.segments[:-1]:
            assert len(segment.tool_return_token_ids) == segment.tool_return_tokens
            seen.update(segment.tool_return_token_ids)
        assert request.segments[-1].tool_return_token_ids is None
        assert plain_request.prompt_token_ids is None
        assert [s.generate_tokens for s in request.segments] == [
            s.generate_tokens for s in plain_request.segments]
    assert seen == set(range(50)) - excluded


def test_mix_draws_augmentations_by_weight():
    equal = generate_trace("mix", NUM_REQUESTS, rate=1.0, seed=10)
    standard_error = math.sqrt((1 / 6) * (5 / 6) / NUM_REQUESTS)
    for augmentation in AUGMENTATIONS:
        share = sum(r.augmentation == augmentation for r in equal.requests) / NUM_REQUESTS
        assert abs(share - 1 / 6) <= MAX_STANDARD_ERRORS * standard_error
    weighted = generate_trace("mix", NUM_REQUESTS, rate=1.0, seed=10,
                              mix_weights={"qa": 1.0, "chatbot": 3.0})
    assert {r.augmentation for r in weighted.requests} == {"qa", "chatbot"}
    share = sum(r.augmentation == "chatbot" for r in weighted.requests) / NUM_REQUESTS
    assert abs(share - 0.75) <= MAX_STANDARD_ERRORS * math.sqrt(0.75 * 0.25 / NUM_REQUESTS)


def test_no_interception_workload_keeps_prompts_contexts_and_arrivals():
    trace = generate_trace("chatbot", 50, rate=1.0, seed=12, vocab_size=100)
    plain = generate_trace("chatbot", 50, rate=1.0, seed=12, vocab_size=100,
                           with_interceptions=False)
    assert plain == trace.without_interceptions()
    assert not plain.with_interceptions
    for request, no_calls in zip(trace.requests, plain.requests):
        assert no_calls.num_interceptions == 0 and no_calls.tool_s_total == 0
        assert (no_calls.request_id, no_calls.arrival_s, no_calls.prompt_token_ids,
                no_calls.context_tokens) == (request.request_id, request.arrival_s,
                                             request.prompt_token_ids, request.context_tokens)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        generate_trace("weather", 1, 1.0, 0)
    with pytest.raises(ValueError):
        generate_trace("qa", 1, 0.0, 0)
    with pytest.raises(ValueError):
        generate_trace("qa", 1, 1.0, 0, length_scale=0)
    with pytest.raises(ValueError):
        generate_trace("mix", 1, 1.0, 0, mix_weights={"weather": 1.0})
    with pytest.raises(ValueError):
        generate_trace("qa", 1, 1.0, 0, vocab_size=2, excluded_token_ids=[0, 1])
