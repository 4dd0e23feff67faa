"""Bad input on every endpoint InferCept adds, and on the `"infercept"` fields it reads.

Against the shared tiny-model server: every bad call is a 4xx in OpenAI's
error shape (never a 5xx), the intercept it named is still resumable
afterwards, and the server keeps serving. Intercept ids are unguessable.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server.helpers import (
    PAUSED_STATES,
    assert_openai_error,
    intercept_state,
    pause_completion,
    wait_until_nothing_held,
)
from server.test_intercept_api import FORCE_CALL, TOOLS

from infercept.server.service import new_intercept_id

pytestmark = pytest.mark.slow

HUGE = 10**30
BEYOND_VOCAB = 1 << 16  # past the tiny model's vocabulary (a few hundred tokens)
UNICODE_TEXT = "Grüße, 世界 🙂 \u0000\u202e\ufffd"

BAD_RESUME_BODIES = [
    # wrong types
    {"text": 42}, {"text": ["a"]}, {"token_ids": "12"}, {"token_ids": [1.5]}, {"token_ids": [None]},
    {"stream": [1]}, {"max_tokens": "many"}, {"infercept": "search"}, {"infercept": [1]},
    {"temperature": "hot"}, {"stop": 5},
    # contradictions and fields the URL implies
    {"text": "a", "token_ids": [1]}, {"infercept": {"resume": "icpt-x"}},
    {"infercept": {"no_such_field": 1}},
    # huge and negative numbers
    {"token_ids": [HUGE]}, {"token_ids": [-1]}, {"token_ids": [2**63]},
    {"token_ids": [5] * 3000},  # past the context length
    {"max_tokens": 0}, {"max_tokens": -HUGE}, {"temperature": -1}, {"logprobs": HUGE}, {"n": 3},
    {"infercept": {"expected_duration_s": 1e300}}, {"infercept": {"expected_duration_s": -1}},
    {"infercept": {"intercept_after": HUGE}}, {"infercept": {"triggers": ["x"] * 10_000}},
    {"infercept": {"triggers": ["x" * 100_000]}}, {"infercept": {"triggers": [""]}},
    {"infercept": {"tool": "t" * 100_000}}, {"text": "x" * (2 << 20)},
    # unicode where a number belongs
    {"max_tokens": "٣"}, {"token_ids": ["🙂"]},
]  # fmt: skip


def resume_url(base_url: str, intercept_id: str) -> str:
    return f"{base_url}/v1/intercepts/{intercept_id}/resume"


def test_bad_resume_bodies_leave_the_intercept_resumable(tiny_server, tiny_model):
    base = tiny_server.base_url
    paused = pause_completion(base, str(tiny_model))
    intercept_id, total_tokens = paused["infercept"]["intercept_id"], paused["usage"]["total_tokens"]
    vocab_size = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    for body in [*BAD_RESUME_BODIES, {"token_ids": [1, vocab_size]}]:
        assert_openai_error(httpx.post(resume_url(base, intercept_id), json=body, timeout=60))
    raw_bodies = [b"", b"{not json", b"[1, 2]", b'"text"', b"null", "{\"text\": \"\udcff\"}".encode("utf-8", "surrogatepass")]
    for content in raw_bodies:
        response = httpx.post(resume_url(base, intercept_id), content=content,
                              headers={"content-type": "application/json"})
        assert_openai_error(response, 400)
    assert_openai_error(httpx.post(resume_url(base, intercept_id), content=b'{"text": "a"}',
                                   headers={"content-type": "text/plain"}), 400)
    assert intercept_state(base, intercept_id) in PAUSED_STATES
    # Still resumable, with all its context, by a good call.
    resumed = httpx.post(resume_url(base, intercept_id), timeout=60,
                         json={"text": UNICODE_TEXT, "infercept": {"tool": "ü"}}).json()
    assert resumed["infercept"]["resumed_from"] == intercept_id
    assert resumed["infercept"]["reused_tokens"] == total_tokens - 1


def json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=8,
    )


# Each body is bad in at least one field, whatever the others hold.
_NO_DIGITS = st.characters(blacklist_categories=("Nd", "Nl", "No", "Cs"))
_BAD_FIELDS = {
    "text": json_values().filter(lambda v: not isinstance(v, str) and v is not None),
    "token_ids": st.lists(st.integers(min_value=BEYOND_VOCAB) | st.integers(max_value=-1), min_size=1),
    "max_tokens": st.integers(max_value=0) | st.text(_NO_DIGITS, min_size=1),
    "infercept": st.fixed_dictionaries({}, optional={
        "triggers": st.lists(st.text(max_size=300), min_size=17, max_size=40),
        "intercept_after": st.integers(max_value=0) | st.integers(min_value=(1 << 20) + 1),
        "expected_duration_s": st.floats(max_value=-1e-9, allow_infinity=False)
        | st.floats(min_value=1e7 + 1, allow_infinity=False),
    }).filter(bool),
    "temperature": st.floats(max_value=-1e-6, allow_infinity=False) | st.lists(st.integers(), min_size=1),
}


@st.composite
def bad_resume_bodies(draw):
    bad = draw(st.sampled_from(sorted(_BAD_FIELDS)))
    body = {bad: draw(_BAD_FIELDS[bad])}
    if bad != "text" and draw(st.booleans()):
        body["text"] = draw(st.text(max_size=50))
    return body


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bad_resume_bodies())
def test_property_bad_resume_never_loses_the_intercept(paused_for_property, body):
    base, intercept_id = paused_for_property
    assert_openai_error(httpx.post(resume_url(base, intercept_id), json=body, timeout=60))
    assert intercept_state(base, intercept_id) in PAUSED_STATES


@pytest.fixture
def paused_for_property(tiny_server, tiny_model):
    """One intercept for all the property's examples; resumed (it must still be) at the end."""
    base = tiny_server.base_url
    intercept_id = pause_completion(base, str(tiny_model))["infercept"]["intercept_id"]
    yield base, intercept_id
    response = httpx.post(resume_url(base, intercept_id), json={"text": " ok", "infercept": {}}, timeout=60)
    assert response.status_code == 200, response.text


