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
from infercept.server.service import CANCELLED, RESUMED, Intercept, InterceptService, new_intercept_id

logger = logging.getLogger(__name__)
router = APIRouter()
# nginx's code for a request whose client closed the connection; nobody reads the response.
_CLIENT_CLOSED_REQUEST = 499

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
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


@router.post("/v1/intercepts/{intercept_id}/resume", responses=_GENERATE_RESPONSES)
async def resume_intercept(intercept_id: str, resume: ResumeRequest, raw_request: Request):
    service = _service(raw_request)
    try:
        claimed = service.registry.claim(intercept_id)
    except InterceptError as error:
        return error.response()
    try:
        body = _resume_body(service, claimed, resume)
    except InterceptError as error:
        service.registry.release(claimed)
        return error.response()
    extension = resume.infercept or InterceptExtension.model_validate(
        {k: v for k, v in claimed.extension.items() if k != "resume"}
    )
    spec = _spec(extension, new_intercept_id(), resume=intercept_id, auto_resume=False)
    return await _run(raw_request, "completion", body, spec, claimed, extension,
                      budget=resume.max_tokens or claimed.max_tokens)


@router.get("/v1/intercepts/{intercept_id}", response_model=InterceptState,
            responses=ERROR_RESPONSES)
async def get_intercept(intercept_id: str, raw_request: Request):
    service = _service(raw_request)
    try:
        return JSONResponse(await service.state(service.registry.get(intercept_id)))
    except InterceptError as error:
        return error.response()


@router.delete("/v1/intercepts/{intercept_id}", response_model=DeletedIntercept,
               responses=ERROR_RESPONSES)
async def delete_intercept(intercept_id: str, raw_request: Request):
    service = _service(raw_request)
    try:
        intercept = service.registry.claim(intercept_id)
    except InterceptError as error:
        return error.response()
    await service.cancel(intercept)
    return JSONResponse({"id": intercept_id, "object": "intercept", "deleted": True})


@router.api_route("/v1/intercepts/{path:path}", include_in_schema=False,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def no_such_intercept_route(path: str):
    """Any other path under /v1/intercepts (an id with a slash): 404 in OpenAI's shape."""
    return error_response(HTTPStatus.NOT_FOUND, f"no intercept route {path!r}", "intercept_id")


# ---- chat and completions --------------------------------------------------


async def _generate(raw_request: Request, kind: str):
    service = _service(raw_request)
    try:
        body = await _json_body(raw_request)
        extension = InterceptExtension.model_validate(body.pop("infercept", None) or {})
        claimed = service.registry.claim(extension.resume) if extension.resume else None
    except ValidationError as error:
        return error_response(HTTPStatus.BAD_REQUEST, "infercept: " + validation_message(error),
                              "infercept")
    except InterceptError as error:
        return error.response()
    spec = _spec(extension, new_intercept_id(), resume=extension.resume, auto_resume=True)
    stock = getattr(raw_request.app.state.args, "intercept_policy", None) == "vllm"
    if kind == "chat" and not stock and body.get("tools") and body.get("tool_choice") != "none":
        # A turn that may end in a tool call pauses at its end; one that ends
        # without a call is then cancelled at once.
        spec["pause_on_stop"] = True
        end = _tool_call_end(raw_request)
        if end:
            spec["triggers"] = sorted({*spec.get("triggers", ()), end})
    return await _run(raw_request, kind, body, spec, claimed, extension, budget=None)


async def _run(raw_request: Request, kind: str, body: dict, spec: dict, claimed: Intercept | None,
               extension: InterceptExtension, budget: int | None):
    service = _service(raw_request)
    started_s = time.monotonic()
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), "infercept": json.dumps(spec)}
    if _may_pause(spec) and not body.get("stop"):
        # vLLM's detokenizer drops the last token of a stopped output (it takes
        # it for EOS); a segment that pauses on a trigger keeps it.
        body.setdefault("include_stop_str_in_output", True)
    original = raw_request.app.state.infercept_originals[CHAT if kind == "chat" else COMPLETIONS]
    try:
        request = original.request_model.model_validate(body)
    except ValidationError as error:
        if claimed is not None:
            service.registry.release(claimed)
        return error_response(HTTPStatus.BAD_REQUEST, validation_message(error))
    session = _Segment(service, kind, body, spec["key"], claimed, extension, budget, started_s)
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
    info = await session.settle(_has_tool_calls(data), data.get("usage"))
    if info:
        data["infercept"] = info
    if "intercept_id" in info and kind == "chat":
        _finish_as_tool_calls(data)
    return JSONResponse(data, status_code=response.status_code, headers=_headers(response))


