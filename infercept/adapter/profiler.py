"""Start-up profiling of the cost model the policy plans with.

A few forward passes of different sizes and a swap of a few blocks run in
every worker (vLLM's `collective_rpc`); the slowest worker's times are fitted
to the policy's cost model (flat up to a saturation point, then linear) and
sent to the scheduler. Results are cached per model, hardware and settings;
a file given by `--cost-profile` overrides them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from infercept.policy import CostModel

logger = logging.getLogger(__name__)

# Prefill-sized passes (a 1-token dummy pass takes another, slower path on
# CPUs); past 2048 tokens a step is rare and CPU caches make it superlinear.
PROFILE_TOKENS = (16, 64, 256, 1024, 2048)
REPEATS = 15
OUTLIER_RATIO = 1.25
SWAP_BLOCKS = 8


class ProfilerWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): the profiler's RPC method."""

    def infercept_measure(self, token_counts: list[int], repeats: int, swap_blocks: int) -> dict:
        return measure_on_worker(self, token_counts, repeats, swap_blocks)


MEASURE_METHOD = "infercept_measure"


def measure_on_worker(worker, token_counts: list[int], repeats: int, swap_blocks: int) -> dict:
    """Runs in each worker: median forward time per token count, swap time per block."""
    import torch

    runner = worker.model_runner
    cuda = torch.cuda.is_available() and str(runner.device).startswith("cuda")

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # vLLM's CPU attention kernel reads out of bounds on dummy attention
    # metadata; there the dummy pass skips attention (a small share of the
    # step for the short prefills that matter most).
    attention = cuda
    for num_tokens in token_counts:  # warm-up
        runner._dummy_run(num_tokens, force_attention=attention)
    # Sizes interleaved, so a burst of load from elsewhere hits them alike; the
    # fastest repeat is the cost itself, without other processes' interference.
    best = {n: float("inf") for n in token_counts}
    for _ in range(repeats):
        for num_tokens in token_counts:
            seconds = timed(lambda: runner._dummy_run(num_tokens, force_attention=attention))
            best[num_tokens] = min(best[num_tokens], seconds)
    forward = [(n, best[n]) for n in token_counts]
    return {"forward": forward, "swap_s_per_block": _swap_s_per_block(timed, swap_blocks, repeats)}


def _swap_s_per_block(timed, swap_blocks: int, repeats: int) -> float | None:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    swapper = getattr(getattr(get_kv_transfer_group(), "worker", None), "swapper", None)
    if swapper is None:
        return None
    n = min(swap_blocks, swapper.num_cpu_blocks, min(swapper.num_device_blocks) - 1)
    device_ids, cpu_ids = list(range(1, n + 1)), list(range(n))

    def round_trip():
        # Copies blocks out and back in place: the device contents do not change.
        swapper.swap_out(device_ids, cpu_ids)
        swapper.synchronize()
        swapper.swap_in(cpu_ids, device_ids)
        swapper.synchronize()

    round_trip()
    samples = [timed(round_trip) for _ in range(repeats)]
    return statistics.median(samples) / (2 * n)


def fit_cost_model(measured: list[dict], base: CostModel) -> CostModel:
    """The slowest worker's forward times and swap time, with the engine's capacities."""
    forward = [(n, max(m["forward"][i][1] for m in measured))
               for i, (n, _) in enumerate(measured[0]["forward"])]
    swaps = [m["swap_s_per_block"] for m in measured if m["swap_s_per_block"] is not None]
    swap_s_per_token = max(swaps) / base.block_size_tokens if swaps else base.swap_s_per_token
    capacities = dict(
        swap_s_per_token=swap_s_per_token,
        kv_bytes_per_token=base.kv_bytes_per_token,
        block_size_tokens=base.block_size_tokens,
        device_capacity_tokens=base.device_capacity_tokens,
        cpu_capacity_tokens=base.cpu_capacity_tokens,
    )
    cost = CostModel.fit(forward, **capacities)
    # Interference only ever slows a pass down: a point far above the fit is
    # one that other work got in the way of. Refit without such points.
    kept = [(n, t) for n, t in forward if t <= OUTLIER_RATIO * cost.forward_s(n)]
    if len(forward) > len(kept) >= 3:
        cost = CostModel.fit(kept, **capacities)
    return cost


