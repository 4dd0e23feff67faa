"""Stock vLLM in its own process: the correctness oracle for equivalence tests.

vLLM keeps one KV connector per process (a module global), so an engine
without InferCept's connector cannot live beside one with it. The reference
engine therefore runs in a child process, which also keeps it honest: it is
plain `vllm.LLM`, with no InferCept code loaded.
"""

from __future__ import annotations

import multiprocessing as mp
import os


def _serve(conn, engine_kwargs: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_PLUGINS"] = ""  # no InferCept plugin: stock vLLM only
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            break
        prompts, params = message
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [SamplingParams(**kw) for kw in params],
            use_tqdm=False,
        )
        conn.send([list(o.outputs[0].token_ids) for o in outputs])
    llm.llm_engine.engine_core.shutdown()


class ChildEngine:
    """An engine served by `serve(conn, engine_kwargs)` in a spawned child process.

    The child says "ready" once its engine is built, then answers one message
    at a time until it receives None. A child that starts processes of its own
    (tensor-parallel workers) cannot be a daemon.
    """

    def __init__(self, serve, engine_kwargs: dict, daemon: bool = True, start_timeout_s: float = 600):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve, args=(child, engine_kwargs), daemon=daemon)
        self._proc.start()
        if not self._conn.poll(start_timeout_s) or self._conn.recv() != "ready":
            self.close()
            raise RuntimeError(f"{type(self).__name__}: the engine in the child process did not start")

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()


class StockReference(ChildEngine):
    """Greedy continuations from stock vLLM for given token prompts."""

    def __init__(self, engine_kwargs: dict):
        super().__init__(_serve, engine_kwargs)

    def generate(self, prompts: list[list[int]], max_tokens: list[int] | int) -> list[list[int]]:
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * len(prompts)
        params = [dict(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        self._conn.send((prompts, params))
        return self._conn.recv()
