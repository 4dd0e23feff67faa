"""Faults around paused requests, against a server with an API key and an intercept timeout.

Clients that go away (while their request is paused, in the middle of a
streamed or non-streamed resume), intercepts that time out, every intercept
endpoint behind `--api-key`, and a shutdown with paused requests. After each,
nothing is held: InferCept's gauges and vLLM's KV usage are back at zero.
"""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest
from server.conftest import TINY_SERVER_ARGS
from server.helpers import (
    PAUSED_STATES,
    assert_openai_error,
    intercept_state,
    memory_samples,
    pause_completion,
    wait_for_state,
    wait_until_nothing_held,
)

pytestmark = pytest.mark.slow

API_KEY = "sk-infercept-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The server's --intercept-timeout. Every intercept these tests pause must stay
# paused until the test is done with it (36 refused calls, a second pause and a
# resume, on a shared two-core machine), so it is far above what that takes; only
# the expiry test waits it out.
TIMEOUT_S = 60.0
# Any one HTTP call: generous, a bound on a hang rather than a timing.
HTTP_TIMEOUT_S = 60
# vLLM drains running requests for up to --shutdown-timeout on SIGTERM (0: aborts them
# and kills the engine core at once, which can log vLLM's own EngineDeadError).
# Paused requests are not running: they must not hold the drain back (the engine
# core's log says whether it drained).
SHUTDOWN_TIMEOUT_S = 20
# How long a server may take to exit after SIGTERM: a bound on a hang, not a timing.
EXIT_TIMEOUT_S = 300
FAULT_SERVER_ARGS = (*TINY_SERVER_ARGS, "--intercept-timeout", str(TIMEOUT_S), "--api-key", API_KEY,
                     "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
LONG = {"max_tokens": 1500}  # a resume long enough to be cut off in the middle


@pytest.fixture
def fault_server(start_server, tiny_model):
    return start_server(tiny_model, *FAULT_SERVER_ARGS)


def paused(server, model, **extra) -> str:
    return pause_completion(server.base_url, str(model), headers=AUTH, **extra)["infercept"]["intercept_id"]


# vLLM's own race at shutdown: its output handler may see the engine core exit
# (killed at once with --shutdown-timeout 0, or after a drain) before it stops.
VLLM_SHUTDOWN_RACE = ("AsyncLLM output_handler failed", "EngineDeadError")


def tracebacks(log_text: str) -> list[str]:
    """The tracebacks in a server log, each with the lines around it."""
    lines = log_text.splitlines()
    return ["\n".join(lines[max(0, i - 1):i + 40]) for i, line in enumerate(lines) if "Traceback" in line]


def assert_no_traceback(server, *, at_shutdown: bool = False) -> None:
    found = tracebacks(server.log_path.read_text(errors="replace"))
    if at_shutdown:
        found = [t for t in found if not all(marker in t for marker in VLLM_SHUTDOWN_RACE)]
    assert not found, found[0]


def test_every_intercept_endpoint_requires_the_api_key(fault_server, tiny_model):
    base, model = fault_server.base_url, str(tiny_model)
    intercept_id = paused(fault_server, model)
    url = f"{base}/v1/intercepts/{intercept_id}"
    calls = [
        ("GET", url, None), ("DELETE", url, None), ("POST", f"{url}/resume", {"text": "a"}),
        ("GET", f"{url}/no/such/route", None),
        ("POST", f"{base}/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2,
                                            "infercept": {"resume": intercept_id}}),
        ("POST", f"{base}/v1/chat/completions", {"model": model, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "Hi"}],
                                                 "infercept": {"resume": intercept_id}}),
    ]  # fmt: skip
    bad_headers = [{}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"},
                   {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": "Bearer"},
                   {"X-API-Key": API_KEY}]
    for method, target, body in calls:
        for headers in bad_headers:
            response = httpx.request(method, target, json=body, headers=headers, timeout=HTTP_TIMEOUT_S)
            assert response.status_code == 401, (method, target, headers, response.text)
            assert "error" in response.json()
    # None of the refused calls touched the intercept; with the key, all work.
    assert intercept_state(base, intercept_id, AUTH) in PAUSED_STATES
    # documentation stays open
    assert httpx.get(f"{base}/openapi.json", timeout=HTTP_TIMEOUT_S).status_code == 200
    response = httpx.post(f"{url}/resume", json={"text": "a", "infercept": {}}, headers=AUTH,
                          timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert intercept_state(base, intercept_id, AUTH) == "resumed"
    other = paused(fault_server, model)
    assert httpx.delete(f"{base}/v1/intercepts/{other}", headers=AUTH,
                        timeout=HTTP_TIMEOUT_S).json()["deleted"] is True
    assert_openai_error(httpx.get(f"{url}/no/such/route", headers=AUTH, timeout=HTTP_TIMEOUT_S), 404)


def test_paused_request_of_a_vanished_client_stays_resumable_until_it_expires(fault_server,
                                                                              tiny_model):
    base, model = fault_server.base_url, str(tiny_model)
    with httpx.Client(headers=AUTH, timeout=HTTP_TIMEOUT_S) as gone:  # this client never comes back
        intercept_id = gone.post(f"{base}/v1/completions", json={
            "model": model, "prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0,
            "ignore_eos": True, "infercept": {"intercept_after": 5}}).json()["infercept"]["intercept_id"]
    kept = paused(fault_server, model)
    # Before the timeout the vanished client's request is still there, and resumable.
    assert intercept_state(base, intercept_id, AUTH) in PAUSED_STATES
    resumed = httpx.post(f"{base}/v1/intercepts/{kept}/resume", json={"text": "!", "infercept": {}},
                         headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert resumed.json()["infercept"]["resumed_from"] == kept
    # Then it expires: the server checks its intercepts every second at most.
    wait_for_state(base, intercept_id, {"expired"}, timeout_s=TIMEOUT_S + 120, headers=AUTH)
    url = f"{base}/v1/intercepts/{intercept_id}"
    assert_openai_error(httpx.post(f"{url}/resume", json={"text": "a"}, headers=AUTH,
                                   timeout=HTTP_TIMEOUT_S), 409)
    assert_openai_error(httpx.delete(url, headers=AUTH, timeout=HTTP_TIMEOUT_S), 409)
    assert_openai_error(httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=HTTP_TIMEOUT_S, json={
        "model": model, "prompt": "Hi", "max_tokens": 2, "infercept": {"resume": intercept_id}}), 409)
    wait_until_nothing_held(base)


def test_client_gone_in_the_middle_of_a_streamed_resume(fault_server, tiny_model):
    base, model = fault_server.base_url, str(tiny_model)
    intercept_id = paused(fault_server, model, ignore_eos=True, **LONG)
    with httpx.Client(headers=AUTH, timeout=HTTP_TIMEOUT_S) as client:
        with client.stream("POST", f"{base}/v1/intercepts/{intercept_id}/resume",
                           json={"text": " = 42", "stream": True, "infercept": {}}) as stream:
            assert stream.status_code == 200
            chunks = stream.iter_lines()
            assert [next(chunks) for _ in range(4)]  # a few tokens, then the client is gone
    # The engine had taken the paused request: it is aborted, not back in the registry.
    assert wait_for_state(base, intercept_id, {"cancelled", "resumed"}, headers=AUTH) == "cancelled"
    wait_until_nothing_held(base)
    assert_openai_error(httpx.post(f"{base}/v1/intercepts/{intercept_id}/resume", json={"text": "a"},
                                   headers=AUTH, timeout=HTTP_TIMEOUT_S), 409)
    assert_no_traceback(fault_server)


def test_client_gone_in_the_middle_of_a_resume(fault_server, tiny_model):
    base, model = fault_server.base_url, str(tiny_model)
    intercept_id = paused(fault_server, model, ignore_eos=True, **LONG)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/intercepts/{intercept_id}/resume", json={"text": " = 42", "infercept": {}},
                   headers=AUTH, timeout=httpx.Timeout(30, read=1.0))
    # vLLM aborts the request when its client goes; the intercept must not stay "resuming".
    state = wait_for_state(base, intercept_id, {"cancelled", "resumed", *PAUSED_STATES}, headers=AUTH)
    assert state == "cancelled"
    wait_until_nothing_held(base)
    assert_no_traceback(fault_server)
    # The server still serves.
    other = paused(fault_server, model)
    assert httpx.delete(f"{base}/v1/intercepts/{other}", headers=AUTH, timeout=HTTP_TIMEOUT_S).status_code == 200


def test_shutdown_with_paused_requests_is_clean(fault_server, tiny_model, server_pool):
    """Last in this module: the server is taken from the pool and stopped here."""
    base, model = fault_server.base_url, str(tiny_model)
    ids = [paused(fault_server, model) for _ in range(3)]
    assert all(intercept_state(base, i, AUTH) in PAUSED_STATES for i in ids)
    assert memory_samples(base)  # the server answered just before the signal
    server = server_pool.take()
    server.process.send_signal(signal.SIGTERM)
    try:
        exit_code = server.process.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {EXIT_TIMEOUT_S} s after SIGTERM\n{server.describe()}")
    finally:
        server.stop()  # and anything left in its session
    assert exit_code == 0, server.describe()
    # The engine core logs whether it had requests to drain: none, the paused ones
    # included (a drain would have waited for them up to --shutdown-timeout).
    log = server.log_path.read_text(errors="replace")
    assert "EngineCore: request processing complete" in log, server.describe()
    assert "draining in-flight requests" not in log, "paused requests held the drain back"
    assert "infercept" not in "".join(tracebacks(log)).lower()
    assert_no_traceback(server, at_shutdown=True)
