"""Synthetic traces of augmented (tool-using) requests, after the InferCept paper's Table 1.

A request is a list of segments. Segment i generates ``generate_tokens`` tokens, then calls
its tool for ``tool_s`` seconds; the tool returns ``tool_return_tokens`` tokens, appended to
the context before segment i+1 starts. The last segment calls no tool and ends the request.

How a request is drawn (each choice is one constant below):

- Interceptions per request: a normal variable rounded to an integer and clipped to
  ``>= 1``: every request of an augmented workload calls its tool at least once (a request
  without calls is the no-interception workload, see ``Trace.without_interceptions``).
- Interception durations: normal, clipped to ``FLOOR_FRACTION_OF_MEAN`` of the mean.
- Final context (prompt + generated + returned tokens): normal, clipped to
  ``FLOOR_FRACTION_OF_MEAN`` of the mean.
- Clipping alone would raise the mean, so each normal is drawn around a shifted centre
  chosen so that the clipped (and rounded) variable has exactly the table's mean
  (``ClippedNormal``). The standard deviation comes out somewhat below the table's.
- The context is split ``PROMPT_FRACTION`` initial prompt, ``GENERATE_FRACTION`` generated
  tokens, the rest tool returns; generation is spread evenly over the segments and returns
  over the tool calls, each getting at least one token.

Scale factors transform the same draws, so ratios hold: ``time_scale`` multiplies every
duration, ``length_scale`` every context, before the split; ``max_context_tokens`` caps the
final context (dropping tool calls when even one token per part would not fit).

Seeds: request i's content comes from its own generator seeded by (seed, i), its token ids
from another, and the arrivals from a third; arrival times are a unit-rate Poisson process
divided by the rate. The same seed at another rate therefore gives the same requests at
proportionally scaled times, and a longer trace extends a shorter one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

AUGMENTATIONS = ("arithmetic", "qa", "virtual_env", "chatbot", "image", "tts")
MIX = "mix"
AGENT = "agent"  # today's agents (infercept.bench.agents), beside the paper's six

# The paper's Table 1 (as in /work/shared/workloads/augmentations.json): per augmentation,
# (mean, sd) of the interception duration in seconds, the interceptions per request and the
# final context in tokens. Embedded so traces can be generated without the shared folder.
TABLE_1: dict[str, dict[str, tuple[float, float]]] = {
    "arithmetic": {"interception_s": (9e-5, 6e-5), "interceptions_per_request": (3.75, 1.3),
                   "context_tokens": (1422, 738)},
    "qa": {"interception_s": (0.69, 0.17), "interceptions_per_request": (2.52, 1.73),
           "context_tokens": (1846, 428)},
    "virtual_env": {"interception_s": (0.09, 0.014), "interceptions_per_request": (28.18, 15.2),
                    "context_tokens": (2185, 115)},
    "chatbot": {"interception_s": (28.6, 15.6), "interceptions_per_request": (4.45, 1.96),
                "context_tokens": (753, 703)},
    "image": {"interception_s": (20.03, 7.8), "interceptions_per_request": (6.91, 3.93),
              "context_tokens": (1247, 792)},
    "tts": {"interception_s": (17.24, 7.6), "interceptions_per_request": (6.91, 3.93),
            "context_tokens": (1251, 792)},
}

FLOOR_FRACTION_OF_MEAN = 0.1
MIN_INTERCEPTIONS = 1
PROMPT_FRACTION = 0.55
GENERATE_FRACTION = 0.25


# ---------------------------------------------------------------------------- distributions

def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _normal_pdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class ClippedNormal:
    """``max(floor, X)`` (or ``max(floor, round(X))`` when ``integer``), X ~ N(loc, sd),
    where ``loc`` is solved so that the clipped variable's mean is ``mean``."""

    mean: float
    sd: float
    floor: float
    integer: bool = False
    loc: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.sd < 0 or self.mean <= self.floor:
            raise ValueError(f"need sd >= 0 and mean > floor, got {self}")
        object.__setattr__(self, "loc", self._solve_loc())

    def expected(self, loc: float) -> float:
        """Mean of the clipped variable when X is centred on ``loc``."""
        if self.sd == 0:
            return max(self.floor, math.floor(loc + 0.5) if self.integer else loc)
        if not self.integer:
            d = (loc - self.floor) / self.sd
            return self.floor + (loc - self.floor) * _normal_cdf(d) + self.sd * _normal_pdf(d)
        # E[max(m, round X)] = m + sum_{j > m} P(round X >= j) = m + sum_{j > m} P(X >= j - 1/2)
        total = self.floor
        j = int(self.floor) + 1
        while j - 0.5 <= loc + 12 * self.sd:
            total += _normal_cdf((loc - (j - 0.5)) / self.sd)
            j += 1
        return total

    def _solve_loc(self) -> float:
        if self.sd == 0:
            return self.mean
        # expected(low) ~ floor < mean <= expected(high): clipping only raises the mean.
        low, high = self.mean - 20 * self.sd, self.mean
        for _ in range(100):
            mid = 0.5 * (low + high)
            if self.expected(mid) < self.mean:
                low = mid
            else:
                high = mid
        return 0.5 * (low + high)

    def sample(self, rng: random.Random) -> float:
        x = rng.gauss(self.loc, self.sd)
        if self.integer:
            x = math.floor(x + 0.5)
        return max(self.floor, x)


