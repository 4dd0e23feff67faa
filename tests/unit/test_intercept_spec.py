"""The interception spec a request carries, and the text-trigger matcher."""

from __future__ import annotations

import json

import pytest

from infercept.adapter.interception import InterceptSpec, InterceptSpecError, trigger_completed


def test_round_trip_through_dict_and_json_string():
    spec = InterceptSpec(triggers=("</calc>",), intercept_after=None, resume="abc", tool="calc",
                         expected_duration_s=1.5, key="k1", pause_on_stop=True, auto_resume=True)
    assert InterceptSpec.from_dict(spec.to_dict()) == spec
    assert InterceptSpec.from_dict(json.dumps(spec.to_dict())) == spec
    assert InterceptSpec.from_dict(None) == InterceptSpec()
    assert not InterceptSpec().intercepts and spec.intercepts


@pytest.mark.parametrize("bad", [
    {"triggers": "x"}, {"triggers": [""]}, {"triggers": [1]}, {"intercept_after": 0},
    {"intercept_after": True}, {"intercept_after": 1.5}, {"resume": 3}, {"tool": ["x"]},
    {"expected_duration_s": -1}, {"expected_duration_s": "1"}, {"pause_on_stop": "yes"},
    {"nope": 1}, "not json", [1, 2],
])
def test_bad_specs_are_rejected(bad):
    with pytest.raises(InterceptSpecError):
        InterceptSpec.from_dict(bad)


def test_trigger_completes_on_the_newest_token_only():
    vocab = {1: "a", 2: "<ca", 3: "lc>", 4: "b", 5: "</", 6: "calc", 7: ">", 8: "z"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert not trigger_completed([1, 5, 6], ["</calc>"], decode)
    assert trigger_completed([1, 5, 6, 7], ["</calc>"], decode)
    # Already complete before the newest token: it does not fire again.
    assert not trigger_completed([1, 5, 6, 7, 8], ["</calc>"], decode)
    assert trigger_completed([2, 3], ["<calc>", "</calc>"], decode)
    assert not trigger_completed([], ["</calc>"], decode)
