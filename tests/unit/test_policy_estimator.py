"""DurationEstimator: per-tool conditional expectation, hint, priors, window."""

import pytest

from infercept.policy import DurationEstimator


def trained() -> DurationEstimator:
    estimator = DurationEstimator()
    for duration_s in (1.0, 2.0, 3.0, 10.0):
        estimator.observe("search", duration_s)
    for duration_s in (0.25, 0.25):
        estimator.observe("calc", duration_s)
    return estimator


def test_conditional_expectation_on_a_hand_example():
    estimator = trained()
    # e = 0: mean(1, 2, 3, 10) = 4
    assert estimator.remaining_s("search", 0.0) == 4.0
    # e = 1: survivors 2, 3, 10 -> mean 5 -> 5 - 1
    assert estimator.remaining_s("search", 1.0) == 4.0
    # e = 2: survivors 3, 10 -> mean 6.5 -> 6.5 - 2
    assert estimator.remaining_s("search", 2.0) == 4.5
    # e = 5: survivor 10 -> 5
    assert estimator.remaining_s("search", 5.0) == 5.0


def test_learns_per_tool():
    estimator = trained()
    assert estimator.remaining_s("calc", 0.0) == 0.25
    assert estimator.expected_total_s("search") == 4.0
    assert estimator.num_observed("search") == 4
    assert estimator.num_observed("calc") == 2


def test_unknown_tool_falls_back_to_all_tools():
    # (1 + 2 + 3 + 10 + 0.25 + 0.25) / 6 = 2.75
    assert trained().remaining_s("translate", 0.0) == 2.75
    assert trained().remaining_s(None, 0.0) == 2.75


def test_outlasting_the_history_falls_back_to_the_elapsed_time():
    # nothing recorded lasted longer than 12 s: the paper's estimate, 12 s more
    assert trained().remaining_s("search", 12.0) == 12.0


def test_prior_with_no_history_is_the_elapsed_time():
    estimator = DurationEstimator()
    assert estimator.remaining_s("search", 3.0) == 3.0
    assert estimator.remaining_s("search", 0.0) == 0.0
    assert estimator.expected_total_s("search") == 0.0
    assert estimator.ttl_s("search") is None


def test_hint_is_blended_with_the_history():
    estimator = trained()
    # history at e = 2: 4.5; hint 10.5 total -> 8.5 remaining; 0.75*8.5 + 0.25*4.5
    assert estimator.remaining_s("search", 2.0, hint_s=10.5) == 7.5
    # an overrun hint (2 s total, 2.5 s elapsed) no longer counts: survivors 3, 10
    assert estimator.remaining_s("search", 2.5, hint_s=2.0) == 4.0


def test_hint_alone_without_history():
    estimator = DurationEstimator()
    assert estimator.remaining_s("search", 1.0, hint_s=5.0) == 4.0
    assert estimator.expected_total_s("search", hint_s=5.0) == 5.0


def test_hint_weight_zero_ignores_the_hint_when_there_is_history():
    estimator = DurationEstimator(hint_weight=0.0)
    estimator.observe("search", 4.0)
    assert estimator.remaining_s("search", 1.0, hint_s=100.0) == 3.0


def test_window_keeps_only_recent_durations():
    estimator = DurationEstimator(window=3)
    for duration_s in (1.0, 2.0, 3.0, 100.0):
        estimator.observe("search", duration_s)
    # 1.0 left the window: mean(2, 3, 100) = 35
    assert estimator.remaining_s("search", 0.0) == 35.0
    assert estimator.num_observed("search") == 3


def test_ttl_is_a_nearest_rank_quantile():
    estimator = trained()
    assert estimator.ttl_s("search", 0.9) == 10.0  # rank ceil(3.6) = 4
    assert estimator.ttl_s("search", 0.5) == 2.0   # rank 2
    assert estimator.ttl_s("translate", 1.0) == 10.0  # all tools


def test_same_observations_give_the_same_answers():
    a, b = trained(), trained()
    points = [0.0, 0.1, 0.25, 1.5, 2.999, 9.0, 50.0]
    assert [a.remaining_s("search", e) for e in points] == \
        [b.remaining_s("search", e) for e in points]


@pytest.mark.parametrize("duration_s", [-1.0, float("nan"), float("inf")])
def test_invalid_durations_are_rejected(duration_s):
    with pytest.raises(ValueError):
        DurationEstimator().observe("search", duration_s)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        DurationEstimator(window=0)
    with pytest.raises(ValueError):
        DurationEstimator(hint_weight=1.5)
    with pytest.raises(ValueError):
        DurationEstimator().remaining_s("search", -1.0)


def test_remaining_many_answers_as_remaining_one_by_one():
    estimator = DurationEstimator(window=5)
    for duration_s in (3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0):  # overflows the window
        estimator.observe("search", duration_s)
    elapsed = [0.0, 0.5, 1.0, 2.0, 4.5, 8.9, 9.0, 12.0]
    for tool in ("search", "unknown"):
        assert estimator.remaining_many_s(tool, elapsed) == [
            estimator.remaining_s(tool, e) for e in elapsed]
    # the window keeps the last five: 4, 1, 5, 9, 2, 6 minus the oldest -> 1, 5, 9, 2, 6
    assert estimator.remaining_s("search", 0.0) == pytest.approx((1 + 5 + 9 + 2 + 6) / 5)
    with pytest.raises(ValueError):
        estimator.remaining_many_s("search", [1.0, -1.0])
