"""A table of `tests/server/load.py` runs from their logs.

Each log holds, per run, a `run i/n: ...` line, the run's report as JSON and
the server's cumulative counters afterwards (`so far: {...}`, one series per
engine under data parallelism). A run's figures are the difference between
its counters and the previous run's (the first run's are its counters), summed
over engines; each run includes its 16 reference conversations run alone.

    .venv/bin/python -m benchmarks.load_summary docs/dp/engine.log docs/dp/affinity-none.log docs/dp/stock.log
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import defaultdict
from pathlib import Path

COLUMNS = {
    "forwarded": "infercept:forwarded_tokens_total",
    "reused": "infercept:tokens_reused_total",
    "recomputed": "infercept:recomputed_tokens_total",
    "prefix hits": "vllm:prefix_cache_hits_total",
    "preemptions": "infercept:preemptions_total",
}


def parse(log: Path) -> list[dict]:
    """Per run: wall time, wrong transcripts, errors and the counters' deltas."""
    text = log.read_text()
    runs, previous = [], defaultdict(float)
    for block in re.split(r"^run \d+/\d+: ", text, flags=re.M)[1:]:
        report = json.JSONDecoder().raw_decode(block[block.index("{"):])[0]
        so_far = ast.literal_eval(re.search(r"^so far: (\{.*\})$", block, re.M).group(1))
        totals = defaultdict(float)
        for series, value in so_far.items():
            totals[series.split("{", 1)[0]] += value
        runs.append({
            "wall_s": report["total_s"],
            "requests": report["num_requests"],
            "errors": len(report["errors"]),
            "wrong": len(report["mismatches"]),
            **{name: totals[metric] - previous[metric] for name, metric in COLUMNS.items()},
        })
        previous = totals
    return runs


def table(logs: list[Path]) -> str:
    header = ["log", "run", "wall s", "requests", "wrong", "errors", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for log in logs:
        for i, run in enumerate(parse(log), 1):
            cells = [log.name, str(i), f"{run['wall_s']:.1f}", str(run["requests"]), str(run["wrong"]),
                     str(run["errors"]), *(f"{run[name]:,.0f}" for name in COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    print(table(parser.parse_args(argv).logs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
