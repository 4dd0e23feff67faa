"""`AsyncInterceptScheduler` step by step, with fake model-runner outputs.

No model runs and no engine: the scheduler is built on a real `VllmConfig` and driven
the way vLLM's own tests drive `AsyncScheduler` (tests/v1/core/test_async_scheduler.py
in vLLM's repository): `schedule()` for step k+1 happens before `update_from_output`
of step k, so a request has a token in flight whenever it decodes. The test plays the
model runner and the swap connector's workers (`async_scheduler_harness.FakeRunner`):
a save is done when the test reports `finished_sending` for it.

Every test checks the token bookkeeping of the requests it drives (computed tokens,
output placeholders, tokens in flight, output tokens) and ends with every device
block free, no deferred free pending, no paused or known request left, and, with the
swap connector, every CPU block free.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from async_scheduler_harness import (BLOCK_SIZE, FakeRunner, build_scheduler, fake_token,
                                     make_request, saves_in)

PROMPT_LEN = 40
INTERCEPT_AFTER = 3
# At the pause the third output token's KV is still in flight (its step is the one
# whose output is dropped): the prompt and the first two output tokens are kept.
KV_AT_PAUSE = PROMPT_LEN + INTERCEPT_AFTER - 1
TOOL_TOKENS = [7, 8, 9, 10]
POLICIES = ["preserve", "swap", "discard", "min-waste"]


@dataclass
class Env:
    scheduler: object
    runner: FakeRunner
    free_blocks: int
    now: list

    @property
    def free(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    @property
    def swap(self):
        return self.scheduler.policy_driver.swap

    @property
    def kv_managers(self):
        return self.scheduler.kv_cache_manager.coordinator.single_type_managers

    @property
    def kv_manager(self):
        """The full-attention group's (the first)."""
        return self.kv_managers[0]

    def block_ids(self, request_id: str) -> list[int]:
        """A request's device blocks (read without creating an entry for it)."""
        return [b.block_id for b in self.kv_manager.req_to_blocks.get(request_id, ())]


@pytest.fixture
def env(tiny_model):
    """`env(policy, **build_scheduler kwargs)` -> Env; the connector as the engine
    sets it (InterceptConfig.uses_connector) unless `connector=` says otherwise."""
    from infercept.adapter.scheduler import AsyncInterceptScheduler, InterceptScheduler
    from infercept.config import InterceptConfig

    def make(policy: str, **kwargs) -> Env:
        kwargs.setdefault("connector", InterceptConfig(policy=policy).uses_connector)
        scheduler = build_scheduler(tiny_model, policy, scheduler_cls=InterceptScheduler, **kwargs)
        assert type(scheduler) is AsyncInterceptScheduler
        assert scheduler.vllm_config.scheduler_config.async_scheduling
        now = [1000.0]
        scheduler.clock = lambda: now[0]  # the policy sees no time pass unless told
        return Env(scheduler, FakeRunner(scheduler),
                   scheduler.kv_cache_manager.block_pool.get_num_free_blocks(), now)

    return make


def counts(request) -> tuple[int, int, int, int]:
    """(computed tokens, output placeholders, tokens in flight, output tokens)."""
    return (request.num_computed_tokens, request.num_output_placeholders,
            request.num_in_flight_tokens, request.num_output_tokens)


def outputs(request_id: str, first_position: int, n: int) -> list[int]:
    return [fake_token(request_id, first_position + i) for i in range(n)]


def assert_all_free(env: Env) -> None:
    env.runner.drain()
    s = env.scheduler
    assert not s.intercepts, f"paused requests left: {list(s.intercepts)}"
    assert not s.requests, f"requests left: {list(s.requests)}"
    assert not s.running and not s.waiting and not s.kv_holding_waiting
    assert not s.deferred_frees
    assert env.free == env.free_blocks
    for manager in env.kv_managers:
        assert not manager.req_to_blocks and not manager.num_cached_block
    if env.swap is not None:
        assert env.swap.allocator.num_free_blocks == env.swap.allocator.num_blocks
        assert not env.swap.has_pending_work()
    assert not s.has_requests()


