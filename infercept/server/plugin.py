"""vLLM endpoint plugin: InferCept's routes in vLLM's OpenAI-compatible server.

Registered under `vllm.endpoint_plugins` (pyproject.toml) and allowlisted by
`infercept serve` through `VLLM_PLUGINS`. Its engine side is the general
plugin's `EngineCore.infercept` utility (patches/engine_core_utility.py), as
vLLM's endpoint-plugin contract asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute

from infercept.server import routes


@dataclass
class OriginalEndpoint:
    endpoint: object  # vLLM's endpoint function: (request_model, raw_request) -> Response
    request_model: type


class InterceptEndpoints:
    name = "infercept"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        """During vLLM's `build_app`: keep vLLM's chat, completion, messages and responses endpoints, add ours."""
        from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

        models = {routes.CHAT: ChatCompletionRequest, routes.COMPLETIONS: CompletionRequest,
                  routes.MESSAGES: AnthropicMessagesRequest, routes.RESPONSES: ResponsesRequest}
        originals = {}
        for route in app.routes:
            if isinstance(route, APIRoute) and route.path in models and "POST" in route.methods:
                originals[route.path] = OriginalEndpoint(route.endpoint, models[route.path])
        app.state.infercept_originals = originals
        app.include_router(routes.router)

    async def init_state(self, engine_client, state, args) -> None:
        """During vLLM's `init_app_state`: the engine calls and metrics."""
        from infercept.server.metrics import StatsPublisher
        from infercept.server.service import InterceptService

        service = InterceptService(engine_client, timeout_s=getattr(args, "intercept_timeout", 600.0),
                                   affinity=getattr(args, "intercept_affinity", "engine") == "engine",
                                   instance=getattr(args, "intercept_instance", None))
        state.infercept = service
        # Several API server processes share the same engines: the first one
        # installs their cost model and publishes their counters.
        if getattr(engine_client.engine_core, "client_index", 0) == 0:
            service.publisher = StatsPublisher()
            await self._install_cost_model(engine_client, service)
        service.start()

    @staticmethod
    async def _install_cost_model(engine_client, service) -> None:
        """Profile (or load) the cost model before serving, as `infercept.LLM` does."""
        from infercept.adapter import profiler
        from infercept.config import InterceptConfig
        from infercept.policy import CostModel

        vllm_config = engine_client.vllm_config
        config = InterceptConfig.from_vllm_config(vllm_config)
        if config.policy == "vllm":
            return
        base = CostModel.from_dict((await service.call("stats"))["cost_model"])  # every engine alike
        known = profiler.known_cost_model(config, vllm_config, base)
        if known is None:
            measured = await engine_client.collective_rpc(
                profiler.MEASURE_METHOD, args=profiler.measurement_args(vllm_config))
            known = profiler.measured_cost_model(measured, vllm_config, base), "profiled"
        await service.call_all("set_cost_model", known[0].to_dict())
