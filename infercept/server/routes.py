"""HTTP routes: vLLM's chat and completion endpoints with interception, and the intercept API.

The chat and completion routes replace vLLM's (an endpoint plugin's routes
take precedence) but do vLLM's work by calling vLLM's own endpoint functions:
they only add the `"infercept"` extension to the request's `vllm_xargs`, then
add the `"infercept"` object to the response (to the last chunk of a stream).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from infercept.server import payloads
from infercept.server.metrics import RESUME_LATENCY
from infercept.server.protocol import (
    ERROR_RESPONSES,
    DeletedIntercept,
    InterceptChatCompletionRequest,
    InterceptCompletionRequest,
    InterceptError,
    InterceptExtension,
    InterceptState,
    ResumeRequest,
    error_response,
    validation_message,
)
from infercept.server.service import Claimed, InterceptService

logger = logging.getLogger(__name__)
router = APIRouter()
# nginx's code for a request whose client closed the connection; nobody reads the response.
_CLIENT_CLOSED_REQUEST = 499

COMPLETIONS, CHAT, MESSAGES, RESPONSES = ("/v1/completions", "/v1/chat/completions", "/v1/messages",
                                          "/v1/responses")
PATHS = {"completion": COMPLETIONS, "chat": CHAT, "messages": MESSAGES, "responses": RESPONSES}
# Conversations (a follow-up sends the conversation again, or names the response it
# continues): OpenAI's chat and Responses, Anthropic's messages.
CONVERSATIONS = ("chat", "messages", "responses")
# Response headers of a (non-streamed) response that leaves a paused request.
INTERCEPT_HEADER, INSTANCE_HEADER = "X-InferCept-Intercept-Id", "X-InferCept-Instance"
# Request header: pause this chat turn at its end for the conversation's next turn.
PAUSE_TURN_HEADER = "X-InferCept-Pause-Turn"
_HEADER_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# The duration estimator's name for the wait between a paused chat turn and the next.
HUMAN_TURN = "human"
# Request fields that describe one segment, not the session: not kept as a resume's defaults.
_SEGMENT_FIELDS = {"prompt", "messages", "stream", "stream_options", "max_tokens",
                   "max_completion_tokens", "vllm_xargs", "infercept", "model", "n"}


_GENERATE_RESPONSES = {int(HTTPStatus.OK): {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES}


# The typed `request` is validated as vLLM's own endpoint validates it, and
# documents the route in /openapi.json; the raw JSON is what goes on to vLLM.
@router.post(COMPLETIONS, responses=_GENERATE_RESPONSES)
async def create_completion(request: InterceptCompletionRequest, raw_request: Request):
    return await _generate(raw_request, "completion")


@router.post(CHAT, responses=_GENERATE_RESPONSES)
async def create_chat_completion(request: InterceptChatCompletionRequest, raw_request: Request):
    return await _generate(raw_request, "chat")


@router.post(MESSAGES, responses=_GENERATE_RESPONSES)
async def create_message(raw_request: Request):
    """Anthropic's Messages API (vLLM's), with interception: a turn that ends in
    `tool_use` pauses, and the follow-up with its `tool_result` resumes it."""
    return payloads.anthropic_error(await _generate(raw_request, "messages"))


@router.post(RESPONSES, responses=_GENERATE_RESPONSES)
async def create_response(raw_request: Request):
    """OpenAI's Responses API (vLLM's), with interception: a turn that ends in a
    `function_call` pauses; the follow-up with its `function_call_output` resumes
    it, whether it sends the input items again or names the previous response
    (`previous_response_id`, with vLLM's response store on): the calls that vLLM
    0.32 leaves out of such a conversation are put back (`with_previous_calls`)."""
    return await _generate(raw_request, "responses")


@router.post("/v1/intercepts/{intercept_id}/resume", responses=_GENERATE_RESPONSES)
async def resume_intercept(intercept_id: str, resume: ResumeRequest, raw_request: Request):
    service = _service(raw_request)
    try:
        claimed = await service.claim(intercept_id)
    except InterceptError as error:
        return error.response()
    try:
        body = _resume_body(service, claimed, resume)
    except InterceptError as error:
        await service.release(claimed)
        return error.response()
    extension = resume.infercept or InterceptExtension.model_validate(
        {k: v for k, v in claimed.session.get("extension", {}).items() if k != "resume"}
    )
    spec = _spec(extension, service.new_key(), resume=claimed.key, auto_resume=False)
    return await _run(raw_request, "completion", body, spec, claimed, extension,
                      budget=resume.max_tokens or claimed.session.get("max_tokens"))


@router.get("/v1/intercepts/{intercept_id}", response_model=InterceptState,
            responses=ERROR_RESPONSES)
async def get_intercept(intercept_id: str, raw_request: Request):
    service = _service(raw_request)
    try:
        return JSONResponse(await service.state(intercept_id))
    except InterceptError as error:
        return error.response()


@router.delete("/v1/intercepts/{intercept_id}", response_model=DeletedIntercept,
               responses=ERROR_RESPONSES)
async def delete_intercept(intercept_id: str, raw_request: Request):
    service = _service(raw_request)
    try:
        claimed = await service.claim(intercept_id)
    except InterceptError as error:
        return error.response()
    await service.cancel(claimed.key, claimed.rank)
    return JSONResponse({"id": intercept_id, "object": "intercept", "deleted": True})


@router.api_route("/v1/intercepts/{path:path}", include_in_schema=False,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def no_such_intercept_route(path: str):
    """Any other path under /v1/intercepts (an id with a slash): 404 in OpenAI's shape."""
    return error_response(HTTPStatus.NOT_FOUND, f"no intercept route {path!r}", "intercept_id")


# ---- completions and conversations ------------------------------------------


async def _generate(raw_request: Request, kind: str):
    service = _service(raw_request)
    try:
        body = await _json_body(raw_request)
        extension = InterceptExtension.model_validate(body.pop("infercept", None) or {})
        # A conversation's turn may pause at its end (never under the stock policy).
        converse = kind in CONVERSATIONS and getattr(raw_request.app.state.args, "intercept_policy",
                                                     None) != "vllm"
        pause_turn = converse and _pause_turn(raw_request, extension)
        if kind == "responses" and isinstance(body.get("previous_response_id"), str):
            payloads.with_previous_calls(body, service.calls_of(body["previous_response_id"]))
        claimed = await service.claim(extension.resume) if extension.resume else None
    except ValidationError as error:
        return error_response(HTTPStatus.BAD_REQUEST, "infercept: " + validation_message(error),
                              "infercept")
    except InterceptError as error:
        return error.response()
    spec = _spec(extension, service.new_key(), resume=claimed and claimed.key, auto_resume=True)
    if converse and body.get("tools") and not payloads.no_tools(body):
        # A turn that may end in tool calls pauses at its end (after all of them);
        # one that ends without a call is then cancelled at once (unless every
        # turn pauses). Its text is stock's: a natural stop drops the stop token.
        spec["pause_on_stop"] = True
    elif pause_turn:
        # The next turn is a person's: the duration estimator learns it as a tool.
        spec["pause_on_stop"] = True
        spec.setdefault("tool", HUMAN_TURN)
    return await _run(raw_request, kind, body, spec, claimed, extension, budget=None,
                      pause_turn=pause_turn)


async def _run(raw_request: Request, kind: str, body: dict, spec: dict, claimed: Claimed | None,
               extension: InterceptExtension, budget: int | None, pause_turn: bool = False):
    service = _service(raw_request)
    started_s = time.monotonic()
    if _may_pause(spec):
        spec["session"] = _session(kind, body, extension, budget, claimed)
    rank = claimed.rank if claimed else None
    if rank is None and service.data_parallel and service.affinity:
        try:
            rank = await _follow_up_rank(service, kind, body)
        except Exception:  # the lookup is an optimization: vLLM's balancing decides
            logger.warning("InferCept: locating a follow-up failed", exc_info=True)
    if rank is not None:
        raw_request = _pinned(raw_request, service.engine_index(rank))
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), "infercept": json.dumps(spec)}
    if (spec.get("triggers") or spec.get("intercept_after")) and kind in ("chat", "completion") \
            and not body.get("stop"):
        # vLLM's detokenizer drops the last token of a stopped output (it takes
        # it for EOS); a segment that pauses on a trigger keeps it.
        body.setdefault("include_stop_str_in_output", True)
    original = raw_request.app.state.infercept_originals.get(PATHS[kind])
    if original is None:  # vLLM does not serve this API for this model
        if claimed is not None:
            await service.release(claimed)
        return error_response(HTTPStatus.NOT_FOUND, f"{PATHS[kind]} is not served for this model")
    try:
        request = original.request_model.model_validate(body)
    except ValidationError as error:
        if claimed is not None:
            await service.release(claimed)
        return error_response(HTTPStatus.BAD_REQUEST, validation_message(error))
    # Under data parallelism a paused turn is named by its conversation, for the
    # follow-up (which names no tool call) to be located by.
    messages = body.get("messages") if pause_turn and service.data_parallel else None
    session = _Segment(service, kind, spec["key"], claimed, started_s, pause_turn, messages)
    try:
        response = await original.endpoint(request, raw_request)
    except BaseException:
        await asyncio.shield(session.abandon())
        raise
    if response is None:  # vLLM's `with_cancellation`: the client went away, vLLM aborted
        await session.abandon()
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    if isinstance(response, StreamingResponse):
        return StreamingResponse(session.stream(response.body_iterator),
                                 media_type="text/event-stream", headers=_headers(response))
    if response.status_code >= 400:
        await session.abandon()
        return response
    data = json.loads(response.body)
    if kind == "responses":
        service.remember_calls(data.get("id"), payloads.function_calls(data))
    call_ids = payloads.call_ids(data, kind)
    info = await session.settle(call_ids, payloads.reply_text(data, kind))
    if info:
        data["infercept"] = info
    if "intercept_id" in info:
        payloads.finish_paused(data, kind, bool(call_ids))
    headers = _headers(response)
    if "intercept_id" in info:  # where the paused request lives, for a router to stick to
        headers[INTERCEPT_HEADER] = info["intercept_id"]
        if service.instance:
            headers[INSTANCE_HEADER] = service.instance
    return JSONResponse(data, status_code=response.status_code, headers=headers)


