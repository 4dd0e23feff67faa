"""KV-cache policies for intercepted requests: the paper's min-waste and its baselines.

The engine calls ``policy.plan(intercepted, batch, cost)`` every scheduler iteration and
carries out the returned ``Plan`` (one ``Decision`` per request; see ``types`` for what
each action asks of the engine). Every policy is deterministic and independent of the
input order: ties go to the earlier first arrival, then the smaller request id. A plan
costs O(n log n) in the number of intercepted requests.

Shared rules:
- A swap-in only uses device tokens free at the start of the iteration, and a swap-out
  only CPU tokens free at the start or released by discarding swapped requests; space
  released by a transfer is reused from the next iteration on.
- Memory pressure (``batch.device_tokens_needed > 0``): preserved requests are evicted
  until that many device tokens are freed, or none is left to evict.
- Memory, transfers and recomputation are counted in each request's own tokens
  (``Intercepted.own_tokens``): a prefix it shares with other requests stays resident.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from infercept.policy.cost_model import CostModel
from infercept.policy.types import Action, BatchState, Decision, Intercepted, Location, Plan
from infercept.policy.waste import (recompute_chunk_tokens, waste_chunked_discard,
                                    waste_preserve, waste_swap)

EVICTED = "evicted under memory pressure"


class Policy(Protocol):
    name: str

    def plan(self, intercepted: Sequence[Intercepted], batch: BatchState,
             cost: CostModel) -> Plan: ...


@dataclass(frozen=True)
class _Assessed:
    """A request with its wastes (token*s); waste_swap is the unhidden swap waste."""

    request: Intercepted
    waste_preserve: float
    waste_discard: float
    waste_swap: float

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def own_tokens(self) -> int:
        """The memory it holds, frees or moves (shared prefix blocks excluded)."""
        return self.request.own_tokens

    @property
    def location(self) -> Location:
        return self.request.location

    @property
    def min_waste(self) -> float:
        return min(self.waste_preserve, self.waste_discard)


@dataclass
class _Room:
    """What is left to spend in this iteration, in tokens."""

    swap_tokens: int
    cpu_tokens: int
    device_tokens: int

    def hide_swap(self, tokens: int) -> bool:
        """Spend swap budget on a transfer if it fits; True when it is hidden."""
        if tokens > self.swap_tokens:
            return False
        self.swap_tokens -= tokens
        return True


# request_id -> (action, reason, transfer hidden under the forward pass)
_Choices = dict[str, tuple[Action, str, bool]]


def _assess(intercepted: Sequence[Intercepted], batch: BatchState,
            cost: CostModel) -> list[_Assessed]:
    """Wastes of every request, in FCFS order; C_other = C_batch = running context."""
    ids = {r.request_id for r in intercepted}
    if len(ids) != len(intercepted):
        raise ValueError("intercepted requests must have distinct request ids")
    chunk_tokens = recompute_chunk_tokens(cost, batch.batch_tokens)
    others = batch.running_context_tokens
    return [_Assessed(request=r,
                      waste_preserve=waste_preserve(r.own_tokens, r.remaining_s),
                      waste_discard=waste_chunked_discard(cost, r.own_tokens, others,
                                                          chunk_tokens),
                      waste_swap=waste_swap(cost, r.own_tokens, others))
            for r in sorted(intercepted, key=lambda r: r.order_key)]


def _room(batch: BatchState, cost: CostModel) -> _Room:
    return _Room(swap_tokens=cost.swap_budget_tokens(batch.batch_tokens),
                 cpu_tokens=batch.free_cpu_tokens, device_tokens=batch.free_device_tokens)


def _build_plan(assessed: list[_Assessed], choices: _Choices) -> Plan:
    """Turn choices into a Plan; requests without a choice are left where they are."""
    left_alone = {Location.DEVICE: Action.PRESERVE, Location.CPU: Action.KEEP_SWAPPED,
                  Location.NONE: Action.KEEP_DISCARDED}
    decisions = []
    for a in assessed:
        action, reason, hidden = choices.get(a.request_id,
                                             (left_alone[a.location], "left as is", False))
        decisions.append(Decision(request_id=a.request_id, action=action,
                                  waste_preserve=a.waste_preserve,
                                  waste_discard=a.waste_discard,
                                  waste_swap=0.0 if hidden else a.waste_swap,
                                  reason=reason, location=a.location,
                                  context_tokens=a.request.context_tokens,
                                  own_tokens=a.own_tokens))
    return Plan(tuple(decisions))


def _freed_device_tokens(assessed: list[_Assessed], choices: _Choices) -> int:
    return sum(a.own_tokens for a in assessed
               if a.location is Location.DEVICE and a.request_id in choices
               and choices[a.request_id][0] is not Action.PRESERVE)


def _relieve_pressure(assessed: list[_Assessed], choices: _Choices, needed_tokens: int,
                      order: Callable[[_Assessed], tuple],
                      evict: Callable[[_Assessed], tuple[Action, bool]],
                      reverse: bool = False) -> None:
    """Evict preserved requests sorted by ``order`` (descending if ``reverse``) until
    ``needed_tokens`` device tokens are freed in this iteration; ``evict`` picks SWAP_OUT
    or DISCARD and says whether the transfer hides under the forward pass."""
    freed_tokens = _freed_device_tokens(assessed, choices)
    if freed_tokens >= needed_tokens:
        return
    preserved = [a for a in assessed if a.location is Location.DEVICE
                 and a.own_tokens > 0
                 and choices.get(a.request_id, (Action.PRESERVE,))[0] is Action.PRESERVE]
    for a in sorted(preserved, key=order, reverse=reverse):
        if freed_tokens >= needed_tokens:
            break
        action, hidden = evict(a)
        choices[a.request_id] = (action, EVICTED, hidden)
        freed_tokens += a.own_tokens


def _fcfs(a: _Assessed) -> tuple[float, str]:
    return a.request.order_key


class MinWastePolicy:
    """The paper's algorithm (DESIGN.md section 2, steps 1-3), revisited every iteration.

    1. Prefetch: a swapped request expected to resume within its swap-in time plus one
       iteration is swapped in (soonest first) while device space and the swap budget
       last; not under memory pressure.
    2. Device requests, largest min(WastePreserve, WasteChunkD) first, are swapped out
       while the budget lasts (first fit: a smaller one may use what a larger one could
       not). CPU space may be made by discarding swapped requests, cheapest WasteChunkD
       first, when their wastes sum to less than what the swap saves. A request that
       would qualify for prefetch is not swapped out (it would come straight back).
    3. Each remaining device request is preserved while nothing needs device memory
       (``batch.device_tokens_needed == 0``). Under pressure it is discarded if
       WasteChunkD < WastePreserve, else preserved. (The paper discards on the waste test
       alone, pressure or not: ``min-waste-paper``. WastePreserve prices memory that nobody
       is waiting for, and the recomputation that follows costs compute: in the simulator
       that variant sustained 1.30x vLLM's rate on GPT-J-6B against 1.68x for this one, in an
       earlier version of the simulator;
       docs/simulator.md.)
    4. Memory pressure: preserved requests are evicted, least extra waste per freed
       token (WasteChunkD - WastePreserve) / C first: swapped out if the budget and CPU
       space allow, else discarded.
    Swap-ins plus swap-outs never exceed ``cost.swap_budget_tokens(batch.batch_tokens)``.
    """

    name = "min-waste"
    discard_without_pressure = False

    def plan(self, intercepted: Sequence[Intercepted], batch: BatchState,
             cost: CostModel) -> Plan:
        assessed = _assess(intercepted, batch, cost)
        room = _room(batch, cost)
        iteration_s = cost.forward_s(batch.batch_tokens)
        choices: _Choices = {}
        pressure = batch.device_tokens_needed > 0
        if not pressure:
            self._prefetch(assessed, cost, iteration_s, room, choices)
        self._swap_out(assessed, cost, iteration_s, room, choices)
        for a in assessed:
            if a.location is Location.DEVICE and a.request_id not in choices:
                if not pressure and not self.discard_without_pressure:
                    choices[a.request_id] = (Action.PRESERVE, "no memory pressure: idle "
                                             "memory that no one needs costs nothing", False)
                    continue
                choices[a.request_id] = (
                    (Action.DISCARD, "chunked discard wastes less than preserve", False)
                    if a.waste_discard < a.waste_preserve else
                    (Action.PRESERVE, "preserve wastes no more than chunked discard", False))

        def evict(a: _Assessed) -> tuple[Action, bool]:
            if a.own_tokens <= room.cpu_tokens and room.hide_swap(a.own_tokens):
                room.cpu_tokens -= a.own_tokens
                return Action.SWAP_OUT, True
            return Action.DISCARD, False

        _relieve_pressure(assessed, choices, batch.device_tokens_needed, evict=evict,
                          order=lambda a: ((a.waste_discard - a.waste_preserve)
                                           / a.own_tokens, a.request.order_key))
        return _build_plan(assessed, choices)

    @staticmethod
    def _resumes_soon(a: _Assessed, cost: CostModel, iteration_s: float) -> bool:
        return a.request.remaining_s <= cost.swap_s(a.own_tokens) + iteration_s

    def _prefetch(self, assessed: list[_Assessed], cost: CostModel, iteration_s: float,
                  room: _Room, choices: _Choices) -> None:
        soon = [a for a in assessed if a.location is Location.CPU
                and self._resumes_soon(a, cost, iteration_s)]
        for a in sorted(soon, key=lambda a: (a.request.remaining_s, a.request.order_key)):
            if a.own_tokens <= room.device_tokens and room.hide_swap(a.own_tokens):
                room.device_tokens -= a.own_tokens
                choices[a.request_id] = (Action.SWAP_IN, "prefetch: resumes within its "
                                         "swap-in time", True)

    def _swap_out(self, assessed: list[_Assessed], cost: CostModel, iteration_s: float,
                  room: _Room, choices: _Choices) -> None:
        victims = sorted((a for a in assessed if a.location is Location.CPU
                          and a.request_id not in choices),
                         key=lambda a: (a.waste_discard, a.request.order_key))
        victim_tokens, victim_waste = [0], [0.0]
        for v in victims:
            victim_tokens.append(victim_tokens[-1] + v.own_tokens)
            victim_waste.append(victim_waste[-1] + v.waste_discard)
        next_victim = 0
        candidates = [a for a in assessed if a.location is Location.DEVICE
                      and not self._resumes_soon(a, cost, iteration_s)]
        for a in sorted(candidates, key=lambda a: (-a.min_waste, a.request.order_key)):
            if a.own_tokens > room.swap_tokens:
                continue
            if a.own_tokens > room.cpu_tokens:
                short_tokens = a.own_tokens - room.cpu_tokens
                end = bisect.bisect_left(victim_tokens,
                                         victim_tokens[next_victim] + short_tokens)
                if end == len(victim_tokens):
                    continue
                if victim_waste[end] - victim_waste[next_victim] >= a.min_waste:
                    continue
                for v in victims[next_victim:end]:
                    choices[v.request_id] = (Action.DISCARD, "CPU space for a costlier "
                                             "swap-out", False)
                room.cpu_tokens += victim_tokens[end] - victim_tokens[next_victim]
                next_victim = end
            room.hide_swap(a.own_tokens)
            room.cpu_tokens -= a.own_tokens
            choices[a.request_id] = (Action.SWAP_OUT, "swap hides under the forward pass",
                                     True)


class PreservePolicy:
    """Keep every intercepted request on the device. Under memory pressure evict the
    latest first arrivals first (reverse FCFS, as vLLM preempts its lowest-priority
    request): swap out if CPU space allows, else discard; the swap budget is ignored."""

    name = "preserve"

    def plan(self, intercepted: Sequence[Intercepted], batch: BatchState,
             cost: CostModel) -> Plan:
        assessed = _assess(intercepted, batch, cost)
        room = _room(batch, cost)
        choices: _Choices = {}

        def evict(a: _Assessed) -> tuple[Action, bool]:
            if a.own_tokens <= room.cpu_tokens:
                room.cpu_tokens -= a.own_tokens
                return Action.SWAP_OUT, room.hide_swap(a.own_tokens)
            return Action.DISCARD, False

        _relieve_pressure(assessed, choices, batch.device_tokens_needed,
                          order=_fcfs, evict=evict, reverse=True)
        return _build_plan(assessed, choices)


class DiscardPolicy:
    """Free every device-resident request at once (stock vLLM's behaviour)."""

    name = "discard"

    def plan(self, intercepted: Sequence[Intercepted], batch: BatchState,
             cost: CostModel) -> Plan:
        assessed = _assess(intercepted, batch, cost)
        choices: _Choices = {a.request_id: (Action.DISCARD, "discard policy", False)
                             for a in assessed if a.location is Location.DEVICE}
        return _build_plan(assessed, choices)


class SwapPolicy:
    """Swap out every device-resident request in FCFS order while CPU space lasts, else
    discard; swapped requests stay on CPU until the engine swaps them in at resume. The
    swap budget is ignored (transfers beyond it stall the batch)."""

    name = "swap"

    def plan(self, intercepted: Sequence[Intercepted], batch: BatchState,
             cost: CostModel) -> Plan:
        assessed = _assess(intercepted, batch, cost)
        room = _room(batch, cost)
        choices: _Choices = {}
        for a in assessed:
            if a.location is not Location.DEVICE:
                continue
            if a.own_tokens <= room.cpu_tokens:
                room.cpu_tokens -= a.own_tokens
                choices[a.request_id] = (Action.SWAP_OUT, "swap policy",
                                         room.hide_swap(a.own_tokens))
            else:
                choices[a.request_id] = (Action.DISCARD, "swap policy: CPU full", False)
        return _build_plan(assessed, choices)


class TTLPolicy:
    """Continuum-style baseline: preserve while ``elapsed_s < ttl_s`` (no TTL known:
    preserve), then discard. Under memory pressure discard the latest first arrivals
    first."""

    name = "ttl"

    def plan(self, intercepted: Sequence[Intercepted], batch: BatchState,
             cost: CostModel) -> Plan:
        assessed = _assess(intercepted, batch, cost)
        choices: _Choices = {}
        for a in assessed:
            ttl_s = a.request.ttl_s
            if a.location is Location.DEVICE and ttl_s is not None \
                    and a.request.elapsed_s >= ttl_s:
                choices[a.request_id] = (Action.DISCARD, "time-to-live expired", False)
        _relieve_pressure(assessed, choices, batch.device_tokens_needed,
                          order=_fcfs, evict=lambda a: (Action.DISCARD, False),
                          reverse=True)
        return _build_plan(assessed, choices)


class PaperMinWastePolicy(MinWastePolicy):
    """min-waste exactly as the paper states step 3: discard whenever WasteChunkD <
    WastePreserve, memory pressure or not. Kept to compare against (simulator only; the
    engine's policies are ``infercept.config.POLICIES``)."""

    name = "min-waste-paper"
    discard_without_pressure = True


_POLICIES: dict[str, type] = {policy.name: policy for policy in
                              (PreservePolicy, DiscardPolicy, SwapPolicy, MinWastePolicy,
                               PaperMinWastePolicy, TTLPolicy)}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def make_policy(name: str) -> Policy:
    """A policy by name: one of POLICY_NAMES."""
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {POLICY_NAMES}") from None
