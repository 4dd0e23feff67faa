"""`infercept.LLM`: vLLM's offline `LLM`, with tools called in the middle of generation
(the tools themselves, and how they run, are in `infercept.entrypoints.tools`).

`generate(..., augmentations=[...])` pauses a request when the model writes an
augmentation's end marker, runs the tool off the engine thread (a plain
function in a thread pool, an `async def` on one event-loop thread), and
resumes the request with the tool's text appended; the engine keeps serving
every other request meanwhile, and InferCept's scheduler decides what happens
to the paused request's KV cache. `chat(..., tool_functions={...})` runs the
whole tool loop of a chat conversation with a vLLM tool parser.

Both run on `SessionEngine` (one session per prompt, one vLLM request per
segment). Without augmentations or tool functions, both are vLLM's own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import vllm
from tqdm.auto import tqdm
from vllm import CompletionOutput, RequestOutput, SamplingParams
from vllm.renderers.inputs.preprocess import conversation_to_seq, prompt_to_seq

from infercept.adapter.interception import InterceptSpec
from infercept.adapter.profiler import profile_llm
from infercept.config import InterceptConfig
from infercept.entrypoints.sessions import Session, SessionEngine, SessionState
from infercept.entrypoints.tools import (Augmentation, ErrorHandler, ToolTimeoutError, _check_error_handler,
                                         _describe, _failed, _Outcome, _recover, _ToolRunner, find_call,
                                         tool_error_message)

__all__ = ["LLM", "Augmentation", "InterceptionRecord", "ToolTimeoutError", "find_call",
           "tool_error_message"]


@dataclass
class InterceptionRecord:
    """One tool call: what was asked, what came back, and what the engine did meanwhile.

    `engine` is the scheduler's record of the interception (paused time as
    `duration_s`, `predicted_duration_s`, `context_tokens`, `reused_tokens`,
    `final_state`, and `decisions`: the preserve/swap/discard history); None
    under the stock `vllm` policy or when the session ended at the call.
    """

    name: str
    args: Any
    result: str | None = None
    error: str | None = None
    duration_s: float = 0.0  # the tool's own run time
    inserted_at_tokens: int | None = None  # offset of the result in the continuation (generate)
    result_tokens: int = 0
    engine: dict[str, Any] | None = None

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return list((self.engine or {}).get("decisions", []))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Run:
    """One prompt's session and what the front-end knows about it."""

    index: int
    session: Session
    params: SamplingParams
    prompt_text: str  # what a start marker is searched in, before the continuation
    prompt: str | None = None  # the prompt string, for the output (None for token prompts)
    pieces: list[str] = field(default_factory=list)  # model text and tool results, in order
    records: list[InterceptionRecord] = field(default_factory=list)
    pause_of_record: list[int] = field(default_factory=list)  # engine interception index per record
    num_pauses: int = 0
    futures: list[concurrent.futures.Future] = field(default_factory=list)
    deadline_s: float = float("inf")  # when the running tools count as failed (monotonic)
    calls: list[Any] = field(default_factory=list)  # what each future answers
    messages: list[dict] = field(default_factory=list)  # chat only
    turn_start: int = 0  # chat: first segment of the current assistant turn

    def attach_engine_records(self) -> None:
        last = self.session.last_output
        params = (last.kv_transfer_params or {}) if last is not None else {}
        engine = params.get("infercept", {}).get("interceptions", [])
        for record, pause in zip(self.records, self.pause_of_record):
            record.engine = engine[pause] if pause < len(engine) else None