class _Segment:
    """One request's passage through the engine, and what it left behind."""

    def __init__(self, service: InterceptService, kind: str, key: str, claimed: Claimed | None,
                 started_s: float, pause_turn: bool = False, messages: list | None = None):
        self.service, self.kind, self.key = service, kind, key
        self.claimed, self.started_s = claimed, started_s
        self.pause_turn = pause_turn  # a chat turn that stays paused without a tool call
        self.messages = messages

    async def abandon(self) -> None:
        """The segment ended without an answer (an error, or its client gone and vLLM's abort).

        What it resumed stays resumable if the engine never took it, and is
        cancelled if it did; if the segment itself paused, nobody will resume
        it: it is cancelled too.
        """
        service = self.service
        try:
            rank, admission = await service.admission(self.key, "cancelled")
        except Exception:  # the engine is shutting down: nothing left to free
            logger.warning("InferCept: no admission for abandoned request %s", self.key, exc_info=True)
            return
        if self.claimed is not None and admission["resumed_from"] is None:
            await service.release(self.claimed)
        if "state" in admission:
            await service.cancel(self.key, rank)

    async def settle(self, tool_call_ids: list[str], reply: str = "") -> dict[str, Any]:
        service, info = self.service, {}
        rank, admission = await service.admission(self.key)
        resumed_from = admission["resumed_from"]
        if self.claimed is not None and resumed_from is None:  # the engine had lost it
            await service.release(self.claimed)
        if resumed_from is not None:
            info.update(resumed_from=service.public_id(resumed_from, rank),
                        reused_tokens=admission["reused_tokens"])
            RESUME_LATENCY.observe(time.monotonic() - self.started_s)
        if "state" not in admission:
            return info
        if self.kind in CONVERSATIONS and not tool_call_ids and not self.pause_turn:
            await service.cancel(self.key, rank, None)  # a final answer: nothing to resume
            return info
        if self.kind in CONVERSATIONS and service.data_parallel:
            names = tool_call_ids or (
                [payloads.turn_id([*self.messages, {"role": "assistant", "content": reply}])]
                if isinstance(self.messages, list) else [])
            await service.call("bind_calls", self.key, names, rank=rank)
        info.update(intercept_id=service.public_id(self.key, rank), state=admission["state"])
        return info

    async def stream(self, chunks):
        """vLLM's event stream, with the `"infercept"` object in its last data chunk."""
        held, call_ids, reply, buffer, settled = None, [], [], "", False
        try:
            async for chunk in chunks:
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    if payloads.is_last_event(event, self.kind):
                        if self.kind == "responses":  # the last event holds the whole response
                            response = payloads.event_data(event).get("response") or {}
                            self.service.remember_calls(response.get("id"),
                                                        payloads.function_calls(response))
                            call_ids = payloads.call_ids(response, self.kind)
                            reply = [payloads.reply_text(response, self.kind)]
                        info = await self.settle(call_ids, "".join(reply))
                        settled = True
                        if self.kind == "responses":
                            event = payloads.with_info(event, info, self.kind, bool(call_ids))
                        if held is not None:
                            yield (held if self.kind == "responses"
                                   else payloads.with_info(held, info, self.kind, bool(call_ids))) + "\n\n"
                            held = None
                        yield event + "\n\n"
                        continue
                    data = payloads.event_data(event)
                    call_ids += payloads.call_ids(data, self.kind, streamed=True)
                    reply.append(payloads.reply_text(data, self.kind, streamed=True))
                    if held is not None:
                        yield held + "\n\n"
                    held = event
            if held is not None:
                yield held + "\n\n"
            if buffer:
                yield buffer
        except BaseException:
            if not settled:  # cancelled with its client: settle in the background
                self.service.track(asyncio.ensure_future(self.abandon()))
            raise


