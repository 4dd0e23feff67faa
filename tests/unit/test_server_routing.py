"""The API server's routing of intercepts to engine cores, on a fake engine client.

What `infercept serve` does under data parallelism without starting one:
which engine each call reaches, the ids that name the engine, the merged
counters and the per-engine metrics. tests/server/test_data_parallel.py runs
the real thing.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from infercept.server import payloads, routes
from infercept.server.metrics import StatsPublisher
from infercept.server.protocol import InterceptError
from infercept.server.service import InterceptService, merge_stats


class FakeEngineCore:
    """vLLM's engine-core client as the service uses it: engines by identity."""

    def __init__(self, ranks, answers):
        self.engine_ranks_managed = ranks
        self.core_engines = [r.to_bytes(2, "little") for r in ranks]
        self.answers = answers  # rank -> method -> answer
        self.calls: list[tuple[int, str, list]] = []

    async def _call_utility_async(self, method, *args, engine):
        assert method == "infercept" and len(args) == 2 and isinstance(args[1], list)
        rank = int.from_bytes(engine, "little")
        self.calls.append((rank, args[0], args[1]))
        return self.answers.get(rank, {}).get(args[0])

    async def call_utility_all_async(self, method, *args):
        return [await self._call_utility_async(method, *args, engine=e) for e in self.core_engines]


def service(ranks, answers=None, dp_size=None):
    core = FakeEngineCore(ranks, answers or {})
    parallel = SimpleNamespace(data_parallel_size=dp_size or len(ranks))
    client = SimpleNamespace(engine_core=core, vllm_config=SimpleNamespace(parallel_config=parallel))
    return InterceptService(client, timeout_s=600.0), core


def test_ids_name_the_engine_only_under_data_parallelism():
    single, _ = service([0])
    assert single.public_id("icpt-abc", 0) == "icpt-abc"
    assert single.parse_id("icpt-abc.1") == ("icpt-abc.1", 0)  # a plain key, dots and all
    dp, _ = service([0, 1])
    assert dp.public_id("icpt-a-b_c", 1) == "icpt-a-b_c.1"
    assert dp.parse_id("icpt-a-b_c.1") == ("icpt-a-b_c", 1)
    for unknown in ("icpt-abc", "icpt-abc.", "icpt-abc.x", "icpt-abc.2", "icpt-abc.-1"):
        with pytest.raises(InterceptError) as error:
            dp.parse_id(unknown)
        assert error.value.status == 404
    # One engine of a larger deployment (vLLM's external load balancing): rank 3 only.
    external, _ = service([3], dp_size=4)
    assert external.parse_id("icpt-abc.3") == ("icpt-abc", 3)
    assert external.engine_index(3) == 0
    with pytest.raises(InterceptError, match="engine 1"):
        external.parse_id("icpt-abc.1")


def test_each_call_reaches_the_engine_that_owns_the_intercept():
    paused = {"state": "paused", "session": {"kind": "completion"}, "token_ids": [1, 2],
              "generated_tokens": 1}
    dp, core = service([0, 1], {1: {"claim": paused, "admission": {"resumed_from": None,
                                                                     "reused_tokens": 0}}})

    async def run():
        claimed = await dp.claim("icpt-k.1")
        await dp.cancel(claimed.key, claimed.rank)
        return claimed, await dp.admission("icpt-new")

    claimed, (rank, admission) = asyncio.run(run())
    assert (claimed.key, claimed.rank, claimed.kind) == ("icpt-k", 1, "completion")
    assert core.calls[:2] == [(1, "claim", ["icpt-k"]), (1, "cancel", ["icpt-k", "cancelled"])]
    # The segment's engine is found by asking all: only engine 1 admitted it.
    assert {c[0] for c in core.calls[2:]} == {0, 1} and rank == 1 and admission["reused_tokens"] == 0


