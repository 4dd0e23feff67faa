"""Tools called inline by `infercept.LLM`: the `Augmentation` a model calls, finding a call
in generated text, and running calls off the engine thread with their errors and timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ErrorHandler = str | Callable[[BaseException], str]  # "skip", "raise", or exc -> text to append


@dataclass(frozen=True)
class Augmentation:
    """A tool the model calls inline: `start` ARGS `end`, answered by `call(ARGS)`.

    `call` takes the text between the markers and returns the text appended
    after `end` (tokenized on its own); it may be an `async def`. `on_error`
    says what a raising call appends: "skip" (nothing), "raise" (abort the
    whole batch and re-raise), or a function of the exception.

    A call that has not returned after `timeout_s` (None: the LLM's
    `intercept_timeout_s`, 600 s by default) fails with `ToolTimeoutError`,
    handled by `on_error` like any other error, so a hung tool cannot hold its
    request's KV cache forever. An `async def` call is cancelled then; a plain
    function cannot be stopped and keeps its worker thread until it returns.
    """

    name: str
    start: str
    end: str
    call: Callable[[str], Any]
    on_error: ErrorHandler = "skip"
    expected_duration_s: float | None = None  # a hint for the policy's duration estimate
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.start or not self.end or self.start == self.end:
            raise ValueError("an augmentation needs distinct, non-empty start and end markers")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"augmentation {self.name!r}: timeout_s must be > 0")
        if not callable(self.call):
            raise TypeError(f"augmentation {self.name!r}: call must be callable")
        _check_error_handler(self.on_error)


def tool_error_message(exc: BaseException) -> str:
    """The default `on_error` of `chat`: the model is told what went wrong."""
    return f"error: {type(exc).__name__}: {exc}"


def find_call(text: str, augmentations: Sequence[Augmentation],
              since: int = 0) -> tuple[Augmentation, str | None] | None:
    """The call that ends `text`: the augmentation whose end marker ends last (the
    longest on a tie), and the text between its last start marker and that end.

    None when no end marker ends after position `since` (the calls before it
    were answered); the arguments are None when no start marker precedes the end.
    """
    ends = [(text.rfind(a.end) + len(a.end), len(a.end), a) for a in augmentations if a.end in text]
    ends = [e for e in ends if e[0] > since]
    if not ends:
        return None
    end_pos, _, aug = max(ends, key=lambda e: (e[0], e[1]))
    end_at = end_pos - len(aug.end)
    start_at = text.rfind(aug.start, 0, end_at)
    return aug, None if start_at < 0 else text[start_at + len(aug.start) : end_at]


class ToolTimeoutError(TimeoutError):
    """A tool call did not return within its timeout."""


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    duration_s: float = 0.0


class _ToolRunner:
    """Runs tool calls off the engine thread; every future resolves to an `_Outcome`."""

    def __init__(self, max_workers: int | None):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="infercept-tool")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
            return asyncio.run_coroutine_threadsafe(self._timed_async(fn, args, kwargs), self._event_loop())
        return self._pool.submit(self._timed, fn, args, kwargs)

    def _timed(self, fn, args, kwargs) -> _Outcome:
        started_s = time.monotonic()
        try:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run_coroutine_threadsafe(_awaited(value), self._event_loop()).result()
            return _Outcome(value, None, time.monotonic() - started_s)
        except Exception as exc:
            return _Outcome(None, exc, time.monotonic() - started_s)

    @staticmethod
    async def _timed_async(fn, args, kwargs) -> _Outcome:
        started_s = time.monotonic()
        try:
            return _Outcome(await fn(*args, **kwargs), None, time.monotonic() - started_s)
        except Exception as exc:
            return _Outcome(None, exc, time.monotonic() - started_s)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="infercept-tool-loop",
                                 daemon=True).start()
            return self._loop

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


async def _awaited(awaitable):
    return await awaitable


def _failed(exc: BaseException) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(_Outcome(None, exc, 0.0))
    return future


def _check_error_handler(on_error: ErrorHandler) -> None:
    if not callable(on_error) and on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip', 'raise' or a function, not {on_error!r}")


def _recover(on_error: ErrorHandler, exc: BaseException) -> str | None:
    """The text to append after a failed call (None: nothing), or re-raise."""
    if on_error == "raise":
        raise exc
    return None if on_error == "skip" else str(on_error(exc))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
