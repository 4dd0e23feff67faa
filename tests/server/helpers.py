"""What the server tests ask of a live `infercept serve`: paused requests, errors, memory."""

from __future__ import annotations

import time

import httpx

OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}
# Where a paused request's KV is while the engine holds it.
PAUSED_STATES = {"preserved", "swapped", "discarded"}
# How long the polls below wait for the server to get there: bounds on a hang, not
# timings (each returns as soon as it gets there; a busy two-core machine is slow).
IDLE_TIMEOUT_S = 120.0
STATE_TIMEOUT_S = 120.0


def pause_completion(base_url: str, model: str, *, headers: dict | None = None, **extra) -> dict:
    """A completion intercepted after 5 of its 30 tokens; returns its response body."""
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0,
            "ignore_eos": True, "infercept": {"intercept_after": 5, "tool": "search"}, **extra}
    response = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["infercept"]["state"] in PAUSED_STATES, data
    return data


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """A 4xx whose body is OpenAI's error object, as vLLM's `ErrorResponse` writes it."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:2000])
    if status is not None:
        assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_FIELDS, body
    error = body["error"]
    assert error["code"] == response.status_code and error["message"] and error["type"], body
    assert error["param"] is None or isinstance(error["param"], str), body
    return error


def intercept_state(base_url: str, intercept_id: str, headers: dict | None = None) -> str:
    response = httpx.get(f"{base_url}/v1/intercepts/{intercept_id}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["state"]


def wait_for_state(base_url: str, intercept_id: str, states: set[str], timeout_s: float = STATE_TIMEOUT_S,
                   headers: dict | None = None) -> str:
    deadline_s = time.monotonic() + timeout_s
    while (state := intercept_state(base_url, intercept_id, headers)) not in states:
        assert time.monotonic() < deadline_s, f"{intercept_id} still {state}, not in {states}"
        time.sleep(0.2)
    return state


def memory_samples(base_url: str) -> dict[str, float]:
    """The /metrics samples that say what is held: InferCept's gauges and vLLM's KV usage."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    prefixes = ("infercept:intercepted_requests{", "infercept:idle_device_tokens",
                "vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefixes)}


def wait_until_nothing_held(base_url: str, timeout_s: float = IDLE_TIMEOUT_S) -> dict[str, float]:
    """Wait until no request runs or waits, nothing is paused and no KV block is in use.

    InferCept's gauges come from a once-a-second poll of the engine, so this
    waits rather than reads once.
    """
    deadline_s = time.monotonic() + timeout_s
    while True:
        samples = memory_samples(base_url)
        if any(name.startswith("infercept:") for name in samples) and not any(samples.values()):
            return samples
        assert time.monotonic() < deadline_s, {k: v for k, v in samples.items() if v}
        time.sleep(0.5)