class _Driver:
    """Steps the engine while tools run; subclasses say what a pause and an end mean."""

    def __init__(self, llm: "LLM", use_tqdm, total: int):
        self.llm = llm
        self.sessions = SessionEngine(llm.llm_engine)
        self.tokenizer = llm.get_tokenizer()
        self.runs: list[_Run] = []
        self._by_session: dict[str, _Run] = {}
        self._waiting: list[_Run] = []
        self._pbar = None
        if use_tqdm:
            make = use_tqdm if callable(use_tqdm) else tqdm
            self._pbar = make(total=total, desc="Processed prompts", dynamic_ncols=True)

    def start(self, prompt_token_ids: list[int], params: SamplingParams, spec: InterceptSpec,
              prompt_text: str, first_params: SamplingParams | None = None) -> _Run:
        """Start a session; `first_params` (if any) drive its first segment only."""
        if params.max_tokens is None:
            params = params.clone()
            params.max_tokens = self.llm.llm_engine.model_config.max_model_len
        if first_params is not None:
            first_params = first_params.clone()
            first_params.max_tokens = params.max_tokens  # the session's budget
        session = self.sessions.start(prompt_token_ids, first_params or params, spec,
                                      session_id=str(next(self.llm.request_counter)))
        run = _Run(len(self.runs), session, params, prompt_text)
        self.runs.append(run)
        self._by_session[session.session_id] = run
        return run

    def run(self) -> list[RequestOutput]:
        """Serve every session to its end; the outputs in start order."""
        outputs: list[RequestOutput | None] = [None] * len(self.runs)
        try:
            for run in self.runs:  # a prompt with no room left ends at once
                if run.session.state is SessionState.FINISHED:
                    outputs[run.index] = self._finish(run)
            while self.sessions.has_unfinished() or self._waiting:
                if self.sessions.has_unfinished():
                    for session in self.sessions.step():
                        run = self._by_session[session.session_id]
                        if session.state is SessionState.INTERCEPTED:
                            run.num_pauses += 1
                            run.futures, run.calls = self.intercepted(run)
                            run.deadline_s = time.monotonic() + self.timeout_s(run)
                            self._waiting.append(run)
                        else:
                            outputs[run.index] = self._finish(run)
                for run in self._collect(block=not self.sessions.has_unfinished()):
                    outputs[run.index] = self._finish(run)
        except BaseException:
            self._abort_all()
            raise
        finally:
            if self._pbar is not None:
                self._pbar.close()
        return outputs

    def _finish(self, run: _Run) -> RequestOutput:
        run.attach_engine_records()
        if self._pbar is not None:
            self._pbar.update(1)
        return self.finished(run)

    def _collect(self, block: bool) -> list[_Run]:
        """Resume every session whose tools are done or timed out; returns those that ended instead."""
        if block:
            pending = [f for run in self._waiting for f in run.futures if not f.done()]
            if pending:
                wait_s = max(0.0, min(r.deadline_s for r in self._waiting) - time.monotonic())
                concurrent.futures.wait(pending, timeout=wait_s, return_when=concurrent.futures.FIRST_COMPLETED)
        ended, now_s = [], time.monotonic()
        for run in [r for r in self._waiting if now_s >= r.deadline_s or all(f.done() for f in r.futures)]:
            self._waiting.remove(run)
            outcomes = [self._outcome(run, f) for f in run.futures]
            run.futures = []
            self.tools_done(run, outcomes)
            if run.session.state is SessionState.FINISHED:  # no budget left after the result
                ended.append(run)
        return ended

    def _outcome(self, run: _Run, future: concurrent.futures.Future) -> _Outcome:
        if future.done() and not future.cancelled():
            return future.result()
        future.cancel()  # an async tool stops; a thread cannot be stopped
        timeout_s = self.timeout_s(run)
        return _Outcome(None, ToolTimeoutError(f"the tool did not return within {timeout_s:g} s"), timeout_s)

    def _abort_all(self) -> None:
        for run in self._waiting:
            for future in run.futures:
                future.cancel()
        for session in self.sessions.sessions.values():
            self.sessions.abort(session)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    # ---- what subclasses define ---------------------------------------------

    def timeout_s(self, run: _Run) -> float:
        """How long the tools of a paused session may take (the LLM's intercept timeout)."""
        return self.llm.intercept_config.intercept_timeout_s

    def intercepted(self, run: _Run) -> tuple[list[concurrent.futures.Future], list[Any]]:
        """A session paused: start its tools; returns their futures and what each answers."""
        raise NotImplementedError

    def tools_done(self, run: _Run, outcomes: list[_Outcome]) -> None:
        """Every tool of a paused session returned: resume it."""
        raise NotImplementedError

    def finished(self, run: _Run) -> RequestOutput:
        """A session ended: its output."""
        raise NotImplementedError