def test_claim_errors_and_locate():
    dp, core = service([0, 1], {0: {"claim": {"state": "expired"}, "locate": None},
                                1: {"claim": None, "locate": "icpt-k"}})

    async def claim(intercept_id):
        with pytest.raises(InterceptError) as error:
            await dp.claim(intercept_id)
        return error.value.status

    assert asyncio.run(claim("icpt-k.0")) == 409
    assert asyncio.run(claim("icpt-k.1")) == 404
    assert asyncio.run(dp.locate(["call-1"], None)) == 1
    assert asyncio.run(dp.locate(None, None)) is None  # nothing to look for: no call at all
    assert core.calls[-1] == (1, "locate", [["call-1"], None])
    single, core = service([0])
    assert asyncio.run(single.locate(["call-1"], [1, 2])) is None and not core.calls


def test_merged_stats_add_counters_and_keep_the_rest():
    engine = {"policy": "min-waste", "interceptions": 2, "decisions": {"swap_out": 1},
              "intercepted_by_state": {"preserved": 1, "swapped": 0},
              "cost_model": {"a": 1.0}, "bytes_swapped_out": 10}
    other = {**engine, "interceptions": 3, "decisions": {"swap_out": 2, "discard": 1},
             "intercepted_by_state": {"preserved": 0, "swapped": 2}, "cost_model": {"a": 2.0}}
    total = merge_stats([engine, other])
    assert total["interceptions"] == 5 and total["bytes_swapped_out"] == 20
    assert total["decisions"] == {"swap_out": 3, "discard": 1}
    assert total["intercepted_by_state"] == {"preserved": 1, "swapped": 2}
    assert total["cost_model"] == {"a": 1.0} and total["policy"] == "min-waste"
    assert merge_stats([]) == {}


def test_published_metrics_follow_each_engines_counters():
    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {r: sample("infercept:interceptions_total", engine=r) for r in ("70", "71")}
    publisher = StatsPublisher()
    snapshot = {"interceptions": 4, "decisions": {"discard": 2}, "idle_device_tokens": 96,
                "intercepted_by_state": {"preserved": 3}}
    publisher.publish({70: snapshot, 71: {**snapshot, "interceptions": 1}})
    publisher.publish({70: {**snapshot, "interceptions": 6}, 71: {**snapshot, "interceptions": 1}})
    assert sample("infercept:interceptions_total", engine="70") - before["70"] == 6
    assert sample("infercept:interceptions_total", engine="71") - before["71"] == 1
    assert sample("infercept:intercepted_requests", engine="70", state="preserved") == 3
    assert sample("infercept:idle_device_tokens", engine="71") == 96


# ---- Anthropic's Messages API: a turn paused at its tool_use -------------------------------

ANTHROPIC_TOOL_TURN = {
    "type": "message", "role": "assistant", "stop_reason": "stop_sequence",
    "stop_sequence": "infercept:intercepted",
    "content": [{"type": "text", "text": "Let me compute. "},
                {"type": "tool_use", "id": "toolu-1", "name": "calculator", "input": {"expression": "2+3"}}],
}


def test_a_paused_anthropic_turn_ends_at_its_tool_use_or_as_a_natural_end():
    data = {**ANTHROPIC_TOOL_TURN, "content": list(ANTHROPIC_TOOL_TURN["content"])}
    assert payloads.call_ids(data, "messages") == ["toolu-1"]
    assert payloads.reply_text(data, "messages") == "Let me compute. "
    payloads.finish_paused(data, "messages", tool_calls=True)
    assert (data["stop_reason"], data["stop_sequence"]) == ("tool_use", None)
    without_call = {**ANTHROPIC_TOOL_TURN, "content": [{"type": "text", "text": "Hello."}]}
    payloads.finish_paused(without_call, "messages", tool_calls=False)
    assert (without_call["stop_reason"], without_call["stop_sequence"]) == ("end_turn", None)
    # A stop sequence of the user's own is left alone.
    own = {**ANTHROPIC_TOOL_TURN, "stop_sequence": "END"}
    payloads.finish_paused(own, "messages", tool_calls=True)
    assert own["stop_reason"] == "stop_sequence"


