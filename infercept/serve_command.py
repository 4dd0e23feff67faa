"""`infercept serve`'s subcommand: vLLM's `serve` with InferCept's text and flags.

A module of its own, imported only when the parser is built (it imports vLLM),
and at module level so that the parsed arguments pickle: vLLM sends them,
`dispatch` (a bound method of this class) included, to every API server
process it spawns (`--api-server-count`, which data parallelism defaults to
the number of engines).
"""

from __future__ import annotations

from vllm.entrypoints.cli.serve import ServeSubcommand


class InterceptServe(ServeSubcommand):
    def subparser_init(self, subparsers):
        from infercept.cli import SERVE_DESCRIPTION, add_infercept_args

        serve_parser = super().subparser_init(subparsers)
        serve_parser.usage = "infercept serve [model_tag] [options]"
        # vLLM's text names its own default model and the `vllm` command.
        serve_parser.description = SERVE_DESCRIPTION
        serve_parser.epilog = serve_parser.epilog.replace("vllm serve", "infercept serve")
        add_infercept_args(serve_parser)
        return serve_parser
