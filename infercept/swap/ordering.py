"""When a queued block copy runs: on a CUDA stream, at once (CPU), or as late as CUDA allows.

`LayerwiseSwapper` hands every swap to one of these as a list of per-layer copies on one
of two queues, `save` (device -> host) and `load` (host -> device):

- `CudaOrdering`: each queue is a CUDA side stream that first waits for the caller's
  (compute) stream. A copy that touches a block an unfinished copy on the other stream
  touches (the same CPU block, or the same device block) waits for it; otherwise saves
  and loads overlap each other and compute. Loads record an event per layer, which
  `wait_layer` makes the compute stream wait for; a tagged save records one event,
  which `finished_saves` polls without blocking.
- `ImmediateOrdering`: the CPU build, where a copy is done when it is queued.
- `DeferredOrdering`: the CPU emulation of the GPU's worst case. Nothing runs when it
  is queued. A load runs at the `wait_layer` of its layer (or `wait_loads`); a tagged
  save runs when `finished_saves` reports it, `lag` polls after it was queued; each
  queue keeps its order and a copy first runs the copies of the other queue that touch
  its blocks, as the CUDA ordering makes it wait for them. Until then, a save reads
  whatever the device block holds when it finally runs: a block that was handed to
  another request meanwhile is caught by `pending_save_reads` (the swapper poisons it).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

SAVE, LOAD = "save", "load"
_OTHER = {SAVE: LOAD, LOAD: SAVE}


class _Unchecked:
    """Orderings that run copies for real have nothing for the emulation's checks."""

    def abandon_save(self, tag) -> None:
        pass

    def pending_save_reads(self, device_ids: Iterable[int]) -> list[tuple[int, int]]:
        return []


class ImmediateOrdering(_Unchecked):
    """Copies run when queued (CPU tensors: a copy is synchronous)."""

    def __init__(self) -> None:
        self._finished: list = []

    def submit(self, queue: str, device_ids: Sequence[int], cpu_ids: Sequence[int],
               layers: Iterable[int], copy_layer: Callable[[int], None], tag=None) -> None:
        for layer_idx in layers:
            copy_layer(layer_idx)
        if tag is not None:
            self._finished.append(tag)

    def finished_saves(self) -> list:
        finished, self._finished = self._finished, []
        return finished

    def wait_layer(self, layer_idx: int) -> None:
        pass

    def wait_loads(self) -> None:
        pass

    def wait_all(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CudaOrdering(_Unchecked):
    """Two side streams, per-layer load events, cross-stream waits only on shared blocks."""

    def __init__(self, device: torch.device, num_layers: int) -> None:
        self.device = device
        self._streams = {SAVE: torch.cuda.Stream(device=device), LOAD: torch.cuda.Stream(device=device)}
        self._layer_events = [torch.cuda.Event() for _ in range(num_layers)]
        # Unfinished copies: (queue, device ids, CPU ids, completion event).
        self._recent: list[tuple[str, frozenset, frozenset, torch.cuda.Event]] = []
        self._saves: deque[tuple[object, torch.cuda.Event]] = deque()

    def submit(self, queue: str, device_ids: Sequence[int], cpu_ids: Sequence[int],
               layers: Iterable[int], copy_layer: Callable[[int], None], tag=None) -> None:
        stream = self._streams[queue]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        device_set, cpu_set = frozenset(device_ids), frozenset(cpu_ids)
        self._recent = [r for r in self._recent if not r[3].query()]
        for other, other_device, other_cpu, event in self._recent:
            if other != queue and (device_set & other_device or cpu_set & other_cpu):
                stream.wait_event(event)
        with torch.cuda.stream(stream):
            for layer_idx in layers:
                copy_layer(layer_idx)
                if queue == LOAD:
                    self._layer_events[layer_idx].record(stream)
            done = torch.cuda.Event()
            done.record(stream)
        self._recent.append((queue, device_set, cpu_set, done))
        if tag is not None:
            self._saves.append((tag, done))

    def finished_saves(self) -> list:
        finished = []
        while self._saves and self._saves[0][1].query():  # one stream: done in order
            finished.append(self._saves.popleft()[0])
        return finished

    def wait_layer(self, layer_idx: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._layer_events[layer_idx])

    def wait_loads(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self._streams[LOAD])

    def wait_all(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for stream in self._streams.values():
            current.wait_stream(stream)

    def synchronize(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()

    def query(self) -> bool:
        return all(stream.query() for stream in self._streams.values())


@dataclass(eq=False)
class _Copy:
    seq: int
    queue: str
    layer_idx: int
    device_ids: frozenset
    cpu_ids: frozenset
    run: Callable[[], None]
    tag: object = None
    done: bool = False


class DeferredOrdering:
    """Every copy runs at the latest moment CUDA's ordering allows (see the module doc)."""

    def __init__(self, lag: int = 1) -> None:
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.lag = lag
        self._seq = itertools.count()
        self._queues: dict[str, deque[_Copy]] = {SAVE: deque(), LOAD: deque()}
        self._saves: deque[list] = deque()  # [tag, last copy, polls left]
        self._abandoned: set = set()

    def submit(self, queue: str, device_ids: Sequence[int], cpu_ids: Sequence[int],
               layers: Iterable[int], copy_layer: Callable[[int], None], tag=None) -> None:
        device_set, cpu_set = frozenset(device_ids), frozenset(cpu_ids)
        last = None
        for layer_idx in layers:
            last = _Copy(next(self._seq), queue, layer_idx, device_set, cpu_set,
                         lambda layer_idx=layer_idx: copy_layer(layer_idx), tag)
            self._queues[queue].append(last)
        if tag is not None:
            self._saves.append([tag, last, self.lag])

    def _run_through(self, copy: _Copy | None) -> None:
        """Run `copy` and everything its stream ordering puts before it."""
        if copy is None or copy.done:
            return
        queue = self._queues[copy.queue]
        while queue and not copy.done:
            head = queue[0]
            for other in list(self._queues[_OTHER[head.queue]]):
                if other.seq > head.seq:
                    break
                if other.device_ids & head.device_ids or other.cpu_ids & head.cpu_ids:
                    self._run_through(other)
            queue.popleft()
            head.done = True
            head.run()

    def finished_saves(self) -> list:
        for save in self._saves:
            save[2] -= 1
        finished = []
        while self._saves and self._saves[0][2] <= 0:
            tag, last, _ = self._saves.popleft()
            self._run_through(last)
            self._abandoned.discard(tag)
            finished.append(tag)
        return finished

    def abandon_save(self, tag) -> None:
        self._abandoned.add(tag)

    def pending_save_reads(self, device_ids: Iterable[int]) -> list[tuple[int, int]]:
        """(layer, device block) pairs of `device_ids` that a wanted save has yet to read."""
        handed_on = frozenset(device_ids)
        return [(c.layer_idx, b) for c in self._queues[SAVE] if c.tag not in self._abandoned
                for b in sorted(c.device_ids & handed_on)]

    def wait_layer(self, layer_idx: int) -> None:
        loads = [c for c in self._queues[LOAD] if c.layer_idx == layer_idx]
        self._run_through(loads[-1] if loads else None)

    def wait_loads(self) -> None:
        queue = self._queues[LOAD]
        self._run_through(queue[-1] if queue else None)

    def wait_all(self) -> None:
        for queue in self._queues.values():
            self._run_through(queue[-1] if queue else None)

    def synchronize(self) -> None:
        self.wait_all()

    def query(self) -> bool:
        return not any(self._queues.values())
