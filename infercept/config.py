"""InferCept's settings, and how they travel into vLLM's engine.

The settings ride in `VllmConfig.additional_config["infercept"]` (a plain
dict, hashed into vLLM's config), which reaches the scheduler in the engine
core and the KV connector in every worker, in-process or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

POLICIES = ("min-waste", "preserve", "swap", "discard", "ttl", "vllm")
DEFAULT_POLICY = "min-waste"
ADDITIONAL_CONFIG_KEY = "infercept"
CONNECTOR_NAME = "InterceptConnector"
CONNECTOR_MODULE = "infercept.adapter.connector"
# Class paths vLLM imports by name (strings, so this module imports no adapter code).
SCHEDULER_CLS = "infercept.adapter.scheduler.InterceptScheduler"
WORKER_EXTENSION = "infercept.adapter.profiler.ProfilerWorkerExtension"


@dataclass(frozen=True)
class InterceptConfig:
    policy: str = DEFAULT_POLICY
    swap_space_bytes: int = 1 << 30
    intercept_timeout_s: float = 600.0
    cost_profile: str | None = None
    profile_at_startup: bool = True
    # > 0: on CPU, run every KV copy as late as CUDA would allow, a swap-out's save
    # completing this many steps late (tests: a GPU-only ordering bug fails on CPU).
    emulate_async_copies: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(
                f"unknown intercept policy {self.policy!r}; choose one of {', '.join(POLICIES)}"
            )
        if self.swap_space_bytes < 0:
            raise ValueError("swap_space_bytes must be >= 0")
        if self.intercept_timeout_s <= 0:
            raise ValueError("intercept_timeout_s must be > 0")
        if self.emulate_async_copies < 0:
            raise ValueError("emulate_async_copies must be >= 0")

    @property
    def uses_connector(self) -> bool:
        """Policies that may swap need InferCept's KV connector in the workers."""
        return self.policy in ("min-waste", "swap", "preserve", "ttl")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "InterceptConfig":
        return cls(**(data or {}))

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "InterceptConfig":
        extra = vllm_config.additional_config
        data = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, dict) else None
        return cls.from_dict(data)

    # --- engine arguments -------------------------------------------------

    def engine_kwargs(self, existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """The vLLM engine arguments that put InferCept in place.

        `existing` holds the user's own engine arguments: their
        `additional_config` is kept, and a KV connector of their own conflicts.
        """
        existing = existing or {}
        if existing.get("worker_extension_cls") not in (None, "", WORKER_EXTENSION):
            raise ValueError("InferCept sets vLLM's worker_extension_cls (its profiler); "
                             "another worker extension cannot be combined with it.")
        additional = dict(existing.get("additional_config") or {})
        additional[ADDITIONAL_CONFIG_KEY] = self.to_dict()
        kwargs: dict[str, Any] = {
            "scheduler_cls": SCHEDULER_CLS,
            "additional_config": additional,
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if self.uses_connector:
            if existing.get("kv_transfer_config") is not None:
                raise ValueError(
                    "InferCept's swap connector cannot be combined with another "
                    "kv_transfer_config; use --intercept-policy discard or vllm."
                )
            kwargs["kv_transfer_config"] = {
                "kv_connector": CONNECTOR_NAME,
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_both",
            }
        return kwargs

    def apply_to_engine_args(self, args: argparse.Namespace) -> None:
        """Set the engine arguments on a parsed `vllm serve` namespace."""
        from vllm.config import KVTransferConfig

        existing = {
            "additional_config": getattr(args, "additional_config", None),
            "kv_transfer_config": getattr(args, "kv_transfer_config", None),
            "worker_extension_cls": getattr(args, "worker_extension_cls", None),
        }
        for key, value in self.engine_kwargs(existing).items():
            if key == "kv_transfer_config":
                value = KVTransferConfig(**value)
            setattr(args, key, value)

    # --- command line ------------------------------------------------------

    @staticmethod
    def add_cli_args(group) -> None:
        group.add_argument(
            "--intercept-policy",
            choices=POLICIES,
            default=DEFAULT_POLICY,
            help="What to do with an intercepted request's KV cache: min-waste picks "
            "preserve, swap or discard per request and iteration; the others fix one "
            "strategy; vllm finishes the request at the call (stock behaviour).",
        )
        group.add_argument(
            "--swap-space-bytes",
            type=_parse_bytes,
            default=InterceptConfig.swap_space_bytes,
            help="CPU memory for swapped-out KV blocks (bytes; suffixes K, M, G, "
            "KiB, MiB, GiB accepted).",
        )
        group.add_argument(
            "--intercept-timeout",
            type=float,
            default=InterceptConfig.intercept_timeout_s,
            help="Seconds after which an intercepted request that was never resumed "
            "is cancelled and its memory freed.",
        )
        group.add_argument(
            "--cost-profile",
            default=None,
            help="JSON file with the cost model (forward and swap times); overrides "
            "the start-up profile.",
        )
        group.add_argument(
            "--no-profile",
            dest="profile_at_startup",
            action="store_false",
            help="Skip the start-up profiling of forward and swap times; use a "
            "cached or default cost model.",
        )
        group.add_argument(
            "--emulate-async-copies",
            type=int,
            default=0,
            metavar="STEPS",
            help="Testing, CPU only: run every KV copy as late as a GPU's asynchronous "
            "copies may complete (a swap-out's save STEPS steps late), so an ordering "
            "bug that only a GPU would show gives wrong tokens here.",
        )

        group.add_argument(
            "--intercept-affinity",
            choices=("engine", "none"),
            default="engine",
            help="Under data parallelism, where a follow-up that names no intercept goes: "
            "engine sends it to the engine core that holds its paused turn; none leaves it "
            "to vLLM's load balancing (to measure what the affinity saves).",
        )

        group.add_argument(
            "--intercept-chat-turns",
            action="store_true",
            help="Pause every chat turn at its natural end, with or without tools, so that "
            "the conversation's next turn (a human's) resumes it; a pause nobody resumes is "
            "released by --intercept-timeout. Per request: \"infercept\": {\"pause_turn\": "
            "true|false}, or the header X-InferCept-Pause-Turn: true|false.",
        )

        group.add_argument(
            "--intercept-instance",
            type=_instance_name,
            default=None,
            metavar="NAME",
            help="This server's name among several behind a router: intercept ids begin "
            "with icpt-NAME. and responses that leave a paused request carry the "
            "X-InferCept-Instance header, so a router can send a resume back here.",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "InterceptConfig":
        return cls(
            policy=args.intercept_policy,
            swap_space_bytes=args.swap_space_bytes,
            intercept_timeout_s=args.intercept_timeout,
            cost_profile=args.cost_profile,
            profile_at_startup=args.profile_at_startup,
            emulate_async_copies=getattr(args, "emulate_async_copies", 0),
        )


def _instance_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]{1,32}", text):
        raise argparse.ArgumentTypeError(f"an instance name is 1-32 letters and digits, not {text!r}")
    return text


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmg])(i)?)?b?\s*$", re.IGNORECASE)


def _parse_bytes(text: str) -> int:
    """'1073741824', '1G', '512MiB' -> bytes (K/M/G are decimal, KiB/MiB/GiB binary)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}")
    number, unit, binary = match.groups()
    power = "kmg".index(unit.lower()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)