def profile_key(vllm_config) -> str:
    """Model, hardware and settings: what the cost model depends on."""
    from vllm import __version__

    model = vllm_config.model_config
    parts = {
        "model": model.model,
        "dtype": str(model.dtype),
        "block_size": vllm_config.cache_config.block_size,
        "tensor_parallel": vllm_config.parallel_config.tensor_parallel_size,
        "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
        "device": _device_name(),
        "vllm": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.machine()}:{platform.processor() or _cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def cache_path(key: str) -> Path:
    from infercept.default_model import cache_root

    return cache_root() / "profiles" / f"{key}.json"


def load(path: Path) -> CostModel | None:
    try:
        return CostModel.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("cost profile %s unusable: %s", path, error)
        return None


def save(cost: CostModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cost.to_dict(), indent=2, sort_keys=True))
    tmp.replace(path)


def token_counts(max_num_batched_tokens: int) -> list[int]:
    return [n for n in PROFILE_TOKENS if n <= max_num_batched_tokens] or [max_num_batched_tokens]


def known_cost_model(config, vllm_config, base: CostModel) -> tuple[CostModel, str] | None:
    """A cost model from `--cost-profile` or the cache; None when it must be measured."""
    if config.cost_profile:
        cost = load(Path(config.cost_profile))
        if cost is None:
            raise ValueError(f"--cost-profile {config.cost_profile}: not a cost model file")
        return _with_capacities(cost, base), f"file {config.cost_profile}"
    path = cache_path(profile_key(vllm_config))
    cached = load(path) if path.exists() else None
    if cached is not None:
        return _with_capacities(cached, base), f"cache {path}"
    if not config.profile_at_startup:
        return base, "defaults"
    return None


def measurement_args(vllm_config) -> tuple[list[int], int, int]:
    """`measure_on_worker`'s arguments after the worker."""
    return token_counts(vllm_config.scheduler_config.max_num_batched_tokens), REPEATS, SWAP_BLOCKS


def measured_cost_model(measured: list[dict], vllm_config, base: CostModel) -> CostModel:
    cost = fit_cost_model(measured, base)
    path = cache_path(profile_key(vllm_config))
    save(cost, path)
    logger.info("InferCept profiled its cost model (cached at %s): %s", path, cost.to_dict())
    return cost


def profile_llm(llm) -> tuple[CostModel, str]:
    """Resolve the cost model of an in-process `vllm.LLM` with InferCept and install it."""
    from infercept.config import InterceptConfig

    engine = llm.llm_engine
    base = CostModel.from_dict(engine_call(engine, "stats")["cost_model"])
    vllm_config = engine.vllm_config
    config = InterceptConfig.from_vllm_config(vllm_config)
    known = known_cost_model(config, vllm_config, base)
    if known is None:
        measured = llm.collective_rpc(MEASURE_METHOD, args=measurement_args(vllm_config))
        known = measured_cost_model(measured, vllm_config, base), "profiled"
    engine_call(engine, "set_cost_model", known[0].to_dict())
    return known


def engine_call(llm_engine, method: str, *args):
    """Call the scheduler through the engine core, in-process or not."""
    client = llm_engine.engine_core
    if hasattr(client, "engine_core"):  # in-process
        return client.engine_core.infercept(method, list(args))
    return client.call_utility("infercept", method, list(args))


def _with_capacities(cost: CostModel, base: CostModel) -> CostModel:
    """Times from the profile, capacities from this engine (they depend on its flags)."""
    data: dict[str, Any] = cost.to_dict()
    for name in ("kv_bytes_per_token", "block_size_tokens", "device_capacity_tokens",
                 "cpu_capacity_tokens"):
        data[name] = getattr(base, name)
    return CostModel.from_dict(data)
