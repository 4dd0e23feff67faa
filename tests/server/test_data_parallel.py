"""InferCept under vLLM's data parallelism: two engine cores, two API server processes.

`infercept serve --data-parallel-size 2 --api-server-count 2`, each engine core
on one of the two cores (`VLLM_CPU_OMP_THREADS_BIND`, as the tensor-parallel
test binds its workers). An intercept lives in the engine that paused it; its
id names that engine; explicit resumes, automatic resumes (a completion's
prompt, a chat follow-up's tool-call ids), state queries and cancels reach it
from whichever API server process takes the HTTP request. Transcripts equal
the single-engine server's for the same scripts.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import PAUSED_STATES, assert_openai_error, wait_for_state, wait_until_nothing_held

pytestmark = pytest.mark.slow

TIMEOUT_S = 30  # the intercept timeout: a pause nobody resumes is released after it
DP_ARGS = (*TINY_SERVER_ARGS, "--data-parallel-size", "2", "--api-server-count", "2",
           "--intercept-timeout", str(TIMEOUT_S))
DP_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
HTTP_TIMEOUT_S = 120
NUM_AGENTS = 6  # completion agents; half resume explicitly, half by their prompt
SEGMENT_TOKENS = 6
BUDGET = 3 * SEGMENT_TOKENS + 4

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}


def _post(base, path, body, rank=None):
    headers = {} if rank is None else {"X-data-parallel-rank": str(rank)}
    response = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def completion_agent(base, model, index, rank=None):
    """Three segments: paused after 6 tokens twice, resumed with a tool's result each time
    (the last segment runs to the token budget).

    Even agents resume explicitly (`/v1/intercepts/{id}/resume`); odd agents
    send their whole context back as token ids (an automatic resume). Returns
    the transcript and what each resume reported.
    """
    explicit = index % 2 == 0
    first = _post(base, "/v1/completions", {
        "model": model, "prompt": f"Agent {index} asks the quick brown fox", "max_tokens": BUDGET,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True,
        "infercept": {"intercept_after": SEGMENT_TOKENS, "tool": "search"}}, rank)
    choice, info = first["choices"][0], first["infercept"]
    texts, infos = [choice["text"]], [info]
    context, generated = choice["prompt_token_ids"] + choice["token_ids"], len(choice["token_ids"])
    for turn in range(2):
        result = f" result {index}.{turn}:"
        # The last segment runs to the budget without pausing.
        pause = {"intercept_after": SEGMENT_TOKENS, "tool": "search"} if turn == 0 else {}
        if explicit:
            data = _post(base, f"/v1/intercepts/{infos[-1]['intercept_id']}/resume",
                         {"text": result, "infercept": pause})
        else:
            appended = httpx.post(f"{base}/tokenize", json={"model": model, "prompt": result,
                                                            "add_special_tokens": False},
                                  timeout=HTTP_TIMEOUT_S).json()["tokens"]
            context += appended
            data = _post(base, "/v1/completions", {
                "model": model, "prompt": context, "max_tokens": BUDGET - generated,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True, "infercept": pause})
            context += data["choices"][0]["token_ids"]
            generated += len(data["choices"][0]["token_ids"])
        texts.append(data["choices"][0]["text"])
        infos.append(data["infercept"])
    return texts, infos


def chat_agent(base, model, index, rank=None):
    """A forced tool call, then the answer after the tool's result (no intercept named)."""
    messages = [{"role": "user", "content": f"Agent {index}: what is 2+3? Use the calculator."}]
    first = _post(base, "/v1/chat/completions", {
        "model": model, "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 80,
        **FORCE_CALL}, rank)
    call = first["choices"][0]["message"]["tool_calls"][0]
    messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": "5"}]
    answer = _post(base, "/v1/chat/completions", {
        "model": model, "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 16})
    return (call["function"], answer["choices"][0]["message"]["content"]), \
        (first.get("infercept"), answer.get("infercept"))


def turn_agent(base, model, index, rank=None):
    """A chat turn without tools paused at its end (`pause_turn`), then the person's next turn."""
    # Longer than a 32-token block: the follow-up shares the prompt and no more (see
    # tests/server/test_chat_turns.py), so whole blocks of it are reused.
    messages = [{"role": "user", "content": f"Agent {index} says hello to the people reading this."}]
    first = _post(base, "/v1/chat/completions", {
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 32,
        "infercept": {"pause_turn": True},
        "structured_outputs": {"regex": f"Hello agent {index}[.] How can I help[?]"}}, rank)
    reply = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "The weather?"}]
    answer = _post(base, "/v1/chat/completions", {
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 12})
    return (reply, answer["choices"][0]["message"]["content"]), (first.get("infercept"), answer.get("infercept"))


