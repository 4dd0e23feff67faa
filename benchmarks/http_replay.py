"""The benchmark over HTTP (``HttpReplay``): a real client against a running server, one asyncio task per
request: the official ``openai`` client for completions, ``httpx`` for InferCept's resume
endpoint, and the server's Prometheus ``/metrics`` for the engine's counters. The stock
baseline is vLLM's own server (``python -m vllm.entrypoints.openai.api_server``), whose
completions report prefix-cache hits (``--enable-prompt-tokens-details``): a segment
recomputes the KV its previous segment had computed, less those hits.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from infercept.bench.workload import Request

RESUME_PATH = "/v1/intercepts/{intercept_id}/resume"
METRICS_POLL_S = 0.1
METRICS_SETTLE_S = 2.5


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample in a Prometheus text exposition."""
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def metric_sum(samples, name: str, **labels: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels``; None if none."""
    values = [value for sample_name, sample_labels, value in samples
              if sample_name == name and labels.items() <= sample_labels.items()]
    return sum(values) if values else None


def kv_capacity_from_metrics(samples) -> int | None:
    """Cache capacity in tokens, from vLLM's ``vllm:cache_config_info`` labels."""
    for name, labels, _ in samples:
        if name == "vllm:cache_config_info" and "num_gpu_blocks" in labels:
            return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    return None


@dataclass
class HttpRequestLog:
    """What the client saw of one request (times relative to the replay's start)."""

    end_s: float | None = None
    output_tokens: int = 0
    tool_s_total: float = 0.0
    num_interceptions: int = 0
    recomputed_tokens: int = 0  # stock only: from the prefix-cache hits it reports
    forwarded_tokens: int = 0  # stock only


class HttpReplay:
    """Replays a trace against ``base_url``; ``policy`` "vllm" means vLLM's stock server."""

    def __init__(self, base_url: str, model: str, policy: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.policy = policy
        self.timeout_s = timeout_s

    def run(self, requests: list[Request], deadline_s: float):
        """Replay; returns ({request id: HttpRequestLog}, metrics before, metrics after,
        idle-token events). Requests still open at ``deadline_s`` are cancelled."""
        return asyncio.run(self._run(requests, deadline_s))

    async def _run(self, requests, deadline_s):
        import httpx
        import openai

        self._t0 = time.monotonic()
        self._client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="EMPTY",
                                          timeout=self.timeout_s, max_retries=0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s,
                                     limits=limits) as http:
            self._http = http
            before = parse_prometheus((await http.get("/metrics")).text)
            logs = {r.request_id: HttpRequestLog() for r in requests}
            events: list[tuple[float, int]] = []
            poller = asyncio.create_task(self._poll_idle(events))
            tasks = [asyncio.create_task(self._replay_one(r, logs[r.request_id])) for r in requests]
            await asyncio.wait(tasks, timeout=max(0.0, deadline_s - self.now_s()))
            for task in tasks:
                task.cancel()
            poller.cancel()
            await asyncio.gather(*tasks, poller, return_exceptions=True)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            await asyncio.sleep(METRICS_SETTLE_S)  # the server refreshes its counters each second
            after = parse_prometheus((await http.get("/metrics")).text)
        await self._client.close()
        return logs, before, after, events

    def now_s(self) -> float:
        return time.monotonic() - self._t0

    async def _poll_idle(self, events: list[tuple[float, int]]) -> None:
        while True:
            samples = parse_prometheus((await self._http.get("/metrics")).text)
            idle = metric_sum(samples, "infercept:idle_device_tokens")
            if idle is not None and (not events or events[-1][1] != idle):
                events.append((self.now_s(), int(idle)))
            await asyncio.sleep(METRICS_POLL_S)

    async def _replay_one(self, request: Request, log: HttpRequestLog) -> None:
        await asyncio.sleep(max(0.0, request.arrival_s - self.now_s()))
        segments = request.segments
        context = list(request.prompt_token_ids)
        if self.policy == "vllm":
            response = await self._complete(request, context, 0, log)
        else:
            response = await self._complete(request, context, 0, log, self._spec(request, 0))
        for index in range(1, len(segments)):
            tool_start_s = self.now_s()
            await asyncio.sleep(segments[index - 1].tool_s)
            returned = list(segments[index - 1].tool_return_token_ids)
            log.tool_s_total += self.now_s() - tool_start_s
            log.num_interceptions += 1
            if self.policy == "vllm":
                context += _choice_token_ids(response) + returned
                response = await self._complete(request, context, index, log)
            else:
                response = await self._resume(request, index, response, returned, log)
        log.end_s = self.now_s()

    @staticmethod
    def _spec(request: Request, index: int) -> dict | None:
        if index == len(request.segments) - 1:
            return None
        return {"intercept_after": request.segments[index].generate_tokens,
                "tool": request.tool_of(index)}

    async def _complete(self, request, context, index, log, spec=None):
        """Stock: one segment as a whole-context completion. InferCept: the first segment,
        whose ``max_tokens`` is the session's budget (the model's tokens over all segments)."""
        max_tokens = (request.segments[index].generate_tokens if self.policy == "vllm"
                      else request.output_tokens)
        extra = {"ignore_eos": True, "return_token_ids": True}
        if spec is not None:
            extra["infercept"] = spec
        response = await self._client.completions.create(
            model=self.model, prompt=context, max_tokens=max_tokens, temperature=0.0,
            extra_body=extra)
        usage = response.usage
        log.output_tokens += usage.completion_tokens
        if self.policy == "vllm":
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            prior_kv_tokens = 0 if index == 0 else len(context) - len(
                request.segments[index - 1].tool_return_token_ids) - 1
            log.recomputed_tokens += max(0, prior_kv_tokens - cached)
            log.forwarded_tokens += usage.prompt_tokens - cached + usage.completion_tokens - 1
        return response.model_dump()

    async def _resume(self, request, index, previous: dict, returned, log) -> dict:
        intercept = previous.get("infercept") or {}
        if "intercept_id" not in intercept:
            raise RuntimeError(f"{request.request_id}: the server did not pause segment "
                               f"{index - 1} (no infercept.intercept_id in its response)")
        # The last segment sends an empty spec: without one the server reuses the last.
        body = {"token_ids": returned, "max_tokens": request.output_tokens,
                "infercept": self._spec(request, index) or {}}
        path = RESUME_PATH.format(intercept_id=intercept["intercept_id"])
        response = await self._http.post(path, json=body)
        response.raise_for_status()
        completion = response.json()
        log.output_tokens += completion["usage"]["completion_tokens"]
        return completion


def _choice_token_ids(response: dict) -> list[int]:
    token_ids = response["choices"][0].get("token_ids")
    if token_ids is None:
        raise RuntimeError("the server returned no token ids (return_token_ids unsupported?)")
    return list(token_ids)


class ServerProcess:
    """A server child process (``command`` must take ``--host``/``--port``), up once GET
    /health answers; stopped with SIGINT, then SIGKILL."""

    def __init__(self, command: list[str], log_path, env: dict[str, str], host: str = "127.0.0.1"):
        import socket

        with socket.socket() as sock:
            sock.bind((host, 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        self.command = [*command, "--host", host, "--port", str(self.port)]
        self.log_path, self.env = log_path, env
        self.process = None

    def __enter__(self) -> ServerProcess:
        import subprocess

        import httpx

        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        deadline_s = time.monotonic() + 300.0
        while time.monotonic() < deadline_s:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited ({self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"server not healthy after 300 s; see {self.log_path}")

    def __exit__(self, *exc_info) -> None:
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def engine_cli_flags(engine_kwargs: dict) -> list[str]:
    """vLLM engine keyword arguments, but the model, as ``vllm serve`` flags."""
    args = []
    for key, value in engine_kwargs.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args
