"""Engines the benchmark driver replays traces against.

In-process (the driver steps the engine itself, one step at a time):

- ``StockBackend``: a plain ``vllm.LLM`` (no InferCept scheduler, no connector, prefix
  caching on, as shipped). Every segment is a new request whose prompt is the whole
  context so far: what a user of stock vLLM does at a tool call.
- ``InterceptBackend``: ``vllm.LLM`` with InferCept's scheduler, driven through
  ``SessionEngine``; a segment ends by ``InterceptSpec(intercept_after=...)`` and the tool's
  tokens come back through ``SessionEngine.resume``.

Both return a ``StepReport`` per engine step: its wall time, the tokens it forwarded, those
that recomputed KV computed before, the KV tokens paused requests hold idle on the device,
and the segments that ended in it. InferCept's numbers are per-step deltas of the
scheduler's counters. Stock vLLM has none, so ``StockBackend`` wraps its scheduler's
``schedule()`` (an observation only) and counts the same way the InferCept scheduler does:
a scheduled token below the KV the request's previous segment had computed, or below what
it had computed before a preemption, is recomputation.

Over HTTP: ``benchmarks.http_replay``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

from infercept.bench.workload import Request


@dataclass(frozen=True)
class SegmentDone:
    request_id: str
    num_tokens: int  # tokens the model generated in the segment
    finished: bool  # the request's last segment


@dataclass
class StepReport:
    wall_s: float
    forwarded_tokens: int
    recomputed_tokens: int
    idle_device_tokens: int
    used_device_tokens: int = 0  # KV tokens in device blocks that are in use
    done: list[SegmentDone] = field(default_factory=list)


def sampling_params(max_tokens: int):
    """Greedy, fixed length, no detokenization: the benchmark reads token ids only."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens,
                          detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)


class InProcessBackend:
    """What the two in-process engines share: the LLM, warm-up, reset and shutdown."""

    policy: str

    def __init__(self, engine_kwargs: dict | None = None, llm=None):
        """Builds ``vllm.LLM(**engine_kwargs)``, or drives a given ``llm`` (not shut down
        by ``close``)."""
        from vllm import LLM

        self.owns_engine = llm is None
        self.llm = LLM(**engine_kwargs) if llm is None else llm
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler

    @property
    def kv_capacity_tokens(self) -> int:
        pool = self.scheduler.kv_cache_manager.block_pool
        return pool.num_gpu_blocks * self.scheduler.block_size

    def used_device_tokens(self) -> int:
        pool = self.scheduler.kv_cache_manager.block_pool
        return (pool.num_gpu_blocks - pool.get_num_free_blocks()) * self.scheduler.block_size

    def has_work(self) -> bool:
        return self.scheduler.has_requests()

    def warm_up(self, prompt_tokens: int = 96, num_requests: int = 4) -> None:
        """Run a few plain requests so the first measured step pays no first-call costs."""
        prompts = [[5 + (i * 7 + j) % 97 for j in range(prompt_tokens)]
                   for i in range(num_requests)]
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params(8),
                          use_tqdm=False)
        self.reset()

    def reset(self) -> None:
        """Between runs: an empty prefix cache, so no run inherits another's."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("prefix cache not reset: requests are still in the engine")

    def close(self) -> None:
        """Shut the engine down (if built here); vLLM allows one KV connector per process."""
        if self.owns_engine:
            self.engine.engine_core.shutdown()
        self.llm = self.engine = self.scheduler = None
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class StockBackend(InProcessBackend):
    policy = "vllm"

    def __init__(self, engine_kwargs: dict | None = None, llm=None):
        super().__init__(engine_kwargs, llm)
        self._requests: dict[str, Request] = {}
        self._context: dict[str, list[int]] = {}  # request id -> its tokens so far
        self._segment: dict[str, int] = {}  # request id -> index of its running segment
        self._engine_ids: dict[str, str] = {}  # request id -> engine id of that segment
        self._probe = _RecomputeProbe(self.scheduler)

    def start(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self._context[request.request_id] = list(request.prompt_token_ids)
        self._submit(request.request_id, 0, prior_kv_tokens=0)

    def resume(self, request_id: str) -> None:
        """Append the tool's tokens; the next segment is a new request with all of it."""
        index = self._segment[request_id]
        segment = self._requests[request_id].segments[index]
        context = self._context[request_id]
        prior_kv_tokens = len(context) - 1  # the last sampled token has no KV yet
        context.extend(segment.tool_return_token_ids)
        self._submit(request_id, index + 1, prior_kv_tokens)

    def _submit(self, request_id: str, index: int, prior_kv_tokens: int) -> None:
        from vllm.inputs import TokensPrompt

        segment = self._requests[request_id].segments[index]
        engine_id = self.engine.add_request(
            f"{request_id}/{index}", TokensPrompt(prompt_token_ids=list(self._context[request_id])),
            sampling_params(segment.generate_tokens))
        self._segment[request_id] = index
        self._engine_ids[request_id] = engine_id
        self._probe.marks[engine_id] = prior_kv_tokens

    def step(self) -> StepReport:
        start_s = time.perf_counter()
        outputs = self.engine.step()
        wall_s = time.perf_counter() - start_s
        forwarded, recomputed = self._probe.take()
        report = StepReport(wall_s, forwarded, recomputed, idle_device_tokens=0,
                            used_device_tokens=self.used_device_tokens())
        for output in outputs:
            if not output.finished:
                continue
            request_id, index = output.request_id.rsplit("/", 1)
            tokens = output.outputs[0].token_ids
            self._context[request_id].extend(tokens)
            self._probe.forget(self._engine_ids[request_id])
            last = int(index) == len(self._requests[request_id].segments) - 1
            report.done.append(SegmentDone(request_id, len(tokens), last))
            if last:
                self._drop(request_id)
        return report

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.engine.abort_request([f"{request_id}/{self._segment[request_id]}"])
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        self._requests.pop(request_id)
        self._context.pop(request_id)
        self._segment.pop(request_id)
        self._probe.forget(self._engine_ids.pop(request_id))

    def counters(self) -> dict:
        return {"preemptions": self._probe.preemptions}

    def idle_device_tokens(self) -> int:
        return 0  # stock vLLM drops a request's KV when its segment ends