def run_agents(base, model, pinned: bool):
    """Every agent at once; `pinned` sends each first turn to engine index % 2."""
    with ThreadPoolExecutor(NUM_AGENTS + 4) as pool:
        completions = [pool.submit(completion_agent, base, model, i, i % 2 if pinned else None)
                       for i in range(NUM_AGENTS)]
        chats = [pool.submit(chat_agent, base, model, i, i % 2 if pinned else None) for i in range(2)]
        turns = [pool.submit(turn_agent, base, model, i, i % 2 if pinned else None) for i in range(2)]
        return ([f.result() for f in completions], [f.result() for f in chats],
                [f.result() for f in turns])


@pytest.fixture(scope="module")
def single_engine_transcripts(server_pool, tiny_model):
    server = server_pool.get(tiny_model, TINY_SERVER_ARGS)
    completions, chats, turns = run_agents(server.base_url, str(tiny_model), pinned=False)
    assert all(answer["resumed_from"] == first["intercept_id"] for _, (first, answer) in turns)
    return ([texts for texts, _ in completions], [transcript for transcript, _ in chats],
            [transcript for transcript, _ in turns])


@pytest.fixture
def dp_server(server_pool, tiny_model, single_engine_transcripts):
    return server_pool.get(tiny_model, DP_ARGS, env=DP_ENV)


def _engine(intercept_id: str) -> int:
    key, dot, rank = intercept_id.rpartition(".")
    assert key.startswith("icpt-") and dot and rank.isdigit(), intercept_id
    return int(rank)


def test_resumes_reach_the_engine_that_holds_the_kv(dp_server, tiny_model, single_engine_transcripts):
    base = dp_server.base_url
    completions, chats, turns = run_agents(base, str(tiny_model), pinned=True)
    engines = set()
    for index, (texts, infos) in enumerate(completions):
        engine = _engine(infos[0]["intercept_id"])
        assert engine == index % 2  # where its first turn was sent
        for before, after in zip(infos, infos[1:]):
            # Each resume took the paused request's KV on its engine and paused there again.
            assert after["resumed_from"] == before["intercept_id"], (index, infos)
            assert after["reused_tokens"] > 0, (index, infos)
        engines.update(_engine(info["intercept_id"]) for info in infos if "intercept_id" in info)
        # Every segment ran on the first turn's engine.
        assert {_engine(i["intercept_id"]) for i in infos if "intercept_id" in i} == {engine}
    assert engines == {0, 1}
    assert [texts for texts, _ in completions] == single_engine_transcripts[0]
    for index, (transcript, (first, answer)) in enumerate(chats):
        assert _engine(first["intercept_id"]) == index % 2
        assert answer["resumed_from"] == first["intercept_id"] and answer["reused_tokens"] > 0
    assert [transcript for transcript, _ in chats] == single_engine_transcripts[1]
    # A turn paused without a tool call is located by its conversation.
    for index, (transcript, (first, answer)) in enumerate(turns):
        assert _engine(first["intercept_id"]) == index % 2
        assert answer["resumed_from"] == first["intercept_id"] and answer["reused_tokens"] > 0
    assert [transcript for transcript, _ in turns] == single_engine_transcripts[2]
    # Any API server process knows every intercept's end.
    for _, infos in completions:
        for info in infos[:-1]:
            state = httpx.get(f"{base}/v1/intercepts/{info['intercept_id']}", timeout=30).json()
            assert state["state"] == "resumed"
    wait_until_nothing_held(base)