def pause_with_token_in_flight(env: Env, request_id: str = "r", prompt=None):
    """Run a request to its interception; returns it paused, with the step that
    computes its trigger token's KV (and samples a stale token) still in flight."""
    from infercept.adapter.interception import STOP_REASON
    from vllm.v1.request import RequestStatus

    s, runner = env.scheduler, env.runner
    prompt = prompt or list(range(1, PROMPT_LEN + 1))
    request = make_request(request_id, prompt, max_tokens=64,
                           infercept={"intercept_after": INTERCEPT_AFTER})
    s.add_request(request)
    assert runner.schedule().num_scheduled_tokens == {request_id: PROMPT_LEN}
    assert counts(request) == (PROMPT_LEN, 1, PROMPT_LEN, 0)
    for n in range(1, INTERCEPT_AFTER):
        assert runner.schedule().num_scheduled_tokens == {request_id: 1}
        assert counts(request) == (PROMPT_LEN + n, 2, PROMPT_LEN + n if n == 1 else 2, n - 1)
        runner.finish()
        assert counts(request) == (PROMPT_LEN + n, 1, 1, n)
        assert request.request_id in [r.request_id for r in s.running]
    # The step of the trigger token's KV goes out before the trigger comes back.
    assert runner.schedule().num_scheduled_tokens == {request_id: 1}
    assert counts(request) == (PROMPT_LEN + INTERCEPT_AFTER, 2, 2, INTERCEPT_AFTER - 1)
    free_before = env.free
    engine_outputs = runner.finish()
    # Paused: its placeholder is gone, only materialized KV counts, and the output
    # of the step still in flight is marked stale, to be dropped.
    assert request_id in s.intercepts and request_id in s.requests
    assert request not in s.running and request not in s.waiting
    assert request not in s.kv_holding_waiting
    assert request.status == RequestStatus.WAITING_FOR_STREAMING_REQ
    assert counts(request) == (KV_AT_PAUSE, 0, 1, INTERCEPT_AFTER)
    assert request.num_stale_output_tokens == 1 and request.drop_stale_output
    assert list(request.output_token_ids) == outputs(request_id, PROMPT_LEN, INTERCEPT_AFTER)
    paused = s.intercepts[request_id]
    assert paused.num_kv_tokens == KV_AT_PAUSE and paused.prompt_tokens == PROMPT_LEN
    assert not paused.saving
    assert request_id in s.finished_req_ids  # the workers are told it is gone
    assert env.free == free_before  # its blocks stay until the policy acts
    [out] = [o for outs in engine_outputs.values() for o in outs.outputs
             if o.request_id == request_id]
    assert out.stop_reason == STOP_REASON and out.new_token_ids == [
        fake_token(request_id, PROMPT_LEN + INTERCEPT_AFTER - 1)]
    assert len(runner.queue) == 1
    return request


def settle(env: Env, request) -> None:
    """The stale step returns, the policy acts, and any save it queues is reported done."""
    finish_stale_step(env, request)
    env.runner.schedule()
    env.runner.finish(report_saves=True)
    assert not env.runner.queue


def finish_stale_step(env: Env, request, report_saves: bool = False) -> None:
    """The in-flight step returns; its token for the paused request is dropped."""
    stale_position = PROMPT_LEN + INTERCEPT_AFTER
    assert env.runner.queue[0].samples.get(request.request_id) == stale_position
    output_before = list(request.output_token_ids)
    env.runner.finish(report_saves=report_saves)
    assert env.runner.times_sampled[request.request_id, stale_position] == 1
    assert list(request.output_token_ids) == output_before
    assert request.num_in_flight_tokens == 0 and request.num_stale_output_tokens == 0


def resume_request(request_id: str, paused, how: str = "explicit", max_tokens: int = 4):
    prompt = list(paused.all_token_ids) + TOOL_TOKENS
    spec = {"resume": paused.request_id} if how == "explicit" else {"auto_resume": True}
    return make_request(request_id, prompt, max_tokens=max_tokens, infercept=spec)


def decode_to_the_end(env: Env, request, first_position: int, max_tokens: int) -> None:
    """Step until `request` finishes by length; every output token where it belongs."""
    from vllm.v1.request import RequestStatus

    for _ in range(max_tokens + 4):
        if request.is_finished():
            break
        env.runner.step(report_saves=True)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert list(request.output_token_ids) == outputs(request.request_id, first_position, max_tokens)
    env.runner.assert_positions_consistent(request)


