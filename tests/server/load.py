"""Many concurrent tool-using agents against a live `infercept serve`, all through `openai`.

Each agent runs a completion that pauses after a few tokens for a tool call
(`"infercept": {"intercept_after": ...}`), sleeps for the tool's duration
(sub-second, varied), resumes the intercept with the tool's result
(`POST /v1/intercepts/{id}/resume` through the client's generic `post`), and
so on for every tool call; the last segment runs to the end of the budget.
Greedy decoding makes every conversation's text a pure function of its
script, so each agent's transcript must equal that of the same script run
alone before the load.

The suite runs it reduced (tests/server/test_reliability_load.py). The full
size, on a server of its own (the same arguments as the suite's):

    .venv/bin/python tests/server/load.py --agents 1000 --tool-calls 6

`--base-url URL --model NAME` aims it at a server already running instead.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
from collections import Counter
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The swap policy with a device cache that holds a fraction of the paused
# agents and a CPU swap space that holds fewer still: intercepted requests are
# swapped out until the swap space runs out, then discarded (recomputed at
# resume), and vLLM preempts running ones. 1 KiB of KV per token for the tiny model:
# 2 MiB = 64 blocks of 32 tokens, 1 MiB of swap = 32 blocks.
LOAD_SERVER_ARGS = (
    "--max-model-len", "1024",
    "--kv-cache-memory-bytes", "2M",
    "--block-size", "32",
    "--dtype", "float32",
    "--enforce-eager",
    "--intercept-policy", "swap",
    "--swap-space-bytes", "1M",
)  # fmt: skip
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Compute 12 * 7 with the calculator.",
    "Search the web for the tallest mountain, then answer in one sentence.",
    "def add(a, b):",
    '{"name": "search", "arguments": {"query": "weather in Paris"}}',
    "Agents call tools: a calculator, a search engine, a game environment, a human.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
]
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Script:
    """What an agent says: its prompt, and each tool call's result."""

    prompt: str
    results: tuple[str, ...]
    tokens_per_segment: int


@dataclass
class Transcript:
    texts: list[str] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    # With tracing, per turn: what the engine did to it (the pause's state and
    # decisions just before the resume, then the tokens the resume reused).
    events: list[dict] = field(default_factory=list)

    def output(self) -> tuple:
        return tuple(self.texts), tuple(self.completion_tokens)


def make_scripts(num_scripts: int, tool_calls: int, tokens_per_segment: int) -> list[Script]:
    return [Script(PROMPTS[k % len(PROMPTS)] + f" ({k})",
                   tuple(f" -> result {k}.{t} = {k * 7 + t}" for t in range(tool_calls)),
                   tokens_per_segment)
            for k in range(num_scripts)]


