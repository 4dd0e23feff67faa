"""The server's tool-call pause API, through the official `openai` client and httpx.

A real `infercept serve` process on 127.0.0.1 and the tiny model. A chat
turn that ends in a tool call is intercepted; the client's follow-up (with the
tool's result) resumes it, explicitly or by its prompt; the content equals
what the same conversation gets from a server with the stock `vllm` policy.
"""

from __future__ import annotations

import re

import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import wait_until_nothing_held

pytestmark = pytest.mark.slow

TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}]
# The tiny model has random weights: structured outputs make its first turn
# the hermes-style tool call its chat template renders, which vLLM's `hermes`
# parser turns into `tool_calls` (the second turn is free generation).
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}


def conversation(client, model, *, explicit: bool, stream_first: bool = False):
    """Two turns: a forced tool call, then the answer after the tool's result."""
    messages = [{"role": "user", "content": "What is 2+3? Use the calculator."}]
    first = dict(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=80,
                 extra_body=FORCE_CALL)
    if stream_first:
        chunks = list(client.chat.completions.create(**first, stream=True))
        info = chunks[-1].model_extra.get("infercept")
        call = {"id": "call-0", "type": "function", "function": {
            "name": "calculator",
            "arguments": "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                                 for c in chunks if c.choices and c.choices[0].delta.tool_calls)}}
    else:
        reply = client.chat.completions.create(**first)
        info = reply.model_extra.get("infercept")
        assert reply.choices[0].message.tool_calls
        call = reply.choices[0].message.tool_calls[0].model_dump()
        if info is not None:
            assert reply.choices[0].finish_reason == "tool_calls"
    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "5"})
    extra = {"infercept": {"resume": info["intercept_id"]}} if explicit and info else None
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                            temperature=0, max_tokens=24, extra_body=extra)
    return call, info, answer


@pytest.fixture(scope="module")
def stock_conversation(tiny_model, server_pool):
    """The same conversation against the stock policy (a server of its own)."""
    args = [a if a != "preserve" else "vllm" for a in TINY_SERVER_ARGS]
    server = server_pool.get(tiny_model, args)
    call, info, answer = conversation(server.client(), str(tiny_model), explicit=False)
    assert info is None  # the stock policy never intercepts
    return call, answer.choices[0].message.content


@pytest.mark.parametrize("explicit", [False, True])
def test_tool_call_is_intercepted_and_resumed(stock_conversation, tiny_server, tiny_model, explicit):
    call, info, answer = conversation(tiny_server.client(), str(tiny_model), explicit=explicit)
    assert info["intercept_id"].startswith("icpt-") and info["state"] == "preserved"
    resumed = answer.model_extra["infercept"]
    assert resumed["resumed_from"] == info["intercept_id"] and resumed["reused_tokens"] > 0
    assert (call["function"], answer.choices[0].message.content) == (
        stock_conversation[0]["function"], stock_conversation[1])
    state = httpx.get(f"{tiny_server.base_url}/v1/intercepts/{info['intercept_id']}").json()
    assert state["state"] == "resumed"


def test_streamed_tool_call_carries_the_intercept_in_its_last_chunk(stock_conversation, tiny_server,
                                                                   tiny_model):
    call, info, answer = conversation(tiny_server.client(), str(tiny_model), explicit=False,
                                      stream_first=True)
    assert info["intercept_id"].startswith("icpt-")
    assert answer.model_extra["infercept"]["resumed_from"] == info["intercept_id"]
    assert call["function"]["arguments"] == stock_conversation[0]["function"]["arguments"]
    assert answer.choices[0].message.content == stock_conversation[1]


def completion(base_url, model, **extra):
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0,
            "ignore_eos": True, "infercept": {"intercept_after": 5, "tool": "search"}, **extra}
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)


def test_completion_intercept_endpoints(tiny_server, tiny_model):
    base, model = tiny_server.base_url, str(tiny_model)
    first = completion(base, model).json()
    info = first["infercept"]
    assert first["choices"][0]["finish_reason"] == "stop" and first["usage"]["completion_tokens"] == 5
    state = httpx.get(f"{base}/v1/intercepts/{info['intercept_id']}").json()
    assert state["state"] == "preserved" and state["tool"] == "search"
    assert state["context_tokens"] == first["usage"]["total_tokens"]
    resumed = httpx.post(f"{base}/v1/intercepts/{info['intercept_id']}/resume",
                         json={"text": " = 42", "infercept": {"tool": "search"}}, timeout=60).json()
    assert resumed["infercept"]["resumed_from"] == info["intercept_id"]
    assert resumed["infercept"]["reused_tokens"] == first["usage"]["total_tokens"] - 1
    # max_tokens (30) counts the model's own tokens across segments.
    assert resumed["usage"]["completion_tokens"] == 25 and "intercept_id" not in resumed["infercept"]
    again = httpx.post(f"{base}/v1/intercepts/{info['intercept_id']}/resume", json={"text": "x"})
    assert again.status_code == 409 and again.json()["error"]["code"] == 409


def test_cancel_and_bad_input(tiny_server, tiny_model):
    base, model = tiny_server.base_url, str(tiny_model)
    intercept_id = completion(base, model).json()["infercept"]["intercept_id"]
    url = f"{base}/v1/intercepts/{intercept_id}"
    cases = [
        (httpx.post(f"{url}/resume", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (httpx.post(f"{url}/resume", json=["a list"]), 400),
        (httpx.post(f"{url}/resume", json={"text": "a", "token_ids": [1]}), 400),
        (httpx.post(f"{url}/resume", json={"token_ids": ["x"]}), 400),
        (httpx.post(f"{url}/resume", json={"max_tokens": 0}), 400),
        (httpx.post(f"{url}/resume", json={"token_ids": [5] * 3000}), 400),  # past the context length
        (httpx.post(f"{base}/v1/intercepts/icpt-unknown/resume", json={"text": "a"}), 404),
        (httpx.get(f"{base}/v1/intercepts/icpt-unknown"), 404),
        (httpx.delete(f"{base}/v1/intercepts/icpt-unknown"), 404),
        (completion(base, model, infercept={"intercept_after": "soon"}), 400),
        (completion(base, model, infercept={"resume": "icpt-unknown"}), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == status and error["message"]
    # Every failed resume left the intercept resumable.
    assert httpx.get(url).json()["state"] == "preserved"
    assert httpx.delete(url).json()["deleted"] is True
    assert httpx.get(url).json()["state"] == "cancelled"
    assert httpx.delete(url).status_code == 409
    assert httpx.post(f"{url}/resume", json={"text": "a"}).status_code == 409
    # The server keeps serving.
    assert completion(base, model, infercept=None).status_code == 200


def test_nothing_is_held_afterwards(tiny_server):
    """After the tests above, no intercepted request holds KV and no block is in use."""
    wait_until_nothing_held(tiny_server.base_url)
