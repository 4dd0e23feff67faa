"""The benchmark driver end to end on a tiny trace: every policy in-process, and through a
real server over HTTP (slow).

The trace is five requests with one or two tool calls each, short tools, arriving within a
fraction of a second. Every run must complete every request with exactly the trace's
tokens, and produce every metric; with ample memory `preserve` recomputes nothing and stock
vLLM (each segment a new request) does.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.backends import InterceptBackend, StockBackend
from benchmarks.driver import counter_change, replay, replay_http
from benchmarks.http_replay import kv_capacity_from_metrics, metric_sum, parse_prometheus
from infercept.bench.metrics import compute_run_metrics, sustainable_rate
from infercept.bench.workload import Request, Segment, Trace

INTERCEPT_POLICIES = ["discard", "preserve", "swap", "min-waste", "ttl", "unbounded"]
NUM_SPECIAL_TOKENS = 5  # tests/tiny_model.py's special tokens take ids 0-4
DRAIN_S = 60.0  # a cut-off far beyond what the trace needs


def tiny_trace(vocab_size: int) -> Trace:
    """Five requests: prompts of 40-130 tokens, 1-2 tool calls of 20-150 ms each."""
    shapes = [  # (arrival_s, prompt_tokens, [(generate, tool_s, returned), ...], last generate)
        (0.00, 40, [(5, 0.05, 7)], 6),
        (0.02, 130, [(3, 0.15, 12), (4, 0.02, 3)], 5),
        (0.05, 70, [(8, 0.10, 20)], 4),
        (0.10, 96, [(2, 0.03, 1), (6, 0.12, 9)], 3),
        (0.15, 33, [(4, 0.08, 30)], 7),
    ]
    requests = []
    for index, (arrival_s, prompt_tokens, calls, last_tokens) in enumerate(shapes):
        ids = iter(NUM_SPECIAL_TOKENS + (index * 31 + j * 7) % (vocab_size - NUM_SPECIAL_TOKENS)
                   for j in range(10_000))
        segments = [Segment(prompt_tokens if i == 0 else 0, generate, tool_s, returned,
                            tuple(next(ids) for _ in range(returned)))
                    for i, (generate, tool_s, returned) in enumerate(calls)]
        segments.append(Segment(0, last_tokens))
        requests.append(Request(f"tiny-{index}", "qa", arrival_s, tuple(segments),
                                tuple(next(ids) for _ in range(prompt_tokens))))
    return Trace("tiny", 0, 20.0, 1.0, 1.0, tuple(requests), vocab_size=vocab_size)


@pytest.fixture(scope="module")
def trace(tiny_model, tmp_path_factory) -> Trace:
    vocab_size = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    path = tmp_path_factory.mktemp("trace") / "tiny.json"
    tiny_trace(vocab_size).save(path)
    return Trace.load(path)  # the driver replays saved traces


def check_run(result, trace: Trace):
    """Every request completed with the trace's tokens; every metric is a finite number."""
    by_id = {r.request_id: r for r in trace.requests}
    assert sorted(r.request_id for r in result.records) == sorted(by_id)
    for record in result.records:
        request = by_id[record.request_id]
        assert record.completed
        assert record.output_tokens == request.output_tokens
        assert record.num_interceptions == request.num_interceptions
        assert record.tool_s_total >= request.tool_s_total - 1e-5  # resumed once a tool is due
        assert record.end_s > record.start_s == request.arrival_s
    assert result.details["output_token_mismatches"] == 0
    metrics = compute_run_metrics(result.records, result.counters)
    assert metrics.num_completed == metrics.num_requests == len(trace.requests)
    for name in ("normalized_latency_p50_s_per_token", "normalized_latency_p90_s_per_token",
                 "normalized_latency_mean_s_per_token", "output_tokens_per_s",
                 "recompute_share_of_forward_time", "recompute_share_of_forwarded_tokens",
                 "memory_waste_fraction", "idle_kv_token_s"):
        value = getattr(metrics, name)
        assert value is not None and math.isfinite(value) and value >= 0, (name, value)
    assert 0 <= metrics.recompute_share_of_forward_time <= 1
    assert 0 <= metrics.recompute_share_of_forwarded_tokens <= 1
    assert 0 <= metrics.memory_waste_fraction <= 1
    assert result.counters.forward_s > 0 and result.counters.forwarded_tokens > 0
    assert sustainable_rate({trace.rate: metrics}, slo_p90_s_per_token=math.inf) == trace.rate
    return metrics


