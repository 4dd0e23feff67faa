"""Runs the pure policy inside vLLM's scheduler and carries out its plan.

Every iteration: describe each paused request and the running batch to the
policy (`infercept.policy`, which knows nothing of vLLM), then apply its
decisions to vLLM's block manager and the swap connector. Also keeps the
counters that metrics and benchmarks read.

A swap-out is asynchronous: the request counts as swapped at once, but its
device blocks return to vLLM only when the workers report the save done
(`saves_finished`); until then it is in transit, and the policy leaves it alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from infercept.adapter import blocks
from infercept.adapter.cost import initial_cost_model
from infercept.policy import Action, BatchState, DurationEstimator, Intercepted, Location, make_policy

if TYPE_CHECKING:
    from infercept.adapter.interception import Interception
    from infercept.adapter.swap_planner import SwapPlanner
    from infercept.config import InterceptConfig


@dataclass
class InterceptStats:
    """Cumulative counters since the engine started."""

    interceptions: int = 0
    resumes: int = 0
    decisions: Counter = field(default_factory=Counter)  # action name -> count
    tokens_reused: int = 0
    forwarded_tokens: int = 0
    recomputed_tokens: int = 0
    preemptions: int = 0
    expired: int = 0  # paused requests released after the intercept timeout


class PolicyDriver:
    # The mutation check of the asynchronous-copy emulation: True frees a swapped
    # request's device blocks when its save is queued (the ordering that races the
    # forward pass on a GPU), which the emulation must catch.
    free_blocks_at_queue = False

    def __init__(self, scheduler, config: "InterceptConfig", swap: "SwapPlanner | None"):
        self.scheduler = scheduler
        self.config = config
        self.swap = swap
        self.policy = None if config.policy == "vllm" else make_policy(config.policy)
        self.estimator = DurationEstimator()
        self.cost = initial_cost_model(scheduler.vllm_config, scheduler.kv_cache_config, swap)
        self.stats = InterceptStats()

    def set_policy(self, name: str) -> None:
        """Switch policy between workloads (no request may be paused)."""
        if name == self.config.policy:
            return
        if self.scheduler.intercepts:
            raise RuntimeError("cannot switch policy while requests are intercepted")
        self.config = replace(self.config, policy=name)
        self.policy = None if name == "vllm" else make_policy(name)

    @property
    def pauses(self) -> bool:
        """False under the stock `vllm` policy: an interception ends the request."""
        return self.policy is not None

    @property
    def block_size(self) -> int:
        return self.scheduler.block_size

    # ---- every iteration ---------------------------------------------------

    def step(self) -> None:
        now = self.scheduler.clock()
        intercepts = self.scheduler.intercepts
        views = [self._view(p, now) for p in intercepts.values() if not p.saving]
        if not views:
            return
        plan = self.policy.plan(views, self._batch_state(), self.cost)
        for decision in plan.decisions:
            paused = intercepts[decision.request_id]
            self._apply(paused, decision.action)
            self._record(paused, decision, now)

    def _view(self, paused: "Interception", now: float) -> Intercepted:
        tool, hint = paused.spec.tool, paused.spec.expected_duration_s
        elapsed_s = now - paused.paused_at_s
        if paused.location is Location.DEVICE:
            paused.shared_tokens = self._shared_tokens(paused)
        return Intercepted(
            request_id=paused.request_id,
            context_tokens=paused.num_kv_tokens,
            shared_tokens=paused.shared_tokens,
            location=paused.location,
            elapsed_s=elapsed_s,
            remaining_s=self.estimator.remaining_s(tool, elapsed_s, hint),
            arrival_s=paused.request.arrival_time,
            ttl_s=self.estimator.ttl_s(tool),
        )

    def _shared_tokens(self, paused: "Interception") -> int:
        """KV tokens of its first blocks that other requests hold too (whole blocks)."""
        shared = blocks.num_shared_blocks(self.scheduler.kv_cache_manager, paused.request_id)
        return min(shared, paused.num_kv_tokens // self.block_size) * self.block_size

    def _batch_state(self) -> BatchState:
        s, block_size = self.scheduler, self.block_size
        running_tokens = sum(r.num_computed_tokens for r in s.running)
        # This step's demand, in the blocks vLLM will allocate: running requests in
        # order (a decode token each, a chunked prefill its next chunk), then waiting
        # prefills up to the step's token budget. vLLM admits a waiting request only if
        # its whole prompt fits (`scheduler_reserve_full_isl`, on by default), less
        # what the prefix cache holds of it.
        budget = s.max_num_scheduled_tokens
        full = s.scheduler_reserve_full_isl
        batch_tokens = needed_blocks = 0
        for queue in (s.running, s.kv_holding_waiting, s.waiting):
            running = queue is s.running
            for request in queue:
                if batch_tokens >= budget:
                    break
                computed = request.num_computed_tokens
                if not running and computed == 0:
                    computed = s.kv_cache_manager.get_computed_blocks(request)[1]
                remaining = request.num_tokens - computed
                if running:
                    remaining = max(1, remaining + request.num_output_placeholders)
                tokens = min(remaining, budget - batch_tokens)
                batch_tokens += tokens
                end = computed + (remaining if full and not running else tokens)
                needed_blocks += -(-end // block_size) - -(-computed // block_size)
        needed_tokens = needed_blocks * block_size
        free_tokens = s.kv_cache_manager.block_pool.get_num_free_blocks() * block_size
        # Blocks a save still reads are not free, but come free within a step or two:
        # the demand they will meet is not pressure to evict more.
        arriving_tokens = sum(-(-p.own_kv_tokens // block_size) * block_size
                              for p in s.intercepts.values() if p.saving)
        return BatchState(
            running_context_tokens=running_tokens,
            batch_tokens=batch_tokens,
            # What a prefetch may take: memory this step's batch does not want.
            free_device_tokens=max(0, free_tokens - needed_tokens),
            free_cpu_tokens=self.swap.num_free_cpu_tokens if self.swap else 0,
            device_tokens_needed=max(0, needed_tokens - free_tokens - arriving_tokens),
        )

    def _apply(self, paused: "Interception", action: Action) -> None:
        s, request = self.scheduler, paused.request
        if action is Action.SWAP_OUT:
            # Blocks other requests hold stay resident: only its own are copied.
            shared_blocks = paused.shared_tokens // self.block_size
            ids = blocks.block_ids(s.kv_cache_manager, request.request_id)
            if self.swap is None or not self.swap.swap_out(request.request_id, ids,
                                                           paused.num_kv_tokens, shared_blocks):
                action = Action.DISCARD
            else:
                paused.location = Location.CPU
                paused.saving = True
                if self.free_blocks_at_queue:
                    self._free_device(paused)
                return
        if action is Action.DISCARD:
            if paused.location is Location.DEVICE:
                self._free_device(paused)
            elif paused.location is Location.CPU:
                self.swap.release(request.request_id)
            request.num_computed_tokens = 0
            paused.location = Location.NONE
            paused.shared_tokens = 0
        elif action is Action.SWAP_IN:
            self._prefetch(paused)

    def discard(self, paused: "Interception") -> None:
        """Let a paused request's KV go wherever it is (it will be recomputed)."""
        self._apply(paused, Action.DISCARD)

    def _free_device(self, paused: "Interception") -> None:
        # vLLM's own free, which waits for in-flight steps where it must.
        self.scheduler._free_request_blocks(paused.request)
        paused.request.num_computed_tokens = 0
        paused.saving = False

    def saves_finished(self, request_ids) -> set[str]:
        """Every worker finished these saves: free the device blocks they read.

        Returns the ids that were paused requests' saves; the others (a request
        aborted mid-save, which vLLM holds until now) are vLLM's to free.
        """
        s, handled = self.scheduler, set()
        for request_id in request_ids:
            if self.swap is None or not self.swap.save_done(request_id):
                continue
            paused = s.intercepts.get(request_id)
            if paused is not None and paused.saving:
                self._free_device(paused)
            if paused is not None or request_id not in s.requests:
                handled.add(request_id)  # paused, or resumed since (its blocks moved on)
        return handled

    def _prefetch(self, paused: "Interception") -> None:
        """Bring a swapped request's KV back before its tool returns.

        What the prefix cache still holds (the shared blocks its copy left out, its
        own blocks not yet reused) is taken from there; the copy fills the rest.
        Without the shared blocks there is nothing to prefetch onto: it stays
        swapped, and its resume recomputes from where the cache stops.
        """
        s, request = self.scheduler, paused.request
        kv = s.kv_cache_manager
        num_tokens = self.swap.num_swapped_tokens(request.request_id)
        cached, hit_tokens, _ = kv.get_computed_blocks(request)
        if hit_tokens < self.swap.num_uncopied_tokens(request.request_id):
            return
        allocated = kv.allocate_slots(
            request, max(0, num_tokens - hit_tokens), num_new_computed_tokens=hit_tokens,
            new_computed_blocks=cached, delay_cache_blocks=True,
            has_scheduled_reqs=bool(s.running),
        )
        if allocated is None:
            return
        request.num_computed_tokens = self.swap.prefetch(
            request.request_id, blocks.block_ids(kv, request.request_id), hit_tokens)
        paused.location = Location.DEVICE

    def _record(self, paused: "Interception", decision, now: float) -> None:
        last = paused.history[-1]["location"] if paused.history else None
        if last == paused.location.value:
            return
        self.stats.decisions[decision.action.value] += 1
        paused.history.append(
            {
                "at_s": round(now - paused.paused_at_s, 6),
                "action": decision.action.value,
                "location": paused.location.value,
                "waste_preserve": decision.waste_preserve,
                "waste_discard": decision.waste_discard,
                "waste_swap": decision.waste_swap,
                "reason": decision.reason,
            }
        )

    # ---- pause and resume --------------------------------------------------

    def paused(self, paused: "Interception") -> None:
        self.stats.interceptions += 1
        paused.predicted_duration_s = self.estimator.expected_total_s(
            paused.spec.tool, paused.spec.expected_duration_s
        )

    def snapshot(self) -> dict:
        """Counters and gauges for metrics, as plain data."""
        by_state = {location.value: 0 for location in Location}
        for paused in self.scheduler.intercepts.values():
            by_state[paused.location.value] += 1
        stats = self.stats
        return {
            "policy": self.config.policy,
            "interceptions": stats.interceptions,
            "resumes": stats.resumes,
            "decisions": dict(stats.decisions),
            "intercepted_by_state": by_state,
            "idle_device_tokens": self.idle_device_tokens(),
            "tokens_reused": stats.tokens_reused,
            "forwarded_tokens": stats.forwarded_tokens,
            "recomputed_tokens": stats.recomputed_tokens,
            "preemptions": stats.preemptions,
            "expired": stats.expired,
            "bytes_swapped_out": self.swap.bytes_swapped_out if self.swap else 0,
            "bytes_swapped_in": self.swap.bytes_swapped_in if self.swap else 0,
            "free_cpu_blocks": self.swap.allocator.num_free_blocks if self.swap else 0,
            "cost_model": self.cost.to_dict(),
        }

    def set_cost_model(self, cost) -> None:
        self.cost = cost

    def observe_resume(self, paused: "Interception") -> None:
        duration_s = self.scheduler.clock() - paused.paused_at_s
        self.estimator.observe(paused.spec.tool, duration_s)

    def resumed(self, paused: "Interception", request, reused_tokens: int) -> None:
        self.stats.resumes += 1
        self.stats.tokens_reused += reused_tokens

    def idle_device_tokens(self) -> int:
        """KV tokens held on the device by paused requests alone (memory left idle)."""
        return sum(p.own_kv_tokens for p in self.scheduler.intercepts.values()
                   if p.location is Location.DEVICE or p.saving)

    def has_pending_work(self) -> bool:
        return self.swap is not None and self.swap.has_pending_work()
