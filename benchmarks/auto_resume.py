"""What finding the paused request a new prompt continues costs the engine core.

Every request that may resume automatically (a chat follow-up, a completion
with `auto_resume`) is looked up among the paused requests when it reaches the
scheduler (`InterceptSchedulerMixin.add_request`), on the thread that drives
the accelerator. N paused agents share a system prompt of L tokens, then each
has its own user turn (64 tokens) and its own output up to the tool call (32
tokens); the arriving request is one agent's whole context plus a tool result
(48 tokens), built as vLLM's engine core builds a request (vLLM's sha256 block
hasher, 16-token hash blocks, so that its `block_hashes` exist as they do with
prefix caching or a KV connector on).

Two implementations, on the same paused requests and arrivals:
- `index`: `ResumeIndex.continued`, what the scheduler calls;
- `scan`: the scan the scheduler did before the index (commit 00c022a): every
  paused request whose first 8 tokens match, token lists compared in Python.
Both must return the same paused request for every arrival (checked).

Reported per (N, L): the median and p90 microseconds per arrival over the
arrivals (each timed alone), and the index's cost to file one paused request.
Machine-speed dependent: compare rows of one run.

    .venv/bin/python -m benchmarks.auto_resume --out docs/benchmarks/auto-resume.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from infercept.adapter import blocks
from infercept.adapter.interception import Interception, InterceptSpec
from infercept.adapter.resume_index import ResumeIndex

HASH_BLOCK = 16
USER_TOKENS, OUTPUT_TOKENS, RESULT_TOKENS = 64, 32, 48
SCAN_PREFIX_TOKENS = 8


class Scan:
    """The lookup before the index: paused requests by their first 8 tokens."""

    def __init__(self) -> None:
        self.by_prefix: dict[tuple[int, ...], list[Interception]] = defaultdict(list)

    def add(self, paused: Interception) -> None:
        self.by_prefix[tuple(paused.request.all_token_ids[:SCAN_PREFIX_TOKENS])].append(paused)

    def continued(self, prompt_token_ids, block_hashes=()) -> Interception | None:
        best, best_len = None, 0
        for paused in self.by_prefix.get(tuple(prompt_token_ids[:SCAN_PREFIX_TOKENS]), ()):
            common = blocks.common_prefix_len(paused.request.all_token_ids, prompt_token_ids,
                                              paused.num_kv_tokens)
            going_on = len(prompt_token_ids) > paused.prompt_tokens
            if going_on and common >= paused.prompt_tokens and common > best_len:
                best, best_len = paused, common
        return best


def _request(request_id: str, tokens: list[int], hasher):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id, tokens, SamplingParams(max_tokens=OUTPUT_TOKENS), None,
                   block_hasher=hasher)


def measure(num_paused: int, shared_tokens: int, arrivals: int, hasher, hash_fn, seed: int = 0) -> dict:
    rng = random.Random(seed)
    shared = [rng.randrange(1, 50_000) for _ in range(shared_tokens)]
    index, scan = ResumeIndex(HASH_BLOCK, hash_fn), Scan()
    paused_requests, file_s = [], []
    for i in range(num_paused):
        request = _request(f"agent-{i}", shared + [rng.randrange(1, 50_000) for _ in range(USER_TOKENS)], hasher)
        request.append_output_token_ids([rng.randrange(1, 50_000) for _ in range(OUTPUT_TOKENS)])
        paused = Interception(request=request, spec=InterceptSpec(), paused_at_s=0.0,
                              num_kv_tokens=request.num_tokens, prompt_tokens=request.num_prompt_tokens)
        started = time.perf_counter()
        index.add(paused)
        file_s.append(time.perf_counter() - started)
        scan.add(paused)
        paused_requests.append(paused)
    targets = [paused_requests[rng.randrange(num_paused)] for _ in range(arrivals)]
    arriving = [_request(f"arrival-{j}", list(target.request.all_token_ids)
                         + [rng.randrange(1, 50_000) for _ in range(RESULT_TOKENS)], hasher)
                for j, target in enumerate(targets)]
    # Each implementation over all arrivals in turn: the scan reads every paused
    # request's tokens, which would leave the index's lookups a cold cache.
    timings: dict[str, list[float]] = {"index": [], "scan": []}
    for name, finder in (("index", index), ("scan", scan)):
        for j, request in enumerate(arriving):
            started = time.perf_counter()
            found = finder.continued(request.prompt_token_ids, request.block_hashes)
            timings[name].append(time.perf_counter() - started)
            if found is not targets[j]:
                raise AssertionError(f"arrival {j}: {name} found {found}, not {targets[j]}")
    row = {"paused": num_paused, "shared_prefix_tokens": shared_tokens, "arrivals": arrivals}
    for name, values in timings.items():
        cuts = statistics.quantiles(values, n=10, method="inclusive")
        row[f"{name}_us_p50"] = round(statistics.median(values) * 1e6, 1)
        row[f"{name}_us_p90"] = round(cuts[8] * 1e6, 1)
    row["index_file_us_p50"] = round(statistics.median(file_s) * 1e6, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paused", default="10,100,1000")
    parser.add_argument("--shared-tokens", default="2048,8192")
    parser.add_argument("--arrivals", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name("sha256")  # vLLM's default prefix_caching_hash_algo
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(HASH_BLOCK, hash_fn)
    rows = []
    for shared_tokens in (int(x) for x in args.shared_tokens.split(",")):
        for num_paused in (int(x) for x in args.paused.split(",")):
            row = measure(num_paused, shared_tokens, args.arrivals, hasher, hash_fn)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python -m benchmarks.auto_resume " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": {"processor": platform.processor() or platform.machine(),
                        "python": platform.python_version()},
            "rows": rows,
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