def test_an_anthropic_stream_names_its_tool_use_and_ends_with_the_intercept():
    start = 'event: content_block_start\ndata: {"type": "content_block_start", "index": 1, ' \
            '"content_block": {"type": "tool_use", "id": "toolu-2", "name": "calculator", "input": {}}}'
    text = 'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, ' \
           '"delta": {"type": "text_delta", "text": "Hi"}}'
    delta = 'event: message_delta\ndata: {"type": "message_delta", "delta": ' \
            '{"stop_reason": "stop_sequence", "stop_sequence": "infercept:intercepted"}}'
    assert payloads.call_ids(payloads.event_data(start), "messages", streamed=True) == ["toolu-2"]
    assert payloads.reply_text(payloads.event_data(text), "messages", streamed=True) == "Hi"
    assert payloads.is_last_event("event: message_stop\ndata: {}", "messages")
    assert not payloads.is_last_event(delta, "messages") and payloads.is_last_event("data: [DONE]", "chat")
    event = payloads.with_info(delta, {"intercept_id": "icpt-k", "state": "preserved"}, "messages", True)
    assert event.startswith("event: message_delta\n")
    data = payloads.event_data(event)
    assert data["infercept"]["intercept_id"] == "icpt-k"
    assert (data["delta"]["stop_reason"], data["delta"]["stop_sequence"]) == ("tool_use", None)


def test_a_follow_up_is_located_by_its_tool_use_ids_or_its_conversation():
    dp, core = service([0, 1], {1: {"locate": "icpt-k"}})
    tool_result = {"messages": [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": ANTHROPIC_TOOL_TURN["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu-1", "content": "5"}]}]}
    assert asyncio.run(routes._follow_up_rank(dp, "messages", tool_result)) == 1
    assert core.calls[-1][2][0][0] == "toolu-1"
    # A turn paused without a tool call: named by the conversation up to its reply, the same
    # digest for a reply sent as a string or as text blocks.
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    blocks = [conversation[0], {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]
    asyncio.run(routes._follow_up_rank(dp, "messages", {"messages": [*blocks, {"role": "user", "content": "?"}]}))
    assert core.calls[-1][2][0] == [payloads.turn_id(conversation)]
    asyncio.run(routes._follow_up_rank(dp, "chat", {"messages": [*conversation, {"role": "user", "content": "?"}]}))
    assert core.calls[-1][2][0] == [payloads.turn_id(conversation)]


def test_a_responses_turn_is_named_by_its_function_calls():
    response = {"output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Computing."}]},
        {"type": "function_call", "call_id": "call-7", "name": "calculator", "arguments": "{}"}]}
    assert payloads.call_ids(response, "responses") == ["call-7"]
    assert payloads.reply_text(response, "responses") == "Computing."
    completed = 'event: response.completed\ndata: ' + json.dumps(
        {"type": "response.completed", "response": response})
    assert payloads.is_last_event(completed, "responses")
    assert not payloads.is_last_event("event: response.output_item.done\ndata: {}", "responses")
    data = payloads.event_data(payloads.with_info(completed, {"intercept_id": "icpt-k"}, "responses", True))
    assert data["response"]["infercept"] == {"intercept_id": "icpt-k"}  # where a response's is
    dp, core = service([0, 1], {0: {"locate": "icpt-k"}})
    follow_up = {"input": [{"role": "user", "content": "2+3?"}, response["output"][1],
                           {"type": "function_call_output", "call_id": "call-7", "output": "5"}]}
    assert asyncio.run(routes._follow_up_rank(dp, "responses", follow_up)) == 0
    assert core.calls[-1][2][0] == ["call-7", "call-7"]


def test_a_previous_responses_function_calls_go_back_in_front_of_the_follow_up():
    """vLLM 0.32 drops a previous response's function calls from a `previous_response_id`
    conversation; they are put back before the new input, once (None fields dropped)."""
    from infercept.server import payloads

    response = {"id": "resp_1", "output": [
        {"type": "reasoning", "id": "rs"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "async_": None},
        {"type": "message", "content": []}]}
    calls = payloads.function_calls(response)
    assert calls == [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]
    output = {"type": "function_call_output", "call_id": "c1", "output": "5"}
    body = {"previous_response_id": "resp_1", "input": [output]}
    payloads.with_previous_calls(body, calls)
    assert body["input"] == [*calls, output]
    payloads.with_previous_calls(body, calls)  # already there: not repeated
    assert body["input"] == [*calls, output]
    text = {"input": "go on"}
    payloads.with_previous_calls(text, calls)
    assert text["input"] == [*calls, {"role": "user", "content": "go on"}]
