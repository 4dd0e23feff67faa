"""OpenAI's Responses API through the official `openai` client: a turn that ends in a
`function_call` pauses, the follow-up with its `function_call_output` (the input items
sent again) resumes it automatically, and every output equals what a server with the
stock `vllm` policy gives."""

from __future__ import annotations

import re

import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import wait_until_nothing_held

pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "name": "calculator", "description": "Evaluate an arithmetic expression.",
          "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                         "required": ["expression"]}}]
# The tiny model has random weights: structured outputs make its first turn the
# hermes-style call its chat template renders, which vLLM's `hermes` parser turns
# into a `function_call` item.
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}


def agent(client, model, *, stream_first: bool = False):
    """A forced function call, then the answer after its output; returns the call's
    arguments, the answer's text and both turns' `infercept` objects."""
    items = [{"role": "user", "content": "What is 2+3? Use the calculator."}]
    first = dict(model=model, input=items, tools=TOOLS, temperature=0, max_output_tokens=80,
                 extra_body=FORCE_CALL)
    if stream_first:
        events = list(client.responses.create(**first, stream=True))
        assert events[-1].type == "response.completed"
        response = events[-1].response
    else:
        response = client.responses.create(**first)
    info = response.model_extra.get("infercept")
    [call] = [item for item in response.output if item.type == "function_call"]
    items += [call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "5"}]
    answer = client.responses.create(model=model, input=items, tools=TOOLS, temperature=0,
                                     max_output_tokens=16)
    return call.arguments, answer.output_text, info, answer.model_extra.get("infercept")


@pytest.fixture(scope="module")
def stock_agent(tiny_model, server_pool):
    args = [a if a != "preserve" else "vllm" for a in TINY_SERVER_ARGS]
    arguments, text, info, resumed = agent(server_pool.get(tiny_model, args).client(), str(tiny_model))
    assert info is None and resumed is None  # the stock policy never pauses
    return arguments, text


@pytest.mark.parametrize("stream_first", [False, True], ids=["json", "stream"])
def test_a_function_call_pauses_and_its_output_resumes_it(stock_agent, tiny_server, tiny_model, stream_first):
    arguments, text, info, resumed = agent(tiny_server.client(), str(tiny_model), stream_first=stream_first)
    assert info["intercept_id"].startswith("icpt-") and info["state"] == "preserved"
    assert resumed["resumed_from"] == info["intercept_id"] and resumed["reused_tokens"] > 0
    assert (arguments, text) == stock_agent
    state = httpx.get(f"{tiny_server.base_url}/v1/intercepts/{info['intercept_id']}").json()
    assert state["state"] == "resumed"


def test_a_turn_that_ends_without_a_call_is_not_held(tiny_server, tiny_model):
    """It pauses at its natural end like any turn that may call a tool; with no call in
    its output the pause is released at once, and the response says nothing of it."""
    response = tiny_server.client().responses.create(
        model=str(tiny_model), input="Hi", tools=TOOLS, temperature=0, max_output_tokens=16,
        extra_body={"structured_outputs": {"regex": "Hello[.]"}})
    assert response.output_text == "Hello." and response.status == "completed"
    assert "intercept_id" not in (response.model_extra.get("infercept") or {})
    wait_until_nothing_held(tiny_server.base_url)


def test_a_follow_up_by_previous_response_id_resumes(stock_agent, server_pool, tiny_model):
    """With vLLM's response store on, the follow-up names the first response instead of
    sending its items again. vLLM 0.32 rebuilds that conversation without the previous
    `function_call` item; `infercept serve` puts it back, so the follow-up continues the
    paused turn (it resumes it) and its answer is the one the explicit conversation gets
    from the stock policy."""
    server = server_pool.get(tiny_model, TINY_SERVER_ARGS,
                             env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"})
    client, model = server.client(), str(tiny_model)
    first = client.responses.create(
        model=model, input=[{"role": "user", "content": "What is 2+3? Use the calculator."}],
        tools=TOOLS, temperature=0, max_output_tokens=80, extra_body=FORCE_CALL)
    info = first.model_extra["infercept"]
    [call] = [item for item in first.output if item.type == "function_call"]
    answer = client.responses.create(
        model=model, previous_response_id=first.id, tools=TOOLS, temperature=0,
        max_output_tokens=16,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "5"}])
    resumed = answer.model_extra["infercept"]
    assert resumed["resumed_from"] == info["intercept_id"] and resumed["reused_tokens"] > 0
    assert (call.arguments, answer.output_text) == stock_agent
    wait_until_nothing_held(server.base_url)