def test_first_turns_are_balanced_by_vllm(dp_server, tiny_model, single_engine_transcripts):
    completions, chats, turns = run_agents(dp_server.base_url, str(tiny_model), pinned=False)
    assert {_engine(infos[0]["intercept_id"]) for _, infos in completions} == {0, 1}
    assert all(after["reused_tokens"] > 0 for _, infos in completions for after in infos[1:])
    assert [texts for texts, _ in completions] == single_engine_transcripts[0]
    assert [transcript for transcript, _ in chats] == single_engine_transcripts[1]
    assert all(answer["reused_tokens"] > 0 for _, (_, answer) in turns)
    assert [transcript for transcript, _ in turns] == single_engine_transcripts[2]
    wait_until_nothing_held(dp_server.base_url)


def _metric(base, name, **labels) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def _pause(base, model, rank):
    return _post(base, "/v1/completions", {
        "model": model, "prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0,
        "ignore_eos": True, "infercept": {"intercept_after": 5}}, rank)["infercept"]["intercept_id"]


def test_state_cancel_and_metrics_per_engine(dp_server, tiny_model):
    base, model = dp_server.base_url, str(tiny_model)
    before = {rank: _metric(base, "infercept:interceptions_total", engine=rank) for rank in (0, 1)}
    ids = {rank: _pause(base, model, rank) for rank in (0, 1)}
    assert {rank: _engine(i) for rank, i in ids.items()} == {0: 0, 1: 1}
    for intercept_id in ids.values():
        state = httpx.get(f"{base}/v1/intercepts/{intercept_id}", timeout=30).json()
        assert state["id"] == intercept_id and state["state"] in PAUSED_STATES
        assert state["context_tokens"] > 0 and state["generated_tokens"] == 5
    deadline_s = time.monotonic() + 120  # the server polls the engines once a second
    while not all(_metric(base, "infercept:intercepted_requests", engine=rank, state="preserved") == 1
                  for rank in (0, 1)):
        assert time.monotonic() < deadline_s, httpx.get(f"{base}/metrics").text[-3000:]
        time.sleep(0.5)
    for rank in (0, 1):
        assert _metric(base, "infercept:interceptions_total", engine=rank) == before[rank] + 1
    # Ids that name no engine of this server, or no intercept of the named engine.
    key = ids[0].rpartition(".")[0]
    for unknown in (key, f"{key}.7", f"{key}.1", f"{key}.x"):
        assert_openai_error(httpx.get(f"{base}/v1/intercepts/{unknown}", timeout=30), 404)
        assert_openai_error(httpx.post(f"{base}/v1/intercepts/{unknown}/resume", json={"text": "a"},
                                       timeout=30), 404)
    for intercept_id in ids.values():
        assert httpx.delete(f"{base}/v1/intercepts/{intercept_id}", timeout=30).json()["deleted"]
        assert httpx.get(f"{base}/v1/intercepts/{intercept_id}", timeout=30).json()["state"] == "cancelled"
        assert_openai_error(httpx.post(f"{base}/v1/intercepts/{intercept_id}/resume",
                                       json={"text": "a"}, timeout=30), 409)
    wait_until_nothing_held(base)


def test_pauses_nobody_resumes_expire_on_each_engine(dp_server, tiny_model):
    base, model = dp_server.base_url, str(tiny_model)
    ids = [_pause(base, model, rank) for rank in (0, 1)]
    for intercept_id in ids:
        wait_for_state(base, intercept_id, {"expired"}, timeout_s=TIMEOUT_S + 120)
    wait_until_nothing_held(base)
