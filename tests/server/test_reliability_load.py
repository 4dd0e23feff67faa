"""A load test on loopback: at least 200 concurrent agents, several tool calls each.

Against the tiny model under the swap policy with a device cache and a swap
space far smaller than the paused agents need (tests/server/load.py), so
paused requests are swapped, discarded when the swap space is full, and
running ones preempted. Every agent's transcript equals its script run alone,
nothing is held afterwards, and the latency figures are printed
(`pytest -s` shows them). `INFERCEPT_LOAD_AGENTS` sets the number of agents;
the full-size run is `tests/server/load.py`'s command line.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from server.helpers import memory_samples, wait_until_nothing_held
from server.load import LOAD_SERVER_ARGS, run_load

pytestmark = pytest.mark.slow

NUM_AGENTS = int(os.environ.get("INFERCEPT_LOAD_AGENTS", "200"))
TOOL_CALLS = 3
TOKENS_PER_SEGMENT = 4
NUM_SCRIPTS = 8
LOAD_TIMEOUT_S = 600.0


def decisions(base_url: str) -> dict[str, float]:
    """Decisions by strategy, all engines together."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("infercept:decisions_total{"):
            strategy = line.split('strategy="', 1)[1].split('"', 1)[0]
            found[strategy] = found.get(strategy, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def test_concurrent_agents_complete_exactly_and_free_everything(start_server, tiny_model):
    server = start_server(tiny_model, *LOAD_SERVER_ARGS)
    base = server.base_url
    wait_until_nothing_held(base)
    report = asyncio.run(run_load(base, str(tiny_model), num_agents=NUM_AGENTS, tool_calls=TOOL_CALLS,
                                  tokens_per_segment=TOKENS_PER_SEGMENT, num_scripts=NUM_SCRIPTS,
                                  timeout_s=LOAD_TIMEOUT_S))
    print(f"\nload ({' '.join(LOAD_SERVER_ARGS)}): {report.describe()}")
    assert not report.errors, report.errors[:5]
    assert not report.mismatches, f"{len(report.mismatches)} agents differ from their script run alone"
    assert report.num_requests == NUM_AGENTS * (TOOL_CALLS + 1)
    wait_until_nothing_held(base)
    # The memory pressure was real: paused requests went to CPU swap and were discarded.
    seen = decisions(base)
    print(f"decisions: {seen}; afterwards: {memory_samples(base)}")
    assert seen.get("swap_out", 0) > 0 and seen.get("discard", 0) > 0, seen
