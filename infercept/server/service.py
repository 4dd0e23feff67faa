"""The API server's side of interception: a registry of intercepts, and the engine calls.

An intercept id is minted for every segment before it runs (128+ random
bits); if the segment pauses, that id names it. The engine core keeps the KV
cache (preserved, swapped or discarded as its policy decides); this registry
keeps what a resume needs (the whole token sequence, the token budget, the
request's defaults) and the intercept's life: paused -> resuming -> resumed,
or cancelled / expired.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from infercept.server.protocol import InterceptError

logger = logging.getLogger(__name__)

PAUSED, RESUMING, RESUMED, CANCELLED, EXPIRED = "paused", "resuming", "resumed", "cancelled", "expired"
MAX_FINISHED_ENTRIES = 10_000


def new_intercept_id() -> str:
    return "icpt-" + secrets.token_urlsafe(24)  # 192 random bits


@dataclass
class Intercept:
    intercept_id: str
    kind: str  # "completion" or "chat"
    model: str
    token_ids: list[int]
    generated_tokens: int  # the model's own tokens, all segments so far
    max_tokens: int | None  # total budget of the model's own tokens
    defaults: dict[str, Any]  # the request's sampling fields, for a resume
    extension: dict[str, Any]  # the request's "infercept" object
    created_s: float = field(default_factory=time.monotonic)
    state: str = PAUSED

    @property
    def tool(self) -> str | None:
        return self.extension.get("tool")


class InterceptRegistry:
    def __init__(self):
        self._live: dict[str, Intercept] = {}
        self._finished: OrderedDict[str, Intercept] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, intercept: Intercept) -> None:
        self._live[intercept.intercept_id] = intercept

    def get(self, intercept_id: str) -> Intercept:
        intercept = self._live.get(intercept_id) or self._finished.get(intercept_id)
        if intercept is None:
            raise InterceptError(HTTPStatus.NOT_FOUND, f"no intercept {intercept_id!r}", "intercept_id")
        return intercept

    def claim(self, intercept_id: str) -> Intercept:
        """Take a paused intercept for a resume; 404 unknown, 409 not paused."""
        intercept = self.get(intercept_id)
        if intercept.state != PAUSED:
            raise InterceptError(HTTPStatus.CONFLICT,
                                 f"intercept {intercept_id!r} is {intercept.state}", "intercept_id")
        intercept.state = RESUMING
        return intercept

    def release(self, intercept: Intercept) -> None:
        """A resume failed before reaching the engine: the intercept stays resumable."""
        if intercept.state == RESUMING:
            intercept.state = PAUSED

    def finish(self, intercept_id: str, state: str) -> Intercept | None:
        intercept = self._live.pop(intercept_id, None)
        if intercept is not None:
            intercept.state = state
            self._finished[intercept_id] = intercept
            while len(self._finished) > MAX_FINISHED_ENTRIES:
                self._finished.popitem(last=False)
        return intercept

    def expired(self, timeout_s: float, now_s: float) -> list[Intercept]:
        return [i for i in self._live.values()
                if i.state == PAUSED and now_s - i.created_s > timeout_s]

    def live(self) -> list[Intercept]:
        return list(self._live.values())


class InterceptService:
    """Registry plus the engine-core calls (through vLLM's utility channel)."""

    def __init__(self, engine_client, timeout_s: float):
        self.engine = engine_client
        self.timeout_s = timeout_s
        self.registry = InterceptRegistry()
        self.stats: dict[str, Any] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Future] = set()

    async def call(self, method: str, *args):
        return await self.engine.engine_core.call_utility_async("infercept", method, *args)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._expire_loop()), loop.create_task(self._stats_loop())]

    def track(self, task: asyncio.Future) -> None:
        """Keep a background task referenced until it is done (asyncio holds only weak ones)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cancel(self, intercept: Intercept, state: str = CANCELLED) -> None:
        self.registry.finish(intercept.intercept_id, state)
        try:
            await self.call("cancel", intercept.intercept_id)
        except Exception:  # the engine is shutting down: nothing left to free
            logger.exception("cancelling intercept %s", intercept.intercept_id)

    async def state(self, intercept: Intercept) -> dict[str, Any]:
        core = await self.call("state", intercept.intercept_id) if intercept.state == PAUSED else None
        return {
            "id": intercept.intercept_id,
            "object": "intercept",
            "state": core["state"] if core else intercept.state,
            "context_tokens": len(intercept.token_ids),
            "generated_tokens": intercept.generated_tokens,
            "tool": intercept.tool,
            "age_s": round(time.monotonic() - intercept.created_s, 6),
            "history": core["history"] if core else [],
        }

    async def _expire_loop(self) -> None:
        period_s = max(0.05, min(1.0, self.timeout_s / 4))
        while True:
            await asyncio.sleep(period_s)
            for intercept in self.registry.expired(self.timeout_s, time.monotonic()):
                logger.info("intercept %s expired after %.1f s", intercept.intercept_id, self.timeout_s)
                await self.cancel(intercept, EXPIRED)

    async def _stats_loop(self) -> None:
        while True:
            try:
                self.stats = await self.call("stats")
            except Exception:
                logger.debug("InferCept stats unavailable", exc_info=True)
            await asyncio.sleep(1.0)

    async def refresh_stats(self) -> dict[str, Any]:
        self.stats = await self.call("stats")
        return self.stats
