"""An iteration-level model of one vLLM 0.32 (V1) engine replica running InferCept.

Each ``Engine.step`` is one engine iteration starting at ``clock_s``:

1. If requests are intercepted, the policy driver plans for them and carries the plan out
   (preserve, swap out, discard, prefetch), as the adapter does in ``schedule()``.
2. vLLM V1's scheduler: running requests first, in admission order, one decode token each
   and a running chunked prefill whatever the token budget leaves; a request crossing a
   block boundary gets a new block, and when none is free the latest-admitted running
   request is preempted (blocks freed, recomputed later). Then, unless someone was
   preempted, waiting requests, KV holders first, in FCFS order, with their prefix-cache
   hits and their swapped KV loaded back, while the token budget
   (``max_num_batched_tokens``), ``max_num_seqs`` and free blocks last.
3. The iteration lasts ``cost.forward_s(tokens)`` plus the part of this iteration's swap
   traffic that the forward pass does not hide. Every request whose context is computed
   samples a token; a segment's last token pauses it on its tool call (InferCept: it
   stays, intercepted; stock vLLM: it ends, and the tool's answer comes back as a new
   request) or ends it.

What keeps an iteration O(1) in the number of decoding requests: every running request
but the last-admitted one decodes (a prefill chunk that does not finish its context took
the rest of the token budget, so nobody was admitted after it). Decoders are kept lazily
(``SimRequest``); a count per block phase says how many need a new block now.
"""

from __future__ import annotations

import dataclasses
import heapq
from bisect import bisect_right
from collections import Counter

from infercept.bench.metrics import EngineCounters
from infercept.policy import BatchState, Location
from infercept.sim.blocks import CpuPool, DevicePool
from infercept.sim.offload import CpuTier
from infercept.sim.driver import PolicyDriver
from infercept.sim.profiles import HardwareProfile
from infercept.sim.state import Session, SimRequest

STOCK = "vllm"  # stock vLLM: an interception ends the request
OFFLOAD = "vllm-offload"  # stock vLLM with its native CPU KV offloading (infercept.sim.offload)
UNBOUNDED = "unbounded"  # preserve everything in a KV cache that never fills
ENGINE_POLICIES = (STOCK, OFFLOAD, "discard", "preserve", "swap", "min-waste", "min-waste-paper",
                   "ttl", UNBOUNDED)

