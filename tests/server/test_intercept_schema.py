"""Fuzz InferCept's endpoints from the server's own /openapi.json with schemathesis.

Every operation InferCept adds or replaces is documented with its request
model; generated requests, valid and invalid, never get a 5xx, and every
response conforms to the schema (status code, content type, body). Requests
against the intercept endpoints name a live paused request half of the time,
so the fuzzing reaches past the id lookup. Schemathesis' "valid data must be
accepted" check is left out: whether a resume is valid depends on the paused
request (its token count, the vocabulary, the context length), which no
schema can say.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server.helpers import PAUSED_STATES, intercept_state, pause_completion, wait_until_nothing_held

pytestmark = pytest.mark.slow

OPERATIONS = r"^/v1/(completions|chat/completions|intercepts/\{intercept_id\}(/resume)?)$"
MAX_EXAMPLES = {"POST /v1/completions": 8, "POST /v1/chat/completions": 8}
MAX_GENERATED_TOKENS = 8
CHECKS_LEFT_OUT = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture
def openapi(tiny_server):
    document = httpx.get(f"{tiny_server.base_url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(document).include(path_regex=OPERATIONS)


def test_schema_documents_infercepts_models(openapi):
    document = openapi.raw_schema
    components = document["components"]["schemas"]
    for name in ("InterceptExtension", "ResumeRequest", "InterceptState", "DeletedIntercept",
                 "InterceptCompletionRequest", "InterceptChatCompletionRequest", "ErrorResponse"):
        assert name in components, name
    paths = document["paths"]
    resume = paths["/v1/intercepts/{intercept_id}/resume"]["post"]
    assert resume["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ResumeRequest")
    state = paths["/v1/intercepts/{intercept_id}"]["get"]["responses"]["200"]
    assert state["content"]["application/json"]["schema"]["$ref"].endswith("/InterceptState")
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].split("/")[-1].startswith("Intercept")
        assert "infercept" in components[body["$ref"].split("/")[-1]]["properties"]
    for method, operation in (("post", resume), ("get", paths["/v1/intercepts/{intercept_id}"]["get"])):
        assert {"400", "404", "409"} <= set(operation["responses"]), method
    assert len(list(openapi.get_all_operations())) == 5


class LiveIntercept:
    """A paused request to aim generated calls at; a fresh one once it is used up."""

    def __init__(self, base_url: str, model: str):
        self.base_url, self.model, self.intercept_id = base_url, model, None

    def get(self) -> str:
        if self.intercept_id is None or intercept_state(self.base_url, self.intercept_id) not in PAUSED_STATES:
            self.intercept_id = pause_completion(self.base_url, self.model)["infercept"]["intercept_id"]
        return self.intercept_id

    def close(self) -> None:
        if self.intercept_id is not None:
            httpx.delete(f"{self.base_url}/v1/intercepts/{self.intercept_id}")


def bounded(case) -> None:
    """Keep generation short: the fuzzing is about the requests, not long outputs."""
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if value is None or (isinstance(value, int) and value > MAX_GENERATED_TOKENS):
                case.body[field] = MAX_GENERATED_TOKENS
        case.body.pop("stream", None)  # streamed responses are not JSON to validate


def test_fuzz_from_openapi(openapi, tiny_server, tiny_model):
    base_url = tiny_server.base_url
    live = LiveIntercept(base_url, str(tiny_model))
    statuses = {}
    try:
        for result in openapi.get_all_operations():
            operation = result.ok()
            label = operation.label
            statuses[label] = fuzz(operation, base_url, live, MAX_EXAMPLES.get(label, 25))
    finally:
        live.close()
    # The live id made the intercept endpoints answer more than 404.
    for label, seen in statuses.items():
        assert seen and all(status < 500 for status in seen), (label, seen)
        if "intercept_id" in label:
            assert seen - {404}, (label, seen)
    wait_until_nothing_held(base_url)


def fuzz(operation, base_url: str, live: LiveIntercept, max_examples: int) -> set[int]:
    seen: set[int] = set()

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(), aim_at_live=st.booleans())
    def check(case, aim_at_live):
        if "intercept_id" in (case.path_parameters or {}) and aim_at_live:
            case.path_parameters["intercept_id"] = live.get()
        bounded(case)
        response = case.call(base_url=base_url, timeout=120)
        seen.add(response.status_code)
        if response.status_code == 200:
            paused_again = (response.json().get("infercept") or {}).get("intercept_id")
            if paused_again:  # a resume inherits its request's interception settings
                httpx.delete(f"{base_url}/v1/intercepts/{paused_again}")
        case.validate_response(response, excluded_checks=CHECKS_LEFT_OUT)

    check()
    return seen
