"""Inputs and outputs of the KV-cache policies.

The engine describes each intercepted request (``Intercepted``) and the running batch
(``BatchState``); a policy answers with one ``Decision`` per request, gathered in a ``Plan``.
What the engine does for each action:

==================  ===========  ===================================================
action              valid from   engine work
==================  ===========  ===================================================
PRESERVE            DEVICE       nothing: the KV stays in device blocks
SWAP_OUT            DEVICE       copy device -> CPU, then free the device blocks
DISCARD             DEVICE, CPU  free the blocks where they are (recompute at resume)
SWAP_IN             CPU          copy CPU -> device ahead of the resume, free CPU
KEEP_SWAPPED        CPU          nothing: the KV stays on CPU
KEEP_DISCARDED      NONE         nothing: the request holds no KV
==================  ===========  ===================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Location(Enum):
    """Where an intercepted request's KV cache lives now."""

    DEVICE = "preserved"
    CPU = "swapped"
    NONE = "discarded"


class Action(Enum):
    """What to do with an intercepted request's KV cache in this iteration."""

    PRESERVE = "preserve"
    SWAP_OUT = "swap_out"
    DISCARD = "discard"
    SWAP_IN = "swap_in"
    KEEP_SWAPPED = "keep_swapped"
    KEEP_DISCARDED = "keep_discarded"


VALID_ACTIONS: dict[Location, frozenset[Action]] = {
    Location.DEVICE: frozenset({Action.PRESERVE, Action.SWAP_OUT, Action.DISCARD}),
    Location.CPU: frozenset({Action.KEEP_SWAPPED, Action.SWAP_IN, Action.DISCARD}),
    Location.NONE: frozenset({Action.KEEP_DISCARDED}),
}

_LOCATION_AFTER: dict[Action, Location] = {
    Action.PRESERVE: Location.DEVICE,
    Action.SWAP_OUT: Location.CPU,
    Action.DISCARD: Location.NONE,
    Action.SWAP_IN: Location.DEVICE,
    Action.KEEP_SWAPPED: Location.CPU,
    Action.KEEP_DISCARDED: Location.NONE,
}


def location_after(location: Location, action: Action) -> Location:
    """Where the KV cache is once ``action`` is carried out; ValueError if it is invalid."""
    if action not in VALID_ACTIONS[location]:
        raise ValueError(f"{action.name} is not valid for a request on {location.name}")
    return _LOCATION_AFTER[action]


def _check_non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value!r}")