def test_stock_vllm_recomputes_each_resumed_segment(tiny_model, live_engine, trace):
    from conftest import engine_kwargs

    live_engine.close()  # a stock engine cannot live beside InferCept's connector
    with StockBackend(engine_kwargs(tiny_model)) as backend:
        backend.warm_up()
        capacity_tokens = backend.kv_capacity_tokens
        result = replay(backend, trace, drain_s=DRAIN_S)
        assert not backend.scheduler.requests
    metrics = check_run(result, trace)
    assert result.counters.kv_capacity_tokens == capacity_tokens > 0
    # Every resumed segment re-prefills at least its previous context's partial last block.
    assert result.counters.recomputed_tokens > 0
    assert metrics.recompute_share_of_forward_time > 0
    assert metrics.memory_waste_fraction == 0  # its KV is dropped at every call
    assert result.counters.swapped_out_bytes == result.counters.swapped_in_bytes == 0


@pytest.mark.parametrize("policy", INTERCEPT_POLICIES)
def test_intercept_policy_replays_tiny_trace(intercept_llm, trace, policy):
    llm = intercept_llm("preserve" if policy == "unbounded" else policy)
    with InterceptBackend(policy, llm=llm) as backend:
        backend.reset()
        before = backend.stats()
        result = replay(backend, trace, drain_s=DRAIN_S)
        after = backend.stats()
    metrics = check_run(result, trace)
    change = counter_change(before, after)
    num_calls = sum(r.num_interceptions for r in trace.requests)
    assert change["interceptions"] == change["resumes"] == num_calls
    assert change["recomputed_tokens"] == result.counters.recomputed_tokens
    assert change["forwarded_tokens"] == result.counters.forwarded_tokens
    assert result.details["engine"]["interceptions"] == num_calls
    assert after["idle_device_tokens"] == 0  # nothing is left paused
    if policy in ("preserve", "unbounded"):
        # Ample memory: every resume continues from its kept KV.
        assert result.counters.recomputed_tokens == 0
        assert metrics.recompute_share_of_forward_time == 0
        assert metrics.idle_kv_token_s > 0  # the KV sat idle while the tools ran
        assert set(change.get("decisions", {})) <= {"preserve"}
    if policy == "swap":
        assert result.counters.swapped_out_bytes > 0
    if policy == "discard":
        # Freed at the first plan after a pause; then at least the partial last block is
        # recomputed. (A tool that returns before the engine plans again finds its KV kept.)
        assert change["decisions"].get("discard", 0) > 0
        assert result.counters.recomputed_tokens > 0


class FakeClock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


class FakeBackend:
    """One token per running segment per step; a step takes ``STEP_S`` of fake time, holds
    10 idle tokens per paused request, and recomputes one token per resumed segment."""

    STEP_S = 0.01
    policy = "fake"
    kv_capacity_tokens = 1000

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.requests, self.segment, self.left, self.resumed = {}, {}, {}, set()
        self.aborted = []

    def start(self, request):
        self.requests[request.request_id] = request
        self.segment[request.request_id] = 0
        self.left[request.request_id] = request.segments[0].generate_tokens

    def resume(self, request_id):
        self.segment[request_id] += 1
        segments = self.requests[request_id].segments
        self.left[request_id] = segments[self.segment[request_id]].generate_tokens
        self.resumed.add(request_id)

    def has_work(self):
        return bool(self.left)

    def idle_device_tokens(self):
        return 10 * (len(self.requests) - len(self.left))

    def step(self):
        from benchmarks.backends import SegmentDone, StepReport

        self.clock.sleep(self.STEP_S)
        report = StepReport(self.STEP_S, forwarded_tokens=len(self.left),
                            recomputed_tokens=len(self.resumed), idle_device_tokens=0)
        self.resumed.clear()
        for request_id in list(self.left):
            self.left[request_id] -= 1
            if self.left[request_id] == 0:
                del self.left[request_id]
                last = self.segment[request_id] == len(self.requests[request_id].segments) - 1
                report.done.append(SegmentDone(request_id, self.requests[request_id].segments[
                    self.segment[request_id]].generate_tokens, last))
                if last:
                    del self.requests[request_id]
        report.idle_device_tokens = self.idle_device_tokens()
        return report

    def abort_all(self):
        self.aborted = sorted(self.requests)
        self.requests.clear()
        self.left.clear()

    def counters(self):
        return {"preemptions": 0}


def two_requests(long_tool_s: float) -> Trace:
    return Trace("fake", 0, 1.0, 1.0, 1.0, (
        Request("a", "qa", 0.0, (Segment(8, 3, 0.5, 2, (1, 2)), Segment(0, 2)), (9,) * 8),
        Request("b", "qa", 0.2, (Segment(4, 1, long_tool_s, 1, (3,)), Segment(0, 1)), (9,) * 4),
    ))


