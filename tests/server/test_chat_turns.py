"""Multi-turn chat without tools: a turn paused at its natural end, resumed by the next.

Opt-in per request (`"infercept": {"pause_turn": true}`), per request by header
(`X-InferCept-Pause-Turn`, for clients that cannot add fields) or for the whole
server (`--intercept-chat-turns`). The conversation's next turn (the assistant's
reply and a new user message appended) resumes the paused turn automatically;
every reply equals what a server with the stock `vllm` policy gives.
"""

from __future__ import annotations

import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import assert_openai_error, wait_until_nothing_held

pytestmark = pytest.mark.slow

# The tiny model has random weights and rarely stops by itself: structured outputs
# make a turn end in EOS (a natural stop) after a fixed reply.
# Its chat template renders a reply after a newline its generation prompt lacks, so a
# follow-up shares the paused turn's prompt and no more: a prompt longer than a
# 32-token block, so that the shared part holds whole blocks to reuse.
FIRST_MESSAGE = "Say hello to the people reading this conversation, please."
FIRST_REPLY = {"structured_outputs": {"regex": "Hello[.] How can I help[?]"}}


def chat(client, model, *, pause_turn=None, headers=None, stream=False, second_pauses=False):
    """Two turns of a conversation; returns (first, second) as (content, finish reason, infercept)."""
    messages = [{"role": "user", "content": FIRST_MESSAGE}]
    extra = dict(FIRST_REPLY)
    if pause_turn is not None:
        extra["infercept"] = {"pause_turn": pause_turn}
    first = dict(model=model, messages=messages, temperature=0, max_tokens=32, extra_body=extra,
                 extra_headers=headers)
    if stream:
        chunks = list(client.chat.completions.create(**first, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
        turn_one = (content, finish, chunks[-1].model_extra.get("infercept"))
    else:
        reply = client.chat.completions.create(**first)
        turn_one = (reply.choices[0].message.content, reply.choices[0].finish_reason,
                    reply.model_extra.get("infercept"))
    messages += [{"role": "assistant", "content": turn_one[0]},
                 {"role": "user", "content": "Tell me about the weather."}]
    # The second turn ends by length (not a natural stop): it never pauses, unless forced.
    extra = {"infercept": {"pause_turn": second_pauses}}
    if second_pauses:
        extra["structured_outputs"] = {"regex": "It is sunny[.]"}
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            max_tokens=24 if second_pauses else 12, extra_body=extra,
                                            extra_headers=headers)
    return turn_one, (answer.choices[0].message.content, answer.choices[0].finish_reason,
                      answer.model_extra.get("infercept"))


@pytest.fixture(scope="module")
def stock_chat(tiny_model, server_pool):
    """The same conversation against the stock policy (a server of its own)."""
    args = [a if a != "preserve" else "vllm" for a in TINY_SERVER_ARGS]
    server = server_pool.get(tiny_model, args)
    first, second = chat(server.client(), str(tiny_model), pause_turn=True)
    assert first[2] is None and second[2] is None  # the stock policy never pauses
    return first[:2], second[:2]


def assert_resumed(first, second, stock_chat, base_url):
    info = first[2]
    assert info["intercept_id"].startswith("icpt-") and info["state"] == "preserved"
    assert first[1] == "stop"  # a turn paused without a tool call finishes as stock's does
    assert second[2]["resumed_from"] == info["intercept_id"] and second[2]["reused_tokens"] > 0
    assert (first[:2], second[:2]) == stock_chat
    state = httpx.get(f"{base_url}/v1/intercepts/{info['intercept_id']}").json()
    assert state["state"] == "resumed"


@pytest.mark.parametrize("how", ["field", "header", "stream"])
def test_a_chat_turn_pauses_and_the_next_turn_resumes_it(stock_chat, tiny_server, tiny_model, how):
    client, model = tiny_server.client(), str(tiny_model)
    if how == "header":
        first, second = chat(client, model, headers={"X-InferCept-Pause-Turn": "true"})
    else:
        first, second = chat(client, model, pause_turn=True, stream=how == "stream")
    assert_resumed(first, second, stock_chat, tiny_server.base_url)


def test_without_the_opt_in_a_chat_turn_does_not_pause(stock_chat, tiny_server, tiny_model):
    first, second = chat(tiny_server.client(), str(tiny_model))
    assert first[2] is None and second[2] is None
    assert (first[:2], second[:2]) == stock_chat


def test_a_paused_turn_is_a_human_tool_for_the_estimator_and_can_be_cancelled(tiny_server, tiny_model):
    base_url = tiny_server.base_url
    body = {"model": str(tiny_model), "messages": [{"role": "user", "content": FIRST_MESSAGE}],
            "temperature": 0, "max_tokens": 32, "infercept": {"pause_turn": True}, **FIRST_REPLY}
    info = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()["infercept"]
    state = httpx.get(f"{base_url}/v1/intercepts/{info['intercept_id']}").json()
    assert state["tool"] == "human" and state["state"] == "preserved"
    assert httpx.delete(f"{base_url}/v1/intercepts/{info['intercept_id']}").json()["deleted"]
    wait_until_nothing_held(base_url)


def test_a_bad_pause_turn_header_is_a_400_and_the_server_keeps_serving(tiny_server, tiny_model):
    body = {"model": str(tiny_model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = httpx.post(f"{tiny_server.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={"X-InferCept-Pause-Turn": "sometimes"})
    assert "X-InferCept-Pause-Turn" in assert_openai_error(response, 400)["message"]
    bad_field = httpx.post(f"{tiny_server.base_url}/v1/chat/completions", timeout=60,
                           json={**body, "infercept": {"pause_turn": "sometimes"}})
    assert_openai_error(bad_field, 400)
    assert httpx.post(f"{tiny_server.base_url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_nothing_is_held_afterwards(tiny_server):
    wait_until_nothing_held(tiny_server.base_url)


def test_the_server_flag_pauses_every_turn_and_a_request_may_opt_out(stock_chat, start_server, tiny_model):
    server = start_server(tiny_model, *TINY_SERVER_ARGS, "--intercept-chat-turns")
    client, model = server.client(), str(tiny_model)
    first, second = chat(client, model)
    assert_resumed(first, second, stock_chat, server.base_url)
    for opt_out in ({"headers": {"X-InferCept-Pause-Turn": "false"}}, {"pause_turn": False},
                    # the request's field wins over its header
                    {"pause_turn": False, "headers": {"X-InferCept-Pause-Turn": "true"}}):
        first, second = chat(client, model, **opt_out)
        assert first[2] is None and (first[:2], second[:2]) == stock_chat
    # A pause nobody resumes is held until cancelled (or the intercept timeout).
    first, second = chat(client, model, second_pauses=True)
    assert second[2]["resumed_from"] == first[2]["intercept_id"] and second[2]["state"] == "preserved"
    httpx.delete(f"{server.base_url}/v1/intercepts/{second[2]['intercept_id']}")
    wait_until_nothing_held(server.base_url)