PAUSE, FINISH = "pause", "finish"
Event = tuple[str, Session, float]  # (kind, session, time_s)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Engine:
    """One replica. ``submit`` hands it work, ``step`` runs one iteration and returns the
    segments that ended in it; the cluster owns the clock between iterations."""

    def __init__(self, profile: HardwareProfile, policy: str, *, prefix_caching: bool = True,
                 plan_every_iteration: bool = False, check_invariants: bool = False,
                 device_capacity_tokens: int | None = None) -> None:
        if policy not in ENGINE_POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {ENGINE_POLICIES}")
        cost = profile.cost
        if device_capacity_tokens is not None:
            cost = dataclasses.replace(cost, device_capacity_tokens=device_capacity_tokens)
        self.cost = cost
        self.policy = policy
        self.pauses = policy not in (STOCK, OFFLOAD)
        self.driver = None if not self.pauses else PolicyDriver(
            "preserve" if policy == UNBOUNDED else policy, plan_every_iteration)
        self.block_size = bs = cost.block_size_tokens
        self.pool = DevicePool(cost.device_capacity_tokens // bs, prefix_caching)
        self.cpu = CpuPool(cost.cpu_capacity_tokens // bs)
        # vllm-offload: the CPU tier (the same host memory InferCept's swap space gets), the
        # requests waiting for a load from it, and the runs their loads pin.
        self.tier = CpuTier(cost.cpu_capacity_tokens // bs) if policy == OFFLOAD else None
        self.loading: list[SimRequest] = []
        self._started_loads: list[tuple[SimRequest, float]] = []
        self._pinned_runs: Counter[str] = Counter()
        self.max_num_seqs = profile.max_num_seqs
        self.max_num_batched_tokens = profile.max_num_batched_tokens
        self.attention_s_per_kv_token = profile.attention_s_per_kv_token
        self.max_forward_s = cost.forward_s(self.max_num_batched_tokens)
        self.check_invariants = check_invariants

        self.clock_s = 0.0
        self.num_iterations = 0
        self.blocked = False  # the last step could run nothing: wait for new work
        self.running: dict[SimRequest, None] = {}  # admission order
        self.prefilling: SimRequest | None = None  # the running chunked prefill (last)
        self.running_computed_tokens = 0
        self.kv_holding: list[SimRequest] = []  # resumed requests that kept their KV
        self.waiting: list[SimRequest] = []
        self.intercepts: dict[str, SimRequest] = {}
        self._by_location = {location: {} for location in Location}
        self._swapped_by_tool: dict[str, dict[str, SimRequest]] = {}
        self._phase_counts = [0] * bs  # decoders by dec_base % block size
        self._finish_heap: list[tuple[int, int, SimRequest]] = []
        self._next_seq = 0
        self._plan_pending = False
        self._swap_tokens = 0  # moved between device and CPU in this iteration
        self._cpu_blocks_to_free = 0  # CPU copies released once this iteration's loads end
        # Shared prefixes that requests swapped out in this plan still hold: the adapter
        # frees a swapped request's blocks when its save is done, after the plan.
        self._prefixes_to_release: list[str] = []

        self.forward_s = 0.0
        self.recompute_forward_s = 0.0
        self.stall_s = 0.0
        self.forwarded_tokens = 0
        self.recomputed_tokens = 0
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0
        self.num_preemptions = 0
        self.idle_tokens = 0  # KV tokens of intercepted requests held on the device
        self.idle_events: list[tuple[float, int]] = []

    # ---- the cluster's view ------------------------------------------------

    @property
    def runnable(self) -> bool:
        """Whether ``step`` has something to do at ``clock_s``."""
        return not self.blocked and bool(self.running or self.kv_holding or self.waiting
                                         or self._plan_pending or self.loading)

    @property
    def num_active(self) -> int:
        """Requests running or queued (a router's load)."""
        return len(self.running) + len(self.kv_holding) + len(self.waiting) + len(self.loading)

    def holds(self, request_id: str) -> bool:
        return request_id in self.intercepts

    def submit(self, session: Session, now: float) -> None:
        """A session's next segment arrives: resume it if it is intercepted here, else
        queue it as a new request (stock vLLM's follow-up, or a first arrival)."""
        self.clock_s = max(self.clock_s, now)
        self.blocked = False
        request = self.intercepts.pop(session.request_id, None)
        if request is not None:
            self._resume(request, now)
        else:
            self.waiting.append(SimRequest(session, arrival_s=now))

    def release(self, request_id: str) -> None:
        """Free what an intercepted request holds here (it resumed on another replica)."""
        request = self.intercepts.pop(request_id)
        self._unregister(request)
        if request.location is Location.DEVICE:
            self._set_idle(-request.kv_tokens, self.clock_s)
            self._free_device(request)
        elif request.location is Location.CPU:
            self.cpu.free(request.cpu_blocks)
            request.cpu_blocks = 0
            request.uncopied_tokens = 0
        self.blocked = False

    # ---- one iteration -----------------------------------------------------

    def step(self) -> list[Event]:
        now = self.clock_s
        self._swap_tokens = 0
        if self.loading:
            self._land_loads(now)
        if self.driver is not None and self.intercepts:
            self.driver.step(self, now)
            self._release_saved_prefixes()
        self._plan_pending = False
        work, num_decoding = self._schedule()
        num_tokens = num_decoding + sum(chunk for _, chunk in work)
        if num_tokens == 0 and self._swap_tokens == 0:
            self._time_loads(now)
            if self.loading:  # nothing to run until a load lands
                self.clock_s = max(now, min(r.ready_s for r in self.loading))
                return []
            self.blocked = True
            return []
        self.running_computed_tokens += num_tokens
        forward_s = self.cost.forward_s(num_tokens) if num_tokens else 0.0
        if self.attention_s_per_kv_token:
            forward_s += self.attention_s_per_kv_token * self.running_computed_tokens
        stall_s = max(0.0, self.cost.swap_s(self._swap_tokens) - forward_s)
        end_s = now + forward_s + stall_s
        iteration = self.num_iterations
        self.num_iterations += 1
        events: list[Event] = []
        if self.tier is not None:
            self._time_loads(end_s)
            self._write_to_tier(work)
        self._finish_decodes(iteration, end_s, events)
        recomputed = self._finish_prefills(work, iteration, end_s, events)
        self.forward_s += forward_s
        self.stall_s += stall_s
        self.forwarded_tokens += num_tokens
        self.recomputed_tokens += recomputed
        if recomputed:
            self.recompute_forward_s += forward_s * recomputed / num_tokens
        if self._cpu_blocks_to_free:
            self.cpu.free(self._cpu_blocks_to_free)
            self._cpu_blocks_to_free = 0
        self.clock_s = end_s
        if self.check_invariants:
            self.check()
        return events

    def _schedule(self) -> tuple[list[tuple[SimRequest, int]], int]:
        """Running requests, then waiting ones; returns the prefill work (request, tokens)
        and the number of decoding requests scheduled."""
        budget = self.max_num_batched_tokens
        preempted = False
        num_decoding = len(self.running) - (self.prefilling is not None)
        if num_decoding:
            need = self._phase_counts[-self.num_iterations % self.block_size]
            if not self.pool.allocate(need):
                preempted = self._allocate_decode_blocks_in_order()
                num_decoding = len(self.running) - (self.prefilling is not None)
        budget -= num_decoding
        work: list[tuple[SimRequest, int]] = []
        tail = self.prefilling
        if tail is not None and budget > 0:
            chunk = min(tail.num_tokens - tail.num_computed, budget)
            if self._grow(tail, chunk):
                work.append((tail, chunk))
                budget -= chunk
            else:
                self._preempt(tail)  # the last running request: vLLM preempts it
                preempted = True
        if not preempted:
            self._admit(budget, work)
        return work, num_decoding

    def _allocate_decode_blocks_in_order(self) -> bool:
        """Too few free blocks for every decoder: go in admission order, preempting the
        latest-admitted running request until each one's block fits (vLLM's loop)."""
        k, bs = self.num_iterations, self.block_size
        for request in list(self.running):
            if request is self.prefilling:
                break
            if request not in self.running or (request.dec_base + k) % bs:
                continue
            while not self.pool.allocate(1):
                victim = next(reversed(self.running))
                self._preempt(victim)
                if victim is request:
                    break
        return True

    def _admit(self, budget: int, work: list[tuple[SimRequest, int]]) -> None:
        bs, pool = self.block_size, self.pool
        while budget > 0:
            queue = self.kv_holding or self.waiting
            if not queue or len(self.running) >= self.max_num_seqs:
                return
            request = queue[0]
            if request.num_blocks == 0:
                shared_blocks, hit_blocks, from_free = self._cache_hit(
                    request, (request.num_tokens - 1) // bs)
                # vLLM 0.32 admits a request only if its whole prompt fits
                # (scheduler_reserve_full_isl), less its prefix-cache hit.
                if from_free + _ceil_div(request.num_tokens, bs) - hit_blocks \
                        > pool.num_free_blocks:
                    return
                # A CPU copy that left a shared prefix out loads only onto that prefix;
                # without it the request recomputes from its hit and lets the copy go.
                loads = (request.location is Location.CPU
                         and request.uncopied_tokens <= hit_blocks * bs)
                if self.tier is not None:
                    tier_end = self._tier_hit_end(request, hit_blocks,
                                                  (request.num_tokens - 1) // bs)
                    request.offload_from = tier_end if tier_end > hit_blocks else 0
                    if tier_end > hit_blocks:
                        if from_free + tier_end - hit_blocks > pool.num_free_blocks:
                            return
                        queue.pop(0)
                        self._start_load(request, shared_blocks, hit_blocks, tier_end)
                        continue
                computed = max(hit_blocks * bs, request.kv_tokens if loads else 0)
                chunk = min(request.num_tokens - computed, budget)
                new_blocks = _ceil_div(computed + chunk, bs) - hit_blocks
                if from_free + new_blocks > pool.num_free_blocks:
                    return
                self._take_hit(request, shared_blocks, hit_blocks)
                self._allocate(request, new_blocks, computed + chunk)
                if request.location is Location.CPU:
                    self._load_swapped(request, computed - hit_blocks * bs if loads else 0)
                request.num_computed = computed
            else:
                chunk = min(request.num_tokens - request.num_computed, budget)
                if _ceil_div(request.num_tokens, bs) - request.num_blocks > pool.num_free_blocks \
                        or not self._grow(request, chunk):
                    return
            queue.pop(0)
            self.running[request] = None
            request.seq = self._next_seq
            self._next_seq += 1
            self.running_computed_tokens += request.num_computed
            work.append((request, chunk))
            budget -= chunk
            if request.num_computed + chunk < request.num_tokens:
                self.prefilling = request

    def _grow(self, request: SimRequest, chunk: int) -> bool:
        """Blocks for ``chunk`` more tokens of a request that holds its KV."""
        end_tokens = request.num_computed + chunk
        return self._allocate(request, _ceil_div(end_tokens, self.block_size) - request.num_blocks,
                              end_tokens)

    def _allocate(self, request: SimRequest, new_blocks: int, end_tokens: int) -> bool:
        """``new_blocks`` more blocks for a request whose KV will reach ``end_tokens``
        this iteration; the one computing a shared prefix grows the prefix's entry."""
        new_blocks = max(0, new_blocks)
        if new_blocks and not self.pool.allocate(new_blocks):
            return False
        if request.holds_prefix and request.shared_blocks == request.num_blocks \
                and request.shared_blocks == self.pool.prefix_blocks(request.prefix_key):
            prefix_blocks = request.prefix_tokens // self.block_size
            extend = min(new_blocks, prefix_blocks - request.shared_blocks)
            self.pool.extend_prefix(request.prefix_key, extend,
                                    min(end_tokens // self.block_size, prefix_blocks))
            request.shared_blocks += extend
        request.num_blocks += new_blocks
        return True

    def _shares_prefix(self, request: SimRequest) -> bool:
        return request.prefix_key is not None and self.pool.prefix_caching

    def _cache_hit(self, request: SimRequest, max_blocks: int) -> tuple[int, int, int]:
        """A request's prefix-cache hit of at most ``max_blocks``: (blocks of its shared
        prefix, blocks in all, blocks of it that come out of the free queue). Its own
        cached blocks count only if the shared prefix reaches where they start."""
        pool = self.pool
        if not self._shares_prefix(request):
            hit = min(pool.num_cached_blocks(request.key), max_blocks)
            return 0, hit, hit
        key = request.prefix_key
        shared = min(pool.prefix_hit_blocks(key), request.prefix_tokens // self.block_size,
                     max_blocks)
        start = request.session.own_run_start
        hit = shared
        if shared >= start:
            hit = max(shared, min(start + pool.num_cached_blocks(request.key), max_blocks))
        from_free = (0 if pool.prefix_is_held(key) else shared) + hit - shared
        return shared, hit, from_free

    def _take_hit(self, request: SimRequest, shared_blocks: int, hit_blocks: int) -> None:
        """Take the hit ``_cache_hit`` found: hold the shared prefix, reuse own blocks."""
        if self._shares_prefix(request):
            self.pool.acquire_prefix(request.prefix_key, shared_blocks)
            request.holds_prefix = True
            request.shared_blocks = shared_blocks
        self.pool.take_cached(request.key, hit_blocks - shared_blocks)
        request.num_blocks = hit_blocks

    # ---- vllm-offload: vLLM's CPU tier ----------------------------------------

    def _tier_keys(self, request: SimRequest) -> tuple[str | None, str]:
        """(its shared prompt's run, its own run) in the tier."""
        prefix = "\0tier-prefix:" + request.prefix_key if self._shares_prefix(request) else None
        return prefix, request.key

    def _tier_runs(self, request: SimRequest) -> tuple[str, ...]:
        """The tier runs a request reads or writes (its shared prompt's, if any, first)."""
        return tuple(key for key in self._tier_keys(request) if key is not None)

    def _tier_hit_end(self, request: SimRequest, hit_blocks: int, max_blocks: int) -> int:
        """Where the tier's consecutive blocks after the GPU hit end (its shared prompt's
        run covers blocks [0, P), its own run [P, P + n))."""
        prefix_key, own_key = self._tier_keys(request)
        first_own = request.prefix_tokens // self.block_size if prefix_key else 0
        end = hit_blocks
        if end < first_own:
            end = max(end, min(self.tier.blocks_of(prefix_key), first_own))
            if end < first_own:
                return min(end, max_blocks)
        own = self.tier.blocks_of(own_key)
        if end < first_own + own:
            end = first_own + own
        return min(end, max_blocks)

    def _start_load(self, request: SimRequest, shared_blocks: int, hit_blocks: int,
                    end_blocks: int) -> None:
        """vLLM's asynchronous load: the blocks now, the request parked until the copy,
        which starts after this step's forward pass, is done."""
        bs = self.block_size
        self._take_hit(request, shared_blocks, hit_blocks)
        self._allocate(request, end_blocks - hit_blocks, end_blocks * bs)
        request.num_computed = end_blocks * bs
        tokens = (end_blocks - hit_blocks) * bs
        self.tier.loaded(request.key, end_blocks - hit_blocks)
        self.swapped_in_bytes += tokens * self.cost.kv_bytes_per_token
        for key in self._tier_runs(request):
            self._pinned_runs[key] += 1
        self.loading.append(request)
        self._started_loads.append((request, self.cost.swap_s(tokens)))

    def _time_loads(self, forward_end_s: float) -> None:
        for request, load_s in self._started_loads:
            request.ready_s = forward_end_s + load_s
        self._started_loads.clear()

    def _land_loads(self, now: float) -> None:
        """Loads reported done join the requests that hold KV, in arrival order."""
        landed = [r for r in self.loading if r.ready_s <= now]
        for request in landed:
            self.loading.remove(request)
            for key in self._tier_runs(request):
                self._pinned_runs[key] -= 1
                if not self._pinned_runs[key]:
                    del self._pinned_runs[key]
            queue = self.kv_holding
            queue.insert(bisect_right(queue, request.arrival_s, key=_arrival_s), request)

    def _write_to_tier(self, work) -> None:
        """Full prompt blocks this step computes go to the tier (vLLM writes them after
        the forward pass; a request's write is all or nothing)."""
        bs, tier = self.block_size, self.tier
        pinned = tuple(self._pinned_runs)
        for request, chunk in work:
            done = min(request.num_computed + chunk, request.num_tokens) // bs
            prefix_key, own_key = self._tier_keys(request)
            first_own = request.prefix_tokens // bs if prefix_key else 0
            start = request.offload_from
            keys = self._tier_runs(request)
            if prefix_key and start < first_own:
                tier.write(prefix_key, start, min(done, first_own), pinned + keys)
            if done > first_own:
                tier.write(own_key, max(start, first_own) - first_own, done - first_own,
                           pinned + keys)

    def _load_swapped(self, request: SimRequest, num_tokens: int) -> None:
        """The connector loads a resumed request's swapped KV (beyond its prefix hit)."""
        self._swap_tokens += num_tokens
        self.swapped_in_bytes += num_tokens * self.cost.kv_bytes_per_token
        self._cpu_blocks_to_free += request.cpu_blocks
        request.cpu_blocks = 0
        request.uncopied_tokens = 0
        request.location = None

    # ---- after the forward pass --------------------------------------------

    def _finish_decodes(self, iteration: int, end_s: float, events: list[Event]) -> None:
        heap = self._finish_heap
        while heap and heap[0][0] <= iteration:
            _, seq, request = heapq.heappop(heap)
            if request.seq == seq and request.decoding:
                self._leave_running(request)
                events.append(self._end_segment(request, end_s))

    def _finish_prefills(self, work, iteration: int, end_s: float,
                         events: list[Event]) -> int:
        """Advance the prefills; those that computed their context sample a token.
        Returns the tokens that recomputed KV computed before."""
        recomputed = 0
        for request, chunk in work:
            session = request.session
            start = request.num_computed
            high_water = session.kv_high_water_tokens
            if start < high_water:
                recomputed += min(start + chunk, high_water) - start
            request.num_computed = start + chunk
            if request.num_computed > high_water:
                session.kv_high_water_tokens = request.num_computed
            if request.num_computed < request.num_tokens:
                continue
            if request is self.prefilling:
                self.prefilling = None
            request.num_tokens += 1
            request.generated += 1
            if request.generated >= request.target:
                self._leave_running(request)
                events.append(self._end_segment(request, end_s))
            else:
                self._start_decoding(request, iteration + 1)
        return recomputed

    def _start_decoding(self, request: SimRequest, first_iteration: int) -> None:
        request.decoding = True
        request.dec_base = request.num_computed - first_iteration
        request.end_iter = first_iteration + request.target - request.generated - 1
        self._phase_counts[request.dec_base % self.block_size] += 1
        heapq.heappush(self._finish_heap, (request.end_iter, request.seq, request))

    def materialize(self, request: SimRequest) -> None:
        """Write a decoding request's lazily kept counts back (as of ``num_iterations``)."""
        if request.decoding:
            k = self.num_iterations
            request.num_computed = request.dec_base + k
            request.num_tokens = request.num_computed + 1
            request.generated = request.target - (request.end_iter + 1 - k)
            request.num_blocks = _ceil_div(request.num_computed, self.block_size)

    def _leave_running(self, request: SimRequest) -> None:
        if request.decoding:
            self.materialize(request)
            self._phase_counts[request.dec_base % self.block_size] -= 1
            request.decoding = False
        elif request is self.prefilling:
            self.prefilling = None
        del self.running[request]
        self.running_computed_tokens -= request.num_computed
        session = request.session
        session.kv_high_water_tokens = max(session.kv_high_water_tokens, request.num_computed)

    def _preempt(self, request: SimRequest) -> None:
        """vLLM's recompute preemption: free the blocks, back to the front of the queue."""
        self._leave_running(request)
        self._free_device(request)
        self.waiting.insert(0, request)
        self.num_preemptions += 1

    def _end_segment(self, request: SimRequest, end_s: float) -> Event:
        session = request.session
        session.context_tokens = request.num_tokens
        if session.is_last_segment or not self.pauses:
            if self.tier is not None:
                self.tier.touch(self._tier_runs(request))
            self._free_device(request)
            return (FINISH if session.is_last_segment else PAUSE, session, end_s)
        request.kv_tokens = request.num_computed
        request.paused_at_s = end_s
        request.tool = session.tool  # this segment's call
        request.location = Location.DEVICE
        self.intercepts[request.key] = request
        self._register(request, Location.DEVICE)
        self._set_idle(request.kv_tokens, end_s)
        self._plan_pending = True
        self.driver.paused(request)
        return (PAUSE, session, end_s)

    def _resume(self, request: SimRequest, now: float) -> None:
        """The adapter's ``_resume``: the tool's answer extends the context; the request
        keeps its first arrival and re-enters the queue in FCFS place."""
        location = request.location
        self._unregister(request)
        self.driver.observe_resume(self, request, now)
        session = request.session
        request.num_tokens = session.context_tokens
        request.generated = 0
        request.target = session.generate_tokens
        if location is Location.DEVICE:
            self._set_idle(-request.kv_tokens, now)
            request.num_computed = request.kv_tokens
            request.location = None
            queue = self.kv_holding
        else:
            request.num_computed = 0
            request.location = location if location is Location.CPU else None
            queue = self.waiting
        queue.insert(bisect_right(queue, request.arrival_s, key=_arrival_s), request)

    def _free_device(self, request: SimRequest, prefix_after_plan: bool = False) -> None:
        """vLLM frees a request's blocks last first: its own, then the shared prefix's
        (which go only with their last holder); ``prefix_after_plan``: its hold on the
        prefix ends after this iteration's plan."""
        if request.num_blocks:
            shared = request.shared_blocks
            own_full = min(request.num_computed // self.block_size, request.num_blocks) - shared
            self.pool.free(request.key, request.num_blocks - shared, max(0, own_full))
            request.session.own_run_start = shared
        if request.holds_prefix:
            if prefix_after_plan:
                self._prefixes_to_release.append(request.prefix_key)
            else:
                self.pool.release_prefix(request.prefix_key)
            request.holds_prefix = False
            request.shared_blocks = 0
        request.num_blocks = 0
        request.num_computed = 0

    def _set_idle(self, delta_tokens: int, time_s: float) -> None:
        self.idle_tokens += delta_tokens
        events = self.idle_events
        if events and events[-1][0] == time_s:
            events[-1] = (time_s, self.idle_tokens)
        else:
            events.append((time_s, self.idle_tokens))

    # ---- what the policy driver reads and does -----------------------------

    def intercepted_on(self, location: Location):
        return self._by_location[location].values()

    def swapped_of_tool(self, tool: str):
        return self._swapped_by_tool.get(tool, {}).values()

    def swapped_tools(self):
        return [tool for tool, requests in self._swapped_by_tool.items() if requests]

    def is_swapped(self, request: SimRequest) -> bool:
        """Whether ``request`` is intercepted here with its KV on CPU."""
        return self._by_location[Location.CPU].get(request.key) is request

    def batch_state(self) -> BatchState:
        """The adapter's ``_batch_state``: this iteration's demand as vLLM will see it."""
        bs, budget = self.block_size, self.max_num_batched_tokens
        # Decoders a token each (a block for those at a block boundary), the running
        # chunked prefill its next chunk, then waiting prefills: the blocks vLLM allocates.
        num_decoding = len(self.running) - (self.prefilling is not None)
        batch_tokens = min(num_decoding, budget)
        needed_blocks = self._phase_counts[-self.num_iterations % bs]
        queues = (self.kv_holding, self.waiting)
        if self.prefilling is not None:
            queues = ((self.prefilling,), *queues)
        for queue in queues:
            waiting = queue is not queues[0] or self.prefilling is None
            for request in queue:
                if batch_tokens >= budget:
                    break
                computed = request.num_computed
                if waiting and request.num_blocks == 0:
                    computed = self._cache_hit(request, (request.num_tokens - 1) // bs)[1] * bs
                remaining = max(1, request.num_tokens - computed)
                tokens = min(remaining, budget - batch_tokens)
                batch_tokens += tokens
                # vLLM 0.32 admits a waiting request only if its whole prompt fits.
                end = computed + (remaining if waiting else tokens)
                needed_blocks += _ceil_div(end, bs) - _ceil_div(computed, bs)
        needed_tokens = needed_blocks * bs
        free_tokens = self.pool.num_free_blocks * bs
        return BatchState(running_context_tokens=self.running_computed_tokens,
                          batch_tokens=batch_tokens, free_device_tokens=free_tokens,
                          free_cpu_tokens=self.cpu.num_free_blocks * bs,
                          device_tokens_needed=max(0, needed_tokens - free_tokens))

    def device_tokens_needed(self) -> int:
        return self.batch_state().device_tokens_needed

    def _release_saved_prefixes(self) -> None:
        for key in self._prefixes_to_release:
            self.pool.release_prefix(key)
        self._prefixes_to_release.clear()

    def own_kv_tokens(self, request: SimRequest) -> int:
        """An intercepted request's KV tokens that no other request holds: what the
        policy counts (``Intercepted.own_tokens``)."""
        if request.location is Location.CPU:
            return request.copied_tokens
        return request.kv_tokens - self._shared_tokens(request)

    def _shared_tokens(self, request: SimRequest) -> int:
        """Tokens of its first blocks that other requests hold too."""
        if request.holds_prefix and self.pool.prefix_holders(request.prefix_key) > 1:
            return min(request.shared_blocks * self.block_size, request.kv_tokens)
        return 0

    def swap_out(self, request: SimRequest) -> bool:
        """Copy a preserved request's KV to CPU and free its blocks; False without room.
        Blocks shared with other requests stay resident and are not copied."""
        uncopied = self._shared_tokens(request)
        cpu_blocks = _ceil_div(request.kv_tokens, self.block_size) - uncopied // self.block_size
        if not self.cpu.allocate(cpu_blocks):
            return False
        self._set_idle(-request.kv_tokens, self.clock_s)
        self._free_device(request, prefix_after_plan=True)
        request.cpu_blocks = cpu_blocks
        request.uncopied_tokens = uncopied
        self._move(request, Location.CPU)
        copied = request.copied_tokens
        self._swap_tokens += copied
        self.swapped_out_bytes += copied * self.cost.kv_bytes_per_token
        return True

    def discard(self, request: SimRequest) -> None:
        if request.location is Location.DEVICE:
            self._set_idle(-request.kv_tokens, self.clock_s)
            self._free_device(request)
        elif request.location is Location.CPU:
            self.cpu.free(request.cpu_blocks)
            request.cpu_blocks = 0
            request.uncopied_tokens = 0
        self._move(request, Location.NONE)

    def prefetch(self, request: SimRequest) -> None:
        """Swap a request's KV back in ahead of its resume, if the blocks are free: what
        the prefix cache still holds is taken from there, the copy loads the rest. A copy
        whose shared prefix is gone stays where it is."""
        bs = self.block_size
        shared_blocks, hit_blocks, from_free = self._cache_hit(request,
                                                               (request.num_tokens - 1) // bs)
        if hit_blocks * bs < request.uncopied_tokens:
            return
        new_blocks = _ceil_div(request.kv_tokens, bs) - hit_blocks
        if from_free + new_blocks > self.pool.num_free_blocks:
            return
        self._take_hit(request, shared_blocks, hit_blocks)
        self._allocate(request, new_blocks, request.kv_tokens)
        request.num_computed = request.kv_tokens
        self._cpu_blocks_to_free += request.cpu_blocks
        request.cpu_blocks = 0
        request.uncopied_tokens = 0
        self._move(request, Location.DEVICE)
        self._set_idle(request.kv_tokens, self.clock_s)
        loaded = max(0, request.kv_tokens - hit_blocks * bs)
        self._swap_tokens += loaded
        self.swapped_in_bytes += loaded * self.cost.kv_bytes_per_token

    def _move(self, request: SimRequest, location: Location) -> None:
        self._unregister(request)
        self._register(request, location)

    def _register(self, request: SimRequest, location: Location) -> None:
        request.location = location
        self._by_location[location][request.key] = request
        if location is Location.CPU:
            self._swapped_by_tool.setdefault(request.tool, {})[request.key] = request

    def _unregister(self, request: SimRequest) -> None:
        """Forget where an intercepted request's KV is (``request.location`` stays)."""
        del self._by_location[request.location][request.key]
        if request.location is Location.CPU:
            del self._swapped_by_tool[request.tool][request.key]

    # ---- results and checks ------------------------------------------------

    def counters(self) -> EngineCounters:
        return EngineCounters(
            forward_s=self.forward_s, recompute_forward_s=self.recompute_forward_s,
            forwarded_tokens=self.forwarded_tokens, recomputed_tokens=self.recomputed_tokens,
            idle_kv_events=tuple(self.idle_events),
            kv_capacity_tokens=self.pool.num_blocks * self.block_size,
            swapped_out_bytes=self.swapped_out_bytes, swapped_in_bytes=self.swapped_in_bytes)

    def check(self) -> None:
        """Raise AssertionError unless every block is accounted for exactly once."""
        bs = self.block_size
        self.pool.check()
        if self.tier is not None:
            self.tier.check()
        for request in self.running:
            self.materialize(request)
            assert request.num_blocks == _ceil_div(request.num_computed, bs), request
        holders = [*self.running, *self.kv_holding, *self.intercepted_on(Location.DEVICE),
                   *self.loading]
        assert (sum(r.num_blocks - r.shared_blocks for r in holders) + self.pool.num_prefix_blocks
                == self.pool.num_used_blocks)
        assert all(r.num_blocks == 0 and not r.holds_prefix for r in self.waiting)
        prefix_holders: dict[str, int] = {}
        for r in holders:
            assert 0 <= r.shared_blocks <= r.num_blocks, r
            if r.holds_prefix:
                prefix_holders[r.prefix_key] = prefix_holders.get(r.prefix_key, 0) + 1
                assert r.shared_blocks <= self.pool.prefix_blocks(r.prefix_key), r
            else:
                assert r.shared_blocks == 0, r
        assert prefix_holders == self.pool.held_prefixes()
        swapped = [*self.intercepted_on(Location.CPU),
                   *(r for r in self.waiting if r.location is Location.CPU)]
        assert sum(r.cpu_blocks for r in swapped) == self.cpu.num_used_blocks
        assert 0 <= self.cpu.num_used_blocks <= self.cpu.num_blocks
        assert self.idle_tokens == sum(r.kv_tokens
                                       for r in self.intercepted_on(Location.DEVICE))
        assert self.running_computed_tokens == sum(r.num_computed for r in self.running)
        assert len(self.running) <= self.max_num_seqs
        assert sum(self._phase_counts) == len(self.running) - (self.prefilling is not None)
        assert self.prefilling is None or next(reversed(self.running)) is self.prefilling


def _arrival_s(request: SimRequest) -> float:
    return request.arrival_s
