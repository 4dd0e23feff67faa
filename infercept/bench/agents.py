"""The ``agent`` workload: tool-using agents as they run in 2026, beside the paper's six.

A coding or tool agent differs from the paper's 2023 workloads (contexts of at most ~2K
tokens, a few calls each) in four ways, each a parameter of ``AgentModel``:

- a long **system prompt with tool schemas**, the same for every task of an agent harness
  (shared by every request of that harness: prefix caching and InferCept's shared-prefix
  accounting see it);
- **tens of turns** per task (a turn: the model writes a tool call, the tool runs, its
  output is appended);
- **tool outputs of hundreds to thousands of tokens** (file contents, test logs, search
  results), so the context grows by far more than the model writes;
- **calls of seconds to minutes**: fast file and shell calls, slower test and build runs,
  and now and then a wait for a human.

Sizes are skewed, so each is a log-normal given by its median and 90th percentile (how
reports state them), clipped below. Every default, its public source and how it was read
is in ``docs/workloads.md``: a real trace of Claude Code and Codex sessions (TraceLab),
SWE-agent's SWE-Bench Pro trajectories and the harnesses' own prompts, for autonomous
coding tasks (tens of turns), not for any one deployment.

Scale factors act as for the paper's workloads: ``length_scale`` multiplies every token
count (system prompt included), ``time_scale`` every duration; ``max_context_tokens`` ends
a task early (fewer turns) rather than cutting a turn.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

AGENT = "agent"
_Z90 = 1.2815515655446004  # the standard normal's 90th percentile


@dataclass(frozen=True)
class LogNormal:
    """A log-normal variable given by its median and 90th percentile, clipped to
    ``[floor, cap]`` (``cap`` before scaling)."""

    median: float
    p90: float
    floor: float = 1.0
    integer: bool = True
    cap: float = math.inf

    def __post_init__(self) -> None:
        if not 0 < self.median <= self.p90:
            raise ValueError(f"need 0 < median <= p90, got {self.median}, {self.p90}")

    @property
    def sigma(self) -> float:
        return math.log(self.p90 / self.median) / _Z90

    @property
    def mean(self) -> float:
        """Mean before clipping and rounding."""
        return self.median * math.exp(self.sigma ** 2 / 2)

    def sample(self, rng: random.Random, scale: float = 1.0) -> float:
        x = scale * min(self.cap, self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))
        if self.integer:
            x = math.floor(x + 0.5)
        return max(self.floor, x)


@dataclass(frozen=True)
class ToolKind:
    """One kind of call an agent makes: its share of the calls and its duration."""

    name: str
    share: float
    duration_s: LogNormal


@dataclass(frozen=True)
class AgentModel:
    # System prompt + tool schemas of each agent harness (shared by its tasks), with the
    # share of tasks run by it.
    system_prompts: tuple[tuple[int, float], ...]
    task_tokens: LogNormal  # the user's task: the first prompt after the system prompt
    turns: LogNormal  # model calls per task (the last one ends it)
    generate_tokens: LogNormal  # the model's tokens per turn (reasoning + the call)
    tool_return_tokens: LogNormal  # a tool's output, appended to the context
    tools: tuple[ToolKind, ...]
    max_context_tokens: int  # a task stops calling tools once its context would pass this

    def __post_init__(self) -> None:
        for name, shares in (("tool", [t.share for t in self.tools]),
                             ("system prompt", [share for _, share in self.system_prompts])):
            if not math.isclose(sum(shares), 1.0):
                raise ValueError(f"{name} shares must add up to 1")


def _seconds(median: float, p90: float, floor: float, cap: float = math.inf) -> LogNormal:
    return LogNormal(median, p90, floor=floor, integer=False, cap=cap)


# Sources and how each figure was read: docs/workloads.md.
AGENT_MODEL = AgentModel(
    system_prompts=((2_000, 0.25), (6_000, 0.35), (18_000, 0.40)),
    task_tokens=LogNormal(1_500, 5_000, cap=16_000),
    turns=LogNormal(60, 120, floor=5, cap=250),
    generate_tokens=LogNormal(220, 1_400, cap=8_000),
    tool_return_tokens=LogNormal(600, 4_000, cap=16_000),
    tools=(
        ToolKind("file", 0.60, _seconds(0.15, 1.0, floor=0.01)),
        ToolKind("shell", 0.28, _seconds(1.0, 10.0, floor=0.05)),
        ToolKind("test", 0.10, _seconds(20.0, 120.0, floor=1.0, cap=600.0)),
        ToolKind("human", 0.02, _seconds(90.0, 1_200.0, floor=5.0, cap=3_600.0)),
    ),
    max_context_tokens=128_000,
)


def draw_agent_request(index: int, rng: random.Random, model: AgentModel,
                       time_scale: float, length_scale: float,
                       max_context_tokens: int | None):
    """Request ``index`` of an agent trace (without its system prompt, which the caller
    puts in front with ``_with_prefix``, nor token ids); returns (request, system prompt
    group)."""
    from infercept.bench.workload import Request, Segment

    cap = model.max_context_tokens * length_scale
    if max_context_tokens is not None:
        cap = min(cap, max_context_tokens)
    group = rng.choices(range(len(model.system_prompts)),
                        [share for _, share in model.system_prompts])[0]
    system = round(model.system_prompts[group][0] * length_scale)
    task = int(model.task_tokens.sample(rng, length_scale))
    turns = int(model.turns.sample(rng))
    shares = [t.share for t in model.tools]
    segments, context = [], system + task
    for turn in range(turns):
        generate = int(model.generate_tokens.sample(rng, length_scale))
        returned = int(model.tool_return_tokens.sample(rng, length_scale))
        tool = rng.choices(model.tools, shares)[0]
        duration_s = tool.duration_s.sample(rng) * time_scale
        last = turn == turns - 1 or context + generate + returned + 1 > cap
        if last:
            segments.append(Segment(0, max(1, min(generate, int(cap - context)))))
            break
        segments.append(Segment(0, generate, duration_s, returned, tool=tool.name))
        context += generate + returned
    first = dataclasses.replace(segments[0], prompt_tokens=task)
    return Request(f"{AGENT}-{index}", AGENT, 0.0, (first, *segments[1:])), system, group
