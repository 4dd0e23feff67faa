"""What the engine core knows about one interception.

A request asks to be intercepted through its sampling parameters'
`extra_args["infercept"]` (`InterceptSpec`): a text trigger (a stop-like
string: the request pauses on the token that completes it) or, for
benchmarks, a scripted count of generated tokens. A resume is a new request
whose prompt is the whole token sequence and whose spec names the paused
request in `resume`; the engine hands it the paused request's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infercept.policy.types import Location

# The engine core's stop_reason on the output that ends an intercepted segment.
STOP_REASON = "infercept:intercepted"
EXTRA_ARGS_KEY = "infercept"


class InterceptSpecError(ValueError):
    pass


@dataclass(frozen=True)
class InterceptSpec:
    triggers: tuple[str, ...] = ()
    intercept_after: int | None = None
    resume: str | None = None
    tool: str | None = None
    expected_duration_s: float | None = None
    # A front-end's name for this segment: if it pauses, the key resumes it.
    key: str | None = None
    # Pause at a natural stop (EOS, stop token) too: a chat turn that may end in
    # a tool call; the front-end cancels the pause if it had none.
    pause_on_stop: bool = False
    # May take over a paused request whose whole prompt this one's begins with.
    auto_resume: bool = False
    # The front-end's record of the session (what a resume needs: the request's
    # kind, model, defaults, budget; opaque to the engine). Kept with the
    # paused request, so every API server process finds it where the KV is.
    session: dict[str, Any] | None = None

    @property
    def intercepts(self) -> bool:
        return bool(self.triggers) or self.intercept_after is not None or self.pause_on_stop

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "InterceptSpec":
        if not data:
            return cls()
        if isinstance(data, str):  # as carried in an OpenAI request's vllm_xargs
            import json

            try:
                data = json.loads(data)
            except ValueError:
                raise InterceptSpecError("'infercept' must be a JSON object") from None
        if not isinstance(data, dict):
            raise InterceptSpecError("'infercept' must be an object")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise InterceptSpecError(f"unknown infercept field(s): {', '.join(sorted(unknown))}")
        triggers = data.get("triggers") or ()
        if isinstance(triggers, str) or not all(isinstance(t, str) and t for t in triggers):
            raise InterceptSpecError("'triggers' must be a list of non-empty strings")
        after = data.get("intercept_after")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 1):
            raise InterceptSpecError("'intercept_after' must be a positive integer")
        for name in ("resume", "tool", "key"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise InterceptSpecError(f"'{name}' must be a string")
        for name in ("pause_on_stop", "auto_resume"):
            if not isinstance(data.get(name, False), bool):
                raise InterceptSpecError(f"'{name}' must be a boolean")
        if data.get("session") is not None and not isinstance(data["session"], dict):
            raise InterceptSpecError("'session' must be an object")
        expected = data.get("expected_duration_s")
        if expected is not None:
            if isinstance(expected, bool) or not isinstance(expected, (int, float)) or not expected >= 0:
                raise InterceptSpecError("'expected_duration_s' must be a number >= 0")
            expected = float(expected)
        return cls(tuple(triggers), after, data.get("resume"), data.get("tool"), expected,
                   data.get("key"), data.get("pause_on_stop", False),
                   data.get("auto_resume", False), data.get("session"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.triggers:
            out["triggers"] = list(self.triggers)
        for name in ("intercept_after", "resume", "tool", "expected_duration_s", "key", "session"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("pause_on_stop", "auto_resume"):
            if getattr(self, name):
                out[name] = True
        return out

    @classmethod
    def of(cls, sampling_params) -> "InterceptSpec":
        extra = getattr(sampling_params, "extra_args", None) or {}
        return cls.from_dict(extra.get(EXTRA_ARGS_KEY))


def trigger_completed(output_token_ids, triggers, decode, special_ids=frozenset()) -> bool:
    """Whether the newest output token completes one of the triggers.

    `decode(token_ids)` must give the text the request's own detokenization
    shows (vLLM's stop strings are matched on it): with the request's
    `skip_special_tokens`, a special token between a marker's characters adds
    nothing to it, so the marker still completes. Only a tail is decoded,
    grown until the text before the newest token holds a whole trigger plus a
    character (a split multi-byte character, a tokenizer's stripped leading
    space), or the whole output. The trigger counts as completed when the
    newest token adds an occurrence of it.

    `special_ids`: the triggers that are one special token each (a tool
    parser's end token), matched by id, as the request may not show them.
    """
    if not output_token_ids:
        return False
    if special_ids and output_token_ids[-1] in special_ids:
        return True
    if not triggers:
        return False
    need = max(len(t) for t in triggers)
    width = need + 1
    while True:
        tail = list(output_token_ids[-width - 1:])
        before = decode(tail[:-1])
        if len(before) > need or len(tail) == len(output_token_ids):
            break
        width *= 2
    text = decode(tail)
    return any(text.count(t) > before.count(t) for t in triggers)


def special_token_triggers(triggers, tokenizer) -> dict[str, int]:
    """The triggers that are one special token each (hidden by `skip_special_tokens`),
    with the token's id."""
    found = {}
    for trigger in triggers:
        ids = tokenizer.encode(trigger, add_special_tokens=False)
        if (len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False) == trigger
                and tokenizer.decode(ids, skip_special_tokens=True) == ""):
            found[trigger] = ids[0]
    return found


@dataclass
class Interception:
    """An intercepted request held by the scheduler between its segments."""

    request: Any  # vllm.v1.request.Request
    spec: InterceptSpec
    paused_at_s: float
    num_kv_tokens: int  # tokens whose KV was computed at the pause
    prompt_tokens: int = 0  # the paused segment's prompt
    location: Location = Location.DEVICE
    # Swapped out, but the save still reads its device blocks (not yet freed).
    saving: bool = False
    # Its first tokens' blocks are held by other requests too (a shared system
    # prompt): they stay resident, and a swap-out does not copy them. Updated
    # every step while it is preserved; fixed by a swap-out.
    shared_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    predicted_duration_s: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def key(self) -> str:
        return self.spec.key or self.request_id

    def describe(self, now_s: float) -> dict[str, Any]:
        """The paused request's state, as the front-end reports it."""
        return {
            "intercept_id": self.key,
            "state": self.location.value,
            "context_tokens": self.context_tokens,
            "prompt_tokens": self.prompt_tokens,
            "kv_tokens": self.num_kv_tokens,
            "shared_kv_tokens": self.shared_tokens,
            "tool": self.spec.tool,
            "age_s": now_s - self.paused_at_s,
            "history": list(self.history),
        }

    def record(self, resumed_at_s: float, reused_tokens: int) -> dict[str, Any]:
        """What this interception did, for the request's output."""
        return {
            "intercept_id": self.key,
            "tool": self.spec.tool,
            "duration_s": resumed_at_s - self.paused_at_s,
            "predicted_duration_s": self.predicted_duration_s,
            "expected_duration_s": self.spec.expected_duration_s,
            "context_tokens": self.num_kv_tokens,
            "reused_tokens": reused_tokens,
            "final_state": self.location.value,
            "decisions": list(self.history),
        }

    @property
    def context_tokens(self) -> int:
        return self.request.num_tokens

    @property
    def own_kv_tokens(self) -> int:
        """KV tokens in blocks only it holds: the memory it costs where it is."""
        return self.num_kv_tokens - self.shared_tokens

    @property
    def generated_tokens(self) -> int:
        """The model's own tokens over the whole session (every segment so far)."""
        before = (self.spec.session or {}).get("generated_before", 0)
        return before + self.context_tokens - self.prompt_tokens

    def summary(self, state: str) -> dict[str, Any]:
        """What the front-end still reports about an intercept that has ended."""
        return {"intercept_id": self.key, "state": state, "context_tokens": self.context_tokens,
                "generated_tokens": self.generated_tokens, "tool": self.spec.tool,
                "paused_at_s": self.paused_at_s, "history": []}