# ---- helpers ---------------------------------------------------------------


def _service(raw_request: Request) -> InterceptService:
    return raw_request.app.state.infercept


async def _json_body(raw_request: Request) -> dict:
    media_type = raw_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise InterceptError(HTTPStatus.BAD_REQUEST,
                             "Unsupported Media Type: Only 'application/json' is allowed")
    try:
        body = json.loads(await raw_request.body())
    except ValueError as error:
        raise InterceptError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise InterceptError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    return body


def _spec(extension: InterceptExtension, key: str, resume: str | None, auto_resume: bool) -> dict:
    spec = {"key": key, "auto_resume": auto_resume}
    if resume:
        spec["resume"] = resume
    for name in ("triggers", "intercept_after", "tool", "expected_duration_s"):
        value = getattr(extension, name)
        if value is not None:
            spec[name] = value
    return spec


def _session(kind: str, body: dict, extension: InterceptExtension, budget: int | None,
             claimed: Claimed | None) -> dict:
    """What a resume of this segment will need, kept by the engine with its KV.
    A chat turn resumes with the conversation sent again: it needs no defaults."""
    session = {
        "kind": kind,
        "model": body.get("model"),
        "max_tokens": budget if budget is not None else body.get("max_tokens"),
        "extension": extension.model_dump(exclude_none=True),
        "generated_before": claimed.generated_tokens if claimed else 0,
    }
    if kind == "completion":
        session["defaults"] = {k: v for k, v in body.items() if k not in _SEGMENT_FIELDS}
    return session


