"""`infercept serve` as a drop-in for `vllm serve`: vLLM's OpenAI API, health,
metrics and command line, against one shared tiny-model server."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from .conftest import INFERCEPT_BIN, ServerProcess, server_env

pytestmark = pytest.mark.slow

COMPLETION_PROMPT = "The quick brown fox"
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
# A bound on a hang, not a timing: the CLI imports vLLM (up to a minute on a busy
# two-core machine) before it parses its arguments.
CLI_TIMEOUT_S = 600
HTTP_TIMEOUT_S = 60


def model_id(tiny_model) -> str:
    return str(tiny_model)  # vLLM serves a local folder under its path


def test_health(base_url):
    assert httpx.get(f"{base_url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200


def test_models_lists_the_model(client, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == [model_id(tiny_model)]
    assert models[0].max_model_len == 2048


def test_completion_greedy_counts_tokens(client, base_url, tiny_model):
    request = dict(
        model=model_id(tiny_model),
        prompt=COMPLETION_PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    first = client.completions.create(**request)
    second = client.completions.create(**request)

    choice = first.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text
    assert len(choice.token_ids) == MAX_TOKENS == first.usage.completion_tokens
    tokenized = httpx.post(
        f"{base_url}/tokenize", json={"model": model_id(tiny_model), "prompt": COMPLETION_PROMPT},
        timeout=HTTP_TIMEOUT_S,
    ).json()
    assert first.usage.prompt_tokens == tokenized["count"]
    assert first.usage.total_tokens == tokenized["count"] + MAX_TOKENS
    assert second.choices[0].text == choice.text  # greedy is deterministic
    assert second.choices[0].token_ids == choice.token_ids


def test_chat_streaming_matches_non_streaming(client, tiny_model):
    request = dict(
        model=model_id(tiny_model), messages=CHAT_MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**request)
    stream_options = {"include_usage": True}
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options=stream_options))

    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    assert whole.usage.completion_tokens == MAX_TOKENS
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content
    choices = [c.choices[0] for c in chunks if c.choices]
    assert len([choice for choice in choices if choice.delta.content]) > 1  # really streamed
    assert [choice.finish_reason for choice in choices if choice.finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_metrics_are_vllms_prometheus_metrics(client, base_url, tiny_model):
    def generation_tokens() -> float:
        text = httpx.get(f"{base_url}/metrics", timeout=HTTP_TIMEOUT_S).text
        samples = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")]
        assert samples, "vllm:generation_tokens_total missing from /metrics"
        return sum(float(line.rsplit(" ", 1)[1]) for line in samples)

    before = generation_tokens()
    client.completions.create(
        model=model_id(tiny_model), prompt=COMPLETION_PROMPT, max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert generation_tokens() == before + 5

    response = httpx.get(f"{base_url}/metrics", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    assert "# TYPE vllm:num_requests_running gauge" in response.text
    # The user's --block-size wins over the CPU default of 128.
    [cache_info] = [line for line in response.text.splitlines() if line.startswith("vllm:cache_config_info")]
    assert 'block_size="32"' in cache_info


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(INFERCEPT_BIN), *args],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "bad_args, error",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--intercept-policy", "fastest"], "argument --intercept-policy: invalid choice: 'fastest'"),
        (["--scheduler-cls", "my.Scheduler"], "--scheduler-cls my.Scheduler cannot be combined"),
    ],
)
def test_bad_arguments_fail_without_traceback(tiny_model, bad_args, error):
    result = run_cli("serve", str(tiny_model), *bad_args)
    assert result.returncode != 0
    assert error in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_help_shows_vllm_and_infercept_arguments():
    result = run_cli("serve", "--help=all")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: infercept serve")
    for vllm_flag in ("--max-model-len", "--kv-cache-memory-bytes", "--tool-call-parser"):
        assert vllm_flag in text
    assert "\nInferCept:\n" in text
    infercept_group = text.split("\nInferCept:\n", 1)[1]
    for flag in ("--intercept-policy", "--swap-space-bytes", "--intercept-timeout", "--cost-profile"):
        assert flag in infercept_group
    assert "--no-profile" in infercept_group
    assert "embedded SmolLM2-135M-Instruct if no model is specified" in text
    assert "Defaults to Qwen" not in text  # vLLM's own default model is not ours


def test_server_that_exits_fails_fast_with_its_log(tmp_path):
    server = ServerProcess([str(tmp_path / "no-such-model")], tmp_path / "server.log")
    with pytest.raises(pytest.fail.Exception) as excinfo:
        server.start(startup_timeout_s=CLI_TIMEOUT_S)
    assert "exited with 1 before it was healthy" in str(excinfo.value)
    assert "no-such-model" in str(excinfo.value)  # the log tail names the missing model
    assert not server.is_running()