# ---- 1. pause with a token in flight ---------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_pause_drops_the_token_in_flight(env, policy):
    from infercept.policy import Location
    from vllm.v1.request import RequestStatus

    e = env(policy)
    s = e.scheduler
    request = pause_with_token_in_flight(e)
    held = e.block_ids("r")
    assert len(held) == -(-(KV_AT_PAUSE + 1) // BLOCK_SIZE)  # the in-flight slot too
    # Next step: nothing scheduled for it, the workers drop it, the policy acts.
    output = e.runner.schedule()
    assert output.num_scheduled_tokens == {}
    assert "r" in output.finished_req_ids
    paused = s.intercepts["r"]
    saves = saves_in(output)
    if paused.location is Location.DEVICE:
        assert policy in ("preserve", "min-waste") and not saves
        assert e.block_ids("r") == held and request.num_computed_tokens == KV_AT_PAUSE
    elif paused.location is Location.CPU:
        assert policy in ("swap", "min-waste") and paused.saving
        assert saves["r"].src == held[: len(saves["r"].dst)]
        assert len(saves["r"].dst) == -(-KV_AT_PAUSE // BLOCK_SIZE)
        assert e.block_ids("r") == held  # until the save is reported done
    else:
        assert policy == "discard" and not saves
        assert request.num_computed_tokens == 0 and not e.block_ids("r")
    if policy in ("preserve", "swap", "discard"):
        assert paused.location is {"preserve": Location.DEVICE, "swap": Location.CPU,
                                   "discard": Location.NONE}[policy]
    finish_stale_step(e, request)
    assert list(request.output_token_ids) == outputs("r", PROMPT_LEN, INTERCEPT_AFTER)
    assert request.status == RequestStatus.WAITING_FOR_STREAMING_REQ
    # Several idle steps later nothing has changed for it (a swap stays in transit
    # until its save is reported).
    for _ in range(3):
        e.runner.step()
    assert list(request.output_token_ids) == outputs("r", PROMPT_LEN, INTERCEPT_AFTER)
    assert s.intercepts["r"].location is paused.location
    if paused.location is not Location.NONE:
        assert e.block_ids("r") == held
    # A paused request keeps no engine busy; an unreported save does.
    assert s.get_num_unfinished_requests() == 0
    assert s.has_requests() == (paused.location is Location.CPU)
    assert s.policy_driver.stats.interceptions == 1
    s.finish_requests("r", RequestStatus.FINISHED_ABORTED)
    assert_all_free(e)


# ---- 2. resume of a preserved request ---------------------------------------------------


@pytest.mark.parametrize("how", ["explicit", "auto"])
@pytest.mark.parametrize("stale_in_flight", [False, True], ids=["settled", "stale-in-flight"])
def test_resume_takes_the_preserved_blocks(env, how, stale_in_flight):
    from infercept.policy import Location
    from vllm.v1.request import RequestStatus

    e = env("preserve")
    s = e.scheduler
    paused = pause_with_token_in_flight(e)
    if not stale_in_flight:
        settle(e, paused)
        assert s.intercepts["r"].location is Location.DEVICE
    held = e.block_ids("r")
    free = e.free
    resumed = resume_request("q", paused, how)
    s.add_request(resumed)
    # It took the paused request's KV: same blocks, nothing freed or allocated.
    assert "r" not in s.intercepts and "r" not in s.requests and "q" in s.requests
    assert e.block_ids("q") == held and not e.block_ids("r")
    assert e.free == free
    assert counts(resumed) == (KV_AT_PAUSE, 0, 0, 0)
    assert resumed in s.kv_holding_waiting
    assert s.policy_driver.stats.resumes == 1
    assert s.policy_driver.stats.tokens_reused == KV_AT_PAUSE
    if stale_in_flight:
        # The paused request's last step returns now: its output is ignored.
        e.runner.finish()
        assert resumed.num_output_tokens == 0
    # Only the tokens after the KV are computed: the dropped trigger token's KV and
    # the tool's tokens.
    new_tokens = resumed.num_prompt_tokens - KV_AT_PAUSE
    assert new_tokens == 1 + len(TOOL_TOKENS)
    output = e.runner.schedule()
    assert output.num_scheduled_tokens == {"q": new_tokens}
    [new] = output.scheduled_new_reqs
    assert new.req_id == "q" and new.num_computed_tokens == KV_AT_PAUSE
    assert list(new.block_ids[0][: len(held)]) == held
    assert counts(resumed) == (resumed.num_prompt_tokens, 1, new_tokens, 0)
    e.runner.schedule()
    assert counts(resumed) == (resumed.num_prompt_tokens + 1, 2, new_tokens + 1, 0)
    e.runner.finish()
    assert counts(resumed) == (resumed.num_prompt_tokens + 1, 1, 1, 1)
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert resumed.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert_all_free(e)


# ---- 3. abort ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("when", ["stale-in-flight", "policy-acted", "settled"])
def test_abort_paused_request(env, policy, when):
    from vllm.v1.request import RequestStatus

    e = env(policy)
    s = e.scheduler
    request = pause_with_token_in_flight(e)
    saving = False
    if when != "stale-in-flight":
        output = e.runner.schedule()  # the policy acts; the stale step still in flight
        saving = "r" in saves_in(output)
        if when == "settled":
            finish_stale_step(e, request)
            e.runner.finish(report_saves=True)
            saving = False
    blocks_held = e.block_ids("r")
    aborted = s.finish_requests("r", RequestStatus.FINISHED_ABORTED)
    assert aborted == [request] and request.status == RequestStatus.FINISHED_ABORTED
    assert "r" not in s.intercepts
    if saving:
        # vLLM holds a request whose save still reads its blocks until it is reported.
        assert "r" in s.requests and e.block_ids("r") == blocks_held
        assert s.finish_requests("r", RequestStatus.FINISHED_ABORTED) == []
        assert e.runner.step().kv_connector_metadata.abandoned == ["r"]
        assert e.runner.unreported_saves == ["r"]
        e.runner.finish(finished_sending={"r"})
        assert "r" not in s.requests
    else:
        assert "r" not in s.requests
    # The output of a step in flight for it (if any) is ignored.
    output_before = list(request.output_token_ids)
    e.runner.drain()
    assert list(request.output_token_ids) == output_before
    assert output_before == outputs("r", PROMPT_LEN, INTERCEPT_AFTER)
    assert_all_free(e)


@pytest.mark.parametrize("policy", POLICIES)
def test_abort_resumed_request_with_tokens_in_flight(env, policy):
    from vllm.v1.request import RequestStatus

    e = env(policy)
    s = e.scheduler
    paused = pause_with_token_in_flight(e)
    settle(e, paused)
    resumed = resume_request("q", paused, max_tokens=32)
    s.add_request(resumed)
    first = e.runner.schedule()
    computed_from = first.scheduled_new_reqs[0].num_computed_tokens
    assert first.num_scheduled_tokens == {"q": resumed.num_prompt_tokens - computed_from}
    for _ in range(3):
        e.runner.step()
    e.runner.schedule()  # two steps in flight
    assert len(e.runner.queue) == 2
    assert counts(resumed) == (resumed.num_prompt_tokens + 4, 2, 2, 3)
    aborted = s.finish_requests("q", RequestStatus.FINISHED_ABORTED)
    assert aborted == [resumed] and "q" not in s.requests
    e.runner.drain()
    assert list(resumed.output_token_ids) == outputs("q", resumed.num_prompt_tokens, 3)
    assert_all_free(e)


# ---- 4. swap out and in -------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_swap_out_then_in(env, prefix_caching):
    from infercept.policy import Location

    e = env("swap", prefix_caching=prefix_caching)
    s, swap = e.scheduler, e.swap
    cpu_total = swap.allocator.num_blocks
    paused = pause_with_token_in_flight(e)
    held = e.block_ids("r")
    free = e.free
    # The next step queues the save of the KV blocks.
    output = e.runner.schedule()
    save = saves_in(output)["r"]
    kv_blocks = -(-KV_AT_PAUSE // BLOCK_SIZE)
    assert save.src == held[:kv_blocks] and len(save.dst) == kv_blocks
    assert swap.allocator.num_free_blocks == cpu_total - kv_blocks
    assert s.intercepts["r"].location is Location.CPU and s.intercepts["r"].saving
    # Its device blocks stay with it while the save is unreported.
    finish_stale_step(e, paused)
    for _ in range(3):
        e.runner.step()
        assert e.block_ids("r") == held and e.free == free
        assert not saves_in(e.runner.queue[-1].output)  # queued once
    assert paused.num_computed_tokens == KV_AT_PAUSE
    e.runner.finish(finished_sending={"r"})
    assert not s.intercepts["r"].saving and s.intercepts["r"].location is Location.CPU
    assert not e.block_ids("r") and paused.num_computed_tokens == 0
    assert e.free == e.free_blocks
    assert swap.num_swapped_tokens("r") == KV_AT_PAUSE
    # Resume: the request loads its KV back into new blocks.
    resumed = resume_request("q", paused)
    s.add_request(resumed)
    assert counts(resumed) == (0, 0, 0, 0) and resumed in s.waiting
    assert swap.num_swapped_tokens("q") == KV_AT_PAUSE
    assert s.policy_driver.stats.tokens_reused == KV_AT_PAUSE
    output = e.runner.schedule()
    [new] = output.scheduled_new_reqs
    assert new.num_computed_tokens == KV_AT_PAUSE  # local prefix hit + loaded tokens
    assert output.num_scheduled_tokens == {"q": resumed.num_prompt_tokens - KV_AT_PAUSE}
    metadata = output.kv_connector_metadata
    device = list(new.block_ids[0])
    full = KV_AT_PAUSE // BLOCK_SIZE
    local_hit = full if prefix_caching else 0  # the freed full blocks are still cached
    if local_hit < full:
        [load] = metadata.loads
        assert load.src == save.dst[local_hit:full] and load.dst == device[local_hit:full]
    else:
        assert not metadata.loads
    [tail] = metadata.tail_loads
    assert tail.src == save.dst[full:kv_blocks] and tail.dst == device[full:kv_blocks]
    if prefix_caching:
        assert device[:full] == held[:full]  # the cached blocks themselves
    assert counts(resumed) == (resumed.num_prompt_tokens, 1,
                               resumed.num_prompt_tokens - KV_AT_PAUSE, 0)
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert_all_free(e)


def test_resume_while_the_save_is_unreported(env):
    from infercept.policy import Location

    e = env("swap")
    s, swap = e.scheduler, e.swap
    cpu_total = swap.allocator.num_blocks
    paused = pause_with_token_in_flight(e)
    held = e.block_ids("r")
    output = e.runner.schedule()
    save = saves_in(output)["r"]
    finish_stale_step(e, paused)
    assert s.intercepts["r"].location is Location.CPU and s.intercepts["r"].saving
    # Resumed before the workers report the save: it takes the intact device blocks.
    free = e.free
    resumed = resume_request("q", paused)
    s.add_request(resumed)
    assert e.block_ids("q") == held and e.free == free
    assert counts(resumed) == (KV_AT_PAUSE, 0, 0, 0)
    assert swap.num_swapped_tokens("q") == 0 and swap.num_swapped_tokens("r") == 0
    # The save is abandoned, its CPU blocks kept until it is reported done.
    output = e.runner.schedule()
    assert output.kv_connector_metadata.abandoned == ["r"]
    metadata = output.kv_connector_metadata
    assert not metadata.loads and not metadata.tail_loads
    assert output.num_scheduled_tokens == {"q": resumed.num_prompt_tokens - KV_AT_PAUSE}
    assert output.scheduled_new_reqs[0].num_computed_tokens == KV_AT_PAUSE
    e.runner.finish()  # the step that queued the save returns; no report yet
    assert swap.allocator.num_free_blocks == cpu_total - len(save.dst)
    e.runner.schedule()
    # The save of the old id is reported done: accepted, its CPU blocks freed.
    e.runner.finish(finished_sending={"r"})
    assert swap.allocator.num_free_blocks == cpu_total and not swap.is_saving("r")
    assert e.block_ids("q")[: len(held)] == held
    assert counts(resumed) == (resumed.num_prompt_tokens + 1, 1, 1, 1)
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert_all_free(e)


# ---- 5. vLLM's preemption with tokens in flight --------------------------------------------


def run_preemption_script(scheduler, intercepted: dict[str, int] | None = None):
    """Four 24-token requests, 40 tokens each, arriving every other step into 9 free
    blocks (each needs 4): vLLM preempts. Returns (runner, requests, preemptions as
    (request id, tokens in flight, output tokens))."""
    runner = FakeRunner(scheduler)
    preemptions = []
    preempt = scheduler._preempt_request

    def observe(request, timestamp, *args, **kwargs):
        preemptions.append((request.request_id, request.num_in_flight_tokens,
                            request.num_output_tokens))
        return preempt(request, timestamp, *args, **kwargs)

    scheduler._preempt_request = observe
    intercepted = intercepted or {}
    requests = [make_request(str(i), [10 * i + j + 1 for j in range(24)], max_tokens=40,
                             arrival_time=float(i),
                             infercept={"intercept_after": intercepted[str(i)]}
                             if str(i) in intercepted else None)
                for i in range(4)]
    pending = list(requests)
    for tick in range(1000):
        if pending and tick % 2 == 0:
            scheduler.add_request(pending.pop(0))
        if not pending and not runner.queue and not scheduler.has_requests():
            return runner, requests, preemptions
        if scheduler.has_requests():
            runner.schedule()
        if len(runner.queue) > 1 or (runner.queue and not scheduler.has_requests()):
            runner.finish(report_saves=True)
    raise AssertionError("script did not finish")


@pytest.mark.parametrize("policy, connector", [
    ("discard", False), ("preserve", False), ("min-waste", False),
    ("preserve", True), ("swap", True), ("min-waste", True),
], ids=lambda v: {True: "connector", False: "no-connector"}.get(v, v))
def test_preemption_keeps_tokens_in_flight_as_stock_vllm(env, tiny_model, policy, connector):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.request import RequestStatus

    e = env(policy, connector=connector, num_blocks=10)
    stock = build_scheduler(tiny_model, policy, connector=connector, num_blocks=10,
                            scheduler_cls=AsyncScheduler)
    assert type(stock) is AsyncScheduler and stock.defer_block_free == e.scheduler.defer_block_free
    ours = run_preemption_script(e.scheduler)
    theirs = run_preemption_script(stock)
    runner, requests, preemptions = ours
    assert preemptions, "the script must make vLLM preempt"
    assert preemptions == theirs[2]
    assert runner.trace == theirs[0].trace  # the very same steps
    for request, reference in zip(requests, theirs[1]):
        assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert list(request.output_token_ids) == list(reference.output_token_ids)
        # Nothing dropped and sampled again: each position sampled once, delivered.
        assert list(request.output_token_ids) == outputs(request.request_id, 24, 40)
        runner.assert_positions_consistent(request)
    assert all(n == 1 for n in runner.times_sampled.values())
    if connector:
        # With a KV connector that loads (kv_both), vLLM defers freeing blocks a step
        # in flight writes, so it never preempts a request with tokens in flight.
        assert e.scheduler.defer_block_free
        assert all(in_flight == 0 for _, in_flight, _ in preemptions)
    else:
        assert any(in_flight > 0 for _, in_flight, _ in preemptions)
    assert e.scheduler.policy_driver.stats.preemptions == len(preemptions)
    assert_all_free(e)


@pytest.mark.parametrize("policy", ["discard", "preserve"])
def test_trigger_token_in_flight_when_preempted(env, policy):
    """vLLM preempts a request whose in-flight token completes its trigger: the stale
    token is delivered (as vLLM delivers it), the request pauses with no KV, and its
    resume recomputes everything."""
    from infercept.policy import Location
    from vllm.v1.request import RequestStatus

    e = env(policy, connector=False, num_blocks=10)
    s = e.scheduler
    # In the script above request "2" is preempted with 20 output tokens, one more in
    # flight: the 21st completes its interception.
    pauses = []
    pause = s._pause

    def observe(request):
        pauses.append((request.request_id, request in s.running, request in s.waiting,
                       request.num_computed_tokens, request.num_output_tokens))
        return pause(request)

    s._pause = observe
    runner, requests, preemptions = run_preemption_script(s, intercepted={"2": 21})
    assert ("2", 1, 20) in preemptions
    assert pauses == [("2", False, True, 0, 21)]  # paused from the waiting queue
    request = requests[2]
    paused = s.intercepts["2"]
    assert paused.num_kv_tokens == 0 and not e.block_ids("2")
    assert counts(request) == (0, 0, 0, 21)
    assert paused.location is (Location.DEVICE if policy == "preserve" else Location.NONE)
    assert list(request.output_token_ids) == outputs("2", 24, 21)
    runner.assert_positions_consistent(request)
    for other in requests[:2] + requests[3:]:
        assert other.status == RequestStatus.FINISHED_LENGTH_CAPPED
    e.runner = runner
    resumed = resume_request("q", request)
    s.add_request(resumed)
    assert counts(resumed) == (0, 0, 0, 0)
    output = runner.schedule()
    hit = output.scheduled_new_reqs[0].num_computed_tokens  # the prefix cache's only
    assert output.num_scheduled_tokens == {"q": resumed.num_prompt_tokens - hit}
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert_all_free(e)


# ---- more: interceptions in a row, diverged resumes, min-waste's prefetch, vLLM's fence --


@pytest.mark.parametrize("policy", ["preserve", "swap"])
def test_two_interceptions_in_a_row(env, policy):
    """A resumed request pauses again with a token in flight and is resumed again; the
    final output carries both interceptions' records."""
    e = env(policy)
    s = e.scheduler
    first = pause_with_token_in_flight(e)
    settle(e, first)
    second = make_request("q", list(first.all_token_ids) + TOOL_TOKENS, max_tokens=64,
                          infercept={"resume": "r", "intercept_after": 2})
    s.add_request(second)
    for _ in range(3):
        e.runner.step(report_saves=True)
    assert "q" in s.intercepts and second.num_output_tokens == 2
    kv = second.num_prompt_tokens + 1  # the second output token's KV was in flight
    assert s.intercepts["q"].num_kv_tokens == kv
    assert counts(second) == (kv, 0, 1, 2)
    e.runner.finish(report_saves=True)  # the stale step
    assert second.num_output_tokens == 2 and second.num_in_flight_tokens == 0
    e.runner.schedule()
    e.runner.finish(report_saves=True)
    third = make_request("q2", list(second.all_token_ids) + TOOL_TOKENS, max_tokens=3,
                         infercept={"resume": "q"})
    s.add_request(third)
    final = None
    for _ in range(10):
        e.runner.schedule()
        for outs in e.runner.finish(report_saves=True).values():
            final = next((o for o in outs.outputs if o.finish_reason is not None), final)
        if third.is_finished():
            break
    assert list(third.output_token_ids) == outputs("q2", third.num_prompt_tokens, 3)
    records = final.kv_transfer_params["infercept"]["interceptions"]
    assert [r["context_tokens"] for r in records] == [KV_AT_PAUSE, kv]
    assert [r["reused_tokens"] for r in records] == [KV_AT_PAUSE, kv]
    assert s.policy_driver.stats.interceptions == 2 and s.policy_driver.stats.resumes == 2
    assert_all_free(e)


@pytest.mark.parametrize("how, common, kept", [
    ("explicit", 20, 16), ("explicit", PROMPT_LEN, PROMPT_LEN), ("auto", PROMPT_LEN, PROMPT_LEN),
    ("auto", PROMPT_LEN + 1, PROMPT_LEN + 1),
])
def test_diverged_resume_keeps_the_common_blocks(env, how, common, kept):
    """A resume whose prompt leaves the paused sequence after `common` tokens (a chat
    template re-rendering the call) keeps the blocks of the common prefix: a full,
    cached block where the prefix ends is not kept (its tail would be overwritten), a
    partial one of its own is. An automatic resume needs the whole paused prompt."""
    e = env("preserve")
    s = e.scheduler
    paused = pause_with_token_in_flight(e)
    settle(e, paused)
    held = e.block_ids("r")
    prompt = list(paused.all_token_ids[:common]) + [5, 5, 5] + TOOL_TOKENS
    spec = {"resume": "r"} if how == "explicit" else {"auto_resume": True}
    resumed = make_request("q", prompt, max_tokens=4, infercept=spec)
    s.add_request(resumed)
    assert "r" not in s.intercepts and "r" not in s.requests
    assert resumed.num_computed_tokens == kept
    assert e.block_ids("q") == held[: -(-kept // BLOCK_SIZE)]
    assert s.policy_driver.stats.tokens_reused == kept
    assert e.free == e.free_blocks - len(e.block_ids("q"))
    output = e.runner.schedule()
    assert output.scheduled_new_reqs[0].num_computed_tokens == kept
    assert output.num_scheduled_tokens == {"q": len(prompt) - kept}
    decode_to_the_end(e, resumed, len(prompt), 4)
    assert_all_free(e)


@pytest.mark.parametrize("hashed", [True, False], ids=["vllm-block-hashes", "own-hashes"])
def test_automatic_resume_finds_the_paused_request_by_its_whole_prompt(env, hashed):
    """The automatic resume looks a new prompt up by block hashes: vLLM's (prefix
    caching and the connector on) or the index's own (both off, so vLLM hashes
    nothing). A token list (the data-parallel front end's locate) meets the same
    keys; a prompt that only repeats the paused one, or leaves it, finds nothing."""
    e = env("preserve", prefix_caching=hashed, connector=hashed)
    s = e.scheduler
    paused = pause_with_token_in_flight(e)
    settle(e, paused)
    prompt = list(paused.prompt_token_ids)
    assert len(prompt) % BLOCK_SIZE  # full blocks and a tail
    follow_up = list(paused.all_token_ids) + TOOL_TOKENS
    assert s.infercept_locate(prompt_token_ids=follow_up) == "r"
    assert s.infercept_locate(prompt_token_ids=prompt) is None  # the same prompt, not going on
    for changed in (1, len(prompt) - 1):  # in a full block, in the tail
        other = follow_up[:changed] + [0] + follow_up[changed + 1:]
        assert s.infercept_locate(prompt_token_ids=other) is None
    assert s.infercept_locate(prompt_token_ids=[0] + follow_up) is None
    resumed = make_request("q", follow_up, max_tokens=4, infercept={"auto_resume": True})
    s.add_request(resumed)
    assert "r" not in s.intercepts
    assert resumed.num_computed_tokens == paused.num_computed_tokens == len(prompt) + INTERCEPT_AFTER - 1
    decode_to_the_end(e, resumed, len(follow_up), 4)
    assert_all_free(e)


@pytest.mark.parametrize("common", [None, 20], ids=["continued", "diverged"])
def test_resume_with_a_sliding_window_group(env, common):
    """A second KV cache group of sliding-window layers (a 16-token window: one block)
    beside the full-attention one, as vLLM's hybrid manager runs Gemma 3 when no
    connector is configured. A resume that continues the paused sequence takes its
    blocks in both groups. One that leaves it after `common` tokens lets them all go:
    the window's blocks before the divergence may already be gone (null), so the common
    prefix is not kept; it recomputes from what the prefix cache holds."""
    e = env("preserve", connector=False, sliding_window=16)
    s = e.scheduler
    assert len(e.kv_managers) == 2
    paused = pause_with_token_in_flight(e)
    settle(e, paused)
    held = [list(manager.req_to_blocks["r"]) for manager in e.kv_managers]
    assert any(block.is_null for block in held[1])  # out of the window already
    if common is None:
        resumed = resume_request("q", paused)
    else:
        prompt = list(paused.all_token_ids[:common]) + [5, 5, 5] + TOOL_TOKENS
        resumed = make_request("q", prompt, max_tokens=4, infercept={"resume": "r"})
    s.add_request(resumed)
    if common is None:
        assert resumed.num_computed_tokens == KV_AT_PAUSE
        assert [list(m.req_to_blocks["q"]) for m in e.kv_managers] == held
        assert s.policy_driver.stats.tokens_reused == KV_AT_PAUSE
    else:
        assert "q" not in e.kv_managers[0].req_to_blocks
        assert s.policy_driver.stats.tokens_reused == 0
    output = e.runner.schedule()
    assert output.num_scheduled_tokens["q"] + output.scheduled_new_reqs[0].num_computed_tokens \
        == resumed.num_prompt_tokens
    e.runner.finish()
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert_all_free(e)


def test_swap_with_a_sliding_window_group(env):
    """The swap connector with a sliding-window group beside the full one: the save
    copies both groups' blocks except those the window dropped, and the resume loads
    every copied block the new request holds in each group."""
    e = env("swap", sliding_window=16)
    s, swap = e.scheduler, e.swap
    paused = pause_with_token_in_flight(e)
    finish_stale_step(e, paused)
    held = [[b.block_id for b in m.req_to_blocks["r"] if not b.is_null] for m in e.kv_managers]
    assert len(held[1]) < len(held[0])  # the window dropped some
    output = e.runner.schedule()
    save = saves_in(output)["r"]
    assert sorted(save.src) == sorted(held[0] + held[1])
    assert swap.bytes_swapped_out == len(save.src) * swap.block_bytes
    e.runner.finish(finished_sending={"r"})
    resumed = resume_request("q", paused)
    s.add_request(resumed)
    output = e.runner.schedule()
    metadata = output.kv_connector_metadata
    loaded = [pair for c in (*metadata.loads, *metadata.tail_loads) for pair in zip(c.src, c.dst)]
    assert {src for src, _ in loaded} <= set(save.dst)
    new_blocks = {b.block_id for m in e.kv_managers for b in m.req_to_blocks["q"] if not b.is_null}
    assert {dst for _, dst in loaded} <= new_blocks
    assert output.scheduled_new_reqs[0].num_computed_tokens == KV_AT_PAUSE
    e.runner.finish()
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert_all_free(e)


def test_memory_pressure_counts_a_waiting_prompt_whole(env):
    """A paused request holds 3 of 11 blocks and a 130-token prompt arrives, to be
    prefilled 48 tokens a step. vLLM admits a prompt only if all its blocks fit (9 here:
    `scheduler_reserve_full_isl`), so the policy counts the whole prompt, not its first
    chunk's 3 blocks: it evicts the paused request, and the prompt runs without a
    preemption. (Counting the first chunk, nothing looked short, the prompt waited and
    the paused request stayed until its timeout.)"""
    e = env("preserve", connector=False, num_blocks=12, max_num_batched_tokens=48)
    s = e.scheduler
    paused = pause_with_token_in_flight(e)
    settle(e, paused)
    assert len(e.block_ids("r")) == 3 and e.free == 8
    long = make_request("long", list(range(500, 630)), max_tokens=2)
    s.add_request(long)
    for _ in range(12):
        if "r" not in s.intercepts or s.intercepts["r"].location.value != "preserved":
            break
        e.runner.step()
    history = s.intercepts["r"].history
    assert [h["action"] for h in history] == ["preserve", "discard"]
    assert history[-1]["reason"].startswith("evicted")
    assert s.policy_driver.stats.preemptions == 0
    e.runner.drain()
    assert long.is_finished() and s.policy_driver.stats.preemptions == 0
    s.infercept_cancel("r")
    assert_all_free(e)


def test_min_waste_swaps_out_prefetches_and_resumes(env):
    """min-waste with the tool's expected duration (1 s): swapped out at once, brought
    back just before the tool returns; the resume takes the prefetched blocks. The
    full blocks it freed are still in the prefix cache: the prefetch takes them from
    there and loads only the partly filled one from its CPU copy."""
    from infercept.policy import Location

    e = env("min-waste")
    s, swap = e.scheduler, e.swap
    spec = {"intercept_after": INTERCEPT_AFTER, "expected_duration_s": 1.0}
    paused = make_request("r", list(range(1, PROMPT_LEN + 1)), max_tokens=64, infercept=spec)
    s.add_request(paused)
    while "r" not in s.intercepts:
        e.runner.step()
    e.runner.finish()  # the stale step
    held = e.block_ids("r")
    output = e.runner.schedule()
    assert s.intercepts["r"].location is Location.CPU and s.intercepts["r"].saving
    save = saves_in(output)["r"]
    e.runner.finish(finished_sending={"r"})
    assert not e.block_ids("r") and e.free == e.free_blocks
    e.now[0] += 0.999  # the tool is about to return: its KV comes back
    output = e.runner.schedule()
    assert s.intercepts["r"].location is Location.DEVICE
    prefetched = e.block_ids("r")
    metadata = output.kv_connector_metadata
    full = KV_AT_PAUSE // BLOCK_SIZE
    assert prefetched[:full] == held[:full]  # the cached blocks it freed
    assert not metadata.loads
    assert [(c.src, c.dst) for c in metadata.tail_loads] == [(save.dst[full:], prefetched[full:])]
    assert paused.num_computed_tokens == KV_AT_PAUSE
    assert len(held) >= len(prefetched) == len(save.dst)
    e.runner.finish()
    resumed = resume_request("q", paused)
    s.add_request(resumed)
    assert counts(resumed) == (KV_AT_PAUSE, 0, 0, 0) and e.block_ids("q") == prefetched
    output = e.runner.schedule()
    assert output.num_scheduled_tokens == {"q": resumed.num_prompt_tokens - KV_AT_PAUSE}
    metadata = output.kv_connector_metadata
    assert not metadata.loads and not metadata.tail_loads
    decode_to_the_end(e, resumed, resumed.num_prompt_tokens, 4)
    assert swap.bytes_swapped_in * len(save.dst) == swap.bytes_swapped_out > 0
    assert dict(s.policy_driver.stats.decisions) == {"swap_out": 1, "swap_in": 1}
    assert_all_free(e)


@pytest.mark.parametrize("case", ["resume-then-abort", "diverged-resume"])
def test_blocks_a_step_in_flight_writes_stay_fenced(env, case):
    from vllm.v1.request import RequestStatus

    e = env("preserve")
    s = e.scheduler
    assert s.defer_block_free  # vLLM's fence: a kv_both connector under async scheduling
    paused = pause_with_token_in_flight(e)
    # The step in flight writes the KV of the trigger token (position 42) here:
    written = s.kv_cache_manager.block_pool.blocks[e.block_ids("r")[KV_AT_PAUSE // BLOCK_SIZE]]
    if case == "resume-then-abort":
        s.add_request(resume_request("q", paused))
        s.finish_requests("q", RequestStatus.FINISHED_ABORTED)
    else:  # it keeps the first block only
        prompt = list(paused.all_token_ids[:20]) + [5, 5, 5] + TOOL_TOKENS
        s.add_request(make_request("q", prompt, max_tokens=4, infercept={"resume": "r"}))
    # As vLLM does for a request it frees with a step in flight: the block goes back
    # to the pool only once that step's output is processed.
    still_held = written.ref_cnt > 0
    e.runner.drain()
    if case == "diverged-resume":
        s.finish_requests("q", RequestStatus.FINISHED_ABORTED)
    assert_all_free(e)
    assert still_held


@pytest.mark.parametrize("policy", ["preserve", "discard"])
def test_memory_pressure_evicts_the_paused_request_not_the_running_one(env, policy):
    """A preserved request holds 3 of 7 blocks while a running one grows into them: the
    policy evicts the paused request, and the running one goes on without preemption."""
    from infercept.policy import Location
    from vllm.v1.request import RequestStatus

    e = env(policy, num_blocks=8)
    s = e.scheduler
    paused = make_request("r", list(range(1, PROMPT_LEN + 1)), max_tokens=64,
                          infercept={"intercept_after": INTERCEPT_AFTER})
    running = make_request("a", list(range(100, 130)), max_tokens=60)
    s.add_request(paused)
    s.add_request(running)
    for _ in range(200):
        if running.is_finished():
            break
        e.runner.step(report_saves=True)
    assert running.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.policy_driver.stats.interceptions == 1
    assert s.intercepts["r"].location is not Location.DEVICE  # evicted
    assert list(paused.output_token_ids) == outputs("r", PROMPT_LEN, INTERCEPT_AFTER)
    assert list(running.output_token_ids) == outputs("a", 30, 60)
    assert all(n == 1 for n in e.runner.times_sampled.values())
    assert running.num_preemptions == 0 and s.policy_driver.stats.preemptions == 0
    s.finish_requests("r", RequestStatus.FINISHED_ABORTED)
    assert_all_free(e)


@pytest.mark.parametrize("policy", POLICIES)
def test_expired_paused_request_is_released_with_its_token_in_flight(env, policy):
    e = env(policy)
    s = e.scheduler
    request = pause_with_token_in_flight(e)
    e.now[0] += s.intercept_config.intercept_timeout_s + 1
    output = e.runner.schedule()
    assert "r" not in s.intercepts and "r" not in s.requests
    assert "r" in output.finished_req_ids and not saves_in(output)
    assert s.policy_driver.stats.expired == 1
    e.runner.finish()  # the stale step: ignored
    assert list(request.output_token_ids) == outputs("r", PROMPT_LEN, INTERCEPT_AFTER)
    assert_all_free(e)


def test_abort_everything(env):
    """finish_requests(None): a paused request whose save is unreported, and a resumed
    request and a new one, both running with tokens in flight, all at once."""
    from vllm.v1.request import RequestStatus

    e = env("swap")
    s = e.scheduler
    first = pause_with_token_in_flight(e, "r1")
    settle(e, first)
    second = pause_with_token_in_flight(e, "r2", prompt=list(range(200, 200 + PROMPT_LEN)))
    e.runner.schedule()  # r2's save is queued
    finish_stale_step(e, second)
    assert s.intercepts["r2"].saving
    resumed = resume_request("q", first, max_tokens=32)
    s.add_request(resumed)
    s.add_request(make_request("w", list(range(300, 310)), max_tokens=8))
    assert set(e.runner.schedule().num_scheduled_tokens) == {"q", "w"}
    e.runner.finish()  # the step of r2's save, unreported
    e.runner.schedule()
    assert len(e.runner.queue) == 2 and resumed.num_in_flight_tokens > 0
    aborted = s.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in aborted} == {"r2", "q", "w"}
    assert not s.intercepts and set(s.requests) == {"r2"}  # held until its save is done
    e.runner.drain()  # reports the save
    assert list(second.output_token_ids) == outputs("r2", PROMPT_LEN, INTERCEPT_AFTER)
    assert resumed.num_output_tokens == 0  # its outputs in flight were ignored
    assert_all_free(e)
