"""The agent workload's draws against the parameters it states (infercept.bench.agents)."""

import dataclasses
import random
import statistics

import pytest

from infercept.bench.agents import AGENT_MODEL, LogNormal, draw_agent_request
from infercept.bench.workload import Trace, generate_trace


def quantile(values, q):
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


@pytest.mark.parametrize("variable", [LogNormal(40, 100), LogNormal(0.3, 1.0, floor=0.0, integer=False),
                                      LogNormal(600, 3000, cap=50_000)])
def test_log_normal_has_its_median_and_p90(variable):
    rng = random.Random(0)
    draws = [variable.sample(rng) for _ in range(40_000)]
    assert quantile(draws, 0.5) == pytest.approx(variable.median, rel=0.03)
    assert quantile(draws, 0.9) == pytest.approx(variable.p90, rel=0.04)
    with pytest.raises(ValueError):
        LogNormal(10, 5)
    capped = LogNormal(10, 100, cap=20)
    assert max(capped.sample(rng) for _ in range(1000)) == 20


def test_agent_requests_follow_the_model():
    """Without the context cap, a few thousand tasks show the stated medians and p90s
    (turns, tokens per turn, tool outputs), the tools' shares and their durations."""
    model = dataclasses.replace(AGENT_MODEL, max_context_tokens=10**9)
    requests = [draw_agent_request(i, random.Random(i), model, 1.0, 1.0, None)
                for i in range(3000)]
    turns = [len(r.segments) for r, _, _ in requests]
    assert quantile(turns, 0.5) == pytest.approx(model.turns.median, rel=0.05)
    assert quantile(turns, 0.9) == pytest.approx(model.turns.p90, rel=0.06)
    calls = [s for r, _, _ in requests for s in r.segments[:-1]]
    for name, variable in (("generate_tokens", model.generate_tokens),
                           ("tool_return_tokens", model.tool_return_tokens)):
        values = [getattr(s, name) for s in calls]
        assert quantile(values, 0.5) == pytest.approx(variable.median, rel=0.03), name
        assert quantile(values, 0.9) == pytest.approx(variable.p90, rel=0.04), name
    for tool in model.tools:
        mine = [s.tool_s for s in calls if s.tool == tool.name]
        assert len(mine) / len(calls) == pytest.approx(tool.share, abs=0.01), tool.name
        assert quantile(mine, 0.5) == pytest.approx(tool.duration_s.median, rel=0.08), tool.name
    tasks = [r.prompt_tokens for r, _, _ in requests]
    assert quantile(tasks, 0.5) == pytest.approx(model.task_tokens.median, rel=0.05)
    for group, (tokens, share) in enumerate(model.system_prompts):
        mine = [system for _, system, g in requests if g == group]
        assert set(mine) == {tokens}
        assert len(mine) / len(requests) == pytest.approx(share, abs=0.03)


def test_agent_trace_shares_system_prompts_and_stays_under_the_cap():
    trace = generate_trace("agent", 40, 0.5, 7, length_scale=0.02, max_context_tokens=1500,
                           vocab_size=300, excluded_token_ids=range(5))
    sizes = {round(tokens * 0.02) for tokens, _ in AGENT_MODEL.system_prompts}
    by_key = {}
    for r in trace.requests:
        system = r.shared_prefix_tokens
        assert system in sizes and r.prompt_tokens > system
        assert len(r.prompt_token_ids) == r.prompt_tokens
        assert r.context_tokens <= 1500
        assert all(len(s.tool_return_token_ids) == s.tool_return_tokens for s in r.segments[:-1])
        assert all(s.tool for s in r.segments[:-1]) and r.segments[-1].tool is None
        by_key.setdefault(r.shared_prefix_key, set()).add(r.prompt_token_ids[:system])
    assert len(by_key) == len(AGENT_MODEL.system_prompts)
    assert all(len(prefixes) == 1 for prefixes in by_key.values())  # one prompt per agent
    # Deterministic, and a JSON round trip keeps every field.
    assert generate_trace("agent", 40, 0.5, 7, length_scale=0.02, max_context_tokens=1500,
                          vocab_size=300, excluded_token_ids=range(5)) == trace


def test_agent_trace_round_trips_through_json(tmp_path):
    trace = generate_trace("agent", 5, 1.0, 3, length_scale=0.05, vocab_size=100)
    trace.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json") == trace
    with pytest.raises(ValueError, match="system prompts"):
        generate_trace("agent", 5, 1.0, 3, shared_prefix_tokens=10)
    assert statistics.mean(len(r.segments) for r in trace.requests) > 2
