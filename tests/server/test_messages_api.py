"""Anthropic's Messages API through the official `anthropic` client: a turn that ends in
`tool_use` pauses, the follow-up with its `tool_result` resumes it automatically, and
every reply equals what a server with the stock `vllm` policy gives."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import wait_until_nothing_held

pytestmark = pytest.mark.slow

# The tiny model has random weights and rarely stops by itself: a JSON schema with one
# allowed value (Anthropic's `output_config.format`) makes a turn end in EOS after a
# fixed reply. (A forced `tool_use` cannot be made here: vLLM 0.32 constrains a forced
# tool's input to any JSON value, and this model's are not objects; the tool_use path
# is unit-tested on Anthropic payloads in tests/unit/test_server_routing.py.)
FIXED_REPLY = {"format": {"type": "json_schema",
                          "schema": {"type": "string", "enum": ["Hello, how can I help you today?"]}}}
# Longer than a 32-token block: the follow-up shares the paused prompt (whole blocks).
FIRST_MESSAGE = "Say hello to the people reading this conversation, please."
# This client version has no `temperature` argument; vLLM's Messages API takes the field.
GREEDY = {"temperature": 0}


def client_of(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


def conversation(client, model, *, stream_first: bool = False, pause_turn: bool = True):
    """A turn paused at its end (`pause_turn`), then the person's next turn; returns both
    replies' texts and `infercept` objects."""
    messages = [{"role": "user", "content": FIRST_MESSAGE}]
    first = dict(model=model, max_tokens=40, messages=messages,
                 extra_body={**GREEDY, "output_config": FIXED_REPLY, "infercept": {"pause_turn": pause_turn}})
    if stream_first:
        with client.messages.stream(**first) as stream:
            events = list(stream)
            reply = stream.get_final_message()
        [delta] = [e for e in events if e.type == "message_delta"]
        info = delta.model_extra.get("infercept")
    else:
        reply = client.messages.create(**first)
        info = reply.model_extra.get("infercept")
    assert reply.stop_reason == "end_turn"  # as stock's, not InferCept's stop reason
    text = "".join(block.text for block in reply.content if block.type == "text")
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "The weather?"}]
    answer = client.messages.create(model=model, max_tokens=12, messages=messages, extra_body=GREEDY)
    return (text, "".join(block.text for block in answer.content if block.type == "text"),
            info, answer.model_extra.get("infercept"))


@pytest.fixture(scope="module")
def stock_conversation(tiny_model, server_pool):
    args = [a if a != "preserve" else "vllm" for a in TINY_SERVER_ARGS]
    first, second, info, resumed = conversation(client_of(server_pool.get(tiny_model, args)), str(tiny_model))
    assert info is None and resumed is None  # the stock policy never pauses
    return first, second


@pytest.mark.parametrize("stream_first", [False, True], ids=["json", "stream"])
def test_a_paused_turn_is_resumed_by_the_next_message(stock_conversation, tiny_server, tiny_model, stream_first):
    first, second, info, resumed = conversation(client_of(tiny_server), str(tiny_model), stream_first=stream_first)
    assert info["intercept_id"].startswith("icpt-") and info["state"] == "preserved"
    assert resumed["resumed_from"] == info["intercept_id"] and resumed["reused_tokens"] > 0
    assert (first, second) == stock_conversation
    state = httpx.get(f"{tiny_server.base_url}/v1/intercepts/{info['intercept_id']}").json()
    assert state["state"] == "resumed" and state["tool"] == "human"


def test_without_the_opt_in_nothing_pauses(stock_conversation, tiny_server, tiny_model):
    first, second, info, resumed = conversation(client_of(tiny_server), str(tiny_model), pause_turn=False)
    assert info is None and resumed is None and (first, second) == stock_conversation


def test_bad_input_gets_anthropics_error_shape(tiny_server, tiny_model):
    client = client_of(tiny_server)
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model=str(tiny_model), max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                               extra_body={"infercept": {"intercept_after": 0}})
    body = raised.value.response.json()
    assert body["type"] == "error" and "infercept" in body["error"]["message"], body
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model=str(tiny_model), max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                               extra_body={"infercept": {"resume": "icpt-none"}})
    # The server keeps serving.
    assert client.messages.create(model=str(tiny_model), max_tokens=2,
                                  messages=[{"role": "user", "content": "Hi"}]).stop_reason == "max_tokens"


def test_nothing_is_held_afterwards(tiny_server):
    wait_until_nothing_held(tiny_server.base_url)
