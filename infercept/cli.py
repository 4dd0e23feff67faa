"""`infercept`: the command line.

`infercept serve [MODEL] [any vllm serve argument]` is a drop-in for
`vllm serve`: it builds vLLM's own serve parser (so every vLLM flag, its help
and its errors are vLLM's), adds InferCept's group, then starts vLLM's
OpenAI-compatible server with InferCept's scheduler in place. It does not go
through the `vllm` console script, which the CPU build breaks.
"""

from __future__ import annotations

import argparse
import os
import sys

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
CPU_DEFAULT_BLOCK_SIZE = 128
CPU_DEFAULT_DTYPE = "float32"

SERVE_DESCRIPTION = """Launch a local OpenAI-compatible API server (vLLM's) with InferCept's
scheduler, so requests that stop for a tool call keep their KV cache. Serves the
embedded SmolLM2-135M-Instruct if no model is specified.

Search by using: `--help=<ConfigGroup>` to explore options by section (e.g.,
--help=ModelConfig, --help=InferCept)
  Use `--help=all` to show all available flags at once.
"""


def add_infercept_args(parser: argparse.ArgumentParser) -> None:
    """InferCept's own flags, grouped apart from vLLM's in `--help`."""
    from infercept.config import InterceptConfig

    group = parser.add_argument_group(
        "InferCept", "Interception of tool calls (InferCept's own arguments)."
    )
    InterceptConfig.add_cli_args(group)


def apply_serve_defaults(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill in what `infercept serve` decides when the user gave nothing.

    The model defaults to the embedded SmolLM2-135M-Instruct. On CPUs the KV
    cache gets an explicit size (vLLM would ask for 92% of RAM), the block size
    a multiple of 32 and the dtype float32; a user's own value always wins.
    """
    from infercept.config import SCHEDULER_CLS
    from infercept.config import InterceptConfig

    if args.model_tag is None and not _given(argv, "--model"):
        from infercept.default_model import DefaultModelUnavailable, default_model_path

        try:
            args.model_tag = str(default_model_path())
        except DefaultModelUnavailable as exc:  # a setup problem: its message, not a traceback
            raise SystemExit(f"infercept serve: error: {exc} (or name a model: infercept serve MODEL)") from None
        if args.tool_call_parser is None:
            # The embedded model's tool calls (forced by a named tool_choice)
            # come out in hermes' <tool_call> format.
            args.tool_call_parser = "hermes"
            args.enable_auto_tool_choice = True
    if args.scheduler_cls not in (None, SCHEDULER_CLS):
        raise SystemExit(
            f"infercept serve runs its own scheduler ({SCHEDULER_CLS}); "
            f"--scheduler-cls {args.scheduler_cls} cannot be combined with it."
        )
    args.scheduler_cls = SCHEDULER_CLS
    InterceptConfig.from_cli_args(args).apply_to_engine_args(args)
    allow_endpoint_plugin()
    if _on_cpu():
        apply_cpu_defaults(args, argv)


def allow_endpoint_plugin() -> None:
    """vLLM loads endpoint plugins only when `VLLM_PLUGINS` names them.

    Naming ours there also restricts general plugins to the named ones, so
    every installed general plugin is named too: nothing else changes.
    """
    from importlib.metadata import entry_points

    names = os.environ.get("VLLM_PLUGINS")
    if names is None:
        names = ",".join(ep.name for ep in entry_points(group="vllm.general_plugins"))
    allowed = [n for n in names.split(",") if n]
    if "infercept" not in allowed:
        allowed.append("infercept")
    os.environ["VLLM_PLUGINS"] = ",".join(allowed)


def apply_cpu_defaults(args: argparse.Namespace, argv: list[str]) -> None:
    if (
        args.kv_cache_memory_bytes is None
        and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
        and not _given(argv, "--gpu-memory-utilization")
    ):
        args.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    if args.block_size is None:
        args.block_size = CPU_DEFAULT_BLOCK_SIZE
    if not _given(argv, "--dtype"):
        args.dtype = CPU_DEFAULT_DTYPE
    # vLLM's CPU build recompiles the model at every start (its compile cache
    # does not load): 1-2 minutes. Eager mode starts in seconds.
    if not any(_given(argv, f) for f in ("--enforce-eager", "--compilation-config", "-O", "-cc")):
        args.enforce_eager = True


def _given(argv: list[str], flag: str) -> bool:
    alt = flag.replace("-", "_")
    return any(
        a == flag or a.startswith(flag + "=") or a == alt or a.startswith(alt + "=")
        for a in argv
    )


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def build_parser():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from infercept.serve_command import InterceptServe

    parser = FlexibleArgumentParser(
        prog="infercept",
        description="InferCept: serving for tool-using LLMs, on vLLM.",
    )
    parser.add_argument("-v", "--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    serve = InterceptServe()
    serve.subparser_init(subparsers).set_defaults(dispatch=serve.cmd, validate=serve.validate)
    _add_sim_subparser(subparsers)
    return parser


def _add_sim_subparser(subparsers) -> None:
    """`infercept sim`: the simulator (pure Python; `main` runs it without vLLM)."""
    from infercept.sim import cli as sim_cli

    sim = subparsers.add_parser("sim", help="simulate InferCept's policies at paper scale",
                                description=sim_cli.__doc__)
    sim_cli.add_arguments(sim)
    sim.set_defaults(dispatch=sim_cli.run, validate=lambda args: None)


def _version() -> str:
    from infercept import VLLM_VERSION, __version__

    return f"infercept {__version__} (vLLM {VLLM_VERSION})"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":  # before anything imports vLLM
        from infercept.sim import cli as sim_cli

        raise SystemExit(sim_cli.main(argv[1:]))
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subparser == "serve":
        apply_serve_defaults(args, argv)
    configure_logging_from_args(args)
    args.validate(args)
    args.dispatch(args)


if __name__ == "__main__":
    main()