BAD_EXTENSIONS = [
    "search", 7, [1], {"no_such_field": 1}, {"resume": 5}, {"resume": "r" * 300},
    {"triggers": "</tool_call>"}, {"triggers": [5]}, {"triggers": [""]}, {"triggers": ["x"] * 17},
    {"triggers": ["🙂" * 257]}, {"intercept_after": "soon"}, {"intercept_after": 0},
    {"intercept_after": -1}, {"intercept_after": HUGE}, {"intercept_after": 2.5},
    {"expected_duration_s": -1}, {"expected_duration_s": 1e300}, {"expected_duration_s": "long"},
    {"tool": 5}, {"tool": "t" * 257},
]  # fmt: skip


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_bad_infercept_extension_is_rejected(tiny_server, tiny_model, kind):
    base, model = tiny_server.base_url, str(tiny_model)
    if kind == "completion":
        url, body = f"{base}/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 4}
    else:
        url, body = f"{base}/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for extension in BAD_EXTENSIONS:
        assert_openai_error(httpx.post(url, json={**body, "infercept": extension}, timeout=60), 400)
    # NaN and Infinity are not JSON, but Python's parser takes them.
    for number in (b"NaN", b"Infinity", b"-Infinity"):
        content = httpx.Request("POST", url, json=body).content[:-1] + \
            b', "infercept": {"expected_duration_s": ' + number + b"}}"
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert_openai_error(response, 400)
    # Unicode text, triggers and tool names are fine.
    unicode = {"triggers": ["🙂", "\u0000", "é", "世界"], "tool": UNICODE_TEXT, "expected_duration_s": 1e7}
    if kind == "completion":
        body["prompt"] = UNICODE_TEXT
    else:
        body["messages"] = [{"role": "user", "content": UNICODE_TEXT}]
    response = httpx.post(url, json={**body, "infercept": unicode}, timeout=60)
    assert response.status_code == 200, response.text
    assert_openai_error(httpx.post(url, json={**body, "max_tokens": HUGE}, timeout=60), 400)
    assert_openai_error(httpx.post(url, json={**body, "max_tokens": -1}, timeout=60), 400)


def test_unknown_finished_and_odd_ids(tiny_server, tiny_model):
    base, model = tiny_server.base_url, str(tiny_model)
    odd_ids = [new_intercept_id(), "icpt-", "x" * 8000, urllib.parse.quote(UNICODE_TEXT, safe=""),
               "..%2F..%2Fmetrics", "%00", "a/b", "a/b/c/d"]
    for intercept_id in odd_ids:
        url = f"{base}/v1/intercepts/{intercept_id}"
        assert_openai_error(httpx.get(url), 404)
        assert_openai_error(httpx.delete(url), 404)
        assert_openai_error(httpx.post(f"{url}/resume", json={"text": "a"}), 404)
    assert_openai_error(httpx.post(f"{base}/v1/completions", json={
        "model": model, "prompt": "Hi", "max_tokens": 4, "infercept": {"resume": odd_ids[0]}}), 404)

    resumed = pause_completion(base, model)["infercept"]["intercept_id"]
    response = httpx.post(resume_url(base, resumed), json={"text": "a", "infercept": {}}, timeout=60)
    assert response.status_code == 200, response.text
    cancelled = pause_completion(base, model)["infercept"]["intercept_id"]
    assert httpx.delete(f"{base}/v1/intercepts/{cancelled}").json()["deleted"] is True
    for intercept_id, state in ((resumed, "resumed"), (cancelled, "cancelled")):
        url = f"{base}/v1/intercepts/{intercept_id}"
        assert intercept_state(base, intercept_id) == state
        assert_openai_error(httpx.post(f"{url}/resume", json={"text": "a"}), 409)
        assert_openai_error(httpx.delete(url), 409)
        for kind, body in (("completions", {"prompt": "Hi"}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
            response = httpx.post(f"{base}/v1/{kind}", json={
                "model": model, "max_tokens": 4, **body, "infercept": {"resume": intercept_id}})
            assert_openai_error(response, 409)
        assert intercept_state(base, intercept_id) == state  # a refused call changes nothing


def test_chat_intercept_is_not_resumed_through_the_completion_endpoint(tiny_server, tiny_model):
    base, model = tiny_server.base_url, str(tiny_model)
    reply = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "2+3?"}], "tools": TOOLS,
        "temperature": 0, "max_tokens": 80, **FORCE_CALL}).json()
    intercept_id = reply["infercept"]["intercept_id"]
    error = assert_openai_error(httpx.post(resume_url(base, intercept_id), json={"text": "5"}), 400)
    assert "chat" in error["message"]
    assert intercept_state(base, intercept_id) in PAUSED_STATES
    assert httpx.delete(f"{base}/v1/intercepts/{intercept_id}").status_code == 200