class _Segment:
    """One request's passage through the engine, and what it left behind."""

    def __init__(self, service: InterceptService, kind, body, key, claimed, extension, budget,
                 started_s):
        self.service, self.kind, self.body, self.key = service, kind, body, key
        self.claimed, self.extension, self.budget, self.started_s = claimed, extension, budget, started_s

    async def abandon(self) -> None:
        """The segment ended without an answer (an error, or its client gone and vLLM's abort).

        What it resumed stays resumable if the engine never took it, and is
        cancelled if it did; if the segment itself paused, nobody will resume
        it: it is cancelled too.
        """
        service = self.service
        try:
            admission = await service.call("admission", self.key)
        except Exception:  # the engine is shutting down: nothing left to free
            logger.warning("InferCept: no admission for abandoned request %s", self.key, exc_info=True)
            admission = {"resumed_from": None}
        if self.claimed is not None and admission["resumed_from"] is None:
            service.registry.release(self.claimed)
        elif self.claimed is not None or admission["resumed_from"] is not None:
            service.registry.finish(admission["resumed_from"] or self.claimed.intercept_id, CANCELLED)
        if "state" in admission:
            await service.call("cancel", self.key)

    async def settle(self, has_tool_calls: bool, usage: dict | None) -> dict[str, Any]:
        service, info = self.service, {}
        admission = await service.call("admission", self.key)
        resumed_from = admission["resumed_from"]
        if self.claimed is not None:
            service.registry.finish(self.claimed.intercept_id, RESUMED)
            resumed_from = resumed_from or self.claimed.intercept_id
        elif resumed_from is not None:
            service.registry.finish(resumed_from, RESUMED)
        if resumed_from is not None:
            info.update(resumed_from=resumed_from, reused_tokens=admission["reused_tokens"])
            RESUME_LATENCY.observe(time.monotonic() - self.started_s)
        if "state" not in admission:
            return info
        if self.kind == "chat" and not has_tool_calls:
            await service.call("cancel", self.key)  # a final answer: nothing to resume
            return info
        previous = self.claimed.generated_tokens if self.claimed else 0
        service.registry.add(Intercept(
            intercept_id=self.key,
            kind=self.kind,
            model=self.body.get("model"),
            token_ids=admission["token_ids"],
            generated_tokens=previous + len(admission["token_ids"]) - admission["prompt_tokens"],
            max_tokens=self.budget if self.budget is not None else self.body.get("max_tokens"),
            defaults={k: v for k, v in self.body.items() if k not in _SEGMENT_FIELDS},
            extension=self.extension.model_dump(exclude_none=True),
        ))
        info.update(intercept_id=self.key, state=admission["state"])
        return info

    async def stream(self, chunks):
        """vLLM's event stream, with the `"infercept"` object in its last data chunk."""
        held, has_tool_calls, buffer, settled = None, False, "", False
        try:
            async for chunk in chunks:
                buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    if event.strip() == "data: [DONE]":
                        info = await self.settle(has_tool_calls, None)
                        settled = True
                        if held is not None:
                            yield _with_info(held, info, self.kind) + "\n\n"
                            held = None
                        yield event + "\n\n"
                        continue
                    has_tool_calls |= _event_has_tool_calls(event)
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


def _resume_body(service: InterceptService, claimed: Intercept, resume: ResumeRequest) -> dict:
    if claimed.kind != "completion":
        raise InterceptError(HTTPStatus.BAD_REQUEST,
                             "a chat intercept resumes with the conversation sent to "
                             "/v1/chat/completions (tool messages appended)", "intercept_id")
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
    budget = resume.max_tokens or claimed.max_tokens
    remaining = max_model_len - len(prompt)
    if budget is not None:
        if budget <= claimed.generated_tokens:
            raise InterceptError(HTTPStatus.BAD_REQUEST,
                                 f"max_tokens {budget} leaves nothing to generate after "
                                 f"{claimed.generated_tokens} tokens", "max_tokens")
        remaining = min(remaining, budget - claimed.generated_tokens)
    overrides = dict(resume.model_extra or {})
    return {**claimed.defaults, **overrides, "model": claimed.model, "prompt": prompt,
            "stream": resume.stream, "max_tokens": remaining}


def _may_pause(spec: dict) -> bool:
    return bool(spec.get("triggers") or spec.get("intercept_after") or spec.get("pause_on_stop"))


def _tool_call_end(raw_request: Request) -> str | None:
    args = raw_request.app.state.args
    name = getattr(args, "tool_call_parser", None)
    if not name:
        return None
    from vllm.tool_parsers import ToolParserManager

    try:
        return getattr(ToolParserManager.get_tool_parser(name), "tool_call_end_token", None)
    except KeyError:
        return None


def _has_tool_calls(data: dict) -> bool:
    return any((choice.get("message") or {}).get("tool_calls") for choice in data.get("choices", ()))


def _event_has_tool_calls(event: str) -> bool:
    if not event.startswith("data: "):
        return False
    try:
        data = json.loads(event[len("data: "):])
    except ValueError:
        return False
    return any((choice.get("delta") or {}).get("tool_calls") for choice in data.get("choices", ()))


def _finish_as_tool_calls(data: dict) -> None:
    """An intercepted chat turn ends in its tool calls, whether chosen or forced."""
    for choice in data.get("choices", ()):
        if (choice.get("message") or choice.get("delta") or {}).get("tool_calls") is not None \
                or choice.get("finish_reason"):
            choice["finish_reason"] = "tool_calls"


def _with_info(event: str, info: dict, kind: str) -> str:
    if not info or not event.startswith("data: "):
        return event
    data = json.loads(event[len("data: "):])
    data["infercept"] = info
    if "intercept_id" in info and kind == "chat":
        _finish_as_tool_calls(data)
    return "data: " + json.dumps(data)


def _headers(response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