class _Generation(_Driver):
    """`LLM.generate` with augmentations: tool text goes inline after each call."""

    def __init__(self, llm: "LLM", augmentations: Sequence[Augmentation], use_tqdm, total: int):
        super().__init__(llm, use_tqdm, total)
        self.augmentations = list(augmentations)
        only = self.augmentations[0] if len(self.augmentations) == 1 else None
        self.spec = InterceptSpec(
            triggers=tuple(dict.fromkeys(a.end for a in self.augmentations)),
            tool=only.name if only else None,
            expected_duration_s=only.expected_duration_s if only else None,
        )

    def intercepted(self, run: _Run):
        answered = run.prompt_text + "".join(run.pieces)
        run.pieces.append(run.session.texts[-1])
        call = find_call(answered + run.pieces[-1], self.augmentations, since=len(answered))
        if call is None:
            # The trigger's text is not in this segment's output text (a special
            # token skipped there, say): nothing new to call, the model goes on.
            return [], []
        aug, args = call
        if args is None:
            return [_failed(ValueError(f"no {aug.start!r} before {aug.end!r}"))], [call]
        return [self.llm._tools.submit(aug.call, args)], [call]

    def timeout_s(self, run: _Run) -> float:
        if run.calls and run.calls[0][0].timeout_s is not None:
            return run.calls[0][0].timeout_s
        return super().timeout_s(run)

    def tools_done(self, run: _Run, outcomes: list[_Outcome]) -> None:
        session = run.session
        text, record = "", None
        if run.calls:
            (aug, args), outcome = run.calls[0], outcomes[0]
            record = InterceptionRecord(aug.name, args, duration_s=outcome.duration_s)
            if outcome.error is None:
                text = record.result = _as_text(outcome.value)
            else:
                record.error = _describe(outcome.error)
                record.result = _recover(aug.on_error, outcome.error)
                text = record.result or ""
            record.inserted_at_tokens = len(session.token_ids) - len(session.prompt_token_ids)
            run.records.append(record)
            run.pause_of_record.append(run.num_pauses - 1)
        run.pieces.append(text)
        self.sessions.resume(session, text=text, spec=self.spec)
        if record is not None:
            record.result_tokens = len(session.appended[-1])

    def finished(self, run: _Run) -> RequestOutput:
        session = run.session
        texts = run.pieces + session.texts[run.num_pauses:]  # the last segment, unless it ended at a call
        continuation = session.token_ids[len(session.prompt_token_ids):]
        output = _request_output(session, run.prompt, session.prompt_token_ids, "".join(texts), continuation)
        output.interceptions = run.records
        return output


