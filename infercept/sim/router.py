"""Routers that place requests on engine replicas.

A router sees every arrival: a session's first segment, and each follow-up after a tool
call (the InferCept resume, or stock vLLM's new request with the whole history). Only a
follow-up that lands where the session's KV is can reuse it; elsewhere its whole context
is prefilled again and the first replica's copy is freed.

- ``affinity``: follow-ups go back to the session's replica (as a router does that reads
  the intercept id or a session header, or hashes the conversation prefix); first
  segments go to the least-loaded replica.
- ``round-robin``: every arrival to the next replica in turn.
- ``least-loaded``: every arrival to the replica with the fewest running and queued
  requests (ties: the lowest index).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from infercept.sim.engine import Engine
from infercept.sim.state import Session


class Router(Protocol):
    name: str

    def route(self, session: Session, engines: Sequence[Engine], follow_up: bool) -> int: ...


def least_loaded(engines: Sequence[Engine]) -> int:
    return min(range(len(engines)), key=lambda i: (engines[i].num_active, i))


class SessionAffinityRouter:
    name = "affinity"

    def route(self, session: Session, engines: Sequence[Engine], follow_up: bool) -> int:
        if follow_up and session.replica is not None:
            return session.replica
        return least_loaded(engines)


class RoundRobinRouter:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, session: Session, engines: Sequence[Engine], follow_up: bool) -> int:
        index = self._next % len(engines)
        self._next += 1
        return index


class LeastLoadedRouter:
    name = "least-loaded"

    def route(self, session: Session, engines: Sequence[Engine], follow_up: bool) -> int:
        return least_loaded(engines)


ROUTERS = {router.name: router for router in
           (SessionAffinityRouter, RoundRobinRouter, LeastLoadedRouter)}


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}") from None
