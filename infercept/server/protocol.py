"""The server's additions to the OpenAI protocol, and its errors in OpenAI's shape."""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse


class InterceptExtension(BaseModel):
    """The `"infercept"` object a client may add to a chat or completion request."""

    model_config = ConfigDict(extra="forbid")

    resume: str | None = Field(default=None, max_length=256,
                               description="Intercept id to resume explicitly.")
    triggers: list[str] | None = Field(default=None, max_length=16,
                                       description="Strings that intercept the completion.")
    intercept_after: int | None = Field(default=None, ge=1, le=1 << 20,
                                        description="Intercept after this many generated tokens.")
    tool: str | None = Field(default=None, max_length=256)
    expected_duration_s: float | None = Field(default=None, ge=0, le=1e7)
    pause_turn: bool | None = Field(
        default=None,
        description="Chat: pause this turn at its natural end, tool call or not, so that the "
        "conversation's next turn resumes it (default: the server's --intercept-chat-turns, "
        "or the X-InferCept-Pause-Turn header).")

    @model_validator(mode="after")
    def _check_triggers(self) -> "InterceptExtension":
        if self.triggers is not None and any(not t or len(t) > 256 for t in self.triggers):
            raise ValueError("each trigger must be a non-empty string of at most 256 characters")
        return self


class ResumeRequest(BaseModel):
    """Body of `POST /v1/intercepts/{id}/resume`.

    Sampling fields of a completion request may be given as overrides;
    `max_tokens` is the total of the model's own tokens across all segments.
    """

    model_config = ConfigDict(extra="allow",
                              json_schema_extra={"not": {"required": ["text", "token_ids"]}})

    text: str | None = Field(default=None, max_length=1 << 20)
    token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=1 << 20)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    infercept: InterceptExtension | None = None

    @model_validator(mode="after")
    def _check_result(self) -> "ResumeRequest":
        if self.text is not None and self.token_ids is not None:
            raise ValueError("give the tool's result as `text` or `token_ids`, not both")
        if self.infercept is not None and self.infercept.resume is not None:
            raise ValueError("`infercept.resume` is implied by the URL")
        return self


class InterceptCompletionRequest(CompletionRequest):
    """vLLM's completion request with the `"infercept"` object (the OpenAPI schema)."""

    infercept: InterceptExtension | None = None


class InterceptChatCompletionRequest(ChatCompletionRequest):
    """vLLM's chat completion request with the `"infercept"` object (the OpenAPI schema)."""

    infercept: InterceptExtension | None = None


class InterceptState(BaseModel):
    """Body of `GET /v1/intercepts/{id}`."""

    id: str
    object: Literal["intercept"] = "intercept"
    state: str = Field(description="preserved, swapped or discarded while paused; "
                                   "resuming, resumed, cancelled or expired after")
    context_tokens: int
    generated_tokens: int
    tool: str | None
    age_s: float
    history: list[dict[str, Any]]


class DeletedIntercept(BaseModel):
    """Body of `DELETE /v1/intercepts/{id}`."""

    id: str
    object: Literal["intercept"] = "intercept"
    deleted: bool


ERROR_RESPONSES = {int(status): {"model": ErrorResponse} for status in (
    HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)}


class InterceptError(Exception):
    def __init__(self, status: HTTPStatus, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param)


_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.CONFLICT: "ConflictError",
    HTTPStatus.UNPROCESSABLE_ENTITY: "UnprocessableEntityError",
}


def error_response(status: HTTPStatus, message: str, param: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape, as vLLM's own endpoints return it."""
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"),
                           "param": param, "code": int(status)}},
    )


def validation_message(error: ValidationError | ValueError) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors()[:5]:
            where = ".".join(str(p) for p in item.get("loc", ())) or "body"
            parts.append(f"{where}: {item.get('msg')}")
        return "; ".join(parts)
    return str(error)
