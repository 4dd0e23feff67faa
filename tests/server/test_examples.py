"""The agent example runs as written against `infercept serve` with the embedded model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).parents[2] / "examples" / "agent_openai_client.py"


def test_agent_openai_client_resumes_every_tool_turn(start_server):
    server = start_server(None)  # the embedded default model, default arguments
    spec = importlib.util.spec_from_file_location("agent_openai_client", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    turns = example.main(["--base-url", f"{server.base_url}/v1", "--search-delay-s", "0.2"])
    assert [t["tool_calls"] for t in turns] == [["search"], ["calculator"], []]
    assert turns[0]["intercept_id"] and turns[0]["resumed_from"] is None
    for previous, turn in zip(turns, turns[1:]):
        assert turn["resumed_from"] == previous["intercept_id"]
        assert turn["reused_tokens"] > 0
