"""Swap-outs under the GPU's ordering: nothing corrupted, and how much of a save hides.

Drives `LayerwiseSwapper` as InferCept's connector does. A paused request's blocks are
saved (one tagged side-stream copy) while a 7B-class layer stack (`swap_overlap.py`'s)
runs on the compute stream and, layer by layer, writes new KV into other, freed blocks;
the saved blocks go back to the pool only when `finished_saves()` reports the save.

  protocol     blocks held until the save is reported: the host copy must be exact
  early free   the compute writes into the saved blocks right after the save is queued
               (the first version's ordering): on a GPU the copy may read the new data
  timing       save alone, compute alone, save overlapped with compute;
               hidden share = (t_save + t_compute - t_both) / t_save (1.0: the save is free)

    python benchmarks/save_ordering.py                           # CUDA, full size
    python benchmarks/save_ordering.py --device cpu --small --emulate   # CPU worst case
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swap_overlap import Bench, median_ms  # noqa: E402
from swap_overlap import parse_args as parse_size_args  # noqa: E402

from infercept.swap.swapper import LayerwiseSwapper  # noqa: E402


class SaveBench(Bench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        lag = 2 if args.emulate else 0
        self.swapper = LayerwiseSwapper(self.kv_layers, self.block_dim, len(self.cpu_ids), emulate_lag=lag)
        taken = set(self.device_ids)
        num_device_blocks = self.kv_layers[0].shape[self.block_dim]
        self.free_ids = [b for b in range(num_device_blocks) if b not in taken]
        self._round = 0

    def _forward(self, write_ids: list[int]) -> None:
        """The layer stack on the compute stream; each layer writes KV into `write_ids`."""
        index = torch.tensor(write_ids, device=self.device)
        x = self.stack.x
        for kv in self.kv_layers:
            x = self.stack.layer(x)
            blocks = kv.index_select(self.block_dim, index)
            kv.index_copy_(self.block_dim, index, blocks + x.mean())  # new KV, data-dependent

    def _wait_for(self, tag: int) -> None:
        while tag not in self.swapper.finished_saves():
            self._forward(self.free_ids)  # later steps keep running meanwhile

    def save_round(self, early_free: bool) -> bool:
        """One save of the paused blocks beside a forward pass; True if the copy is exact."""
        self._round += 1
        index = torch.tensor(self.device_ids, device=self.device)
        for kv in self.kv_layers:
            kv.index_fill_(self.block_dim, index, float(self._round % 7 + 1))
        expected = [kv.index_select(self.block_dim, index).cpu() for kv in self.kv_layers]
        self.swapper.swap_out(self.device_ids, self.cpu_ids, tag=self._round)
        if early_free:
            self.swapper.poison_reused(self.device_ids)  # emulation: handed on while unread
        self._forward(self.device_ids if early_free else self.free_ids)
        self._wait_for(self._round)
        self.swapper.synchronize()
        return all(torch.equal(self.swapper.host_layer(i)[: len(self.cpu_ids)].movedim(0, self.block_dim), e)
                   for i, e in enumerate(expected))

    def save_alone(self) -> None:
        self.swapper.swap_out(self.device_ids, self.cpu_ids)
        self.swapper.synchronize()

    def compute_alone(self) -> None:
        self._forward(self.free_ids)

    def save_and_compute(self) -> None:
        self.swapper.swap_out(self.device_ids, self.cpu_ids)
        self._forward(self.free_ids)
        self.swapper.synchronize()


def run(args: argparse.Namespace) -> dict:
    bench = SaveBench(args)
    rounds = args.rounds
    exact = {name: sum(bench.save_round(early_free=name == "early_free") for _ in range(rounds))
             for name in ("protocol", "early_free")}
    timings = {f"{name}_ms": median_ms(getattr(bench, name), bench.device, args.warmup, args.repeats)
               for name in ("save_alone", "compute_alone", "save_and_compute")}
    return {
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "emulated": args.emulate,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "save_bytes": len(bench.cpu_ids) * bench.swapper.bytes_per_block,
        "rounds": rounds,
        "exact_rounds": exact,
        **timings,
        "hidden_share": (timings["save_alone_ms"] + timings["compute_alone_ms"]
                         - timings["save_and_compute_ms"]) / timings["save_alone_ms"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--emulate", action="store_true",
                        help="CPU only: run every copy as late as CUDA allows")
    own, rest = parser.parse_known_args(argv)
    args = parse_size_args(rest)
    args.rounds, args.emulate = own.rounds, own.emulate
    result = run(args)
    exact = result["exact_rounds"]
    print(f"save of {result['save_bytes'] / 2**20:.1f} MiB beside {args.num_layers} layers on "
          f"{result['device']}{' (emulated GPU ordering)' if args.emulate else ''}\n"
          f"  exact copies: protocol {exact['protocol']}/{args.rounds}, "
          f"early free {exact['early_free']}/{args.rounds}\n"
          f"  save alone {result['save_alone_ms']:.3f} ms, compute alone "
          f"{result['compute_alone_ms']:.3f} ms, both {result['save_and_compute_ms']:.3f} ms: "
          f"hidden {100 * result['hidden_share']:.1f} %")
    if result["device"] == "cpu":
        print("  (on CPU copies are synchronous or emulated: the hidden share is noise)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