def _resume_body(service: InterceptService, claimed: Claimed, resume: ResumeRequest) -> dict:
    if claimed.kind != "completion":
        raise InterceptError(HTTPStatus.BAD_REQUEST,
                             f"a {claimed.kind} intercept resumes with the conversation sent to "
                             f"{PATHS.get(claimed.kind, CHAT)} (tool results appended)", "intercept_id")
    appended = resume.token_ids
    if appended is None:
        tokenizer = service.engine.get_tokenizer()
        appended = tokenizer.encode(resume.text or "", add_special_tokens=False)
    prompt = claimed.token_ids + list(appended)
    max_model_len = service.engine.model_config.max_model_len
    if len(prompt) >= max_model_len:
        raise InterceptError(HTTPStatus.BAD_REQUEST,
                             f"the resumed context ({len(prompt)} tokens) would exceed the model's "
                             f"context length ({max_model_len}); the intercept is still resumable")
    budget = resume.max_tokens or claimed.session.get("max_tokens")
    remaining = max_model_len - len(prompt)
    if budget is not None:
        if budget <= claimed.generated_tokens:
            raise InterceptError(HTTPStatus.BAD_REQUEST,
                                 f"max_tokens {budget} leaves nothing to generate after "
                                 f"{claimed.generated_tokens} tokens", "max_tokens")
        remaining = min(remaining, budget - claimed.generated_tokens)
    overrides = dict(resume.model_extra or {})
    return {**claimed.session.get("defaults", {}), **overrides, "model": claimed.session.get("model"),
            "prompt": prompt,
            "stream": resume.stream, "max_tokens": remaining}


