"""Forward and transfer times of the hardware, as the waste equations need them.

The forward time of an iteration is flat up to the device's saturation point and linear
beyond it (a hinge). The engine's start-up profiler measures (num_tokens, seconds) pairs,
fits the hinge with ``CostModel.fit`` and caches the model as JSON (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

# A budget ratio such as 0.03 / 0.001 evaluates to 29.999999999999996; this slack keeps
# the floor at the intended integer without ever admitting a token that does not fit.
_FLOOR_SLACK = 1e-9

_INT_FIELDS = ("saturation_tokens", "kv_bytes_per_token", "block_size_tokens",
               "device_capacity_tokens", "cpu_capacity_tokens")


@dataclass(frozen=True)
class CostModel:
    """Hardware costs in seconds and tokens.

    fwd_base_s: forward time of an iteration of at most ``saturation_tokens`` tokens.
    fwd_per_token_s: extra forward time per token beyond ``saturation_tokens``.
    swap_s_per_token: one-way device<->CPU transfer time of one token's KV (inf: no swap).
    """

    fwd_base_s: float
    fwd_per_token_s: float
    saturation_tokens: int
    swap_s_per_token: float
    kv_bytes_per_token: int
    block_size_tokens: int
    device_capacity_tokens: int
    cpu_capacity_tokens: int

    def __post_init__(self) -> None:
        for name in ("fwd_base_s", "fwd_per_token_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"CostModel.{name} must be finite and >= 0, got {value!r}")
        if not self.swap_s_per_token >= 0:
            raise ValueError(f"CostModel.swap_s_per_token must be >= 0, got "
                             f"{self.swap_s_per_token!r}")
        for name in _INT_FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"CostModel.{name} must be >= 0")
        if self.block_size_tokens < 1:
            raise ValueError("CostModel.block_size_tokens must be >= 1")

    def forward_s(self, num_tokens: float) -> float:
        """Forward time of an iteration of ``num_tokens`` tokens: flat, then linear."""
        beyond_tokens = max(0.0, num_tokens - self.saturation_tokens)
        return self.fwd_base_s + self.fwd_per_token_s * beyond_tokens

    def swap_s(self, num_tokens: float) -> float:
        """One-way transfer time of ``num_tokens`` tokens' KV."""
        if num_tokens == 0:
            return 0.0
        return self.swap_s_per_token * num_tokens

    def swap_budget_tokens(self, batch_tokens: int) -> int:
        """Tokens whose one-way transfer hides under one forward pass of ``batch_tokens``.

        0 when swapping is impossible (``swap_s_per_token`` is inf); when transfers are
        free (0 s per token) every token the device and CPU can hold.
        """
        if math.isinf(self.swap_s_per_token):
            return 0
        if self.swap_s_per_token == 0:
            return self.device_capacity_tokens + self.cpu_capacity_tokens
        ratio = self.forward_s(batch_tokens) / self.swap_s_per_token
        return max(0, math.floor(ratio + _FLOOR_SLACK))

    def kv_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.kv_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (json.dumps writes an infinite swap time as ``Infinity``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CostModel":
        """Inverse of ``to_dict``; rejects missing or unknown keys (a stale cache file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = names - raw.keys(), raw.keys() - names
        if missing or unknown:
            raise ValueError(f"CostModel dict: missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        values = {name: int(raw[name]) if name in _INT_FIELDS else float(raw[name])
                  for name in names}
        return cls(**values)

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]], *, swap_s_per_token: float,
            kv_bytes_per_token: int, block_size_tokens: int, device_capacity_tokens: int,
            cpu_capacity_tokens: int) -> "CostModel":
        """A CostModel whose forward time is the hinge fitted to measured samples.

        ``samples`` are (num_tokens, seconds) pairs of measured forward passes; sizes may
        repeat. The other arguments are copied into the model.
        """
        base_s, per_token_s, saturation_tokens = fit_hinge(samples)
        return cls(fwd_base_s=base_s, fwd_per_token_s=per_token_s,
                   saturation_tokens=saturation_tokens, swap_s_per_token=swap_s_per_token,
                   kv_bytes_per_token=kv_bytes_per_token, block_size_tokens=block_size_tokens,
                   device_capacity_tokens=device_capacity_tokens,
                   cpu_capacity_tokens=cpu_capacity_tokens)


def fit_hinge(samples: Sequence[tuple[int, float]]) -> tuple[float, float, int]:
    """Least-squares fit of y = base + slope * max(0, x - knee) with slope >= 0.

    Tries every sample size as the knee, and for every gap between consecutive sizes the
    knee that the gap's own fit puts inside it (flat mean on the left, free line on the
    right, meeting at the knee). Keeps the smallest squared error; ties go to the smaller
    knee. Returns (base_s, slope_s_per_token, knee_tokens).
    """
    if not samples:
        raise ValueError("fit_hinge needs at least one sample")
    points = sorted((float(x), float(y)) for x, y in samples)
    sizes = sorted({x for x, _ in points})
    best: tuple[float, float, float, float] | None = None  # (sse, knee, base, slope)
    for knee in sizes:
        best = _better(best, _fit_at_knee(points, knee))
    for left_size, right_size in zip(sizes, sizes[1:]):
        best = _better(best, _fit_in_gap(points, left_size, right_size))
    assert best is not None
    _, knee, base, slope = best
    return base, slope, int(round(knee))


def _better(best, candidate):
    if candidate is None:
        return best
    if best is None or candidate[:2] < best[:2]:
        return candidate
    return best


def _fit_at_knee(points, knee: float) -> tuple[float, float, float, float]:
    hinge = [max(0.0, x - knee) for x, _ in points]
    ys = [y for _, y in points]
    slope, base = _ols(hinge, ys)
    if slope <= 0:
        slope, base = 0.0, sum(ys) / len(ys)
    sse = sum((y - base - slope * h) ** 2 for h, y in zip(hinge, ys))
    return (sse, knee, base, slope)


def _fit_in_gap(points, left_size: float, right_size: float):
    left = [y for x, y in points if x <= left_size]
    right = [(x, y) for x, y in points if x >= right_size]
    if len({x for x, _ in right}) < 2:
        return None
    base = sum(left) / len(left)
    slope, intercept = _ols([x for x, _ in right], [y for _, y in right])
    if slope <= 0:
        return None
    knee = (base - intercept) / slope
    if not left_size < knee < right_size:
        return None
    sse = (sum((y - base) ** 2 for y in left)
           + sum((y - intercept - slope * x) ** 2 for x, y in right))
    return (sse, knee, base, slope)


def _ols(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line; slope 0 when xs do not vary."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, mean_y
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x
