"""The API server's side of interception: routing intercepts to their engine.

An intercept id is minted for every segment before it runs (192 random
bits); if the segment pauses, that id names it. The intercept lives in the
engine core that ran it, with its KV cache: the scheduler keeps its session
record (what a resume needs: kind, model, defaults, token budget; sent with
the segment), its life (paused -> resuming while claimed -> resumed, or
cancelled / expired) and its timeout. An API server process keeps nothing,
so any of vLLM's API server processes (`--api-server-count`) serves any
intercept.

Under data parallelism each engine core holds its own intercepts. The public
intercept id then carries the engine's rank (`<key>.<rank>`), so a resume, a
state query or a cancel goes to that engine alone, and a router can read it
from the URL. An automatic resume (a follow-up that names no intercept) is
routed to the engine that holds its conversation: a chat follow-up by the ids
of the tool calls it answers, a completion by its prompt's tokens; every
engine is asked (`locate`), as no API server process can know another's
pauses. First turns are balanced by vLLM's own load balancing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from infercept.server.protocol import InterceptError

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 1.0


def new_intercept_id(instance: str | None = None) -> str:
    """A fresh key: 192 random bits, after the instance's name if it has one
    (`icpt-<instance>.<random>`: `.` is in no random part, so a router can read
    the instance off a URL with a regular expression)."""
    return "icpt-" + (f"{instance}." if instance else "") + secrets.token_urlsafe(24)


@dataclass
class Claimed:
    """A paused intercept taken for a resume or a cancel."""

    intercept_id: str  # public: names the engine under data parallelism
    key: str  # the engine's
    rank: int
    session: dict[str, Any]
    token_ids: list[int]
    generated_tokens: int

    @property
    def kind(self) -> str:
        return self.session.get("kind", "completion")


class InterceptService:
    """The engine-core calls, each sent to the engine that owns the intercept."""

    def __init__(self, engine_client, timeout_s: float, affinity: bool = True,
                 instance: str | None = None):
        self.engine = engine_client
        self.timeout_s = timeout_s
        self.affinity = affinity  # automatic resumes located on their engine
        self.instance = instance  # this server's name among several behind a router
        core = engine_client.engine_core
        # The data-parallel ranks this API server's engine client reaches, in
        # the order vLLM's `X-data-parallel-rank` indexes them.
        self.ranks: list[int] = list(getattr(core, "engine_ranks_managed", None) or [0])
        self.data_parallel = engine_client.vllm_config.parallel_config.data_parallel_size > 1
        self.stats: dict[str, Any] = {}  # all engines together
        self.stats_by_rank: dict[int, dict[str, Any]] = {}
        self.publisher = None  # a metrics.StatsPublisher in the API server that publishes
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Future] = set()
        # The function calls of the last responses (Responses API) this process served,
        # by response id, for follow-ups by `previous_response_id`.
        self._response_calls: OrderedDict[str, list[dict]] = OrderedDict()

    # ---- Responses API follow-ups --------------------------------------------

    MAX_REMEMBERED_RESPONSES = 4096

    def remember_calls(self, response_id: str | None, calls: list[dict]) -> None:
        if not response_id or not calls:
            return
        self._response_calls[response_id] = calls
        while len(self._response_calls) > self.MAX_REMEMBERED_RESPONSES:
            self._response_calls.popitem(last=False)

    def calls_of(self, response_id: str) -> list[dict]:
        """The function calls a response this process served ended with ([]: none known)."""
        return self._response_calls.get(response_id, [])

    # ---- ids and engines ---------------------------------------------------

    def new_key(self) -> str:
        return new_intercept_id(self.instance)

    def public_id(self, key: str, rank: int) -> str:
        return f"{key}.{rank}" if self.data_parallel else key

    def parse_id(self, intercept_id: str) -> tuple[str, int]:
        """(the engine's key, the engine's rank) of a public intercept id."""
        if not self.data_parallel:
            return intercept_id, self.ranks[0]
        key, dot, rank = intercept_id.rpartition(".")
        if not dot or not rank.isdigit():
            raise InterceptError(HTTPStatus.NOT_FOUND, f"no intercept {intercept_id!r}", "intercept_id")
        if int(rank) not in self.ranks:
            raise InterceptError(HTTPStatus.NOT_FOUND,
                                 f"no intercept {intercept_id!r} here: it names engine {int(rank)}, "
                                 f"this server reaches engines {self.ranks}", "intercept_id")
        return key, int(rank)

    def engine_index(self, rank: int) -> int:
        """The value of vLLM's `X-data-parallel-rank` header that reaches `rank`."""
        return self.ranks.index(rank)

    async def call(self, method: str, *args, rank: int | None = None):
        """`EngineCore.infercept(method, args)` on one engine (the first by default)."""
        rank = self.ranks[0] if rank is None else rank
        return await self.engine.engine_core._call_utility_async(
            "infercept", method, list(args), engine=rank.to_bytes(2, "little"))

    async def call_all(self, method: str, *args) -> dict[int, Any]:
        """The call on every engine this server reaches, by rank."""
        if len(self.ranks) == 1:
            return {self.ranks[0]: await self.call(method, *args)}
        results = await self.engine.engine_core.call_utility_all_async("infercept", method, list(args))
        return dict(zip(self.ranks, results))

    async def admission(self, key: str, resumed_as: str = "resumed") -> tuple[int, dict[str, Any]]:
        """(the rank of the engine that ran the segment of `key`, how it was
        admitted); what it resumed ends `resumed_as`."""
        for rank, admission in (await self.call_all("admission", key, resumed_as)).items():
            if admission is not None:
                return rank, admission
        return self.ranks[0], {"resumed_from": None, "reused_tokens": 0}

    # ---- intercepts ----------------------------------------------------------

    async def claim(self, intercept_id: str) -> Claimed:
        """Take a paused intercept for a resume; 404 unknown, 409 not paused."""
        key, rank = self.parse_id(intercept_id)
        claimed = await self.call("claim", key, rank=rank)
        if claimed is None:
            raise InterceptError(HTTPStatus.NOT_FOUND, f"no intercept {intercept_id!r}", "intercept_id")
        if claimed["state"] != "paused":
            raise InterceptError(HTTPStatus.CONFLICT,
                                 f"intercept {intercept_id!r} is {claimed['state']}", "intercept_id")
        return Claimed(intercept_id, key, rank, claimed["session"], claimed["token_ids"],
                       claimed["generated_tokens"])

    async def release(self, claimed: Claimed) -> None:
        """A resume failed before reaching the engine: the intercept stays resumable."""
        await self._quietly("release", claimed.key, rank=claimed.rank)

    async def cancel(self, key: str, rank: int, ended_as: str | None = "cancelled") -> None:
        await self._quietly("cancel", key, ended_as, rank=rank)

    async def _quietly(self, method: str, *args, rank: int) -> None:
        try:
            await self.call(method, *args, rank=rank)
        except Exception:  # the engine is shutting down: nothing left to free
            logger.exception("InferCept: %s %s", method, args)

    async def state(self, intercept_id: str) -> dict[str, Any]:
        key, rank = self.parse_id(intercept_id)
        state = await self.call("state", key, rank=rank)
        if state is None:
            raise InterceptError(HTTPStatus.NOT_FOUND, f"no intercept {intercept_id!r}", "intercept_id")
        return {
            "id": intercept_id,
            "object": "intercept",
            "state": state["state"],
            "context_tokens": state["context_tokens"],
            "generated_tokens": state["generated_tokens"],
            "tool": state["tool"],
            "age_s": round(state["age_s"], 6),
            "history": state["history"],
        }

    async def locate(self, call_ids: list[str] | None, prompt_token_ids: list[int] | None) -> int | None:
        """The rank of the engine holding the paused request a follow-up continues."""
        if not self.data_parallel or not (call_ids or prompt_token_ids):
            return None
        found = await self.call_all("locate", call_ids, prompt_token_ids)
        return next((rank for rank, key in found.items() if key is not None), None)

    # ---- background ----------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._expire_loop()), loop.create_task(self._stats_loop())]

    def track(self, task: asyncio.Future) -> None:
        """Keep a background task referenced until it is done (asyncio holds only weak ones)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _expire_loop(self) -> None:
        """The engines expire their pauses as they step; an idle engine does not
        step, so it is asked too."""
        period_s = max(0.05, min(1.0, self.timeout_s / 4))
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.call_all("expire")
            except Exception:
                logger.debug("InferCept expiry unavailable", exc_info=True)

    async def _stats_loop(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except Exception:
                logger.debug("InferCept stats unavailable", exc_info=True)
            await asyncio.sleep(STATS_PERIOD_S)

    async def refresh_stats(self) -> dict[str, Any]:
        self.stats_by_rank = await self.call_all("stats")
        self.stats = merge_stats(self.stats_by_rank.values())
        if self.publisher is not None:
            self.publisher.publish(self.stats_by_rank)
        return self.stats


# The engine counters that add up over engines; the rest (the policy, the
# cost model) is every engine's own and reported as the first engine has it.
_ADDED = ("interceptions", "resumes", "idle_device_tokens", "tokens_reused", "forwarded_tokens",
          "recomputed_tokens", "preemptions", "expired", "bytes_swapped_out", "bytes_swapped_in",
          "free_cpu_blocks")
_ADDED_BY_NAME = ("decisions", "intercepted_by_state")


def merge_stats(snapshots) -> dict[str, Any]:
    """Several engines' stats snapshots as one, for the whole server."""
    snapshots = list(snapshots)
    if not snapshots:
        return {}
    total = dict(snapshots[0])
    for name in _ADDED:
        total[name] = sum(s.get(name, 0) for s in snapshots)
    for name in _ADDED_BY_NAME:
        merged: dict[str, int] = {}
        for snapshot in snapshots:
            for label, count in snapshot.get(name, {}).items():
                merged[label] = merged.get(label, 0) + count
        total[name] = merged
    return total