def _pause_turn(raw_request: Request, extension: InterceptExtension) -> bool:
    """Whether a chat turn pauses at its natural end without a tool call: the
    request's `pause_turn`, else its `X-InferCept-Pause-Turn` header, else the
    server's `--intercept-chat-turns`."""
    if extension.pause_turn is not None:
        return extension.pause_turn
    header = raw_request.headers.get(PAUSE_TURN_HEADER)
    if header is not None:
        value = header.strip().lower()
        if value not in _HEADER_BOOLEANS:
            raise InterceptError(HTTPStatus.BAD_REQUEST,
                                 f"{PAUSE_TURN_HEADER} must be true or false, not {header!r}")
        return _HEADER_BOOLEANS[value]
    return bool(getattr(raw_request.app.state.args, "intercept_chat_turns", False))


def _may_pause(spec: dict) -> bool:
    return bool(spec.get("triggers") or spec.get("intercept_after") or spec.get("pause_on_stop"))


async def _follow_up_rank(service: InterceptService, kind: str, body: dict) -> int | None:
    """Under data parallelism: the engine holding the paused turn this request
    continues. A chat follow-up answers its tool calls, by id; a completion's
    prompt begins with the paused request's tokens."""
    if kind == "responses":  # its function calls' ids, in the input items
        items = body.get("input") if isinstance(body.get("input"), list) else ()
        call_ids = [item["call_id"] for item in items if isinstance(item, dict)
                    and item.get("type") in ("function_call", "function_call_output")
                    and isinstance(item.get("call_id"), str)]
        return await service.locate(call_ids[-64:], None) if call_ids else None
    if kind in CONVERSATIONS:
        messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
        calls = [call for message in messages if message.get("role") == "assistant"
                 for call in (message.get("tool_calls") or () if kind == "chat" else
                              message.get("content") if isinstance(message.get("content"), list) else ())
                 if isinstance(call, dict) and (kind == "chat" or call.get("type") == "tool_use")]
        call_ids = [call["id"] for call in calls if isinstance(call.get("id"), str)]
        replies = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
        if replies:  # a turn paused without a tool call: named by the conversation up to it
            call_ids.append(payloads.turn_id(messages[:replies[-1] + 1]))
        return await service.locate(call_ids[-64:], None) if call_ids else None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        tokenizer = service.engine.get_tokenizer()
        prompt = tokenizer.encode(prompt, add_special_tokens=body.get("add_special_tokens", True))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return await service.locate(None, prompt)
    return None


def _pinned(raw_request: Request, engine_index: int) -> Request:
    """The request, with vLLM's `X-data-parallel-rank` header sending it to one engine."""
    headers = [(name, value) for name, value in raw_request.scope["headers"]
               if name.lower() != b"x-data-parallel-rank"]
    headers.append((b"x-data-parallel-rank", str(engine_index).encode()))
    return Request({**raw_request.scope, "headers": headers}, raw_request.receive)


def _headers(response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
