"""Benchmark presets: the model, the engine, the workload, the rates and the SLO.

- ``cpu-quick``: two CPU cores, under 15 minutes. A random Llama (hidden 768, 8 layers,
  float32) whose forward time grows with the tokens in a step (prefill ~0.6 ms/token
  against a ~10 ms decode step, one thread), the paper's six-workload mix with contexts
  divided by 6 and tool durations by 10, a 15-second arrival window, and a KV cache of 30%
  of the contexts live at 3 requests/s (~800 tokens: the running batch and a few paused
  contexts), so paused requests really compete for memory. One OpenMP thread: with two, an
  engine on a shared two-core machine stalls whenever another process holds a core
  (measured: steps 5-20x slower and erratic).
- ``gpu-paper``: the paper's scale for one GPU: a 6B-class Llama (GPT-J-6B's hidden size and
  depth, multi-head attention) with random weights, contexts and tool durations unscaled, a
  10-minute arrival window, rates up to a few requests per second. Not run on the CPU machines.

The KV cache is sized from the workload (``live_context_tokens``): by Little's law the
contexts live at rate r are r times the token-seconds a request holds, while it generates
(at ``nominal_decode_s``) and while its tools run. Every policy gets the same cache, except
``unbounded`` (preserve with a cache that holds every context of the largest trace).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from benchmarks.random_model import ModelShape
from infercept.bench.workload import MIX, Request, Trace, generate_trace

POLICIES = ("vllm", "discard", "preserve", "swap", "ttl", "min-waste", "unbounded")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelShape
    rates: tuple[float, ...]  # requests/s, swept in increasing order
    slo_p90_s_per_token: float  # p90 normalized latency a sustainable rate keeps
    duration_s: float  # arrival window of every run: rate * duration_s requests
    drain_s: float  # a run not finished this long after its last arrival is cut off
    length_scale: float
    time_scale: float
    max_context_tokens: int
    kv_fraction_of_live: float  # device KV cache / contexts live at reference_rate
    reference_rate: float
    nominal_decode_s: float  # a decode step's time, for the live-context estimate
    swap_to_device_ratio: float  # CPU swap space / device KV cache
    dtype: str = "float32"
    dtype_bytes: int = 4
    block_size: int = 32
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    workload: str = MIX
    seed: int = 0
    threads: int = 1
    policies: tuple[str, ...] = POLICIES
    overhead_requests: int = 48
    overhead_repeats: int = 3

    @property
    def max_model_len(self) -> int:
        return self.max_context_tokens + self.block_size

    def with_overrides(self, **overrides) -> Preset:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def quick(self) -> Preset:
        """A smoke run: two rates, half the arrival window."""
        rates = (self.rates[0], self.rates[len(self.rates) // 2])
        return dataclasses.replace(self, rates=tuple(sorted(set(rates))),
                                   duration_s=self.duration_s / 2)

    # ---- traces ------------------------------------------------------------

    def trace(self, rate: float, vocab_size: int, excluded_token_ids=(),
              num_requests: int | None = None) -> Trace:
        """The workload at ``rate`` (``rate * duration_s`` requests unless given): the same
        requests at every rate, arrivals scaled."""
        num_requests = num_requests or max(1, round(rate * self.duration_s))
        return generate_trace(self.workload, num_requests, rate, self.seed,
                              time_scale=self.time_scale, length_scale=self.length_scale,
                              max_context_tokens=self.max_context_tokens,
                              vocab_size=vocab_size, excluded_token_ids=excluded_token_ids)

    # ---- memory ------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(self.dtype_bytes)

    def kv_cache_tokens(self, trace: Trace) -> int:
        """The shared device cache: a fraction of the live contexts at the reference rate,
        in whole blocks, at least one request of the longest length."""
        live = live_context_tokens(trace.requests, self.reference_rate, self.nominal_decode_s)
        tokens = max(self.kv_fraction_of_live * live, self.max_model_len)
        return self.block_size * math.ceil(tokens / self.block_size)

    def unbounded_kv_cache_tokens(self, trace: Trace) -> int:
        """Room for every context of ``trace`` at once: nothing is ever evicted."""
        tokens = sum(r.context_tokens + self.block_size for r in trace.requests)
        return self.block_size * math.ceil(max(tokens, self.max_model_len) / self.block_size)

    # ---- engines -----------------------------------------------------------

    def engine_kwargs(self, model_path: str, kv_cache_tokens: int) -> dict:
        """vLLM's own arguments, the same for every policy but the cache size."""
        return dict(
            model=model_path, load_format="dummy", dtype=self.dtype, seed=0,
            block_size=self.block_size, max_model_len=self.max_model_len,
            kv_cache_memory_bytes=kv_cache_tokens * self.kv_bytes_per_token(),
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=True, enforce_eager=True,
        )

    def swap_space_bytes(self, kv_cache_tokens: int) -> int:
        return int(self.swap_to_device_ratio * kv_cache_tokens * self.kv_bytes_per_token())


def live_context_tokens(requests: tuple[Request, ...], rate: float, decode_s: float) -> float:
    """Mean context tokens held by requests in the system at ``rate`` (Little's law):
    ``rate`` times a request's token-seconds, counting one decode step per generated token
    and the tool durations, and no queueing."""
    if not requests:
        return 0.0
    total_token_s = 0.0
    for request in requests:
        context = request.prompt_tokens
        for segment in request.segments:
            generate_s = segment.generate_tokens * decode_s
            total_token_s += (context + segment.generate_tokens / 2) * generate_s
            context += segment.generate_tokens
            total_token_s += context * segment.tool_s
            context += segment.tool_return_tokens
    return rate * total_token_s / len(requests)


CPU_QUICK = Preset(
    name="cpu-quick",
    model=ModelShape(hidden_size=768, num_layers=8, intermediate_size=2048, num_kv_heads=6,
                     max_position_embeddings=2048),
    rates=(1.0, 1.5, 2.0, 3.0, 4.0),
    slo_p90_s_per_token=0.1,
    duration_s=15.0,
    drain_s=30.0,
    length_scale=1 / 6,
    time_scale=1 / 10,
    max_context_tokens=480,
    kv_fraction_of_live=0.3,
    reference_rate=3.0,
    nominal_decode_s=0.02,
    swap_to_device_ratio=2.0,
)

GPU_PAPER = Preset(
    name="gpu-paper",
    model=ModelShape(hidden_size=4096, num_layers=28, intermediate_size=16384, num_kv_heads=64,
                     max_position_embeddings=4096),
    rates=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
    slo_p90_s_per_token=0.2,
    duration_s=600.0,
    drain_s=900.0,
    length_scale=1.0,
    time_scale=1.0,
    max_context_tokens=4000,
    kv_fraction_of_live=0.3,
    reference_rate=2.0,
    nominal_decode_s=0.04,
    swap_to_device_ratio=2.0,
    dtype="float16",
    dtype_bytes=2,
    block_size=16,
    max_num_batched_tokens=2048,
    max_num_seqs=256,
    threads=8,
    overhead_requests=256,
)

PRESETS = {preset.name: preset for preset in (CPU_QUICK, GPU_PAPER)}
