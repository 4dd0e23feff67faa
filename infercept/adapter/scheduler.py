"""InferCept's scheduler for vLLM 0.32's V1 engine core.

`InterceptScheduler` is what `--scheduler-cls` names. The interception logic
is a mixin over vLLM's `Scheduler`, so it also composes with `AsyncScheduler`
(vLLM's default on GPUs): `AsyncInterceptScheduler` keeps that overlap.

Lifecycle of an intercepted request (one vLLM `Request` object throughout):
  running --trigger--> paused (kept in `self.intercepts`, in no queue; the
  worker is told it is gone) --policy--> preserved / swapped / discarded,
  changing every iteration as the policy decides --resume--> its KV is handed
  to the resuming request, which the worker sees as a new request with a
  prefix already computed.

A swap-out's device blocks stay with the paused request until every worker
reports its save done (`_update_from_kv_xfer_finished`); a resume before then
takes the blocks, intact, as from a preserved request.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections import OrderedDict

from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from infercept.adapter import blocks
from infercept.adapter.interception import (
    STOP_REASON,
    Interception,
    InterceptSpec,
    special_token_triggers,
    trigger_completed,
)
from infercept.adapter.policy_driver import PolicyDriver
from infercept.adapter.resume_index import ResumeIndex
from infercept.config import InterceptConfig
from infercept.policy.types import Location
from infercept.policy.waste import recompute_chunk_tokens

logger = logging.getLogger(__name__)


class InterceptSchedulerMixin:
    """Interception state per request, layered over vLLM's scheduler."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # What pauses, expiry and the policy's elapsed times are measured with.
        self.clock = time.monotonic
        self.intercept_config = InterceptConfig.from_vllm_config(self.vllm_config)
        self.intercepts: dict[str, Interception] = {}
        self._pausing: set[str] = set()
        self._specs: dict[str, InterceptSpec] = {}
        self._tokenizer = None
        # (triggers, skip_special_tokens) -> (text triggers, special-token trigger ids)
        self._trigger_split: dict[tuple, tuple[tuple[str, ...], frozenset[int]]] = {}
        # Request id -> tokens whose KV was computed before (a resume or a
        # preemption): scheduled tokens below it are recomputation.
        self._recompute_marks: dict[str, int] = {}
        # Under the stock `vllm` policy: KV a finished segment had computed,
        # by request id, for the resume that names it (bounded).
        self._finished_kv: dict[str, int] = {}
        # Request id -> records of the interceptions its session went through.
        self._records: dict[str, list[dict]] = {}
        # Paused requests by their front-end key, and by their prompt (to find
        # the one a new prompt continues), filed under vLLM's block hashes.
        self._keys: dict[str, str] = {}
        # Where vLLM hashes every request's blocks (prefix caching or a KV
        # connector on: EngineCore's condition), the index uses its hashes, and
        # hashes token lists the front end sends with its function.
        self._resume_index = ResumeIndex(
            self.hash_block_size,
            get_hash_fn_by_name(self.cache_config.prefix_caching_hash_algo)
            if self.cache_config.enable_prefix_caching or self.connector is not None
            else None,
        )
        # Key -> how the request of that key was admitted (bounded).
        self._admissions: dict[str, dict] = {}
        # The intercepts' ledger, here with their KV so that every API server
        # process (and, under data parallelism, the front-end that routes to
        # this engine) finds it: keys claimed by a resume on its way, ended
        # intercepts' last state (bounded), paused keys by the ids of the tool
        # calls their turn made (how a follow-up names its conversation).
        self._claimed: set[str] = set()
        self._ended: OrderedDict[str, dict] = OrderedDict()
        self._by_call_id: dict[str, str] = {}
        # This engine's data-parallel rank (0 without data parallelism).
        self.engine_rank = self.vllm_config.parallel_config.data_parallel_rank
        planner = getattr(self.connector, "planner", None)
        self.policy_driver = PolicyDriver(self, self.intercept_config, planner)

    # ---- entry: vLLM calls add_request for every new request -------------

    def add_request(self, request: Request) -> None:
        """Override of `Scheduler.add_request` (engine core, per new request).

        A request that resumes a paused one takes over its KV cache and first
        arrival time: named explicitly (`resume`: its key or request id), or
        found automatically when its prompt begins with the paused request's
        whole prompt (a client sending the conversation back with the tool's
        result appended).
        """
        spec = InterceptSpec.of(request.sampling_params)
        if spec.intercepts:
            self._specs[request.request_id] = spec
        paused = self._find_paused(spec, request)
        if paused is None:
            prior_kv_tokens = self._finished_kv.pop(spec.resume, 0) if spec.resume else 0
            if prior_kv_tokens:
                self._recompute_marks[request.request_id] = prior_kv_tokens
            self._admit(spec, None, 0)
            super().add_request(request)
            return
        self._admit(spec, paused, self._resume(paused, request))

    def _find_paused(self, spec: InterceptSpec, request: Request) -> Interception | None:
        # A keyed request's front end settles it (`infercept_admission`): until
        # then, what it resumed is `resuming`; it ends `resumed` or `cancelled`.
        ended_as = "resumed" if spec.key is None else "resuming"
        if spec.resume is not None:
            request_id = self._keys.get(spec.resume, spec.resume)
            if request_id in self.intercepts:
                return self._take_paused(request_id, ended_as)
        if not spec.auto_resume:
            return None
        best = self._continued(request.prompt_token_ids, request.block_hashes)
        return self._take_paused(best.request_id, ended_as) if best else None

    def _continued(self, prompt_token_ids, block_hashes=()) -> Interception | None:
        """The paused request `prompt_token_ids` continues (its whole prompt, and
        more, computed in its KV), the longest match; a claimed one is taken
        only by the resume that claimed it."""
        return self._resume_index.continued(prompt_token_ids, block_hashes,
                                            skip=lambda paused: paused.key in self._claimed)

    def _take_paused(self, request_id: str, ended_as: str = "resumed") -> Interception:
        paused = self.intercepts.pop(request_id)
        self._keys.pop(paused.key, None)
        self._claimed.discard(paused.key)
        for call_id in (paused.spec.session or {}).get("call_ids", ()):
            self._by_call_id.pop(call_id, None)
        if paused.spec.key is not None:
            self._end(paused.key, paused.summary(ended_as))
        self._resume_index.remove(request_id)
        return paused

    def _end(self, key: str, summary: dict) -> None:
        self._ended[key] = summary
        while len(self._ended) > MAX_ENDED_INTERCEPTS:
            self._ended.popitem(last=False)

    def _admit(self, spec: InterceptSpec, paused: Interception | None, reused_tokens: int) -> None:
        """Remember how a keyed request was admitted, for the front-end to ask."""
        if spec.key is None:
            return
        self._admissions[spec.key] = {
            "resumed_from": paused.key if paused else None,
            "reused_tokens": reused_tokens,
        }
        while len(self._admissions) > 4096:
            self._admissions.pop(next(iter(self._admissions)))

    @property
    def _initialized(self) -> bool:
        """False for a scheduler built without `__init__` (some of vLLM's own tests
        build one so, to drive a single hook): it then behaves as vLLM's."""
        return "policy_driver" in vars(self)

    # ---- detecting the trigger ------------------------------------------

    def _update_request_with_output(self, request: Request, new_token_ids, is_stale=False):
        """Override of `Scheduler._update_request_with_output` (per sampled token batch).

        After vLLM's own stop checks, a completed trigger stops the request
        with InferCept's stop reason; `_handle_stopped_request` then pauses it.
        """
        new_token_ids, stopped = super()._update_request_with_output(
            request, new_token_ids, is_stale
        )
        if not self._initialized:
            return new_token_ids, stopped
        spec = self._specs.get(request.request_id)
        if spec is None or not new_token_ids:
            return new_token_ids, stopped
        if stopped:
            # A natural stop (EOS, stop token) pauses only a turn that may end
            # in a tool call, and only under a policy that pauses at all.
            natural_stop = request.status == RequestStatus.FINISHED_STOPPED
            if not (spec.pause_on_stop and natural_stop and self.policy_driver.pauses):
                return new_token_ids, stopped
        elif not self._trigger_fired(request, spec):
            return new_token_ids, False
        request.status = RequestStatus.FINISHED_STOPPED
        request.stop_reason = STOP_REASON
        if self.policy_driver.pauses:
            self._pausing.add(request.request_id)
        return new_token_ids, True

    def _trigger_fired(self, request: Request, spec: InterceptSpec) -> bool:
        if spec.intercept_after is not None and request.num_output_tokens >= spec.intercept_after:
            return True
        if not spec.triggers:
            return False
        skip_special = request.sampling_params.skip_special_tokens
        text_triggers, special_ids = self._split_triggers(spec.triggers, skip_special)
        return trigger_completed(
            request.output_token_ids, text_triggers,
            lambda ids: self._tokenizer_once().decode(ids, skip_special_tokens=skip_special),
            special_ids,
        )

    def _split_triggers(self, triggers: tuple[str, ...], skip_special: bool):
        """(the triggers matched as text, the ids of those matched as one special token):
        with special tokens hidden, a trigger that is one special token goes by id."""
        key = (triggers, skip_special)
        split = self._trigger_split.get(key)
        if split is None:
            special = special_token_triggers(triggers, self._tokenizer_once()) if skip_special else {}
            split = (tuple(t for t in triggers if t not in special), frozenset(special.values()))
            if len(self._trigger_split) >= 1024:
                self._trigger_split.pop(next(iter(self._trigger_split)))
            self._trigger_split[key] = split
        return split

    def _tokenizer_once(self):
        if self._tokenizer is None:
            from vllm.tokenizers import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(self.vllm_config.model_config)
        return self._tokenizer

    # ---- pause -------------------------------------------------------------

    def _handle_stopped_request(self, request: Request) -> bool:
        """Override of `Scheduler._handle_stopped_request` (a request stopped).

        Returns False (not finished) for a request that pauses on a trigger.
        """
        if not self._initialized:
            return super()._handle_stopped_request(request)
        if request.request_id not in self._pausing:
            self._specs.pop(request.request_id, None)
            self._recompute_marks.pop(request.request_id, None)
            if request.stop_reason == STOP_REASON:  # stock policy: the call ends the request
                self._remember_finished_kv(request)
            return super()._handle_stopped_request(request)
        self._pausing.discard(request.request_id)
        self._recompute_marks.pop(request.request_id, None)
        self._pause(request)
        return False

    def _remember_finished_kv(self, request: Request) -> None:
        self._finished_kv[request.request_id] = request.num_computed_tokens
        while len(self._finished_kv) > 4096:
            self._finished_kv.pop(next(iter(self._finished_kv)))

    def _pause(self, request: Request) -> None:
        # Under async scheduling a token may be in flight: its output is
        # dropped, and only KV that was materialized counts.
        request.num_computed_tokens -= request.num_output_placeholders
        request.spec_token_ids = []
        request.drop_stale_output = True
        request.num_stale_output_tokens = request.num_in_flight_tokens
        request.num_output_placeholders = 0
        request.status = RequestStatus.WAITING_FOR_STREAMING_REQ
        self._inflight_prefills.discard(request)
        # The worker forgets the request; a resume reaches it as a new one.
        self.finished_req_ids.add(request.request_id)
        spec = self._specs.pop(request.request_id)
        paused = Interception(
            request=request,
            spec=spec,
            paused_at_s=self.clock(),
            num_kv_tokens=request.num_computed_tokens,
            prompt_tokens=request.num_prompt_tokens,
        )
        self.intercepts[request.request_id] = paused
        self._keys[paused.key] = request.request_id
        self._resume_index.add(paused)
        self.policy_driver.paused(paused)

    # ---- resume ------------------------------------------------------------

    def _resume(self, paused: Interception, request: Request) -> int:
        """Hand `paused`'s KV to `request`; returns the tokens it will not recompute."""
        old = paused.request
        # At least the prompt's last token is computed, to sample from (vLLM
        # asserts it: a prompt all covered by the KV would kill the engine).
        reusable = blocks.common_prefix_len(
            old.all_token_ids, request.prompt_token_ids,
            min(paused.num_kv_tokens, len(request.prompt_token_ids) - 1),
        )
        request.arrival_time = old.arrival_time
        self.policy_driver.observe_resume(paused)
        del self.requests[old.request_id]
        self.requests[request.request_id] = request
        if self.connector is not None:
            self.connector.on_new_request(request)
        reused = reusable
        if paused.saving:
            # Its save is still running: the device blocks are intact, take them.
            self.policy_driver.swap.release(old.request_id)
            paused.location, paused.saving = Location.DEVICE, False
        if (paused.location is Location.DEVICE and reusable < paused.num_kv_tokens
                and blocks.num_groups(self.kv_cache_manager) > 1):
            # Diverged with several KV cache groups: a sliding window's blocks before the
            # divergence may be gone (null), so the common prefix cannot be kept as is.
            # Its blocks go back (the prefix cache keeps what it can) and it recomputes.
            self.policy_driver.discard(paused)
        if paused.location is Location.DEVICE:
            if reusable < paused.num_kv_tokens:
                # Diverged (a chat template re-rendering the tool call): keep
                # the common prefix's blocks, recompute the rest.
                reused, tail = blocks.truncate(self.kv_cache_manager, old.request_id, reusable,
                                               self.block_size)
                self._free_blocks_after_inflight(old, tail)
            blocks.transfer(self.kv_cache_manager, old.request_id, request.request_id)
            request.num_computed_tokens = reused
            # A step still in flight may write these blocks: vLLM's fence follows them.
            request.last_sched_seq = old.last_sched_seq
        elif paused.location is Location.CPU:
            swap = self.policy_driver.swap
            reused = min(reusable, swap.num_swapped_tokens(old.request_id))
            uncopied = swap.num_uncopied_tokens(old.request_id)
            if uncopied and self.kv_cache_manager.get_computed_blocks(request)[1] < uncopied:
                reused = 0  # the shared prefix its copy left out is gone: recomputed
            swap.rekey(old.request_id, request.request_id, reusable)
        else:
            reused = 0  # whatever the prefix cache still holds
        if reused < reusable or (paused.location is Location.CPU and paused.shared_tokens):
            # KV it had, computed again (a copy's shared prefix may yet be evicted
            # before it is scheduled: the count at scheduling is exact).
            self._recompute_marks[request.request_id] = reusable
        self._records[request.request_id] = self._records.pop(old.request_id, []) + [
            paused.record(self.clock(), reused)
        ]
        self._enqueue_by_arrival(request)
        self.policy_driver.resumed(paused, request, reused)
        return reused

    def _free_blocks_after_inflight(self, request: Request, freed: list) -> None:
        """Return `request`'s `freed` blocks to the pool as vLLM's `_free_request_blocks`
        does: at once, or (async scheduling with a connector) once the last step that
        wrote them has been processed."""
        if not freed:
            return
        if self._request_blocks_can_be_freed(request):
            self.kv_cache_manager.block_pool.free_blocks(reversed(freed))
        else:
            self.deferred_frees.append((self.sched_step_seq, freed))

    def _enqueue_by_arrival(self, request: Request) -> None:
        """FCFS by first arrival: a resumed agent keeps its place in line."""
        self._enqueue_waiting_request(request)
        queue = self.kv_holding_waiting if self._holds_kv_blocks(request) else self.waiting
        if isinstance(queue, FCFSRequestQueue):  # a priority queue orders by arrival itself
            queue.remove(request)
            arrivals = [r.arrival_time for r in queue]
            queue.insert(bisect_right(arrivals, request.arrival_time), request)

    # ---- every iteration ---------------------------------------------------

    def schedule(self, *args, **kwargs):
        """Override of `Scheduler.schedule` (every engine step).

        The policy first revisits every intercepted request (keep, swap out,
        discard, swap back in), then vLLM schedules as usual.
        """
        if self.intercepts:
            self._expire_paused(self.clock())
        if self.intercepts:
            self.policy_driver.step()
        threshold = self._recompute_threshold()
        if threshold is None:
            return super().schedule(*args, **kwargs)
        config = self.scheduler_config
        saved = config.long_prefill_token_threshold
        config.long_prefill_token_threshold = min(saved, threshold) if saved else threshold
        try:
            return super().schedule(*args, **kwargs)
        finally:
            config.long_prefill_token_threshold = saved

    def _expire_paused(self, now_s: float) -> None:
        """Release paused requests never resumed within `intercept_timeout_s`.

        A backstop for front-ends that lose track of a pause (a client gone, a
        tool that never answers): the memory comes back while the engine runs.
        A later resume naming an expired request recomputes it from its prompt.
        """
        timeout_s = self.intercept_config.intercept_timeout_s
        expired = [p for p in self.intercepts.values()
                   if now_s - p.paused_at_s > timeout_s and p.key not in self._claimed]
        if expired:
            logger.info("releasing %d paused request(s) not resumed within %.1f s", len(expired), timeout_s)
            self.policy_driver.stats.expired += len(expired)
            self.finish_requests([p.request_id for p in expired], RequestStatus.FINISHED_ABORTED)
            for paused in expired:
                if paused.key in self._ended:
                    self._ended[paused.key]["state"] = "expired"

    def _recompute_threshold(self) -> int | None:
        """Chunked recompute (min-waste): the step's prefill threshold, or None.

        Recomputation rides along with decoding: a request that recomputes KV it
        had before (a discarded resume, a preemption) is fed in chunks that fill
        the step up to the profiled saturation point with the decodes. vLLM 0.32
        has one threshold per step, for every prefill; it is raised to the
        longest prefill that recomputes nothing, so new prompts are never cut.
        """
        if self.policy_driver.config.policy != "min-waste" or not self._recompute_marks:
            return None
        marks, recomputing, decodes, others = self._recompute_marks, False, 0, 0
        for queue, running in ((self.running, True), (self.waiting, False),
                               (self.kv_holding_waiting, False)):
            for request in queue:
                if marks.get(request.request_id, 0) > request.num_computed_tokens:
                    recomputing = True
                    continue
                remaining = (request.num_tokens_with_spec + request.num_output_placeholders
                             - request.num_computed_tokens)
                if running and remaining <= 1 + len(request.spec_token_ids):
                    decodes += 1
                else:
                    others = max(others, remaining)
        if not recomputing:
            return None
        return max(recompute_chunk_tokens(self.policy_driver.cost, decodes), others)

    def _update_from_kv_xfer_finished(self, kv_connector_output) -> None:
        """Override of `Scheduler._update_from_kv_xfer_finished` (after every step).

        Saves of paused requests that every worker finished free the device
        blocks they read; vLLM handles the other ids (requests it holds for a
        save that was still running when they were aborted).
        """
        finished = kv_connector_output.finished_sending
        if finished:
            ours = self.policy_driver.saves_finished(finished)
            if ours:
                kv_connector_output.finished_sending = set(finished) - ours
        super()._update_from_kv_xfer_finished(kv_connector_output)

    def _update_after_schedule(self, scheduler_output) -> None:
        """Override of `Scheduler._update_after_schedule` (end of every `schedule()`).

        Counts forwarded tokens, and those that recompute KV computed before.
        """
        stats = self.policy_driver.stats
        stats.forwarded_tokens += scheduler_output.total_num_scheduled_tokens
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            mark = self._recompute_marks.get(request_id)
            if mark is None:
                continue
            start = self.requests[request_id].num_computed_tokens
            stats.recomputed_tokens += max(0, min(mark, start + num_tokens) - start)
            if start + num_tokens >= mark:
                del self._recompute_marks[request_id]
        super()._update_after_schedule(scheduler_output)

    def _preempt_request(self, request: Request, timestamp: float, *args, **kwargs) -> None:
        """Override of `Scheduler._preempt_request` (vLLM frees a running request to make room)."""
        mark = max(request.num_computed_tokens, self._recompute_marks.get(request.request_id, 0))
        self._recompute_marks[request.request_id] = mark
        self.policy_driver.stats.preemptions += 1
        super()._preempt_request(request, timestamp, *args, **kwargs)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        """Override of `Scheduler._free_request` (a request finished).

        The session's interception records ride on the final output, in
        `kv_transfer_params["infercept"]`, to the front-end.
        """
        kv_params, ec_params = super()._free_request(request, delay_free_blocks)
        records = self._records.pop(request.request_id, None)
        if records:
            kv_params = {**(kv_params or {}), "infercept": {"interceptions": records}}
        return kv_params, ec_params

    # ---- queries from the front-end (EngineCore.infercept utility) ---------

    def infercept_states(self, request_ids: list[str] | None = None) -> dict[str, dict]:
        now = self.clock()
        ids = self.intercepts if request_ids is None else request_ids
        return {
            request_id: self.intercepts[request_id].describe(now)
            for request_id in ids
            if request_id in self.intercepts
        }

    def infercept_stats(self) -> dict:
        return self.policy_driver.snapshot()

    def infercept_set_cost_model(self, data: dict) -> None:
        from infercept.policy import CostModel

        self.policy_driver.set_cost_model(CostModel.from_dict(data))

    def infercept_state(self, key: str) -> dict | None:
        """An intercept's state by its key: paused (where its KV is, or
        `resuming` while claimed), its last state if it ended, None if unknown."""
        request_id = self._keys.get(key)
        if request_id is None:
            ended = self._ended.get(key)
            return None if ended is None else {**ended, "age_s": self.clock() - ended["paused_at_s"]}
        paused = self.intercepts[request_id]
        state = paused.describe(self.clock())
        if key in self._claimed:
            state["state"] = "resuming"
        return {**state, "generated_tokens": paused.generated_tokens}

    def infercept_admission(self, key: str, resumed_as: str = "resumed") -> dict | None:
        """How the request of `key` was admitted (None: not by this engine), and
        whether it is paused now; the intercept it resumed ends `resumed_as`
        (`cancelled` when the request failed or its client went away).

        A paused one also reports its whole token sequence, which a resume
        sends back with the tool's result appended.
        """
        admission = self._admissions.pop(key, None)
        ended = self._ended.get((admission or {}).get("resumed_from"))
        if ended is not None and ended["state"] == "resuming":
            ended["state"] = resumed_as
        request_id = self._keys.get(key)
        if admission is None and request_id is None:
            return None
        admission = {**(admission or {"resumed_from": None, "reused_tokens": 0}),
                     "engine": self.engine_rank}
        if request_id is not None:
            paused = self.intercepts[request_id]
            admission = {**admission, **paused.describe(self.clock()),
                         "token_ids": list(paused.request.all_token_ids)}
        return admission

    def infercept_claim(self, key: str) -> dict | None:
        """Take a paused intercept for an explicit resume (or a cancel): its
        session and tokens; None if unknown here, `{"state": ...}` alone if it
        is not paused (resuming, or ended). Claims are atomic: the engine core
        serves every API server process's calls one at a time."""
        request_id = self._keys.get(key)
        if request_id is None or key in self._claimed:
            state = self.infercept_state(key)
            return None if state is None else {"state": state["state"]}
        self._claimed.add(key)
        paused = self.intercepts[request_id]
        return {"state": "paused", "session": paused.spec.session or {},
                "token_ids": list(paused.request.all_token_ids),
                "generated_tokens": paused.generated_tokens}

    def infercept_release(self, key: str) -> None:
        """A claimed resume that never reached the engine: resumable again."""
        self._claimed.discard(key)

    def infercept_bind_calls(self, key: str, call_ids: list[str]) -> None:
        """The ids of the tool calls a paused chat turn made: a follow-up that
        carries them (its tool results answer them) continues this turn."""
        request_id = self._keys.get(key)
        if request_id is None:
            return
        session = self.intercepts[request_id].spec.session
        if session is not None:
            session["call_ids"] = list(call_ids)
        for call_id in call_ids:
            self._by_call_id[call_id] = key

    def infercept_locate(self, call_ids: list[str] | None = None,
                         prompt_token_ids: list[int] | None = None) -> str | None:
        """The key of the paused request a new request would resume here: named by
        one of its tool calls' ids, or continued by its prompt tokens."""
        for call_id in call_ids or ():
            key = self._by_call_id.get(call_id)
            if key is not None and key not in self._claimed:
                return key
        if prompt_token_ids:
            paused = self._continued(prompt_token_ids)
            return paused.key if paused else None
        return None

    def infercept_expire(self) -> None:
        """Release what has timed out (also called while the engine is idle and
        does not step)."""
        if self.intercepts:
            self._expire_paused(self.clock())

    def infercept_cancel(self, key: str, ended_as: str | None = "cancelled") -> bool:
        """Free a paused request by its key; False if none is paused under it.
        `ended_as` None: forget it (a turn that ended without a tool call)."""
        request_id = self._keys.get(key)
        if request_id is None:
            # Taken by a resume whose segment then failed: the intercept ends so.
            if ended_as is not None and key in self._ended:
                self._ended[key]["state"] = ended_as
            return False
        self.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
        if ended_as is None:
            self._ended.pop(key, None)
        elif key in self._ended:  # a keyed intercept (the front-end's)
            self._ended[key]["state"] = ended_as
        return True

    def has_requests(self) -> bool:
        """Override: keep stepping while swap copies are queued for the workers."""
        return super().has_requests() or self.policy_driver.has_pending_work()

    def has_finished_requests(self) -> bool:
        """Override of `Scheduler.has_finished_requests`.

        With a connector, vLLM counts requests held outside its queues as
        finished ones awaiting cleanup; paused requests are held there too,
        and must not keep an idle engine stepping.
        """
        if self.finished_req_ids:
            return True
        if self.connector is None:
            return False
        num_running, num_waiting = self.get_request_counts()
        return len(self.requests) - len(self.intercepts) > num_running + num_waiting

    # ---- abort -------------------------------------------------------------

    def finish_requests(self, request_ids, finished_status):
        """Override of `Scheduler.finish_requests` (abort from the front-end).

        Paused requests are in no vLLM queue: they are released here, with
        whatever device or CPU blocks they hold.
        """
        if request_ids is None:
            request_ids = [*self.intercepts, *self.requests]
        elif isinstance(request_ids, str):
            request_ids = [request_ids]
        request_ids = list(dict.fromkeys(request_ids))
        released = []
        for request_id in request_ids:
            self._specs.pop(request_id, None)
            self._recompute_marks.pop(request_id, None)
            self._records.pop(request_id, None)
            paused = (self._take_paused(request_id, "cancelled")
                      if request_id in self.intercepts else None)
            if paused is not None:
                paused.request.status = finished_status
                self._free_request(paused.request)
                released.append(paused.request)
        others = [r for r in request_ids if r not in {p.request_id for p in released}]
        return released + (super().finish_requests(others, finished_status) if others else [])


# Ended intercepts whose last state (resumed, cancelled, expired) is kept.
MAX_ENDED_INTERCEPTS = 10_000


class InterceptScheduler(InterceptSchedulerMixin, Scheduler):
    """The class `--scheduler-cls` names.

    vLLM uses a custom scheduler class as given, whatever its async-scheduling
    setting; constructing this class yields the async variant when the engine
    runs with async scheduling, so the overlap is not lost.
    """

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is InterceptScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = AsyncInterceptScheduler
        return super().__new__(cls)


class AsyncInterceptScheduler(InterceptScheduler, AsyncScheduler):
    pass

