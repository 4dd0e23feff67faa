"""Hardware profiles: what one engine replica costs and holds, for the simulator.

A profile is a ``CostModel`` (the same object the engine's start-up profiler fits and the
policy reads) plus the scheduler limits and the latency SLO the sweeps judge by.

Built-in profiles are derived from the model architecture and the GPU datasheet:

- KV bytes per token = 2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16).
- Device KV capacity = GPU_MEMORY_UTILIZATION x total GPU memory - fp16 weights.
- Forward time is a roofline with a fixed step overhead: an iteration of x tokens takes
  ``overhead + max(weights / (HBM bandwidth x MEMORY_EFFICIENCY),
  2 x params x x / (fp16 FLOP/s x COMPUTE_EFFICIENCY))``, which is the CostModel's hinge:
  flat (``fwd_base_s``) up to ``saturation_tokens`` = the tokens at which compute time
  equals the weight-read time, then ``fwd_per_token_s`` per token. Tensor parallelism
  divides weights and FLOPs over the GPUs and adds two all-reduces per layer.
- Swap moves each GPU's KV shard over its own PCIe link: ``kv_bytes_per_token /
  (num_gpus x effective PCIe bandwidth)``.
- CPU swap space: CPU_SWAP_BYTES per replica.
- Scheduler limits: vLLM 0.32's OpenAI-server defaults (vllm/engine/arg_utils.py):
  2048 batched tokens and 256 sequences on A100s, 8192 and 1024 on H100s.

Attention's reads of the KV cache are not in the CostModel (its forward time depends on
the tokens in the iteration only); ``attention_s_per_kv_token`` adds them when set: every
iteration then also takes that long per context token of the running batch. It is 0 in
every built-in profile (iteration time is exactly ``cost.forward_s``); ``with_attention``
sets it to the roofline's time to read one token's KV from HBM (``kv_read_s_per_token``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infercept.policy import CostModel

GIB = 1 << 30
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
MEMORY_EFFICIENCY = 0.8  # share of peak HBM bandwidth a decode step reaches
COMPUTE_EFFICIENCY = 0.6  # share of peak fp16 tensor FLOP/s a large prefill reaches
STEP_OVERHEAD_S = 2e-3  # scheduling, sampling, launches per iteration
ALLREDUCE_S = 10e-6  # one small all-reduce over NVLink, per tensor-parallel GPU group
CPU_SWAP_BYTES = 200 * 10**9
FP16_BYTES = 2


@dataclass(frozen=True)
class ModelSpec:
    """The numbers of a transformer that fix its KV size and its weight and FLOP costs."""

    name: str
    num_params: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    source: str

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * FP16_BYTES

    @property
    def weight_bytes(self) -> int:
        return self.num_params * FP16_BYTES


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    fp16_flops: float  # dense tensor-core peak
    pcie_bytes_per_s: float  # effective host<->device bandwidth of one GPU's link
    source: str


GPT_J_6B = ModelSpec("GPT-J-6B", 6_053_381_344, num_layers=28, num_kv_heads=16, head_dim=256,
                     source="EleutherAI/gpt-j-6b config.json (n_layer 28, n_head 16, "
                            "n_embd 4096)")
VICUNA_13B = ModelSpec("Vicuna-13B", 13_015_864_320, num_layers=40, num_kv_heads=40,
                       head_dim=128, source="lmsys/vicuna-13b-v1.5 config.json (LLaMA-2-13B: "
                                            "40 layers, 40 heads, hidden 5120)")
LLAMA_3_70B = ModelSpec("Llama-3-70B", 70_553_706_496, num_layers=80, num_kv_heads=8,
                        head_dim=128, source="meta-llama/Meta-Llama-3-70B config.json (80 "
                                             "layers, 8 KV heads of 128)")
LLAMA_3_8B = ModelSpec("Llama-3-8B", 8_030_261_248, num_layers=32, num_kv_heads=8, head_dim=128,
                       source="meta-llama/Meta-Llama-3-8B config.json (32 layers, 8 KV heads "
                              "of 128)")

LLAMA_3_1_8B = ModelSpec("Llama-3.1-8B", 8_030_261_248, num_layers=32, num_kv_heads=8,
                         head_dim=128, source="meta-llama/Llama-3.1-8B config.json (32 layers, "
                                              "8 KV heads of 128, 131,072-token context)")

A100_80GB = GpuSpec("A100-SXM4-80GB", 80 * GIB, hbm_bytes_per_s=2.039e12, fp16_flops=312e12,
                    pcie_bytes_per_s=25e9,
                    source="NVIDIA A100 datasheet: HBM2e 2,039 GB/s, 312 TFLOP/s dense fp16; "
                           "PCIe 4.0 x16, ~25 GB/s effective of 32")
H100_80GB = GpuSpec("H100-SXM5-80GB", 80 * GIB, hbm_bytes_per_s=3.35e12, fp16_flops=989e12,
                    pcie_bytes_per_s=50e9,
                    source="NVIDIA H100 datasheet: HBM3 3.35 TB/s, 989 TFLOP/s dense fp16; "
                           "PCIe 5.0 x16, ~50 GB/s effective of 64")


@dataclass(frozen=True)
class HardwareProfile:
    """One engine replica: its costs and capacities, scheduler limits and SLO."""

    name: str
    cost: CostModel
    max_num_seqs: int
    max_num_batched_tokens: int
    slo_p90_s_per_token: float
    description: str = ""
    attention_s_per_kv_token: float = 0.0  # applied per context token of the batch
    kv_read_s_per_token: float = 0.0  # roofline estimate of one token's KV read (0: unknown)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("need 1 <= max_num_seqs <= max_num_batched_tokens")
        if not self.slo_p90_s_per_token > 0:
            raise ValueError("slo_p90_s_per_token must be > 0")

    @property
    def block_size_tokens(self) -> int:
        return self.cost.block_size_tokens

    def with_attention(self) -> "HardwareProfile":
        """This profile with attention's KV reads timed (``kv_read_s_per_token`` each)."""
        if not self.kv_read_s_per_token > 0:
            raise ValueError(f"profile {self.name} has no KV read time to apply")
        return dataclasses.replace(self, name=f"{self.name}+attention",
                                   attention_s_per_kv_token=self.kv_read_s_per_token)

    def with_cost(self, **changes: Any) -> "HardwareProfile":
        return dataclasses.replace(self, cost=dataclasses.replace(self.cost, **changes))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``load_profile`` reads."""
        out = dataclasses.asdict(self)
        out["cost"] = self.cost.to_dict()
        return out


def roofline_profile(name: str, model: ModelSpec, gpu: GpuSpec, num_gpus: int, *,
                     max_num_seqs: int, max_num_batched_tokens: int,
                     slo_p90_s_per_token: float, block_size_tokens: int = 16) -> HardwareProfile:
    """A profile derived from the datasheets as the module docstring describes."""
    kv_bytes = model.kv_bytes_per_token
    device_bytes = GPU_MEMORY_UTILIZATION * gpu.memory_bytes * num_gpus - model.weight_bytes
    if device_bytes <= 0:
        raise ValueError(f"{model.name} does not fit on {num_gpus} x {gpu.name}")
    weight_read_s = model.weight_bytes / (num_gpus * gpu.hbm_bytes_per_s * MEMORY_EFFICIENCY)
    per_token_s = 2 * model.num_params / (num_gpus * gpu.fp16_flops * COMPUTE_EFFICIENCY)
    allreduce_s = 2 * model.num_layers * ALLREDUCE_S if num_gpus > 1 else 0.0
    cost = CostModel(
        fwd_base_s=STEP_OVERHEAD_S + allreduce_s + weight_read_s,
        fwd_per_token_s=per_token_s,
        saturation_tokens=round(weight_read_s / per_token_s),
        swap_s_per_token=kv_bytes / (num_gpus * gpu.pcie_bytes_per_s),
        kv_bytes_per_token=kv_bytes,
        block_size_tokens=block_size_tokens,
        device_capacity_tokens=_whole_blocks(device_bytes / kv_bytes, block_size_tokens),
        cpu_capacity_tokens=_whole_blocks(CPU_SWAP_BYTES / kv_bytes, block_size_tokens),
    )
    description = (f"{model.name} on {num_gpus} x {gpu.name} (TP {num_gpus}). "
                   f"Model: {model.source}. GPU: {gpu.source}.")
    kv_read_s = kv_bytes / (num_gpus * gpu.hbm_bytes_per_s * MEMORY_EFFICIENCY)
    return HardwareProfile(name, cost, max_num_seqs, max_num_batched_tokens,
                           slo_p90_s_per_token, description, kv_read_s_per_token=kv_read_s)


def _whole_blocks(tokens: float, block_size_tokens: int) -> int:
    return int(tokens // block_size_tokens) * block_size_tokens


# SLOs: p90 normalized latency about 5x the profile's single-step time (fwd_base_s), the
# knee of the paper's latency-vs-load curves.
PROFILES: dict[str, HardwareProfile] = {
    p.name: p for p in (
        roofline_profile("gptj-6b-a100", GPT_J_6B, A100_80GB, 1, max_num_seqs=256,
                         max_num_batched_tokens=2048, slo_p90_s_per_token=0.05),
        roofline_profile("vicuna-13b-2xa100", VICUNA_13B, A100_80GB, 2, max_num_seqs=256,
                         max_num_batched_tokens=2048, slo_p90_s_per_token=0.06),
        roofline_profile("llama3-70b-4xa100", LLAMA_3_70B, A100_80GB, 4, max_num_seqs=256,
                         max_num_batched_tokens=2048, slo_p90_s_per_token=0.15),
        roofline_profile("llama3-8b-h100", LLAMA_3_8B, H100_80GB, 1, max_num_seqs=1024,
                         max_num_batched_tokens=8192, slo_p90_s_per_token=0.04),
    )
}

# Long contexts (the agent workload, docs/workloads.md): Llama-3.1-8B's 128K window on one
# H100, with attention's KV reads timed (they dominate a step at tens of thousands of
# tokens). SLO: 5x the step time of a batch holding one 64K-token context.
_LONG = roofline_profile("llama31-8b-h100-128k", LLAMA_3_1_8B, H100_80GB, 1, max_num_seqs=1024,
                         max_num_batched_tokens=8192, slo_p90_s_per_token=1.0)
_LONG = dataclasses.replace(
    _LONG, attention_s_per_kv_token=_LONG.kv_read_s_per_token,
    slo_p90_s_per_token=round(5 * (_LONG.cost.fwd_base_s + 65_536 * _LONG.kv_read_s_per_token), 4),
    description=_LONG.description + " Attention's KV reads timed; 128K-token context.")
PROFILES[_LONG.name] = _LONG

_PROFILE_KEYS = ("name", "max_num_seqs", "max_num_batched_tokens", "slo_p90_s_per_token",
                 "description", "attention_s_per_kv_token", "kv_read_s_per_token")
# Defaults for a measured cost model that brings no scheduler limits (vLLM's A100 ones).
_MEASURED_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048}


def profile_from_dict(raw: dict[str, Any], *, name: str = "measured") -> HardwareProfile:
    """A profile from JSON: either ``HardwareProfile.to_dict()`` (cost under "cost") or a
    bare ``CostModel.to_dict()`` (what the engine's start-up profiler caches) with the
    profile's own fields beside the cost fields. ``slo_p90_s_per_token`` defaults to 5x
    ``fwd_base_s``; the scheduler limits to vLLM's A100 defaults."""
    raw = dict(raw)
    cost_raw = raw.pop("cost", None)
    if cost_raw is None:
        cost_names = {f.name for f in dataclasses.fields(CostModel)}
        cost_raw = {k: raw.pop(k) for k in list(raw) if k in cost_names}
    unknown = set(raw) - set(_PROFILE_KEYS)
    if unknown:
        raise ValueError(f"profile JSON: unknown keys {sorted(unknown)}")
    cost = CostModel.from_dict(cost_raw)
    fields = {**_MEASURED_DEFAULTS, "name": name, "slo_p90_s_per_token": 5 * cost.fwd_base_s,
              **raw}
    return HardwareProfile(cost=cost, **fields)


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A built-in profile by name, or a profile JSON file (see ``profile_from_dict``)."""
    if str(name_or_path) in PROFILES:
        return PROFILES[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown profile {name_or_path!r}: not one of {sorted(PROFILES)} "
                         f"and no such file")
    return profile_from_dict(json.loads(path.read_text()), name=path.stem)