async def run_agent(client, model: str, script: Script, durations_s: list[float],
                    trace: bool = False, resend: bool = False) -> Transcript:
    """One conversation; every segment but the last pauses for a tool call.

    `resend`: the agent sends the whole context back as token ids (its prompt
    and outputs, the tool's result tokenized by the server), as a client of
    stock vLLM does (`--intercept-policy vllm`, where the call ends the
    request): the same tokens InferCept's resume appends. Against InferCept
    that is an automatic resume, wherever the server sends it.
    """
    from openai.types import Completion

    tokens = script.tokens_per_segment
    budget = tokens * (len(script.results) + 1)
    transcript, previous_id = Transcript(), None
    context_ids: list[int] = []

    def extension(turn: int) -> dict:
        if turn == len(script.results):
            return {}
        return {"intercept_after": tokens, "tool": f"tool-{turn % 3}", "expected_duration_s": durations_s[turn]}

    for turn in range(len(script.results) + 1):
        started_s = time.monotonic()
        if turn == 0 or resend:
            if turn > 0:
                await asyncio.sleep(durations_s[turn - 1])  # the tool runs
                root = str(client.base_url).rstrip("/").removesuffix("/v1")
                result = await client.post(f"{root}/tokenize", cast_to=object, body={
                    "model": model, "prompt": script.results[turn - 1], "add_special_tokens": False})
                context_ids += result["tokens"]
                started_s = time.monotonic()
            reply = await client.completions.create(
                model=model, prompt=context_ids if turn else script.prompt,
                max_tokens=budget - sum(transcript.completion_tokens), temperature=0,
                extra_body={"ignore_eos": True, "infercept": extension(turn),
                            "return_token_ids": resend})
            if resend:
                choice = reply.choices[0].model_extra
                context_ids = list(choice["prompt_token_ids"]) + list(choice["token_ids"])
        else:
            await asyncio.sleep(durations_s[turn - 1])  # the tool runs
            if trace:
                state = await client.get(f"/intercepts/{previous_id}", cast_to=object)
                transcript.events.append({"turn": turn, "state": state["state"], "decisions": [
                    (d["action"], d["location"], d["at_s"]) for d in state["history"]]})
            started_s = time.monotonic()
            reply = await client.post(
                f"/intercepts/{previous_id}/resume", cast_to=Completion,
                body={"text": script.results[turn - 1], "infercept": extension(turn)})
        transcript.latencies_s.append(time.monotonic() - started_s)
        transcript.texts.append(reply.choices[0].text)
        transcript.completion_tokens.append(reply.usage.completion_tokens)
        info = reply.model_extra.get("infercept") or {}
        if trace and turn > 0:
            transcript.events[-1]["reused_tokens"] = info.get("reused_tokens")
        if resend:
            continue
        if turn > 0 and info.get("resumed_from") != previous_id:
            raise AssertionError(f"turn {turn} resumed {info.get('resumed_from')}, not {previous_id}")
        previous_id = info.get("intercept_id")
        if (previous_id is None) != (turn == len(script.results)):
            raise AssertionError(f"turn {turn}: {info}")
    return transcript


@dataclass
class LoadReport:
    num_agents: int
    num_requests: int
    total_s: float
    turn_latency_s: dict[str, float]
    errors: list[str]
    mismatches: list[int]
    divergence_turns: dict[int, int] = field(default_factory=dict)  # first differing turn: agents
    # With tracing, per differing agent: its first differing turn and what the engine did
    traces: dict[int, dict] = field(default_factory=dict)
    # With tracing: resumes by the paused request's state just before (all agents)
    resume_states: dict[str, int] = field(default_factory=dict)
    # The scripts' transcripts run alone: equal digests, equal references (across
    # policies: InferCept's resumes against stock vLLM's resent contexts)
    reference_digest: str = ""

    def describe(self) -> str:
        latency = ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in self.turn_latency_s.items())
        return (f"{self.num_agents} agents, {self.num_requests} requests in {self.total_s:.1f} s "
                f"({self.num_requests / self.total_s:.1f} req/s); per turn: {latency}; "
                f"{len(self.errors)} errors, {len(self.mismatches)} wrong transcripts"
                + (f" (first wrong turn: agents {self.divergence_turns})" if self.mismatches else ""))


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values)}


async def run_load(base_url: str, model: str, *, num_agents: int, tool_calls: int,
                   tokens_per_segment: int, num_scripts: int, seed: int = 0,
                   timeout_s: float = 1800.0, trace: bool = False,
                   resend: bool = False) -> LoadReport:
    """The scripts alone first (the reference), then all agents at once."""
    import httpx
    import openai

    scripts = make_scripts(num_scripts, tool_calls, tokens_per_segment)
    rng = random.Random(seed)
    # No keep-alive: uvicorn closes a connection idle for 5 s, and a client whose
    # event loop lags under load may send on one as it closes (a reset that is
    # no fault of the server).
    limits = httpx.Limits(max_connections=num_agents + 10, max_keepalive_connections=0)
    http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=REQUEST_TIMEOUT_S)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0,
                                  http_client=http_client) as client:
        reference = [(await run_agent(client, model, s, [0.0] * tool_calls, resend=resend)).output() for s in scripts]
        plans = [(j % num_scripts, [rng.uniform(0.05, 0.95) for _ in range(tool_calls)])
                 for j in range(num_agents)]
        started_s = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(
            *(run_agent(client, model, scripts[k], durations, trace, resend)
              for k, durations in plans),
            return_exceptions=True), timeout_s)
        total_s = time.monotonic() - started_s
    errors = [f"agent {j}: {r!r} ({r.__cause__!r})" for j, r in enumerate(results)
              if isinstance(r, BaseException)]
    transcripts = [(j, r) for j, r in enumerate(results) if not isinstance(r, BaseException)]
    mismatches = [j for j, r in transcripts if r.output() != reference[plans[j][0]]]
    divergence_turns: dict[int, int] = {}
    traces: dict[int, dict] = {}
    for j in mismatches:
        texts, expected = results[j].texts, reference[plans[j][0]][0]
        turn = next((t for t in range(len(expected)) if texts[t] != expected[t]), len(expected))
        divergence_turns[turn] = divergence_turns.get(turn, 0) + 1
        if trace:
            traces[j] = {"script": plans[j][0], "first_wrong_turn": turn, "turns": results[j].events}
    latencies = [s for _, r in transcripts for s in r.latencies_s]
    return LoadReport(num_agents, len(latencies), total_s, percentiles(latencies) if latencies else {},
                      errors, mismatches, divergence_turns, traces,
                      dict(Counter(e["state"] for _, r in transcripts for e in r.events)),
                      hashlib.sha256(json.dumps(reference).encode()).hexdigest()[:16])