def test_replay_loop_times_steps_tools_and_idle_kv():
    clock = FakeClock()
    result = replay(FakeBackend(clock), two_requests(long_tool_s=0.1), drain_s=10.0,
                    clock=clock, sleep=clock.sleep)
    a, b = result.records
    # a: 3 steps, a tool of 0.5 s, 2 steps.  b: arrives at 0.2, 1 step, 0.1 s tool, 1 step.
    assert (a.start_s, a.end_s, a.output_tokens) == (0.0, pytest.approx(0.55), 5)
    assert a.tool_s_total == pytest.approx(0.5) and a.num_interceptions == 1 and a.completed
    assert (b.start_s, b.end_s, b.output_tokens) == (0.2, pytest.approx(0.32), 2)
    assert b.tool_s_total == pytest.approx(0.1)
    counters = result.counters
    assert counters.forward_s == pytest.approx(0.07) and result.details["num_steps"] == 7
    assert counters.forwarded_tokens == 7 and counters.recomputed_tokens == 2
    # Each resumed segment's first step forwarded one token, all of it recomputation.
    assert counters.recompute_forward_s == pytest.approx(0.02)
    # 10 idle tokens while each request waits on its tool: a for 0.5 s, b for 0.1 s.
    metrics = compute_run_metrics(result.records, counters)
    assert metrics.idle_kv_token_s == pytest.approx(10 * 0.5 + 10 * 0.1)
    assert metrics.normalized_latency_p50_s_per_token == pytest.approx(0.01)


def test_replay_cuts_off_a_run_at_its_drain_deadline():
    clock = FakeClock()
    backend = FakeBackend(clock)
    result = replay(backend, two_requests(long_tool_s=30.0), drain_s=5.0, clock=clock,
                    sleep=clock.sleep)
    a, b = result.records
    assert a.completed and not b.completed
    assert backend.aborted == ["b"]
    assert b.end_s == pytest.approx(5.2) and b.output_tokens == 1
    metrics = compute_run_metrics(result.records, result.counters)
    assert metrics.num_completed == 1
    assert sustainable_rate({1.0: metrics}, slo_p90_s_per_token=math.inf) is None


def test_prometheus_parsing():
    text = "\n".join([
        "# HELP infercept:bytes_swapped_total KV bytes copied",
        "# TYPE infercept:bytes_swapped_total counter",
        'infercept:bytes_swapped_total{direction="out",engine="0"} 4096.0',
        'infercept:bytes_swapped_total{direction="in",engine="0"} 1024.0',
        "infercept:idle_device_tokens 96",
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="50",prefix="x, \\"y\\""} 1.0',
    ])
    samples = parse_prometheus(text)
    assert metric_sum(samples, "infercept:bytes_swapped_total") == 5120
    assert metric_sum(samples, "infercept:bytes_swapped_total", direction="out") == 4096
    assert metric_sum(samples, "infercept:idle_device_tokens") == 96
    assert metric_sum(samples, "infercept:recomputed_tokens_total") is None
    assert kv_capacity_from_metrics(samples) == 50 * 32


# ---------------------------------------------------------------------------- HTTP

HTTP_SERVER_ARGS = ("--max-model-len", "2048", "--kv-cache-memory-bytes", "32M",
                    "--block-size", "32", "--dtype", "float32", "--enforce-eager",
                    "--enable-prompt-tokens-details", "--intercept-policy", "preserve")


@pytest.fixture(scope="module")
def http_server(tiny_model, tmp_path_factory):
    from server.conftest import ServerPool

    pool = ServerPool(tmp_path_factory.mktemp("benchmark-server-logs"))
    yield pool.get(tiny_model, HTTP_SERVER_ARGS)
    pool.close()


@pytest.mark.slow
def test_http_stock_client_replays_tiny_trace(http_server, tiny_model, trace):
    """Each segment a whole-context completion (what the stock baseline sends)."""
    result = replay_http(http_server.base_url, str(tiny_model), "vllm", trace, drain_s=DRAIN_S)
    for record in result.records:
        assert record.completed
    assert result.details["output_token_mismatches"] == 0
    assert result.counters.recomputed_tokens > 0
    assert result.counters.kv_capacity_tokens > 0
    metrics = compute_run_metrics(result.records, result.counters)
    assert metrics.memory_waste_fraction == 0