class _RecomputeProbe:
    """Counts stock vLLM's forwarded and recomputed tokens per step, from the outputs of
    its scheduler's ``schedule()`` (wrapped on this one instance; behaviour unchanged)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.marks: dict[str, int] = {}  # engine id -> tokens whose KV was computed before
        self.preemptions = 0
        self._forwarded = self._recomputed = 0
        self._schedule = scheduler.schedule
        scheduler.schedule = self._observed_schedule

    def _observed_schedule(self, *args, **kwargs):
        output = self._schedule(*args, **kwargs)
        # After schedule() a request's num_computed_tokens already counts this step.
        for engine_id, num_tokens in output.num_scheduled_tokens.items():
            end = self.scheduler.requests[engine_id].num_computed_tokens
            start = end - num_tokens
            mark = self.marks.get(engine_id, 0)
            self._recomputed += max(0, min(mark, end) - start)
            self.marks[engine_id] = max(mark, end)
        self._forwarded += output.total_num_scheduled_tokens
        self.preemptions += len(output.preempted_req_ids or ())
        return output

    def take(self) -> tuple[int, int]:
        """(forwarded, recomputed) tokens since the last call."""
        counts = (self._forwarded, self._recomputed)
        self._forwarded = self._recomputed = 0
        return counts

    def forget(self, engine_id: str) -> None:
        self.marks.pop(engine_id, None)


class InterceptBackend(InProcessBackend):
    """InferCept's scheduler under ``policy`` (``unbounded`` runs as ``preserve``).

    An engine built here gets its cost model as ``infercept.LLM`` and the server do: from
    the start-up profile (measured once per model, hardware and settings, then cached), so
    the policy plans with this machine's forward and swap times, not the defaults."""

    def __init__(self, policy: str, engine_kwargs: dict | None = None, llm=None):
        from infercept.entrypoints.sessions import SessionEngine

        super().__init__(engine_kwargs, llm)
        self.policy = policy
        self.cost_model_source = "engine's own"
        if self.owns_engine:
            from infercept.adapter.profiler import profile_llm

            _, self.cost_model_source = profile_llm(self.llm)
        self.sessions = SessionEngine(self.engine)
        self._requests: dict[str, Request] = {}
        self._last = self.stats()

    def stats(self) -> dict:
        return self.engine.engine_core.engine_core.infercept("stats")

    def reset(self) -> None:
        super().reset()
        from infercept.entrypoints.sessions import SessionEngine

        self.sessions = SessionEngine(self.engine)
        self._last = self.stats()

    def start(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.sessions.start(list(request.prompt_token_ids), sampling_params(request.output_tokens),
                            self._spec(request, 0), session_id=request.request_id)

    def resume(self, request_id: str) -> None:
        session = self.sessions.sessions[request_id]
        request = self._requests[request_id]
        index = len(session.segments)  # the segment about to start
        returned = request.segments[index - 1].tool_return_token_ids
        self.sessions.resume(session, token_ids=list(returned), spec=self._spec(request, index))

    @staticmethod
    def _spec(request: Request, index: int):
        from infercept.adapter.interception import InterceptSpec

        if index == len(request.segments) - 1:
            return InterceptSpec()
        return InterceptSpec(intercept_after=request.segments[index].generate_tokens,
                             tool=request.tool_of(index))

    def step(self) -> StepReport:
        from infercept.entrypoints.sessions import SessionState

        start_s = time.perf_counter()
        changed = self.sessions.step()
        wall_s = time.perf_counter() - start_s
        stats = self.stats()
        report = StepReport(
            wall_s,
            forwarded_tokens=stats["forwarded_tokens"] - self._last["forwarded_tokens"],
            recomputed_tokens=stats["recomputed_tokens"] - self._last["recomputed_tokens"],
            idle_device_tokens=stats["idle_device_tokens"],
            used_device_tokens=self.used_device_tokens())
        self._last = stats
        for session in changed:
            finished = session.state is SessionState.FINISHED
            report.done.append(SegmentDone(session.session_id, len(session.segments[-1]), finished))
            if finished:
                del self._requests[session.session_id]
        return report

    def counters(self) -> dict:
        return self.stats()

    def idle_device_tokens(self) -> int:
        return self.stats()["idle_device_tokens"]

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.sessions.abort(self.sessions.sessions[request_id])
            del self._requests[request_id]
