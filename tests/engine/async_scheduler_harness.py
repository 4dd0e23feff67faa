"""Driving InferCept's scheduler with fake model-runner outputs: no model, no engine.

vLLM's own scheduler tests (tests/v1/core in vLLM's repository) drive `AsyncScheduler`
this way; this is InferCept's own version of that harness:

- `build_scheduler(...)`: a scheduler on a real `VllmConfig` (the tiny model's
  `ModelConfig`, one full-attention KV cache group, block size 16), with InferCept's
  settings in `additional_config["infercept"]` and, for the swap policies, its
  `InterceptConnector` (whose scheduler side, the `SwapPlanner`, needs no worker).
- `FakeRunner`: plays the engine's batch queue and the model runner. `schedule()`
  queues a step; `finish()` hands the oldest queued step's output back with
  `update_from_output`, as `EngineCore.step_with_batch_queue` does with two batches
  in flight under async scheduling. It samples a token for a scheduled request when
  the step reaches the end of the sequence as the runner sees it (not a partial
  prefill chunk), for position `request.num_computed_tokens` right after scheduling.
  Tokens are a deterministic function of (request id, position, how many times that
  position was sampled before), so two schedulers that deliver every sampled token
  produce the same outputs, and a position sampled twice (an output dropped and
  resampled) gets a different token. It also plays the workers' side of the swap
  connector: `finish(finished_sending={...})` reports saves done.

vLLM's CPU platform switches async scheduling off in `VllmConfig`; it is switched
back on before the scheduler is built, as a GPU engine runs it.
"""

from __future__ import annotations

import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZE = 16
MAX_MODEL_LEN = 1024


def build_scheduler(
    model: Path,
    policy: str | None = "preserve",
    *,
    connector: bool = True,
    num_blocks: int = 300,
    swap_space_bytes: int = 1 << 20,
    prefix_caching: bool = True,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 16,
    async_scheduling: bool = True,
    scheduler_cls=None,
    sliding_window: int | None = None,
):
    """A scheduler for a fresh `VllmConfig`.

    `scheduler_cls` None: InferCept's `InterceptScheduler` (whose `__new__` picks the
    async variant). `policy` None: no InferCept settings at all (stock vLLM's config).
    `sliding_window`: a second KV cache group, of sliding-window layers, beside the
    full-attention one (vLLM's hybrid KV cache manager, as for Gemma 3).
    """
    import torch
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            SlidingWindowSpec)
    from vllm.v1.structured_output import StructuredOutputManager

    from infercept.config import CONNECTOR_MODULE, CONNECTOR_NAME

    if scheduler_cls is None:
        from infercept.adapter.scheduler import InterceptScheduler as scheduler_cls

    init_none_hash(sha256)
    model_config = ModelConfig(model=str(model), dtype="float32", seed=0,
                               max_model_len=MAX_MODEL_LEN)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=MAX_MODEL_LEN,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
        watermark=0.0,
        async_scheduling=async_scheduling,
    )
    cache_config = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    kv_transfer_config = None
    if connector:
        kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE,
            kv_role="kv_both")
    additional_config = {}
    if policy is not None:
        additional_config["infercept"] = {"policy": policy, "profile_at_startup": False,
                                          "swap_space_bytes": swap_space_bytes}
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                             cache_config=cache_config, kv_transfer_config=kv_transfer_config,
                             additional_config=additional_config)
    # The CPU platform turns async scheduling off; a GPU engine keeps it on.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=8,
                             dtype=torch.float32)
    kv_cache_groups = [KVCacheGroupSpec(["layer.0"], spec)]
    if sliding_window is not None:
        kv_cache_groups.append(KVCacheGroupSpec(["layer.1"], SlidingWindowSpec(
            block_size=BLOCK_SIZE, num_kv_heads=1, head_size=8, dtype=torch.float32,
            sliding_window=sliding_window)))
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=kv_cache_groups)
    cache_config.num_gpu_blocks = num_blocks
    register_all_kvcache_specs(vllm_config)
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
        log_stats=True,
    )