LONG_PROMPT = "Agents call tools: a calculator, a search engine, a game environment, a human."


def test_resume_whose_prompt_the_paused_context_covers(tiny_server, tiny_model):
    """A resume sending back the paused context or less (it once killed the engine core)."""
    base, model = tiny_server.base_url, str(tiny_model)
    body = {"model": model, "prompt": LONG_PROMPT, "max_tokens": 30, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "infercept": {"intercept_after": 5}}
    for keep in ("paused context", "prompt"):
        first = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        choice, intercept_id = first["choices"][0], first["infercept"]["intercept_id"]
        context = choice["prompt_token_ids"] + choice["token_ids"]
        prompt = context[:-1] if keep == "paused context" else choice["prompt_token_ids"]
        response = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": model, "prompt": prompt, "max_tokens": 3, "infercept": {"resume": intercept_id}})
        assert response.status_code == 200, response.text
        assert response.json()["infercept"]["resumed_from"] == intercept_id
    assert httpx.get(f"{base}/health").status_code == 200


def test_same_prompt_from_another_client_takes_over_no_paused_request(tiny_server, tiny_model):
    base, model = tiny_server.base_url, str(tiny_model)
    first = pause_completion(base, model, prompt=LONG_PROMPT)["infercept"]
    second = pause_completion(base, model, prompt=LONG_PROMPT)["infercept"]
    assert "resumed_from" not in second
    for info in (first, second):
        assert intercept_state(base, info["intercept_id"]) in PAUSED_STATES
        response = httpx.post(resume_url(base, info["intercept_id"]), timeout=60,
                              json={"text": " ok", "infercept": {}})
        assert response.json()["infercept"]["resumed_from"] == info["intercept_id"]


def test_concurrent_resumes_of_one_intercept_admit_one(tiny_server, tiny_model):
    base = tiny_server.base_url
    intercept_id = pause_completion(base, str(tiny_model))["infercept"]["intercept_id"]
    statuses, barrier = [], threading.Barrier(6)

    def resume():
        barrier.wait()
        statuses.append(httpx.post(resume_url(base, intercept_id), json={"text": " 1", "infercept": {}},
                                   timeout=60))

    threads = [threading.Thread(target=resume) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in statuses) == [200] + [409] * 5
    for response in statuses:
        if response.status_code == 409:
            assert_openai_error(response, 409)


def id_bits(intercept_id: str) -> int:
    assert intercept_id.startswith("icpt-")
    raw = base64.urlsafe_b64decode(intercept_id[len("icpt-"):] + "==")
    assert len(raw) * 8 >= 128
    return int.from_bytes(raw, "big")


def test_intercept_ids_are_unguessable():
    """192 random bits: distinct, every bit fair, consecutive ids unrelated."""
    ids = [new_intercept_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert {len(i) for i in ids} == {len("icpt-") + 32}
    values = [id_bits(i) for i in ids]
    for bit in range(192):
        ones = sum(value >> bit & 1 for value in values)
        assert 0.45 < ones / len(values) < 0.55, (bit, ones)
    assert len({b - a for a, b in zip(values, values[1:])}) == len(values) - 1  # no stride
    # Consecutive ids differ in about half their bits (96 +- 7); 40 is 8 sigma out.
    assert min(bin(a ^ b).count("1") for a, b in zip(values, values[1:])) > 40


def test_server_issues_unrelated_ids(tiny_server, tiny_model):
    base = tiny_server.base_url
    ids = [pause_completion(base, str(tiny_model), max_tokens=8)["infercept"]["intercept_id"]
           for _ in range(12)]
    for intercept_id in ids:
        httpx.delete(f"{base}/v1/intercepts/{intercept_id}")
    values = [id_bits(i) for i in ids]
    assert len(set(values)) == len(values)
    assert min(bin(a ^ b).count("1") for a, b in zip(values, values[1:])) > 40


def test_server_still_serves_and_holds_nothing(tiny_server, tiny_model):
    base = tiny_server.base_url
    paused = pause_completion(base, str(tiny_model))
    response = httpx.post(resume_url(base, paused["infercept"]["intercept_id"]), json={"text": ".", "infercept": {}},
                          timeout=60)
    assert response.status_code == 200
    wait_until_nothing_held(base)