@pytest.mark.slow
def test_http_intercept_client_replays_tiny_trace(http_server, tiny_model, trace):
    """Segments paused and resumed through InferCept's API (``/v1/intercepts/{id}/resume``)."""
    result = replay_http(http_server.base_url, str(tiny_model), "preserve", trace,
                         drain_s=DRAIN_S)
    records = {r.request_id: r for r in result.records}
    for request in trace.requests:
        record = records[request.request_id]
        assert record.completed and record.output_tokens == request.output_tokens
        assert record.num_interceptions == request.num_interceptions
    # The server's counters: preserve with ample memory recomputes nothing.
    assert result.counters.recomputed_tokens == 0
    # At least every decode step's token (prompts may hit the prefix cache of earlier tests).
    num_segments = sum(len(r.segments) for r in trace.requests)
    num_outputs = sum(r.output_tokens for r in trace.requests)
    assert result.counters.forwarded_tokens >= num_outputs - num_segments
    metrics = compute_run_metrics(result.records, result.counters)
    assert metrics.memory_waste_fraction is not None


# ---------------------------------------------------------------------------- set-up and summary

def test_live_context_tokens_is_littles_law():
    from benchmarks.presets import live_context_tokens

    request = Request("r", "qa", 0.0, (Segment(10, 2, 1.0, 3, (1, 2, 3)), Segment(0, 2)), (9,) * 10)
    # Generating 2 tokens at 0.5 s each from 10 tokens: 11 token-s on average over 1 s; then
    # 12 tokens for the 1 s tool; then 2 tokens from 15: 16 token-s. At 2 requests/s:
    assert live_context_tokens((request,), rate=2.0, decode_s=0.5) == pytest.approx(2 * 39)


def test_preset_cache_sizes_are_whole_blocks_and_hold_one_request():
    from benchmarks.presets import CPU_QUICK

    trace = CPU_QUICK.trace(CPU_QUICK.reference_rate, vocab_size=400, excluded_token_ids=range(3))
    assert len(trace.requests) == round(CPU_QUICK.reference_rate * CPU_QUICK.duration_s)
    assert max(r.context_tokens for r in trace.requests) <= CPU_QUICK.max_context_tokens
    tokens = CPU_QUICK.kv_cache_tokens(trace)
    assert tokens % CPU_QUICK.block_size == 0 and tokens >= CPU_QUICK.max_model_len
    all_contexts = sum(r.context_tokens for r in trace.requests)
    assert CPU_QUICK.unbounded_kv_cache_tokens(trace) >= all_contexts
    kwargs = CPU_QUICK.engine_kwargs("model", tokens)
    assert kwargs["kv_cache_memory_bytes"] == tokens * CPU_QUICK.kv_bytes_per_token()


def test_engine_kwargs_as_server_flags():
    from benchmarks.http_replay import engine_cli_flags

    flags = engine_cli_flags({"model": "m", "block_size": 32, "enforce_eager": True,
                              "enable_prefix_caching": False})
    assert flags == ["--block-size", "32", "--enforce-eager", "--no-enable-prefix-caching"]


def _metrics(p90_s: float | None, completed: int = 10):
    from infercept.bench.metrics import RunMetrics

    return RunMetrics(10, completed, 10.0, p90_s, p90_s, p90_s, p90_s, 1.0, 1.0, 0.1, 0.2, 1.0,
                      0.01, 0)


def test_headline_ratios_and_bounds():
    from benchmarks.run import headline, headline_markdown
    from infercept.bench.metrics import summarize

    ok, slow = 0.05, 0.5
    results = {
        "vllm": {1.0: _metrics(slow)},  # misses the SLO at the lowest rate
        "discard": {1.0: _metrics(ok), 2.0: _metrics(slow)},
        "swap": {1.0: _metrics(ok), 2.0: _metrics(slow)},
        "ttl": {1.0: _metrics(ok), 2.0: _metrics(ok), 3.0: _metrics(slow)},
        "min-waste": {1.0: _metrics(ok), 2.0: _metrics(ok), 3.0: _metrics(ok, completed=9)},
        "unbounded": {1.0: _metrics(ok), 2.0: _metrics(ok), 3.0: _metrics(ok), 4.0: _metrics(slow)},
    }
    head = headline(summarize(results, slo_p90_s_per_token=0.1))
    assert head["sustainable_rate"]["min-waste"] == 2.0
    assert head["best_fixed_policies"] == ["discard", "swap"]
    assert head["min_waste_vs"]["vllm"] == {"ratio": None, "at_least": 2.0}
    assert head["min_waste_vs"]["best_fixed"] == {"ratio": 2.0}
    assert head["min_waste_vs"]["ttl"] == {"ratio": 1.0}
    assert head["min_waste_vs"]["unbounded"] == {"ratio": pytest.approx(2 / 3)}
    assert head["at_rate"] == 1.0  # the highest rate every policy completed
    assert "> 2.00" in headline_markdown(head)
