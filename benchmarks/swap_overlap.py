"""How much of a KV swap-in hides under per-layer compute.

Swaps a context's KV cache into the device, one tensor per layer, while a batch
runs a 7B-class transformer layer stack (hidden 4096, 32 layers, fp16: RMSNorm,
QKV 4096x12288, causal attention over the batch, out 4096x4096, MLP 4096x11008
gate/up/down), and times:

  copy alone         swap_in of all layers, then wait
  compute alone      all layers, no copies
  copy then compute  swap_in of all layers, current stream waits for all, then all layers
  layer-pipelined    swap_in of all layers, layer i's compute waits only for layer i

hidden share = (t_copy_then_compute - t_pipelined) / t_copy (1.0: the copy is free).
Host buffers are pinned on CUDA; times are medians of CUDA-event intervals.
The layers share one set of weights (405 MiB at full size, far above any cache).
Before timing, both swapping variants run once against zeroed device blocks and
check, per layer, a checksum of what the layer's compute read from its KV.

    python benchmarks/swap_overlap.py                        # CUDA, full size
    python benchmarks/swap_overlap.py --device cpu --small   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from infercept.swap.swapper import LayerwiseSwapper
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from infercept.swap.swapper import LayerwiseSwapper

FULL_SIZE = dict(num_layers=32, hidden_size=4096, intermediate_size=11008, head_size=128,
                 num_tokens=2048, swap_tokens=2048, block_size=16, warmup=3, repeats=10)
SMALL_SIZE = dict(num_layers=4, hidden_size=256, intermediate_size=688, head_size=64,
                  num_tokens=64, swap_tokens=256, block_size=16, warmup=1, repeats=3)
# Block-dim layouts of one layer's KV tensor, as vLLM backends allocate them.
LAYOUTS = {
    "flash": 1,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    "cpu": 0,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
}


class LayerStack:
    """A Llama-style decoder layer applied num_layers times with shared weights."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        h, i = args.hidden_size, args.intermediate_size
        gen = torch.Generator(device="cpu").manual_seed(0)

        def weight(rows: int, cols: int) -> torch.Tensor:
            w = torch.randn(rows, cols, generator=gen) / rows**0.5
            return w.to(device=device, dtype=dtype)

        self.w_qkv, self.w_out = weight(h, 3 * h), weight(h, h)
        self.w_gate_up, self.w_down = weight(h, 2 * i), weight(i, h)
        self.num_heads = h // args.head_size
        self.x = torch.randn(args.num_tokens, h, generator=gen).to(device=device, dtype=dtype)

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = (F.rms_norm(x, x.shape[-1:]) @ self.w_qkv).chunk(3, dim=-1)
        q, k, v = (t.view(1, tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.transpose(1, 2).reshape(tokens, -1) @ self.w_out
        gate, up = (F.rms_norm(x, x.shape[-1:]) @ self.w_gate_up).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ self.w_down


class Bench:
    """The device KV tensors, the swapper, the layer stack and the four variants."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        num_blocks = args.swap_tokens // args.block_size
        heads, head, bs = args.hidden_size // args.head_size, args.head_size, args.block_size
        num_device_blocks = 2 * num_blocks
        shape = {"flash": (2, num_device_blocks, bs, heads, head),
                 "cpu": (num_device_blocks, heads, bs, 2 * head)}[args.layout]
        self.block_dim = LAYOUTS[args.layout]
        self.kv_layers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(args.num_layers)]
        self.swapper = LayerwiseSwapper(self.kv_layers, self.block_dim, num_cpu_blocks=num_blocks)
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.cpu_ids = list(range(num_blocks))
        self.device_ids = torch.randperm(num_device_blocks, generator=gen)[:num_blocks].tolist()
        for layer_idx in range(args.num_layers):
            self.swapper.host_layer(layer_idx).view(torch.uint8).random_(generator=gen)
        self.stack = LayerStack(args, self.device, dtype)
        self._index = torch.tensor(self.device_ids, device=self.device)
        self.checksums: list[torch.Tensor] | None = None

    def _compute_layer(self, x: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if self.checksums is not None:  # verification runs only: what this layer's KV holds now
            blocks = self.kv_layers[layer_idx].view(torch.uint8).index_select(self.block_dim, self._index)
            self.checksums.append(blocks.sum(dtype=torch.int64))
        return self.stack.layer(x)

    def copy_alone(self) -> None:
        self.swapper.swap_in(self.cpu_ids, self.device_ids)
        self.swapper.wait_all()

    def compute_alone(self) -> None:
        x = self.stack.x
        for layer_idx in range(len(self.kv_layers)):
            x = self._compute_layer(x, layer_idx)

    def copy_then_compute(self) -> None:
        self.copy_alone()
        self.compute_alone()

    def pipelined(self) -> None:
        self.swapper.swap_in(self.cpu_ids, self.device_ids)
        x = self.stack.x
        for layer_idx in range(len(self.kv_layers)):
            self.swapper.wait_layer(layer_idx)
            x = self._compute_layer(x, layer_idx)

    def verify(self, variant: Callable[[], None]) -> bool:
        """Runs `variant` on zeroed device KV; True if every layer read the swapped-in bytes."""
        for kv in self.kv_layers:
            kv.zero_()
        self.checksums = []
        variant()
        self.swapper.synchronize()
        got = torch.stack(self.checksums).cpu().tolist()
        self.checksums = None
        expected = [
            self.swapper.host_layer(i).view(torch.uint8)[self.cpu_ids].sum(dtype=torch.int64).item()
            for i in range(len(self.kv_layers))
        ]
        return got == expected


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in ms: CUDA events on the current stream, else perf_counter."""
    samples = []
    for step in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed_ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed_ms = (time.perf_counter() - t0) * 1e3
        if step >= warmup:
            samples.append(elapsed_ms)
    return statistics.median(samples)


def run(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    verified = bench.verify(bench.copy_then_compute) and bench.verify(bench.pipelined)
    timings = {}
    for name in ("copy_alone", "compute_alone", "copy_then_compute", "pipelined"):
        timings[f"{name}_ms"] = median_ms(getattr(bench, name), bench.device, args.warmup, args.repeats)
    swap_bytes = len(bench.cpu_ids) * bench.swapper.bytes_per_block
    return {
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "swap_bytes": swap_bytes,
        "verified": verified,
        **timings,
        "copy_gb_per_s": swap_bytes / (timings["copy_alone_ms"] * 1e6),
        "hidden_share": (timings["copy_then_compute_ms"] - timings["pipelined_ms"])
        / timings["copy_alone_ms"],
    }


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"swap-in of {cfg['swap_tokens']} tokens x {cfg['num_layers']} layers "
        f"({result['swap_bytes'] / 2**20:.1f} MiB, layout {cfg['layout']}) under "
        f"{cfg['num_tokens']} tokens of compute, hidden {cfg['hidden_size']}, on {result['device']}",
        f"  copy alone         {result['copy_alone_ms']:9.3f} ms  ({result['copy_gb_per_s']:.1f} GB/s)",
        f"  compute alone      {result['compute_alone_ms']:9.3f} ms",
        f"  copy then compute  {result['copy_then_compute_ms']:9.3f} ms",
        f"  layer-pipelined    {result['pipelined_ms']:9.3f} ms",
        f"  hidden share       {100 * result['hidden_share']:8.1f} %",
        f"  data verified      {result['verified']}",
    ]
    if result["device"] == "cpu":
        lines.append("  (on CPU copies are synchronous: the hidden share is noise)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="reduced sizes (smoke run)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="flash")
    for name, value in FULL_SIZE.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"full size: {value}")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    for name, value in (SMALL_SIZE if args.small else FULL_SIZE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.swap_tokens % args.block_size or args.hidden_size % args.head_size:
        parser.error("swap-tokens must be a multiple of block-size, hidden-size of head-size")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
