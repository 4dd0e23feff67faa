"""A state-machine property test of the engine: random sessions, for every policy.

Hypothesis draws sequences of: start a session (intercepted by a scripted
token count or a text trigger), step the engine, resume a paused session
(token ids or text, sometimes with a new `max_tokens`), abort (running,
paused wherever its KV is, or just resumed), cancel a pause through the
engine-core utility, let a pause time out, all in a device cache and a CPU
swap space far smaller than the live contexts (so vLLM preempts, and the
policies swap and discard). After every rule the block accounting is
consistent; at the end of each example every session is driven to its end,
every segment equals stock vLLM's continuation of its full context, and all
device blocks and CPU swap space are free again.
"""

from __future__ import annotations

import functools
import random
import traceback
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from kv_accounting import assert_all_free, scheduler_of, total_device_blocks
from test_interception import BLOCK_BYTES, POLICIES
from vllm import SamplingParams

from infercept.adapter.interception import InterceptSpec
from infercept.entrypoints.sessions import SessionEngine, SessionState
from infercept.policy import Location

# 32 device blocks of 32 tokens, 12 CPU blocks: a few sessions fill them.
ENGINE = dict(kv_cache_bytes=32 * BLOCK_BYTES, swap_space_bytes=12 * BLOCK_BYTES, max_model_len=960)
MAX_LIVE_SESSIONS = 9
MAX_SESSION_TOKENS = 760  # below max_model_len: sessions end by max_tokens only
MAX_DRAIN_STEPS = 4000

# No shrinking: a failing example (at most 20 rules) is printed as found,
# without the minutes that replaying engine runs would take.
SETTINGS = settings(max_examples=8, stateful_step_count=20, deadline=None, derandomize=True,
                    database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck))

intercepts = st.one_of(
    st.none(),
    st.integers(1, 12).map(lambda n: InterceptSpec(intercept_after=n)),
    st.sampled_from(["e", "a", " ", "o"]).map(lambda t: InterceptSpec(triggers=(t,))),
)


