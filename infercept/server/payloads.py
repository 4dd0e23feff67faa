"""What the server reads from and adds to each API's payloads: OpenAI's chat
completions and Responses, Anthropic's messages (their tool calls, reply text and
stream events), and how a paused turn's response is finished."""

from __future__ import annotations

import hashlib
import json

from fastapi.responses import JSONResponse, Response

from infercept.adapter.interception import STOP_REASON


def tool_call_ids(data: dict, field: str) -> list[str]:
    """The ids of the tool calls in a chat response's choices (`field`: "message",
    or "delta" in a stream's chunk); a call without an id counts, as ""."""
    return [call.get("id") or ""
            for choice in data.get("choices", ())
            for call in (choice.get(field) or {}).get("tool_calls") or ()]


def call_ids(data: dict, kind: str, streamed: bool = False) -> list[str]:
    """The tool calls' ids in a response (or a stream's event) of this kind."""
    if kind == "responses":  # the whole response (a stream's is read from its last event)
        return [item.get("call_id") or "" for item in data.get("output") or ()
                if isinstance(item, dict) and item.get("type") == "function_call"]
    if kind == "messages":
        blocks = [data.get("content_block") or {}] if streamed else data.get("content") or ()
        return [block.get("id") or "" for block in blocks
                if isinstance(block, dict) and block.get("type") == "tool_use"]
    return tool_call_ids(data, "delta" if streamed else "message")


def reply_text(data: dict, kind: str, streamed: bool = False) -> str:
    """The text a response (or a stream's event) of this kind adds to the reply
    (a chat's first choice)."""
    if kind == "responses":
        return "".join(part.get("text") or "" for item in data.get("output") or ()
                       if isinstance(item, dict) and item.get("type") == "message"
                       for part in item.get("content") or ()
                       if isinstance(part, dict) and part.get("type") == "output_text")
    if kind == "messages":
        if streamed:
            delta = data.get("delta") or {}
            return delta.get("text") or "" if delta.get("type") == "text_delta" else ""
        return "".join(block.get("text") or "" for block in data.get("content") or ()
                       if isinstance(block, dict) and block.get("type") == "text")
    choices = data.get("choices") or [{}]
    return (choices[0].get("delta" if streamed else "message") or {}).get("content") or ""


def event_data(event: str) -> dict:
    """A stream event's JSON object (empty for anything else)."""
    for line in event.split("\n"):
        if line.startswith("data: "):
            try:
                data = json.loads(line[len("data: "):])
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def is_last_event(event: str, kind: str) -> bool:
    """The stream's end: OpenAI's `[DONE]`, Anthropic's `message_stop` event, the
    Responses API's final event (the whole response: completed, incomplete or failed)."""
    if kind == "messages":
        return event.startswith("event: message_stop")
    if kind == "responses":
        return event.startswith(("event: response.completed", "event: response.incomplete",
                                 "event: response.failed"))
    return event.strip() == "data: [DONE]"


def _text(content) -> str:
    if isinstance(content, list):  # content parts
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def turn_id(messages: list[dict]) -> str:
    """A conversation's name up to its last reply: its roles and texts, digested."""
    normal = [[m.get("role"), _text(m.get("content"))] for m in messages if isinstance(m, dict)]
    return "turn:" + hashlib.sha256(json.dumps(normal).encode()).hexdigest()[:32]


def _finish_as_tool_calls(data: dict) -> None:
    """An intercepted chat turn ends in its tool calls, whether chosen or forced."""
    for choice in data.get("choices", ()):
        if (choice.get("message") or choice.get("delta") or {}).get("tool_calls") is not None \
                or choice.get("finish_reason"):
            choice["finish_reason"] = "tool_calls"


def finish_paused(data: dict, kind: str, tool_calls: bool) -> None:
    """A paused turn ends as the API ends a turn: at its tool calls (chat's
    `tool_calls`, Anthropic's `tool_use`), else as a natural end (Anthropic's
    `end_turn`, not InferCept's stop reason as a stop sequence)."""
    if kind == "chat" and tool_calls:
        _finish_as_tool_calls(data)
    if kind == "messages":
        target = data.get("delta") if data.get("type") == "message_delta" else data
        if isinstance(target, dict) and target.get("stop_sequence") == STOP_REASON:
            target["stop_reason"] = "tool_use" if tool_calls else "end_turn"
            target["stop_sequence"] = None


def with_info(event: str, info: dict, kind: str, tool_calls: bool) -> str:
    """A stream's last data event with the `"infercept"` object, finished as a paused turn."""
    lines = event.split("\n")
    for i, line in enumerate(lines):
        if info and line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            # A Responses event carries the response: the info goes where a response's is.
            (data["response"] if isinstance(data.get("response"), dict) else data)["infercept"] = info
            if "intercept_id" in info:
                finish_paused(data, kind, tool_calls)
            lines[i] = "data: " + json.dumps(data)
    return "\n".join(lines)


def no_tools(body: dict) -> bool:
    """`tool_choice` none: OpenAI's "none", Anthropic's {"type": "none"}."""
    choice = body.get("tool_choice")
    return choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")


def anthropic_error(response: Response) -> Response:
    """InferCept's own errors on /v1/messages in Anthropic's shape, as vLLM's are there."""
    if response.status_code < 400 or not isinstance(response, JSONResponse):
        return response
    body = json.loads(response.body)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "code" not in error:  # vLLM's: already Anthropic's
        return response
    return JSONResponse({"type": "error", "error": {"type": error.get("type"), "message": error.get("message")}},
                        status_code=response.status_code)


def function_calls(response: dict) -> list[dict]:
    """A Responses API response's `function_call` output items."""
    return [{key: value for key, value in item.items() if value is not None}
            for item in response.get("output") or ()
            if isinstance(item, dict) and item.get("type") == "function_call"]


def with_previous_calls(body: dict, calls: list[dict]) -> None:
    """Put the previous response's function calls in front of a follow-up's input.

    vLLM 0.32 rebuilds a `previous_response_id` conversation from the previous
    response's messages only (`construct_input_messages` keeps its text output and
    drops its `function_call` items), so the `function_call_output` that follows
    would answer a call the model never sees. Calls the input already holds (by
    `call_id`) are not repeated.
    """
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or ())
    present = {item.get("call_id") for item in items
               if isinstance(item, dict) and item.get("type") == "function_call"}
    missing = [call for call in calls if call.get("call_id") not in present]
    if missing:
        body["input"] = missing + items