def _check_finite(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{owner}.{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class Intercepted:
    """One request paused on an interception, as the engine sees it this iteration.

    ``remaining_s`` is the estimator's expected remaining interception time.
    ``arrival_s`` is the request's first arrival; with ``request_id`` it breaks ties.
    ``ttl_s`` is only read by the "ttl" policy (None: no time-to-live known yet).
    ``shared_tokens`` are the first of its ``context_tokens`` whose blocks other requests
    hold too (a common system prompt, through the prefix cache): they stay resident
    whatever is done with this request, so every figure of memory (what preserve keeps
    idle, what swap or discard frees, what a swap copies or a recompute forwards) counts
    only ``own_tokens``.
    """

    request_id: str
    context_tokens: int
    location: Location
    elapsed_s: float
    remaining_s: float
    arrival_s: float
    ttl_s: float | None = None
    shared_tokens: int = 0

    def __post_init__(self) -> None:
        _check_non_negative("Intercepted", context_tokens=self.context_tokens,
                            elapsed_s=self.elapsed_s, remaining_s=self.remaining_s,
                            shared_tokens=self.shared_tokens)
        _check_finite("Intercepted", elapsed_s=self.elapsed_s, remaining_s=self.remaining_s,
                      arrival_s=self.arrival_s)
        if self.ttl_s is not None:
            _check_non_negative("Intercepted", ttl_s=self.ttl_s)
        if self.shared_tokens > self.context_tokens:
            raise ValueError(f"Intercepted.shared_tokens ({self.shared_tokens}) exceeds "
                             f"context_tokens ({self.context_tokens})")

    @property
    def own_tokens(self) -> int:
        """Tokens in blocks only this request holds: the memory its KV costs."""
        return self.context_tokens - self.shared_tokens

    @property
    def order_key(self) -> tuple[float, str]:
        """FCFS order by first arrival, then request id: the tie-break of every policy."""
        return (self.arrival_s, self.request_id)


@dataclass(frozen=True)
class BatchState:
    """The running batch in this iteration.

    running_context_tokens: context held on the device by running (not intercepted) requests.
    batch_tokens: tokens forwarded in this iteration.
    free_device_tokens / free_cpu_tokens: unallocated KV capacity.
    device_tokens_needed: device tokens that waiting or running requests need now beyond
        ``free_device_tokens``; a policy frees at least that much from preserved requests
        when it can.
    """

    running_context_tokens: int
    batch_tokens: int
    free_device_tokens: int
    free_cpu_tokens: int
    device_tokens_needed: int = 0

    def __post_init__(self) -> None:
        _check_non_negative("BatchState", running_context_tokens=self.running_context_tokens,
                            batch_tokens=self.batch_tokens,
                            free_device_tokens=self.free_device_tokens,
                            free_cpu_tokens=self.free_cpu_tokens,
                            device_tokens_needed=self.device_tokens_needed)


@dataclass(frozen=True)
class Decision:
    """A policy's choice for one request, with the wastes it weighed (token*seconds).

    waste_discard is the chunked-recompute waste (WasteChunkD); waste_swap is 0 when the
    transfer hides under the iteration's forward pass. ``location`` is where the KV was
    before the action; ``own_tokens`` what the action moves or frees (``Intercepted``).
    """

    request_id: str
    action: Action
    waste_preserve: float
    waste_discard: float
    waste_swap: float
    reason: str
    location: Location
    context_tokens: int
    own_tokens: int

    def __post_init__(self) -> None:
        location_after(self.location, self.action)


@dataclass(frozen=True)
class Plan:
    """One decision per intercepted request, in FCFS order (arrival, then request id)."""

    decisions: tuple[Decision, ...]

    def __post_init__(self) -> None:
        ids = [d.request_id for d in self.decisions]
        if len(set(ids)) != len(ids):
            raise ValueError("a Plan holds one decision per request id")

    def by_action(self, action: Action) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action is action)

    def action_of(self, request_id: str) -> Action:
        for decision in self.decisions:
            if decision.request_id == request_id:
                return decision.action
        raise KeyError(request_id)

    def tokens(self, action: Action) -> int:
        """Own tokens (``Intercepted.own_tokens``) of the requests given ``action``."""
        return sum(d.own_tokens for d in self.decisions if d.action is action)

    @property
    def swap_out_tokens(self) -> int:
        return self.tokens(Action.SWAP_OUT)

    @property
    def swap_in_tokens(self) -> int:
        return self.tokens(Action.SWAP_IN)

    @property
    def swap_tokens(self) -> int:
        """Tokens moved between device and CPU in this iteration, both directions."""
        return self.swap_out_tokens + self.swap_in_tokens

    @property
    def freed_device_tokens(self) -> int:
        """Device tokens released by SWAP_OUT and DISCARD of device-resident requests."""
        return sum(d.own_tokens for d in self.decisions
                   if d.location is Location.DEVICE and d.action is not Action.PRESERVE)

    @property
    def freed_cpu_tokens(self) -> int:
        """CPU tokens released at once by DISCARD of swapped requests (a SWAP_IN releases
        its CPU copy only after the transfer, so policies do not reuse it this iteration)."""
        return sum(d.own_tokens for d in self.decisions
                   if d.location is Location.CPU and d.action is Action.DISCARD)