def recorded(method):
    """Keep the first failure: a failing example leaves the live engine changed, so
    Hypothesis' replay of it may fail differently (reported as flaky)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.failures.append(traceback.format_exc())
            raise

    return wrapper


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 400) for _ in range(n)]


class EngineSessions(RuleBasedStateMachine):
    """Set per test: the live engine, the stock oracle, the policy, a coverage counter."""

    llm = stock = policy = None
    seen: Counter
    failures: list[str]

    @initialize(seed=st.integers(0, 1 << 16), num_sessions=st.integers(2, 5), spec=intercepts)
    @recorded
    def start_engine(self, seed, num_sessions, spec):
        self.engine = SessionEngine(self.llm.llm_engine)
        self.scheduler = scheduler_of(self.llm)
        # Rules have no preconditions and each example starts from an empty
        # prefix cache, so an example's draws replay the same whatever ran before.
        assert self.llm.reset_prefix_cache()
        self.core = self.llm.llm_engine.engine_core.engine_core
        self.ended: set[str] = set()  # aborted sessions: their last segment never came
        self.floor: dict[str, int] = {}  # tokens generated before the last resume
        # A burst of sessions to start with, whichever rules this example enables.
        rng = random.Random(seed)
        for _ in range(num_sessions):
            params = SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 40), ignore_eos=True)
            first = spec or InterceptSpec(intercept_after=rng.randint(1, 10))
            self.engine.start(_tokens(rng.random(), rng.randint(60, 300)), params, first)

    # ---- what the machine sees ------------------------------------------

    def _live(self, state: SessionState):
        return [s for s in self.engine.sessions.values() if s.state is state]

    def _pick(self, state: SessionState, pick: int):
        live = self._live(state)
        return live[pick % len(live)]

    def least_resumed_pick(self, round_: int) -> int:
        """The `pick` that resumes a pause in the place resumes have come from least (the
        round-th of those there, as `pick=round_` picks among all)."""
        live = self._live(SessionState.INTERCEPTED)
        if not live:
            return 0
        places = [self._where(s) for s in live]
        least = min(places, key=lambda w: (self.seen[f"resume from {w}"], w))
        candidates = [i for i, where in enumerate(places) if where == least]
        return candidates[round_ % len(candidates)]

    def _paused(self, session):
        """The scheduler's record of a paused session, if the engine still holds it."""
        return self.scheduler.intercepts.get(session.engine_request_id)

    def _where(self, session) -> str:
        if session.state is SessionState.RUNNING:
            request = self.scheduler.requests.get(session.engine_request_id)
            if request is not None and request in self.scheduler.running:
                return "running"
            return "resuming" if session.segments else "waiting"
        paused = self._paused(session)
        return paused.location.value if paused else "released"

    # ---- rules -----------------------------------------------------------

    @rule(seeds=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=3),
          prompt_tokens=st.integers(60, 300), spec=intercepts, max_tokens=st.integers(4, 40))
    @recorded
    def add(self, seeds, prompt_tokens, spec, max_tokens):
        """One to three sessions arrive at once, then the engine steps."""
        live = len(self._live(SessionState.RUNNING)) + len(self._live(SessionState.INTERCEPTED))
        seeds = seeds[: max(0, MAX_LIVE_SESSIONS - live)]
        for k, seed in enumerate(seeds):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens + k, ignore_eos=True)
            self.engine.start(_tokens(seed, prompt_tokens - 20 * k), params, spec)
        self.engine.step()

    @rule(steps=st.integers(1, 6))
    @recorded
    def step(self, steps):
        for _ in range(steps):
            self.engine.step()

    @rule(pick=st.integers(0, 99), seed=st.integers(0, 1 << 16), kind=st.sampled_from(["tokens", "text"]),
          result_tokens=st.integers(0, 24), spec=intercepts,
          max_tokens=st.one_of(st.none(), st.integers(1, 48)))
    @recorded
    def resume(self, pick, seed, kind, result_tokens, spec, max_tokens):
        if not self._live(SessionState.INTERCEPTED):
            return
        session = self._pick(SessionState.INTERCEPTED, pick)
        if len(session.token_ids) + result_tokens + 48 > MAX_SESSION_TOKENS:
            result_tokens = 0
        self.seen[f"resume from {self._where(session)}"] += 1
        self.floor[session.session_id] = session.num_generated
        if kind == "text":
            text = "".join(random.Random(seed).choice("0123456789 =+-abcxyz") for _ in range(result_tokens))
            self.engine.resume(session, text=text, spec=spec, max_tokens=max_tokens)
        else:
            self.engine.resume(session, token_ids=_tokens(seed, result_tokens), spec=spec,
                               max_tokens=max_tokens)

    @rule(kind=st.sampled_from(["abort", "cancel", "time out"]), pick=st.integers(0, 99))
    @recorded
    def interrupt(self, kind, pick):
        """A client or a tool gives up on a session: abort it, or cancel or time out its pause.

        The session is picked in the state (scheduled, waiting to be, or
        paused with its KV in a given place) least often hit by `kind` so far.
        """
        live = [s for s in self.engine.sessions.values() if s.state is not SessionState.FINISHED]
        if kind != "abort":
            live = [s for s in live if self._paused(s) is not None]
        if not live:
            return
        where = min({self._where(s) for s in live}, key=lambda w: (self.seen[f"{kind} {w}"], w))
        candidates = [s for s in live if self._where(s) == where]
        session = candidates[pick % len(candidates)]
        self.seen[f"{kind} {where}"] += 1
        if kind == "abort":
            self.engine.abort(session)
            self.ended.add(session.session_id)
        elif kind == "cancel":
            self._cancel(session)
        else:
            self._time_out(session)

    def _cancel(self, session):
        """A front-end cancels the pause; a later resume of the session recomputes it."""
        held = self._paused(session) is not None
        assert self.core.infercept("cancel", [session.engine_request_id]) is held
        assert self._paused(session) is None

    def _time_out(self, session):
        """The tool outlives the intercept timeout: the engine releases the pause itself."""
        paused = self._paused(session)
        paused.paused_at_s -= self.scheduler.intercept_config.intercept_timeout_s + 1
        expired = self.scheduler.policy_driver.stats.expired
        self.engine.step()
        assert self._paused(session) is None
        assert self.scheduler.policy_driver.stats.expired == expired + 1

    # ---- after every rule --------------------------------------------------

    @invariant()
    @recorded
    def blocks_are_accounted_for(self):
        s = self.scheduler
        if not hasattr(self, "engine"):
            return
        [manager] = s.kv_cache_manager.coordinator.single_type_managers
        held = {id(b) for blocks in manager.req_to_blocks.values() for b in blocks if not b.is_null}
        free = s.kv_cache_manager.block_pool.get_num_free_blocks()
        assert len(held) + free == total_device_blocks(self.llm), "device blocks leaked or double-held"
        for paused in s.intercepts.values():
            holds = len(manager.req_to_blocks.get(paused.request_id, ()))
            if paused.location is Location.DEVICE or paused.saving:  # a save still reads them
                assert holds * s.block_size >= paused.request.num_computed_tokens
            else:
                assert holds == 0 and paused.request.num_computed_tokens == 0
            assert (paused.location is Location.CPU) == s.policy_driver.swap.holds(paused.request_id)
        swap = s.policy_driver.swap
        on_cpu = sum(len(kv.cpu_block_ids) for kv in swap._swapped.values())
        assert swap.allocator.num_free_blocks + on_cpu + swap.num_pending_free_blocks() == swap.allocator.num_blocks

    # ---- end of an example -------------------------------------------------

    @recorded
    def teardown(self):
        if not hasattr(self, "engine"):
            return
        try:
            self._finish_all()
            self._check_tokens()
            assert_all_free(self.llm)
        finally:
            for session in self.engine.sessions.values():
                self.engine.abort(session)

    def _finish_all(self):
        for _ in range(MAX_DRAIN_STEPS):
            for session in self._live(SessionState.INTERCEPTED):
                self.floor[session.session_id] = session.num_generated
                self.engine.resume(session, token_ids=[3, 4])
            if not self.engine.has_unfinished():
                return
            self.engine.step()
        raise AssertionError(f"sessions never finished: {self._live(SessionState.RUNNING)}")

    def _check_tokens(self):
        cases = []
        for session in self.engine.sessions.values():
            if session.session_id not in self.ended:
                floor = self.floor.get(session.session_id, 0)
                assert session.num_generated == max(session.max_tokens, floor), session.session_id
            pos = len(session.prompt_token_ids)
            for k, tokens in enumerate(session.segments):
                if tokens:
                    cases.append((session.token_ids[:pos], tokens))
                pos += len(tokens) + (len(session.appended[k]) if k < len(session.appended) else 0)
        expected = self.stock.generate([c for c, _ in cases], [len(t) for _, t in cases]) if cases else []
        for (context, got), want in zip(cases, expected):
            assert got == want, f"context of {len(context)} tokens: got {got}, stock vLLM gives {want}"
        self.seen["segments compared"] += len(cases)


