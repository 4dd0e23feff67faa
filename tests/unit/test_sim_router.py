"""Several replicas behind a router: where follow-ups land decides what KV they reuse."""

import dataclasses

import pytest

from infercept.bench.workload import generate_trace
from infercept.sim.router import make_router
from infercept.sim.runner import SimConfig, simulate
from test_sim_properties import SMALL

ROOMY = SMALL.with_cost(device_capacity_tokens=1 << 16, cpu_capacity_tokens=1 << 16)
TRACE = generate_trace("mix", 40, 8.0, 7, time_scale=0.05, length_scale=0.25,
                       max_context_tokens=1000)


def run(policy: str, router: str, replicas: int = 2):
    return simulate(TRACE, ROOMY, policy, SimConfig(replicas=replicas, router=router,
                                                   check_invariants=True))


@pytest.mark.parametrize("policy", ["preserve", "min-waste"])
def test_affinity_keeps_every_resume_on_its_replica(policy):
    result = run(policy, "affinity")
    assert result.stats["migrations"] == 0
    assert all(record.completed for record in result.records)
    if policy == "preserve":  # memory is ample: nothing is lost
        assert result.counters.recomputed_tokens == 0
    spread = run(policy, "round-robin")
    assert spread.counters.recomputed_tokens > result.counters.recomputed_tokens


@pytest.mark.parametrize("router", ["round-robin", "least-loaded"])
def test_other_routers_move_sessions_and_recompute_their_context(router):
    result = run("preserve", router)
    assert result.stats["migrations"] > 0
    assert result.counters.recomputed_tokens > 0
    assert all(record.completed for record in result.records)
    # The KV left behind on the first replica was freed.
    assert result.stats["device_blocks_in_use_at_end"] == 0
    assert result.stats["intercepted_at_end"] == 0


def test_round_robin_costs_stock_vllm_its_prefix_cache():
    affine, spread = run("vllm", "affinity"), run("vllm", "round-robin")
    assert spread.counters.recomputed_tokens > affine.counters.recomputed_tokens


def test_one_replica_is_the_same_under_every_router():
    results = [run("min-waste", router, replicas=1)
               for router in ("affinity", "round-robin", "least-loaded")]
    assert results[0].records == results[1].records == results[2].records


def test_routers_by_name():
    assert make_router("round-robin").name == "round-robin"
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random")


def test_replicas_share_the_load():
    result = run("preserve", "affinity", replicas=4)
    single = run("preserve", "affinity", replicas=1)
    assert result.counters.kv_capacity_tokens == 4 * single.counters.kv_capacity_tokens
    assert result.counters.forwarded_tokens == single.counters.forwarded_tokens
    assert dataclasses.asdict(result.records[0]).keys() == dataclasses.asdict(
        single.records[0]).keys()
