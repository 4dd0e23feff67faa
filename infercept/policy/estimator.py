"""Online estimate of how much longer an interception will last.

The planner needs T_INT, which is not known in advance. ``DurationEstimator`` keeps the
last ``window`` observed durations per tool (and across all tools) and answers with the
conditional expectation of the remaining time given the time already elapsed:

    remaining(e) = E[D - e | D > e]     over the tool's recent durations D

falling back to the durations of all tools when the tool has no history, and to the
paper's simple estimate (the time elapsed since the call) when the interception has
outlasted every recorded duration or nothing is recorded. A client hint of the expected
total duration is blended in while it has not been overrun. Deterministic: the same
observations in the same order give the same answers.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Iterable

DEFAULT_WINDOW = 256
DEFAULT_HINT_WEIGHT = 0.75
DEFAULT_TTL_QUANTILE = 0.9


@dataclass
class _History:
    """A bounded window of durations, kept sorted with suffix sums for O(log n) queries."""

    window: int
    recent_s: deque[float] = field(default_factory=deque)
    sorted_s: list[float] = field(default_factory=list)
    suffix_sum_s: list[float] = field(default_factory=lambda: [0.0])

    def add(self, duration_s: float) -> None:
        self.recent_s.append(duration_s)
        if len(self.recent_s) > self.window:
            del self.sorted_s[bisect.bisect_left(self.sorted_s, self.recent_s.popleft())]
        bisect.insort(self.sorted_s, duration_s)
        # suffix sums, added from the largest down (the order of a loop from the end)
        sums = list(accumulate(reversed(self.sorted_s), initial=0.0))
        sums.reverse()
        self.suffix_sum_s = sums

    def __len__(self) -> int:
        return len(self.sorted_s)

    def mean_remaining_s(self, elapsed_s: float) -> float | None:
        """E[D - e | D > e], or None when no recorded duration exceeds ``elapsed_s``."""
        first = bisect.bisect_right(self.sorted_s, elapsed_s)
        survivors = len(self.sorted_s) - first
        if survivors == 0:
            return None
        return max(0.0, self.suffix_sum_s[first] / survivors - elapsed_s)

    def mean_remaining_many_s(self, elapsed_s: Iterable[float]) -> list[float | None]:
        """``mean_remaining_s`` for each of ``elapsed_s``, in one pass."""
        sorted_s, suffix_sum_s, count = self.sorted_s, self.suffix_sum_s, len(self.sorted_s)
        answers: list[float | None] = []
        for e in elapsed_s:
            first = bisect.bisect_right(sorted_s, e)
            answers.append(max(0.0, suffix_sum_s[first] / (count - first) - e)
                           if first < count else None)
        return answers

    def quantile_s(self, quantile: float) -> float:
        """Nearest-rank quantile of the recorded durations."""
        rank = max(1, math.ceil(quantile * len(self.sorted_s)))
        return self.sorted_s[rank - 1]


class DurationEstimator:
    """Per-tool interception durations, learned online (no oracle).

    ``hint_weight`` is the share given to a client's hint against the history's estimate.
    """

    def __init__(self, window: int = DEFAULT_WINDOW,
                 hint_weight: float = DEFAULT_HINT_WEIGHT) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= hint_weight <= 1.0:
            raise ValueError(f"hint_weight must be in [0, 1], got {hint_weight}")
        self.window = window
        self.hint_weight = hint_weight
        self._by_tool: dict[str | None, _History] = {}
        self._all = _History(window)

    def observe(self, tool: str | None, duration_s: float) -> None:
        """Record a finished interception of ``tool`` (None: an unnamed tool)."""
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"duration_s must be finite and >= 0, got {duration_s!r}")
        self._by_tool.setdefault(tool, _History(self.window)).add(duration_s)
        self._all.add(duration_s)

    def num_observed(self, tool: str | None) -> int:
        """Durations of ``tool`` in the window."""
        history = self._by_tool.get(tool)
        return len(history) if history else 0

    def remaining_s(self, tool: str | None, elapsed_s: float,
                    hint_s: float | None = None) -> float:
        """Expected remaining interception time after ``elapsed_s`` seconds.

        ``hint_s`` is the client's expected total duration; it counts while
        ``hint_s > elapsed_s`` and alone when there is no history to blend with.
        """
        if not elapsed_s >= 0:
            raise ValueError(f"elapsed_s must be >= 0, got {elapsed_s!r}")
        history_s = self._history(tool).mean_remaining_s(elapsed_s)
        hint_remaining_s = None
        if hint_s is not None and hint_s > elapsed_s:
            hint_remaining_s = hint_s - elapsed_s
        if hint_remaining_s is not None and history_s is not None:
            return (self.hint_weight * hint_remaining_s
                    + (1.0 - self.hint_weight) * history_s)
        if hint_remaining_s is not None:
            return hint_remaining_s
        if history_s is not None:
            return history_s
        return elapsed_s

    def remaining_many_s(self, tool: str | None, elapsed_s: Iterable[float]) -> list[float]:
        """``remaining_s(tool, e)`` without a hint for each ``e`` in ``elapsed_s``, the same
        answers in one call (the simulator asks this for many paused requests at once)."""
        elapsed = list(elapsed_s)
        if not all(e >= 0 for e in elapsed):
            raise ValueError("elapsed_s must all be >= 0")
        answers = self._history(tool).mean_remaining_many_s(elapsed)
        return [e if a is None else a for a, e in zip(answers, elapsed)]

    def expected_total_s(self, tool: str | None, hint_s: float | None = None) -> float:
        """Expected duration of a new interception of ``tool`` (0 with nothing to go on)."""
        return self.remaining_s(tool, 0.0, hint_s)

    def ttl_s(self, tool: str | None, quantile: float = DEFAULT_TTL_QUANTILE) -> float | None:
        """Time-to-live for the "ttl" policy: a high quantile of the tool's durations
        (all tools' when the tool has none); None with no history at all."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        history = self._history(tool)
        return history.quantile_s(quantile) if len(history) else None

    def _history(self, tool: str | None) -> _History:
        history = self._by_tool.get(tool)
        return history if history else self._all
