"""What the simulator tracks per request: the trace request across its segments
(``Session``) and its state inside one engine replica (``SimRequest``)."""

from __future__ import annotations

from infercept.bench.workload import Request
from infercept.policy import Location


class Session:
    """One trace request from its arrival to its last token, across segments and replicas.

    ``context_tokens`` is the conversation so far (prompt, generated and returned tokens);
    ``kv_high_water_tokens`` the longest prefix whose KV was ever computed, so any prefill
    below it is recomputation.
    """

    __slots__ = ("request", "segment", "context_tokens", "kv_high_water_tokens", "end_s",
                 "replica", "num_migrations", "paused_at_s", "own_run_start")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.segment = 0
        self.context_tokens = request.prompt_tokens
        self.kv_high_water_tokens = 0
        # The block where its cached own blocks start (after the shared prefix's).
        self.own_run_start = 0
        self.end_s: float | None = None
        self.replica: int | None = None
        self.num_migrations = 0
        self.paused_at_s: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tool(self) -> str:
        """The tool a pause calls, as the engine's interception spec names it."""
        return self.request.tool_of(self.segment)

    @property
    def generate_tokens(self) -> int:
        return self.request.segments[self.segment].generate_tokens

    @property
    def is_last_segment(self) -> bool:
        return self.segment == len(self.request.segments) - 1

    def next_segment(self) -> float:
        """Move past the current tool call: append its returned tokens; returns the call's
        duration."""
        done = self.request.segments[self.segment]
        self.segment += 1
        self.context_tokens += done.tool_return_tokens
        return done.tool_s


class SimRequest:
    """A request inside one engine, with what vLLM's ``Request`` and InferCept's
    ``Interception`` hold for scheduling.

    While decoding, ``num_computed``, ``num_tokens`` and ``generated`` are kept lazily:
    after ``k`` engine iterations ``num_computed == dec_base + k``, and the request samples
    its segment's last token in iteration ``end_iter``; ``Engine.materialize`` writes them
    back. ``seq`` numbers admissions into the running batch (its order there).
    """

    __slots__ = ("session", "key", "tool", "arrival_s", "num_tokens", "num_computed", "num_blocks",
                 "generated", "target", "dec_base", "end_iter", "seq", "decoding",
                 "location", "paused_at_s", "kv_tokens", "cpu_blocks", "next_check_s",
                 "prefix_key", "prefix_tokens", "holds_prefix", "shared_blocks",
                 "uncopied_tokens", "offload_from", "ready_s")

    def __init__(self, session: Session, arrival_s: float) -> None:
        self.session = session
        self.key = session.request_id
        self.tool = session.tool
        self.arrival_s = arrival_s
        self.num_tokens = session.context_tokens
        self.num_computed = 0
        self.num_blocks = 0  # its blocks, the shared prefix's first ones included
        # A prefix shared with other requests (Request.shared_prefix_key): while it
        # holds the prefix's entry, its first ``shared_blocks`` blocks are the entry's.
        self.prefix_key = session.request.shared_prefix_key
        self.prefix_tokens = session.request.shared_prefix_tokens
        self.holds_prefix = False
        self.shared_blocks = 0
        self.uncopied_tokens = 0  # swapped: the shared blocks' tokens its CPU copy left out
        # vllm-offload: the block from which it writes its prompt to the CPU tier, and
        # when its load from there lands (while it waits for one).
        self.offload_from = 0
        self.ready_s = 0.0
        self.generated = 0
        self.target = session.generate_tokens
        self.dec_base = 0
        self.end_iter = 0
        self.seq = -1
        self.decoding = False
        # Set while intercepted (paused on a tool call):
        self.location: Location | None = None
        self.paused_at_s = 0.0
        self.kv_tokens = 0  # tokens whose KV was computed at the pause
        self.cpu_blocks = 0
        self.next_check_s = 0.0  # min-waste: when a swapped request is next planned for

    @property
    def copied_tokens(self) -> int:
        """Swapped: the tokens its CPU copy holds (the shared prefix's left out)."""
        return self.kv_tokens - self.uncopied_tokens

    def __repr__(self) -> str:
        return (f"SimRequest({self.key}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={self.num_blocks}, "
                f"location={self.location})")
