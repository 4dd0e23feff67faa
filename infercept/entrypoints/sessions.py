"""In-process sessions over vLLM's `LLMEngine`: start, intercept, resume, abort.

A session is one conversation with the model that may stop many times for a
tool. Each segment is one vLLM request; its prompt is the whole token
sequence so far, and its spec names the paused request it resumes, so the
engine core hands it the paused KV cache. The model's own tokens are never
re-tokenized; a tool's text result is tokenized on its own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vllm import RequestOutput, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from infercept.adapter.interception import EXTRA_ARGS_KEY, STOP_REASON, InterceptSpec


class SessionState(Enum):
    RUNNING = "running"
    INTERCEPTED = "intercepted"
    FINISHED = "finished"


@dataclass
class Session:
    session_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the whole sequence so far
    output_token_ids: list[int] = field(default_factory=list)  # the model's own, all segments
    segments: list[list[int]] = field(default_factory=list)  # the model's tokens per segment
    appended: list[list[int]] = field(default_factory=list)  # tool tokens after each segment
    state: SessionState = SessionState.RUNNING
    finish_reason: str | None = None
    stop_reason: Any = None
    engine_request_id: str | None = None
    texts: list[str] = field(default_factory=list)  # the model's text per segment (see _segment_text)
    last_output: RequestOutput | None = None  # the latest segment's final output
    keeps_stop_text: bool = False  # the running segment's text keeps its stopping token

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids)


class SessionEngine:
    """Drives an `LLMEngine` (vLLM's synchronous front-end) with sessions."""

    def __init__(self, llm_engine):
        self.engine = llm_engine
        self.sessions: dict[str, Session] = {}
        self._by_request: dict[str, Session] = {}
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.get_tokenizer()

    def start(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
              spec: InterceptSpec | None = None, session_id: str | None = None) -> Session:
        session_id = session_id or f"session-{next(self._ids)}"
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} exists")
        max_tokens = sampling_params.max_tokens
        session = Session(session_id, list(prompt_token_ids), sampling_params, max_tokens,
                          token_ids=list(prompt_token_ids))
        self.sessions[session_id] = session
        self._submit(session, spec or InterceptSpec())
        return session

    def resume(self, session: Session, token_ids: list[int] | None = None, text: str | None = None,
               spec: InterceptSpec | None = None, max_tokens: int | None = None,
               sampling_params: SamplingParams | None = None,
               context_token_ids: list[int] | None = None) -> None:
        """Append a tool's result (token ids, or text tokenized on its own) and continue.

        `sampling_params` replaces the session's for this and later segments
        (the session's max_tokens budget stays). `context_token_ids` replaces
        the whole sequence instead of appending to it (a re-rendered
        conversation); the engine reuses the KV of the prefix it shares with
        the paused request, and `appended` records the tokens after that prefix.
        """
        if session.state is not SessionState.INTERCEPTED:
            raise ValueError(f"session {session.session_id} is {session.state.value}, not intercepted")
        if text is not None:
            token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        appended = list(token_ids or [])
        if max_tokens is not None:
            session.max_tokens = max_tokens
        if sampling_params is not None:
            session.sampling_params = sampling_params
        if context_token_ids is not None:
            common = _common_prefix_len(session.token_ids, context_token_ids)
            appended = list(context_token_ids[common:])
            del session.token_ids[common:]
        session.appended.append(appended)
        session.token_ids.extend(appended)
        base = (spec or InterceptSpec()).to_dict()
        base["resume"] = session.engine_request_id
        session.state = SessionState.RUNNING
        self._submit(session, InterceptSpec.from_dict(base))

    def abort(self, session: Session) -> None:
        """Free everything the session holds, paused or running."""
        if session.state is SessionState.FINISHED:
            return
        self.engine.engine_core.abort_requests([session.engine_request_id])
        self.engine.output_processor.abort_requests([session.engine_request_id], internal=True)
        self._by_request.pop(session.engine_request_id, None)
        session.state = SessionState.FINISHED
        session.finish_reason = "abort"

    def _submit(self, session: Session, spec: InterceptSpec) -> None:
        remaining = session.max_tokens - session.num_generated
        if remaining <= 0 or len(session.token_ids) >= self._max_model_len():
            # Nothing left to generate: the session ends at its tool result,
            # and the paused request it would have resumed is released.
            if spec.resume is not None:
                self.engine.engine_core.abort_requests([spec.resume])
            session.state = SessionState.FINISHED
            session.finish_reason = "length"
            return
        params = session.sampling_params.clone()
        params.max_tokens = remaining
        params.output_kind = RequestOutputKind.FINAL_ONLY
        if spec.intercepts and not params.stop:
            # vLLM's detokenizer drops a stopped output's last token from the
            # text (it takes it for EOS); a paused segment keeps it.
            params.include_stop_str_in_output = True
        session.keeps_stop_text = params.include_stop_str_in_output
        params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: spec.to_dict()}
        request_id = f"{session.session_id}/{len(session.segments)}"
        engine_id = self.engine.add_request(
            request_id, TokensPrompt(prompt_token_ids=list(session.token_ids)), params
        )
        session.engine_request_id = engine_id
        self._by_request[engine_id] = session
        self._by_request[request_id] = session

    def _segment_text(self, session: Session, completion) -> str:
        """A finished segment's text as vLLM gives it, but with the token that paused it.

        vLLM leaves a stopping token's text out (it takes it for EOS);
        `_submit` has it kept where no stop strings forbid. So the pausing
        token's text is added where it was left out, and an EOS or stop
        token's text taken off where it was kept only for a pause.
        """
        text = completion.text
        if completion.stop_reason == STOP_REASON:
            return text if session.keeps_stop_text else text + self._last_token_text(session)
        kept_for_pause = session.keeps_stop_text and not session.sampling_params.include_stop_str_in_output
        if kept_for_pause and completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
            last = self._last_token_text(session)
            return text[: len(text) - len(last)] if last and text.endswith(last) else text
        return text

    def _last_token_text(self, session: Session) -> str:
        if not session.segments[-1]:
            return ""
        tail = session.token_ids[-8:]
        skip = session.sampling_params.skip_special_tokens
        text = self.tokenizer.decode(tail, skip_special_tokens=skip)
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=skip)
        return text[len(before):] if text.startswith(before) else ""

    def _max_model_len(self) -> int:
        return self.engine.model_config.max_model_len

    def has_unfinished(self) -> bool:
        return any(s.state is SessionState.RUNNING for s in self.sessions.values())

    def step(self) -> list[Session]:
        """One engine step; returns the sessions that paused or finished in it."""
        changed = []
        for output in self.engine.step():
            if not output.finished:
                continue
            session = self._by_request.pop(output.request_id, None)
            if session is None:
                continue
            self._by_request.pop(session.engine_request_id, None)
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            session.last_output = output
            session.segments.append(tokens)
            session.output_token_ids.extend(tokens)
            session.token_ids.extend(tokens)
            session.texts.append(self._segment_text(session, completion))
            if completion.stop_reason == STOP_REASON:
                session.state = SessionState.INTERCEPTED
            else:
                session.state = SessionState.FINISHED
                session.finish_reason = completion.finish_reason
                session.stop_reason = completion.stop_reason
            changed.append(session)
        return changed


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