def counters(base_url: str) -> dict[str, float]:
    """The server's decision and preemption counters (cumulative)."""
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(("infercept:decisions_total", "infercept:preemptions_total",
                                   "infercept:recomputed_tokens_total", "infercept:tokens_reused_total",
                                   "infercept:forwarded_tokens_total", "vllm:prefix_cache_hits_total"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--tool-calls", type=int, default=6)
    parser.add_argument("--tokens-per-segment", type=int, default=8)
    parser.add_argument("--scripts", type=int, default=16, help="distinct conversations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", action="store_true",
                        help="before each resume, ask the intercept's state and decisions; "
                        "a differing agent's report shows them per turn (adds a request per turn)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs on the same server, seeds seed, seed+1, ...")
    parser.add_argument("--server-args", default="",
                        help="more `infercept serve` arguments after the suite's (later ones win), "
                        "e.g. '--intercept-policy vllm' or '--emulate-async-copies 2'")
    parser.add_argument("--resend", action="store_true",
                        help="agents send their whole context back (an automatic resume) instead of "
                        "resuming their intercept by id (implied by '--intercept-policy vllm')")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the server's environment, e.g. OMP_NUM_THREADS=1 and "
                        "VLLM_CPU_OMP_THREADS_BIND='0|1' for --data-parallel-size 2 on two cores")
    parser.add_argument("--base-url", help="a running server (default: start one on the tiny model)")
    parser.add_argument("--model", help="the served model's name (with --base-url)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny_model, server)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (benchmarks)
    from server.conftest import ServerProcess, server_env
    from server.helpers import memory_samples, wait_until_nothing_held
    from tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        base_url, model = args.base_url, args.model
        if base_url is None:
            model = str(build_tiny_model(Path(tmp) / "tiny-model"))
            env = {**server_env(), **dict(item.split("=", 1) for item in args.server_env)}
            server = ServerProcess([model, *LOAD_SERVER_ARGS, *args.server_args.split()],
                                   Path(tmp) / "server.log", env=env).start()
            base_url = server.base_url
            print(f"server: infercept serve {' '.join(server.command[2:])}", flush=True)
        reports = []
        try:
            for run in range(args.repeat):
                report = asyncio.run(run_load(base_url, model, num_agents=args.agents,
                                              tool_calls=args.tool_calls,
                                              tokens_per_segment=args.tokens_per_segment,
                                              num_scripts=args.scripts, seed=args.seed + run,
                                              trace=args.trace,
                                              resend=args.resend or "vllm" in args.server_args.split()))
                reports.append(report)
                print(f"run {run + 1}/{args.repeat}: {report.describe()}")
                print(json.dumps({**report.__dict__, "errors": report.errors[:5]}, indent=1))
                if not report.errors:  # an agent that failed leaves its intercept to the timeout
                    wait_until_nothing_held(base_url, timeout_s=60)
                print("afterwards:", memory_samples(base_url))
                print("so far:", counters(base_url), flush=True)
        finally:
            if server is not None:
                print("server stopped:", server.stop())
    return 0 if reports and not any(r.errors or r.mismatches for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