def walk_every_state(machine) -> None:
    """A fixed walk through the machine's rules that reaches every state a policy leaves a
    session in: Hypothesis' draws, derandomized or not, change with what ran before
    in the process, so the coverage the test asserts must not rest on them alone.
    Each round steps, resumes a pause where resumes have come from least (not yet
    scheduled when it is interrupted), then aborts, cancels and times out a session in
    the state least hit so far."""
    walk = machine()
    walk.start_engine(seed=7, num_sessions=5, spec=None)
    try:
        for round_ in range(12):
            walk.step(3)
            walk.resume(pick=walk.least_resumed_pick(round_), seed=round_, kind="tokens",
                        result_tokens=8, spec=InterceptSpec(intercept_after=4), max_tokens=None)
            for kind in ("abort", "cancel", "time out"):
                walk.interrupt(kind, round_)
                walk.blocks_are_accounted_for()
            walk.add(seeds=[round_], prompt_tokens=220, spec=None, max_tokens=30)
            walk.blocks_are_accounted_for()
    finally:
        walk.teardown()


@pytest.mark.parametrize("policy", POLICIES)
def test_random_sessions_match_stock_and_free_everything(intercept_llm, stock, policy):
    llm = intercept_llm(policy, **ENGINE)
    stats = scheduler_of(llm).policy_driver.stats
    preemptions, decisions = stats.preemptions, Counter(stats.decisions)
    seen, failures = Counter(), []
    machine = type("Machine", (EngineSessions,),
                   dict(llm=llm, stock=stock, policy=policy, seen=seen, failures=failures))
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)
        walk_every_state(machine)
    except Exception as exc:
        if failures:
            raise AssertionError(f"first failure:\n{failures[0]}") from exc
        raise
    decisions = Counter(stats.decisions) - decisions
    print(policy, dict(seen), dict(decisions), "preemptions", stats.preemptions - preemptions)
    # The examples reached what they are meant to: memory pressure, and
    # aborts and resumes in the states each policy leaves a pause in.
    assert stats.preemptions > preemptions, seen
    assert seen["segments compared"] > 0 and seen["abort running"] and seen["abort resuming"], seen
    where = {"preserve": "preserved", "swap": "swapped", "discard": "discarded"}.get(policy)
    if where:
        assert seen[f"resume from {where}"], seen
        assert seen[f"abort {where}"] + seen[f"cancel {where}"] + seen[f"time out {where}"], seen
    if policy == "swap":
        assert decisions["swap_out"] and decisions["discard"], decisions