def make_request(request_id: str, prompt: list[int], *, max_tokens: int = 64,
                 infercept: dict | None = None, arrival_time: float | None = None):
    """A `Request` as the engine core builds one (block hashes for the prefix cache)."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request

    extra_args = {"infercept": dict(infercept)} if infercept else None
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)
    return Request(request_id, list(prompt), params, None, arrival_time=arrival_time,
                   block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256))


def fake_token(request_id: str, position: int, nth: int = 0) -> int:
    """The token the fake model samples: distinct per request, position and resample."""
    return 100_000 + (zlib.crc32(request_id.encode()) % 1000) * 100_000 + position * 10 + nth


@dataclass
class QueuedStep:
    output: object  # SchedulerOutput
    samples: dict[str, int]  # request id -> sampled position (absent: a prefill chunk)


@dataclass
class FakeRunner:
    scheduler: object
    queue: deque = field(default_factory=deque)
    # (request id, position) -> times sampled
    times_sampled: Counter = field(default_factory=Counter)
    # token -> (request id, position)
    origin: dict = field(default_factory=dict)
    # every step's {request id: scheduled tokens}, in order
    trace: list = field(default_factory=list)
    # tags of the saves queued so far and not yet reported done
    unreported_saves: list = field(default_factory=list)

    def schedule(self):
        """`scheduler.schedule()`; the step joins the batch queue."""
        output = self.scheduler.schedule()
        samples = {}
        for request_id in output.num_scheduled_tokens:
            request = self.scheduler.requests[request_id]
            if not request.is_prefill_chunk:
                samples[request_id] = request.num_computed_tokens
        self.queue.append(QueuedStep(output, samples))
        self.trace.append(dict(output.num_scheduled_tokens))
        self.unreported_saves.extend(saves_in(output))
        return output

    def finish(self, finished_sending=(), report_saves: bool = False):
        """The oldest queued step returns: `update_from_output` with its sampled tokens
        and, as the workers' `finished_sending`, the saves in `finished_sending` (or,
        with `report_saves`, every save queued up to this step)."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        step = self.queue.popleft()
        if report_saves:
            queued_later = {tag for later in self.queue for tag in saves_in(later.output)}
            finished_sending = {t for t in self.unreported_saves if t not in queued_later}
        for tag in finished_sending:
            self.unreported_saves.remove(tag)
        request_ids = list(step.output.num_scheduled_tokens)
        sampled = []
        for request_id in request_ids:
            position = step.samples.get(request_id)
            if position is None:
                sampled.append([])
                continue
            nth = self.times_sampled[request_id, position]
            self.times_sampled[request_id, position] += 1
            token = fake_token(request_id, position, nth)
            self.origin[token] = (request_id, position)
            sampled.append([token])
        kv_output = None
        if finished_sending:
            kv_output = KVConnectorOutput(finished_sending=set(finished_sending))
        runner_output = ModelRunnerOutput(
            req_ids=request_ids,
            req_id_to_index={r: i for i, r in enumerate(request_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=[],
            kv_connector_output=kv_output,
        )
        return self.scheduler.update_from_output(step.output, runner_output)

    def step(self, finished_sending=(), report_saves: bool = False):
        """One engine step, two batches in flight: schedule, then the oldest returns."""
        output = self.schedule()
        if len(self.queue) > 1:
            self.finish(finished_sending, report_saves)
        return output

    def drain(self, max_steps: int = 200, report_saves: bool = True) -> None:
        """Run until nothing is in flight and the scheduler has no work left."""
        for _ in range(max_steps):
            if self.queue:
                self.finish(report_saves=report_saves)
            elif self.scheduler.has_requests():
                self.schedule()
            else:
                return
        raise AssertionError("scheduler did not become idle")

    def assert_positions_consistent(self, request) -> None:
        """Its i-th output token was sampled for position prompt_len + i of that request."""
        for i, token in enumerate(request.output_token_ids):
            assert self.origin[token] == (request.request_id, request.num_prompt_tokens + i), (
                f"output {i} of {request.request_id} is {token}, sampled for {self.origin[token]}")


def saves_in(output) -> dict[str, object]:
    """The swap saves a step's connector metadata queues, by tag (the paused request)."""
    metadata = output.kv_connector_metadata
    return {copies.tag: copies for copies in metadata.saves} if metadata is not None else {}
