"""Agent frameworks, unchanged, against a real `infercept serve`: the OpenAI Agents SDK
(through its Chat Completions model and its Responses model) and LangChain's `ChatOpenAI`
with bound tools each run a tool loop; every follow-up resumes the turn that paused at the
tool call (`reused_tokens > 0`, read off the HTTP responses), and the agent's outputs equal
those against a server with the stock `vllm` policy.

The tiny model has random weights: structured outputs make the first turn the hermes-style
call its chat template renders (passed as the frameworks pass any extra body field), and
the turn after the tool's result is free generation. The Agents SDK's tools are not
strict here: vLLM constrains a strict tool's call with a grammar of its own, in place of
the regex.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import wait_until_nothing_held

pytestmark = pytest.mark.slow

CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}
QUESTION = "What is 2+3? Use the calculator."
ANSWER = {"structured_outputs": {"regex": "The answer is 5[.]"}}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return "5"


class Recorder:
    """The `infercept` objects of the server's JSON responses, in order (httpx hooks)."""

    def __init__(self) -> None:
        self.infos: list[dict | None] = []

    def _record(self, body: bytes) -> None:
        text = body.decode(errors="replace")
        if text.startswith(("event:", "data:")):  # a Responses stream: its completed response
            for line in text.splitlines():
                if line.startswith("data: ") and '"response.completed"' in line:
                    self.infos.append(json.loads(line[len("data: "):])["response"].get("infercept"))
            return
        try:
            data = json.loads(text)
        except ValueError:
            return
        if isinstance(data, dict) and ("choices" in data or "output" in data):
            self.infos.append(data.get("infercept"))

    def sync_hook(self, response: httpx.Response) -> None:
        self._record(response.read())

    async def async_hook(self, response: httpx.Response) -> None:
        self._record(await response.aread())


def openai_agent(base_url: str, model: str, api: str):
    """The Agents SDK's agent with one function tool; returns its final output and the
    server's `infercept` objects."""
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, RunHooks,
                        Runner, function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    recorder = Recorder()
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0,
                         http_client=httpx.AsyncClient(timeout=120, event_hooks={"response": [recorder.async_hook]}))
    model_class = OpenAIChatCompletionsModel if api == "chat" else OpenAIResponsesModel
    agent = Agent(name="calculator agent", instructions="Answer with the calculator.",
                  tools=[function_tool(calculator, strict_mode=False)],
                  model=model_class(model=model, openai_client=client),
                  model_settings=ModelSettings(temperature=0, max_tokens=80, extra_body=FORCE_CALL))

    class FreeAfterTheCall(RunHooks):
        async def on_tool_end(self, context, agent, tool, result):
            # The Agents SDK takes a turn cut by the token budget for an error: this one ends.
            agent.model_settings = dataclasses.replace(agent.model_settings, extra_body=ANSWER, max_tokens=16)

    result = asyncio.run(Runner.run(agent, QUESTION, hooks=FreeAfterTheCall(), max_turns=3))
    return result.final_output, recorder.infos


def langchain_agent(base_url: str, model: str):
    """LangChain's `ChatOpenAI` with the tool bound: call, tool message, answer."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    recorder = Recorder()
    http_client = httpx.Client(timeout=120, event_hooks={"response": [recorder.sync_hook]})
    common = dict(base_url=f"{base_url}/v1", api_key="EMPTY", model=model, temperature=0, max_retries=0,
                  http_client=http_client)
    calculator_tool = tool(calculator)
    caller = ChatOpenAI(**common, max_tokens=80, extra_body=FORCE_CALL).bind_tools([calculator_tool])
    answerer = ChatOpenAI(**common, max_tokens=16).bind_tools([calculator_tool])
    messages = [HumanMessage(QUESTION)]
    call = caller.invoke(messages)
    [tool_call] = call.tool_calls
    messages += [call, ToolMessage(calculator_tool.invoke(tool_call["args"]), tool_call_id=tool_call["id"])]
    answer = answerer.invoke(messages)
    return (tool_call["args"], answer.content), recorder.infos


FRAMEWORKS = {
    "agents-sdk-chat": lambda base, model: openai_agent(base, model, "chat"),
    "agents-sdk-responses": lambda base, model: openai_agent(base, model, "responses"),
    "langchain": langchain_agent,
}


@pytest.fixture(scope="module")
def stock_outputs(tiny_model, server_pool):
    args = [a if a != "preserve" else "vllm" for a in TINY_SERVER_ARGS]
    server = server_pool.get(tiny_model, args)
    outputs = {}
    for name, run in FRAMEWORKS.items():
        outputs[name], infos = run(server.base_url, str(tiny_model))
        assert len(infos) == 2 and infos == [None, None]  # the stock policy never pauses
    return outputs


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_a_framework_agent_resumes_every_paused_turn(stock_outputs, tiny_server, tiny_model, framework):
    output, infos = FRAMEWORKS[framework](tiny_server.base_url, str(tiny_model))
    first, answer = infos
    assert first["intercept_id"].startswith("icpt-") and first["state"] == "preserved"
    assert answer["resumed_from"] == first["intercept_id"] and answer["reused_tokens"] > 0
    assert output == stock_outputs[framework]
    wait_until_nothing_held(tiny_server.base_url)
