"""What the swap connector's scheduler side tells its worker side, once per step.

Its own module so that the planner (scheduler side), the worker and the connector
front import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class BlockCopies:
    """Paired block ids: `src[i]` is copied to `dst[i]`; a save's `tag` is its request id."""

    src: list[int]
    dst: list[int]
    tag: str | None = None


@dataclass
class SwapMetadata(KVConnectorMetadata):
    """One step's transfers, built in the scheduler and run in every worker.

    Saves (device -> CPU) read blocks that stay allocated until every worker reports
    the save done (`get_finished`), so they may run alongside any later forward pass.
    Loads (CPU -> device) of full blocks run before the layers that read them (layer
    by layer); `tail_loads`, the partly filled last block of a load, lands before the
    forward pass begins, because vLLM writes the step's new KV into that block before
    the layer's attention waits for its load. `abandoned` names saves whose copy
    is no longer wanted (the request resumed or ended meanwhile: its blocks may be
    reused, the save still runs). `allocated` lists the device blocks this step hands
    to requests, for the asynchronous-copy emulation's check that no wanted save
    still reads them.
    """

    saves: list[BlockCopies] = field(default_factory=list)
    loads: list[BlockCopies] = field(default_factory=list)
    tail_loads: list[BlockCopies] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)
