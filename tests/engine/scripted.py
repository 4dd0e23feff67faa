"""Scripted sessions for engine tests, and the equivalence oracle.

A script says, per session: the prompt, and for each interception the number
of tokens to generate before it, the tool's result (token ids) and how many
engine steps the tool takes. `check_equivalent` replays every segment
boundary as a fresh request to stock vLLM and compares tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from vllm import SamplingParams

from infercept.adapter.interception import InterceptSpec
from infercept.entrypoints.sessions import Session, SessionEngine, SessionState


@dataclass
class Call:
    after_tokens: int  # tokens the model generates before this interception
    result: list[int]  # the tool's result, appended at resume
    steps: int = 0  # engine steps the tool takes


@dataclass
class Script:
    prompt: list[int]
    calls: list[Call]
    max_tokens: int
    max_tokens_after: dict[int, int] = field(default_factory=dict)  # call index -> new max_tokens


def random_scripts(n: int, seed: int, vocab: int = 400, prompt_tokens=(20, 200),
                   calls=(1, 4), result_tokens=(0, 60), steps=(0, 6), max_tokens=64) -> list[Script]:
    rng = random.Random(seed)
    scripts = []
    for _ in range(n):
        prompt = [rng.randrange(5, vocab) for _ in range(rng.randint(*prompt_tokens))]
        k = rng.randint(*calls)
        cuts = sorted(rng.sample(range(1, max_tokens - 4), k))
        afters = [b - a for a, b in zip([0, *cuts], cuts)]
        script_calls = [
            Call(after, [rng.randrange(5, vocab) for _ in range(rng.randint(*result_tokens))],
                 rng.randint(*steps))
            for after in afters
        ]
        scripts.append(Script(prompt, script_calls, max_tokens))
    return scripts


def run_scripts(llm, scripts: list[Script], max_steps: int = 20000,
                on_step=None) -> list[Session]:
    """Run every script to completion; `on_step(engine, step)` may intervene."""
    engine = SessionEngine(llm.llm_engine)
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    sessions, pending = [], {}
    for i, script in enumerate(scripts):
        params_i = params.clone()
        params_i.max_tokens = script.max_tokens
        session = engine.start(script.prompt, params_i, _spec(script, 0), session_id=f"s{i}")
        sessions.append(session)
    due: dict[str, int] = {}
    for step in range(max_steps):
        if not engine.has_unfinished() and not due:
            return sessions
        for session in engine.step():
            if session.state is SessionState.INTERCEPTED:
                call = scripts[_index(session)].calls[len(session.segments) - 1]
                due[session.session_id] = step + call.steps
        for session_id, at in list(due.items()):
            if at <= step:
                del due[session_id]
                session = engine.sessions[session_id]
                script = scripts[_index(session)]
                n = len(session.segments)
                engine.resume(session, token_ids=script.calls[n - 1].result,
                              spec=_spec(script, n),
                              max_tokens=script.max_tokens_after.get(n - 1))
        if on_step is not None:
            on_step(engine, step)
    raise AssertionError("scripts did not finish")


def _index(session: Session) -> int:
    return int(session.session_id[1:])


def _spec(script: Script, segment: int) -> InterceptSpec:
    if segment < len(script.calls):
        return InterceptSpec(intercept_after=script.calls[segment].after_tokens)
    return InterceptSpec()


def segment_prompts(session: Session) -> list[tuple[list[int], list[int], int]]:
    """(context before the segment, the segment's tokens, max_tokens left) per segment."""
    out, pos, generated = [], len(session.prompt_token_ids), 0
    for k, tokens in enumerate(session.segments):
        out.append((session.token_ids[:pos], tokens, session.max_tokens - generated))
        generated += len(tokens)
        pos += len(tokens) + (len(session.appended[k]) if k < len(session.appended) else 0)
    return out


def check_equivalent(stock, sessions: list[Session]) -> int:
    """Every segment equals stock vLLM's continuation of its full context; returns tokens compared."""
    cases = [case for s in sessions for case in segment_prompts(s)]
    expected = stock.generate([c for c, _, _ in cases], [m for _, _, m in cases])
    compared = 0
    for (context, got, _), want in zip(cases, expected):
        assert got == want[: len(got)], (
            f"context of {len(context)} tokens: got {got}, stock vLLM gives {want[:len(got)]}"
        )
        compared += len(got)
    return compared