class _Chat(_Driver):
    """`LLM.chat` with tool functions: the whole tool loop, one session per conversation."""

    def __init__(self, llm: "LLM", tools: list[dict] | None, tool_functions: dict[str, Callable],
                 tool_parser: str, tool_call_end: str | None, on_error: ErrorHandler,
                 chat_template: str | None, chat_template_kwargs: dict | None, use_tqdm, total: int):
        from vllm.tool_parsers import ToolParserManager

        super().__init__(llm, use_tqdm, total)
        self.parser_cls = ToolParserManager.get_tool_parser(tool_parser)
        end = tool_call_end or getattr(self.parser_cls, "tool_call_end_token", None)
        if not end:
            raise ValueError(f"tool parser {tool_parser!r} names no end marker; pass tool_call_end=")
        self.spec = InterceptSpec(triggers=(end,))
        self.tools, self.tool_functions, self.on_error = tools, tool_functions, on_error
        self.template_kwargs = dict(chat_template_kwargs or {})
        if chat_template is not None:
            self.template_kwargs["chat_template"] = chat_template

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=True, **self.template_kwargs)

    def start_conversation(self, messages: list[dict], params: SamplingParams,
                           first_turn_params: SamplingParams | None) -> None:
        text = self.render(messages)
        run = self.start(self.tokenizer.encode(text, add_special_tokens=False), params, self.spec,
                         text, first_params=first_turn_params)
        run.messages = [dict(m) for m in messages]

    def intercepted(self, run: _Run):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        turn_text = "".join(run.session.texts[run.turn_start:])
        request = ChatCompletionRequest(messages=run.messages, tools=self.tools)
        info = self.parser_cls(self.tokenizer).extract_tool_calls(turn_text, request)
        if not info.tools_called:
            return [], []  # not a call the parser reads: the model goes on with its turn
        calls = [{"id": tc.id, "type": "function",
                  "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                 for tc in info.tool_calls]
        run.messages.append({"role": "assistant", "content": info.content or "", "tool_calls": calls})
        return [self._call(c["function"]) for c in calls], calls

    def _call(self, function: dict) -> concurrent.futures.Future:
        fn = self.tool_functions.get(function["name"])
        if fn is None:
            return _failed(KeyError(f"unknown tool {function['name']!r}"))
        try:
            args = json.loads(function["arguments"] or "{}")
        except json.JSONDecodeError as exc:
            return _failed(exc)
        return self.llm._tools.submit(fn, **args) if isinstance(args, dict) else self.llm._tools.submit(fn, args)

    def tools_done(self, run: _Run, outcomes: list[_Outcome]) -> None:
        if not run.calls:
            self.sessions.resume(run.session, token_ids=[], spec=self.spec, sampling_params=run.params)
            return
        records = []
        for call, outcome in zip(run.calls, outcomes):
            function = call["function"]
            record = InterceptionRecord(function["name"], _loads(function["arguments"]),
                                        duration_s=outcome.duration_s)
            if outcome.error is None:
                record.result = _as_text(outcome.value)
            else:
                record.error = _describe(outcome.error)
                record.result = _recover(self.on_error, outcome.error) or ""
            run.messages.append({"role": "tool", "tool_call_id": call["id"], "name": function["name"],
                                 "content": record.result})
            records.append(record)
        self._continue(run)
        for record in records:
            record.result_tokens = len(run.session.appended[-1])
            run.records.append(record)
            run.pause_of_record.append(run.num_pauses - 1)
        run.turn_start = len(run.session.segments)

    def _continue(self, run: _Run) -> None:
        """Resume with the conversation rendered anew.

        The model's own tokens are kept when the rendering starts with their
        text; otherwise the whole rendering replaces them, and the engine
        reuses the KV of the common token prefix.
        """
        target = self.render(run.messages)
        current = self.decode(run.session.token_ids)
        if target.startswith(current):
            tokens = self.tokenizer.encode(target[len(current):], add_special_tokens=False)
            self.sessions.resume(run.session, token_ids=tokens, spec=self.spec, sampling_params=run.params)
        else:
            self.sessions.resume(run.session, spec=self.spec, sampling_params=run.params,
                                 context_token_ids=self.tokenizer.encode(target, add_special_tokens=False))

    def finished(self, run: _Run) -> RequestOutput:
        session = run.session
        answer_tokens = [t for segment in session.segments[run.turn_start:] for t in segment]
        answer = "".join(session.texts[run.turn_start:])
        context = session.token_ids[: len(session.token_ids) - len(answer_tokens)]
        if len(session.segments) > run.turn_start:
            run.messages.append({"role": "assistant", "content": answer})
        output = _request_output(session, self.decode(context), context, answer, answer_tokens)
        output.messages = run.messages
        output.interceptions = run.records
        return output


def _request_output(session: Session, prompt: str | None, prompt_token_ids: list[int], text: str,
                    token_ids: list[int]) -> RequestOutput:
    last = session.last_output
    completion = CompletionOutput(index=0, text=text, token_ids=list(token_ids), cumulative_logprob=None,
                                  logprobs=None, finish_reason=session.finish_reason,
                                  stop_reason=session.stop_reason)
    return RequestOutput(session.session_id, prompt, list(prompt_token_ids), None, [completion],
                         finished=True, kv_transfer_params=last.kv_transfer_params if last else None)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return arguments


class LLM(vllm.LLM):
    """A drop-in for `vllm.LLM` whose requests pause for tools, keeping their place (InferCept).

    Takes vLLM's engine arguments, plus InferCept's settings: the policy for
    paused requests' KV cache, the CPU swap space, and `intercept_timeout_s`
    (600 s by default): how long a tool may take before it counts as failed
    (`Augmentation.timeout_s` overrides it per augmentation), and after which
    the engine releases a paused request that was never resumed. `model` must be a
    local folder (nothing is downloaded); None serves the embedded default
    model. `tool_workers` caps the threads that run plain-function tools.
    `emulate_async_copies` (tests, CPU only) runs KV copies as late as a GPU may.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, intercept_policy: str = "min-waste",
                 swap_space_bytes: int | None = None, intercept_timeout_s: float | None = None,
                 cost_profile: str | None = None, profile_at_startup: bool = True,
                 tool_workers: int | None = None, emulate_async_copies: int = 0,
                 **kwargs: Any) -> None:
        model = _local_model(model)
        if kwargs.get("tokenizer") is not None:
            _require_local(kwargs["tokenizer"], "tokenizer")
        _hub_offline()
        settings = {"swap_space_bytes": swap_space_bytes, "intercept_timeout_s": intercept_timeout_s,
                    "cost_profile": cost_profile, "profile_at_startup": profile_at_startup,
                    "emulate_async_copies": emulate_async_copies}
        self.intercept_config = InterceptConfig(
            policy=intercept_policy, **{k: v for k, v in settings.items() if v is not None}
        )
        kwargs.update(self.intercept_config.engine_kwargs(kwargs))
        super().__init__(model=str(model), **kwargs)
        self.cost_model = self.cost_model_source = None
        if intercept_policy != "vllm":
            # The policy plans with measured forward and swap times.
            self.cost_model, self.cost_model_source = profile_llm(self)
        self._tools = _ToolRunner(tool_workers)
        weakref.finalize(self, self._tools.shutdown)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 augmentations: Sequence[Augmentation] | None = None, *, use_tqdm=True,
                 **kwargs: Any) -> list[RequestOutput]:
        """vLLM's `generate`; with `augmentations`, tools answer inline.

        Each output's `outputs[0]` is then the whole continuation (the model's
        tokens and the tools' tokens as they were fed; the text with each
        result after its call), `max_tokens` counts the model's tokens only,
        and `interceptions` lists one `InterceptionRecord` per call.
        """
        if not augmentations:
            return super().generate(prompts, sampling_params, use_tqdm=use_tqdm, **kwargs)
        _only(kwargs, {"tokenization_kwargs"}, "generate() with augmentations")
        inputs = self._preprocess_cmpl(prompt_to_seq(prompts), kwargs.get("tokenization_kwargs"))
        params = self._params_to_seq(sampling_params or self.get_default_sampling_params(), len(inputs))
        driver = _Generation(self, augmentations, use_tqdm, len(inputs))
        for engine_input, p in zip(inputs, params):
            if engine_input.get("type") != "token":
                raise ValueError("augmentations take text or token prompts only")
            _check_params(p)
            ids = list(engine_input["prompt_token_ids"])
            run = driver.start(ids, p, driver.spec, engine_input.get("prompt") or driver.decode(ids))
            run.prompt = engine_input.get("prompt")
        return driver.run()

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm=True, *, tools: list[dict] | None = None,
             tool_functions: dict[str, Callable] | None = None, tool_parser: str = "hermes",
             tool_call_end: str | None = None, first_turn_params: SamplingParams | None = None,
             on_error: ErrorHandler = tool_error_message, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> list[RequestOutput]:
        """vLLM's `chat`; with `tool_functions`, the whole tool loop of each conversation.

        The model's tool calls (read by the vLLM tool parser `tool_parser`)
        pause the request; `tool_functions[name](**arguments)` answers; the
        conversation goes on until the model answers without a call. Each
        output's prompt is the conversation as the model last saw it,
        `outputs[0]` its final answer, `messages` the whole conversation,
        `interceptions` one record per call. `first_turn_params` apply to the
        first assistant turn only (e.g. structured outputs forcing a call).
        """
        if not tool_functions:
            if first_turn_params is not None:
                raise ValueError("first_turn_params needs tool_functions")
            return super().chat(messages, sampling_params, use_tqdm, tools=tools, chat_template=chat_template,
                                chat_template_kwargs=chat_template_kwargs, **kwargs)
        _only(kwargs, set(), "chat() with tool_functions")
        _check_error_handler(on_error)
        conversations = conversation_to_seq(messages)
        params = self._params_to_seq(sampling_params or self.get_default_sampling_params(),
                                     len(conversations))
        driver = _Chat(self, tools, tool_functions, tool_parser, tool_call_end, on_error,
                       chat_template if chat_template is not None else self.chat_template,
                       chat_template_kwargs, use_tqdm, len(conversations))
        for conversation, p in zip(conversations, params):
            driver.start_conversation(list(conversation), _for_parsing(p), _for_parsing(first_turn_params))
        return driver.run()


def _for_parsing(params: SamplingParams | None) -> SamplingParams | None:
    """Tool-call markers may be special tokens: keep them in the text (as vLLM's serving does)."""
    if params is None:
        return None
    _check_params(params)
    params = params.clone()
    params.skip_special_tokens = False
    return params


def _check_params(params: SamplingParams) -> None:
    if params.n != 1:
        raise ValueError("tool calls need n=1 (one sequence per prompt)")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        raise ValueError("logprobs are not returned across tool calls; request them without tools")


def _only(kwargs: dict[str, Any], allowed: set[str], where: str) -> None:
    unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in allowed)
    if unsupported:
        raise TypeError(f"{where} does not take {', '.join(unsupported)}")


def _local_model(model: str | os.PathLike | None) -> str:
    if model is None:
        from infercept.default_model import default_model_path

        return str(default_model_path())
    return _require_local(model, "model")


def _require_local(path: str | os.PathLike, what: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(
            f"{what} {str(path)!r} is not a local folder; InferCept never downloads models "
            "(pass a folder with config.json, or model=None for the embedded default model)"
        )
    return str(path)


def _hub_offline() -> None:
    """No Hugging Face Hub access from this process, unless the environment says otherwise."""
    import sys

    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