@dataclass(frozen=True)
class AugmentationModel:
    """The three distributions of one augmentation type."""

    interception_s: ClippedNormal
    interceptions_per_request: ClippedNormal
    context_tokens: ClippedNormal

    @classmethod
    def from_stats(cls, stats: Mapping[str, tuple[float, float]]) -> AugmentationModel:
        def continuous(key: str) -> ClippedNormal:
            mean, sd = stats[key]
            return ClippedNormal(mean, sd, FLOOR_FRACTION_OF_MEAN * mean)

        mean, sd = stats["interceptions_per_request"]
        return cls(continuous("interception_s"),
                   ClippedNormal(mean, sd, MIN_INTERCEPTIONS, integer=True),
                   continuous("context_tokens"))


def load_stats(path: str | Path | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """Per-augmentation (mean, sd) pairs from an augmentations.json file; TABLE_1 when None."""
    if path is None:
        return TABLE_1
    raw = json.loads(Path(path).read_text())["augmentations"]
    return {name: {key: tuple(pair) for key, pair in stats.items()} for name, stats in raw.items()}


# ---------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Segment:
    """Generate ``generate_tokens``, then (unless last) call the tool for ``tool_s`` seconds;
    it returns ``tool_return_tokens`` tokens (ids in ``tool_return_token_ids`` when drawn)."""

    prompt_tokens: int  # the initial prompt in the first segment, 0 in the others
    generate_tokens: int
    tool_s: float = 0.0
    tool_return_tokens: int = 0
    tool_return_token_ids: tuple[int, ...] | None = None
    tool: str | None = None  # the tool it calls; None: the request's augmentation


@dataclass(frozen=True)
class Request:
    """A trace request. Its prompt's first ``shared_prefix_tokens`` tokens are those of
    every request with the same ``shared_prefix_key`` (a common system prompt)."""

    request_id: str
    augmentation: str
    arrival_s: float
    segments: tuple[Segment, ...]
    prompt_token_ids: tuple[int, ...] | None = None
    shared_prefix_key: str | None = None
    shared_prefix_tokens: int = 0

    @property
    def num_interceptions(self) -> int:
        return len(self.segments) - 1

    def tool_of(self, index: int) -> str:
        """The tool segment ``index`` calls (the interception spec's ``tool``)."""
        return self.segments[index].tool or self.augmentation

    @property
    def prompt_tokens(self) -> int:
        return self.segments[0].prompt_tokens

    @property
    def output_tokens(self) -> int:
        return sum(s.generate_tokens for s in self.segments)

    @property
    def tool_return_tokens(self) -> int:
        return sum(s.tool_return_tokens for s in self.segments)

    @property
    def context_tokens(self) -> int:
        """The final context: prompt + generated + returned tokens."""
        return self.prompt_tokens + self.output_tokens + self.tool_return_tokens

    @property
    def tool_s_total(self) -> float:
        return sum(s.tool_s for s in self.segments)

    def without_interceptions(self) -> Request:
        """Same prompt and final context; one segment generates everything after the prompt."""
        only = Segment(self.prompt_tokens, self.context_tokens - self.prompt_tokens)
        return dataclasses.replace(self, segments=(only,))


def split_context(context_tokens: int, num_interceptions: int,
                  prompt_fraction: float = PROMPT_FRACTION,
                  generate_fraction: float = GENERATE_FRACTION) -> tuple[int, list[int], list[int]]:
    """Split a final context into (prompt, generated per segment, returned per tool call).

    Every part gets at least one token; ``context_tokens`` must be ``>= 2 * n + 2`` for n
    interceptions. Without interceptions the return share goes to generation.
    """
    n = num_interceptions
    if n < 0 or context_tokens < 2 * n + 2:
        raise ValueError(f"{context_tokens} tokens cannot hold {n} interceptions")
    prompt = min(max(1, round(context_tokens * prompt_fraction)), context_tokens - (2 * n + 1))
    if n == 0:
        return prompt, [context_tokens - prompt], []
    generated = min(max(n + 1, round(context_tokens * generate_fraction)),
                    context_tokens - prompt - n)
    returned = context_tokens - prompt - generated
    return prompt, _spread(generated, n + 1), _spread(returned, n)


def _spread(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _fit(context_tokens: int, num_interceptions: int,
         max_context_tokens: int | None) -> tuple[int, int]:
    """Raise the context to hold one token per part, cap it, and drop calls that don't fit."""
    n = num_interceptions
    context = max(context_tokens, 2 * n + 2)
    if max_context_tokens is not None:
        n = min(n, (max_context_tokens - 2) // 2)
        context = min(context, max_context_tokens)
    return context, n


@dataclass(frozen=True)
class _Options:
    seed: int
    time_scale: float
    length_scale: float
    max_context_tokens: int | None
    vocab_size: int | None
    excluded_token_ids: frozenset[int]

    def token_ids(self, rng: random.Random, count: int) -> tuple[int, ...] | None:
        """``count`` uniform ids from the vocabulary minus the excluded ones; None without one."""
        if self.vocab_size is None:
            return None
        ids = []
        while len(ids) < count:
            token_id = rng.randrange(self.vocab_size)
            if token_id not in self.excluded_token_ids:
                ids.append(token_id)
        return tuple(ids)


def _draw_request(index: int, augmentation: str, model: AugmentationModel,
                  rng: random.Random, options: _Options, workload: str) -> Request:
    num_interceptions = int(model.interceptions_per_request.sample(rng))
    tool_s = [model.interception_s.sample(rng) * options.time_scale
              for _ in range(num_interceptions)]
    context = round(model.context_tokens.sample(rng) * options.length_scale)
    context, num_interceptions = _fit(context, num_interceptions, options.max_context_tokens)
    prompt, generated, returned = split_context(context, num_interceptions)

    ids_rng = random.Random(f"{options.seed}:{index}:tokens")
    prompt_ids = options.token_ids(ids_rng, prompt)
    segments = [Segment(prompt if i == 0 else 0, generated[i], tool_s[i], returned[i],
                        options.token_ids(ids_rng, returned[i]))
                for i in range(num_interceptions)]
    segments.append(Segment(0 if num_interceptions else prompt, generated[-1]))
    return Request(f"{workload}-{index}", augmentation, 0.0, tuple(segments), prompt_ids)


def _agent_trace(num_requests: int, rate: float, seed: int, time_scale: float,
                 length_scale: float, max_context_tokens: int | None, vocab_size: int | None,
                 excluded_token_ids: Iterable[int]) -> Trace:
    """The ``agent`` workload (``infercept.bench.agents``): every request starts with one
    of the model's shared system prompts."""
    from infercept.bench.agents import AGENT_MODEL, draw_agent_request

    options = _Options(seed, time_scale, length_scale, max_context_tokens, vocab_size,
                       frozenset(excluded_token_ids))
    system_ids: dict[int, tuple[int, ...] | None] = {}
    requests = []
    for index, arrival_s in enumerate(poisson_arrivals_s(num_requests, rate, seed)):
        rng = random.Random(f"{seed}:{index}:content")
        request, system, group = draw_agent_request(index, rng, AGENT_MODEL, time_scale,
                                                    length_scale, max_context_tokens)
        ids_rng = random.Random(f"{seed}:{index}:tokens")
        segments = tuple(dataclasses.replace(
            s, tool_return_token_ids=options.token_ids(ids_rng, s.tool_return_tokens)
            if s.tool_return_tokens else None) for s in request.segments)
        request = dataclasses.replace(
            request, arrival_s=arrival_s, segments=segments,
            prompt_token_ids=options.token_ids(ids_rng, request.prompt_tokens))
        if group not in system_ids:
            system_ids[group] = options.token_ids(random.Random(f"{seed}:prefix:{group}"), system)
        requests.append(_with_prefix(request, f"{AGENT}-system-{group}", system,
                                     system_ids[group]))
    return Trace(AGENT, seed, rate, time_scale, length_scale, tuple(requests),
                 max_context_tokens, vocab_size)


def _with_prefix(request: Request, key: str, num_tokens: int,
                 token_ids: tuple[int, ...] | None) -> Request:
    """``request`` with a shared prefix of ``num_tokens`` put in front of its prompt."""
    first, *rest = request.segments
    first = dataclasses.replace(first, prompt_tokens=first.prompt_tokens + num_tokens)
    prompt_ids = (None if token_ids is None or request.prompt_token_ids is None
                  else token_ids + request.prompt_token_ids)
    return dataclasses.replace(request, segments=(first, *rest), prompt_token_ids=prompt_ids,
                               shared_prefix_key=key, shared_prefix_tokens=num_tokens)


def poisson_arrivals_s(num_requests: int, rate: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process with ``rate`` requests/s (unit-rate times / rate)."""
    if not 0 < rate < math.inf:
        raise ValueError(f"rate must be positive and finite, got {rate}")
    rng = random.Random(f"{seed}:arrivals")
    unit_s, arrivals_s = 0.0, []
    for _ in range(num_requests):
        unit_s += rng.expovariate(1.0)
        arrivals_s.append(unit_s / rate)
    return arrivals_s


# ---------------------------------------------------------------------------- traces

@dataclass(frozen=True)
class Trace:
    """A replayable list of requests and the settings that drew it."""

    workload: str
    seed: int
    rate: float
    time_scale: float
    length_scale: float
    requests: tuple[Request, ...]
    max_context_tokens: int | None = None
    vocab_size: int | None = None
    with_interceptions: bool = True

    def without_interceptions(self) -> Trace:
        """The same requests and arrivals with every tool call removed (overhead runs)."""
        return dataclasses.replace(
            self, with_interceptions=False,
            requests=tuple(r.without_interceptions() for r in self.requests))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        raw = json.loads(Path(path).read_text())
        raw["requests"] = tuple(_request_from_json(r) for r in raw["requests"])
        return cls(**raw)


def _ids(values: list[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


def _request_from_json(raw: dict) -> Request:
    segments = tuple(
        Segment(**{**s, "tool_return_token_ids": _ids(s["tool_return_token_ids"])})
        for s in raw["segments"])
    return Request(raw["request_id"], raw["augmentation"], raw["arrival_s"], segments,
                   _ids(raw["prompt_token_ids"]), raw.get("shared_prefix_key"),
                   raw.get("shared_prefix_tokens", 0))


def generate_trace(augmentation: str, num_requests: int, rate: float, seed: int,
                   time_scale: float = 1.0, length_scale: float = 1.0,
                   max_context_tokens: int | None = None,
                   stats_path: str | Path | None = None,
                   vocab_size: int | None = None,
                   excluded_token_ids: Iterable[int] = (),
                   mix_weights: Mapping[str, float] | None = None,
                   with_interceptions: bool = True,
                   shared_prefix_tokens: int = 0, shared_prefix_groups: int = 1) -> Trace:
    """Draw ``num_requests`` requests of one augmentation (or ``"mix"``) arriving at ``rate``/s.

    ``stats_path``: an augmentations.json to use instead of the embedded TABLE_1.
    ``vocab_size``: when given, prompts and tool returns get pseudo-random token ids in
    ``range(vocab_size)``, never one of ``excluded_token_ids`` (e.g. special tokens).
    ``mix_weights``: relative weight per augmentation in a mix (equal by default).
    ``shared_prefix_tokens``: every prompt starts with one of ``shared_prefix_groups``
    common prefixes of that many tokens (request i: group i mod groups), put in front of
    its drawn prompt.
    """
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError("time_scale and length_scale must be positive")
    if max_context_tokens is not None and max_context_tokens < 2:
        raise ValueError("max_context_tokens must be at least 2")
    if augmentation == AGENT:
        if shared_prefix_tokens:
            raise ValueError("the agent workload brings its own shared system prompts")
        trace = _agent_trace(num_requests, rate, seed, time_scale, length_scale,
                             max_context_tokens, vocab_size, excluded_token_ids)
        return trace if with_interceptions else trace.without_interceptions()
    stats = load_stats(stats_path)
    models = {name: AugmentationModel.from_stats(s) for name, s in stats.items()}
    if augmentation == MIX:
        weights = dict(mix_weights) if mix_weights else {name: 1.0 for name in AUGMENTATIONS}
    elif augmentation in models:
        weights = {augmentation: 1.0}
    else:
        raise ValueError(f"unknown augmentation {augmentation!r}; known: {sorted(models)} and mix")
    if not set(weights) <= set(models):
        raise ValueError(f"mix weights name unknown augmentations: {set(weights) - set(models)}")
    if vocab_size is not None and not set(range(vocab_size)) - set(excluded_token_ids):
        raise ValueError("every token id of the vocabulary is excluded")
    if shared_prefix_tokens < 0 or shared_prefix_groups < 1:
        raise ValueError("shared_prefix_tokens must be >= 0 and shared_prefix_groups >= 1")
    names, name_weights = list(weights), list(weights.values())
    options = _Options(seed, time_scale, length_scale, max_context_tokens, vocab_size,
                       frozenset(excluded_token_ids))
    prefixes = [options.token_ids(random.Random(f"{seed}:prefix:{g}"), shared_prefix_tokens)
                for g in range(shared_prefix_groups)]
    requests = []
    for index, arrival_s in enumerate(poisson_arrivals_s(num_requests, rate, seed)):
        rng = random.Random(f"{seed}:{index}:content")
        name = rng.choices(names, name_weights)[0] if augmentation == MIX else augmentation
        request = _draw_request(index, name, models[name], rng, options, augmentation)
        request = dataclasses.replace(request, arrival_s=arrival_s)
        if shared_prefix_tokens:
            request = _with_prefix(request, f"prefix-{index % shared_prefix_groups}",
                                   shared_prefix_tokens, prefixes[index % shared_prefix_groups])
        requests.append(request)
    trace = Trace(augmentation, seed, rate, time_scale, length_scale, tuple(requests),
                  max_context_tokens, vocab_size)
    return trace if with_interceptions else trace.without_interceptions()
