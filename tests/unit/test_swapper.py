"""CpuBlockAllocator and LayerwiseSwapper: exact round trips, validation, byte counts."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infercept.swap import CpuBlockAllocator, CpuBlocksExhaustedError, LayerwiseSwapper
from infercept.swap.swapper import bytes_per_block

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_DEVICE_BLOCKS = 10
NUM_CPU_BLOCKS = 12
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- KV layouts: (base tensor, view of it that the swapper gets, block dim) ----

def _cpu_layout(device="cpu"):  # vLLM CPU backend: [num_blocks, kv_heads, block_size, 2*head]
    base = torch.empty(NUM_DEVICE_BLOCKS, 2, 4, 6, dtype=torch.float32, device=device)
    return base, lambda t: t, 0


def _flash_layout(device="cpu"):  # GPU backends: [2, num_blocks, block_size, kv_heads, head]
    base = torch.empty(2, NUM_DEVICE_BLOCKS, 4, 2, 3, dtype=torch.float16, device=device)
    return base, lambda t: t, 1


def _strided_layout(device="cpu"):  # a permuted, sliced view: blocks in dim 1, padding around
    base = torch.empty(4, NUM_DEVICE_BLOCKS, 3, 7, dtype=torch.bfloat16, device=device)
    return base, lambda t: t.transpose(0, 2)[..., 1:6], 1


def _byte_layout(device="cpu"):  # one-byte elements, block dim given as a negative index
    base = torch.empty(3, 5, NUM_DEVICE_BLOCKS, 2, dtype=torch.uint8, device=device)
    return base, lambda t: t, -2


LAYOUTS = [_cpu_layout, _flash_layout, _strided_layout, _byte_layout]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _fill_random_bits(t: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    bits = _bits(t)
    info = torch.iinfo(bits.dtype)
    bits.copy_(torch.randint(info.min, info.max, bits.shape, generator=gen, dtype=bits.dtype))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(_bits(a), _bits(b))


def _make_layers(layouts, seed=0, device="cpu"):
    """Returns (bases, views, block dims), views filled with random bits."""
    bases, views, dims = [], [], []
    for offset, layout in enumerate(layouts):
        base, view_of, dim = layout(device)
        _fill_random_bits(base, seed + offset)
        bases.append(base)
        views.append(view_of(base))
        dims.append(dim)
    return bases, views, dims


# ---- allocator ----

def test_allocator_hands_out_lowest_free_ids_without_overlap():
    alloc = CpuBlockAllocator(6)
    assert alloc.allocate(2) == [0, 1]
    assert alloc.allocate(3) == [2, 3, 4]
    assert alloc.num_free_blocks == 1 and alloc.num_used_blocks == 5
    alloc.free([1, 3])
    assert alloc.allocate(3) == [1, 3, 5]
    assert alloc.allocate(0) == []


def test_allocator_raises_when_short_and_keeps_its_state():
    alloc = CpuBlockAllocator(3)
    alloc.allocate(2)
    assert alloc.can_allocate(1) and not alloc.can_allocate(2)
    with pytest.raises(CpuBlocksExhaustedError, match="1 of 3 free"):
        alloc.allocate(2)
    assert alloc.num_free_blocks == 1
    with pytest.raises(ValueError):
        alloc.allocate(-1)


@pytest.mark.parametrize(
    "bad_ids, message",
    [([2], "already free"), ([0, 0], "twice"), ([-1], "unknown"), ([4], "unknown"), (["0"], "unknown")],
)
def test_allocator_free_rejects_bad_ids_atomically(bad_ids, message):
    alloc = CpuBlockAllocator(4)
    alloc.allocate(2)  # 0 and 1 in use
    with pytest.raises(ValueError, match=message):
        alloc.free([1, *bad_ids])
    assert alloc.num_free_blocks == 2  # block 1 was not released either
    alloc.free([1])
    with pytest.raises(ValueError, match="already free"):
        alloc.free([1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=40))
def test_allocator_matches_a_set_model(ops):
    alloc, used = CpuBlockAllocator(8), set()
    for is_alloc, count in ops:
        if is_alloc:
            if count > 8 - len(used):
                with pytest.raises(CpuBlocksExhaustedError):
                    alloc.allocate(count)
                continue
            ids = alloc.allocate(count)
            assert len(set(ids)) == count and not used & set(ids)
            assert all(0 <= i < 8 for i in ids)
            used |= set(ids)
        else:
            released = sorted(used)[:count]
            alloc.free(released)
            used -= set(released)
        assert alloc.num_free_blocks == 8 - len(used)


def test_allocator_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from infercept.swap.allocator import CpuBlockAllocator\n"
        "import infercept.swap as swap\n"
        "assert swap.CpuBlockAllocator(2).allocate(2) == [0, 1]\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# ---- swapper: round trips ----

def _swap_ids(data, num_pairs_max=NUM_DEVICE_BLOCKS):
    n = data.draw(st.integers(0, min(num_pairs_max, NUM_CPU_BLOCKS)))
    src = data.draw(st.permutations(range(NUM_DEVICE_BLOCKS)))[:n]
    cpu = data.draw(st.permutations(range(NUM_CPU_BLOCKS)))[:n]
    if data.draw(st.booleans()):
        cpu = sorted(cpu)  # consecutive CPU ids take the one-copy-per-run path
    dst = data.draw(st.permutations(range(NUM_DEVICE_BLOCKS)))[:n]
    return src, cpu, dst


def _expected_after_swap_in(base, view_of, dim, original_view, src, dst):
    expected = base.clone()
    for s, d in zip(src, dst):
        view_of(expected).select(dim, d).copy_(original_view.select(dim, s))
    return expected


@settings(max_examples=50, deadline=None)
@given(layouts=st.lists(st.sampled_from(LAYOUTS), min_size=1, max_size=4), data=st.data())
def test_round_trip_into_other_device_blocks(layouts, data):
    bases, views, dims = _make_layers(layouts)
    view_fns = [layout()[1] for layout in layouts]
    src, cpu, dst = _swap_ids(data)
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS)
    originals = [v.clone() for v in views]
    bases_before = [b.clone() for b in bases]

    swapper.swap_out(src, cpu)
    swapper.synchronize()
    for i, (base, before) in enumerate(zip(bases, bases_before)):
        assert _bits_equal(base, before)  # swap out never writes the device
        for s, c in zip(src, cpu):
            assert _bits_equal(swapper.host_layer(i)[c], originals[i].select(dims[i], s))

    for i, base in enumerate(bases):
        _fill_random_bits(base, seed=100 + i)  # garbage over every device block
    garbage = [b.clone() for b in bases]
    swapper.swap_in(cpu, dst)
    swapper.synchronize()
    for i, base in enumerate(bases):
        expected = _expected_after_swap_in(garbage[i], view_fns[i], dims[i], originals[i], src, dst)
        assert _bits_equal(base, expected)  # dst blocks restored, all else untouched
    expected_bytes = len(src) * bytes_per_block(views, dims)
    assert swapper.bytes_swapped_out == swapper.bytes_swapped_in == expected_bytes


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_per_layer_primitives_with_own_ids_and_skipped_layers(data):
    bases, views, dims = _make_layers(LAYOUTS, seed=7)
    view_fns = [layout()[1] for layout in LAYOUTS]
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS)
    originals = [v.clone() for v in views]
    plans = [_swap_ids(data) if data.draw(st.booleans()) else None for _ in LAYOUTS]

    for i, plan in enumerate(plans):
        if plan is not None:
            swapper.swap_out_layer(i, plan[0], plan[1])
    for i, plan in enumerate(plans):
        swapper.wait_layer(i)
        _fill_random_bits(bases[i], seed=50 + i)
    garbage = [b.clone() for b in bases]
    for i, plan in enumerate(plans):
        if plan is not None:
            swapper.swap_in_layer(i, plan[1], plan[2])
            swapper.wait_layer(i)
    swapper.synchronize()

    for i, plan in enumerate(plans):
        src, _, dst = plan if plan is not None else ([], [], [])
        expected = _expected_after_swap_in(garbage[i], view_fns[i], dims[i], originals[i], src, dst)
        assert _bits_equal(bases[i], expected)
    moved_bytes = sum(len(p[0]) * swapper.layer_bytes_per_block[i] for i, p in enumerate(plans) if p)
    assert swapper.bytes_swapped_out == swapper.bytes_swapped_in == moved_bytes


def test_several_swaps_queued_between_waits_and_repeated_sources():
    bases, views, dims = _make_layers([_flash_layout, _cpu_layout])
    originals = [v.clone() for v in views]
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS)
    swapper.swap_out([2, 5], [0, 1])
    swapper.swap_out([2, 9], [6, 3])  # device block 2 copied twice
    swapper.swap_in([6, 0, 3], [7, 8, 2])
    swapper.synchronize()
    for view, original, dim in zip(views, originals, dims):
        assert _bits_equal(view.select(dim, 7), original.select(dim, 2))
        assert _bits_equal(view.select(dim, 8), original.select(dim, 2))
        assert _bits_equal(view.select(dim, 2), original.select(dim, 9))
        assert _bits_equal(view.select(dim, 5), original.select(dim, 5))
    assert swapper.bytes_swapped_out == 4 * swapper.bytes_per_block
    assert swapper.bytes_swapped_in == 3 * swapper.bytes_per_block
    assert swapper.query()


def test_byte_accounting_is_exact():
    layers = [torch.zeros(8, 2, 4, 6), torch.zeros(2, 8, 4, 3, dtype=torch.float16)]
    swapper = LayerwiseSwapper(layers, [0, 1], num_cpu_blocks=5)
    assert swapper.layer_bytes_per_block == (2 * 4 * 6 * 4, 2 * 4 * 3 * 2)
    assert swapper.bytes_per_block == 240 == bytes_per_block(layers, [0, 1])
    assert [tuple(swapper.host_layer(i).shape) for i in range(2)] == [(5, 2, 4, 6), (5, 2, 4, 3)]
    swapper.swap_out([3, 1, 7], [4, 0, 1])
    swapper.swap_in_layer(1, [4, 0], [2, 3])
    swapper.swap_in([], [])
    assert (swapper.bytes_swapped_out, swapper.bytes_swapped_in) == (720, 96)


# ---- swapper: validation ----

@pytest.fixture
def small_swapper():
    layers = [torch.zeros(NUM_DEVICE_BLOCKS, 2, 3), torch.zeros(2, 4, 3)]  # layer 1 has 4 blocks
    return LayerwiseSwapper(layers, [0, 1], NUM_CPU_BLOCKS)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.swap_out([0, 1], [0]), "2 device block ids vs 1"),
        (lambda s: s.swap_out([4], [0]), r"device_block_ids: block id 4 outside \[0, 4\)"),
        (lambda s: s.swap_out([-1], [0]), "outside"),
        (lambda s: s.swap_out([0], [NUM_CPU_BLOCKS]), "cpu_block_ids: block id 12 outside"),
        (lambda s: s.swap_out([0, 1], [3, 3]), "more than once"),
        (lambda s: s.swap_in([0, 1], [2, 2]), "more than once"),
        (lambda s: s.swap_in([0.5], [1]), "integers"),
        (lambda s: s.swap_out_layer(2, [0], [0]), "layer index 2"),
        (lambda s: s.swap_in_layer(1, [0], [5]), "outside"),
        (lambda s: s.wait_layer(-1), "layer index"),
        (lambda s: s.host_layer(9), "layer index"),
    ],
)
def test_bad_calls_raise_and_copy_nothing(small_swapper, call, message):
    with pytest.raises(ValueError, match=message):
        call(small_swapper)
    assert small_swapper.bytes_swapped_out == small_swapper.bytes_swapped_in == 0


def test_per_layer_calls_use_that_layers_block_count(small_swapper):
    small_swapper.swap_out_layer(0, [9], [0])  # layer 0 has 10 blocks, layer 1 only 4
    assert small_swapper.bytes_swapped_out == small_swapper.layer_bytes_per_block[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[], block_dims=0), "non-empty"),
        (dict(layers=[torch.zeros(4, 2)], block_dims=[0, 1]), "2 block dims for 1 layers"),
        (dict(layers=[torch.zeros(4, 2)], block_dims=2), "block dim 2 out of range"),
        (dict(layers=[torch.zeros(4, 2)], block_dims=0, num_cpu_blocks=0), "num_cpu_blocks"),
    ],
)
def test_bad_construction_raises(kwargs, message):
    kwargs.setdefault("num_cpu_blocks", 4)
    with pytest.raises(ValueError, match=message):
        LayerwiseSwapper(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinned_memory_without_cuda_is_refused():
    with pytest.raises(ValueError, match="pinned"):
        LayerwiseSwapper([torch.zeros(4, 2)], 0, 4, pin_memory=True)
    assert not LayerwiseSwapper([torch.zeros(4, 2)], 0, 4).pin_memory


# ---- benchmark smoke run ----

def _load_benchmark(name: str = "swap_overlap"):
    path = REPO_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_run_verifies_its_data(tmp_path, capsys):
    bench_mod = _load_benchmark()
    out = tmp_path / "swap.json"
    args = ["--device", "cpu", "--small", "--num-layers", "2", "--warmup", "0", "--repeats", "1"]
    args += ["--out", str(out)]
    result = bench_mod.main(args)
    assert json.loads(out.read_text()) == result
    assert result["verified"] is True
    assert result["swap_bytes"] == 256 * 2 * 2 * 256 * 4  # tokens x layers x (K, V) x hidden x fp32
    assert "hidden share" in capsys.readouterr().out
    bench = bench_mod.Bench(bench_mod.parse_args(args))
    assert not bench.verify(bench.compute_alone)  # the check notices KV that was never swapped in


def test_save_ordering_check_catches_early_free_under_the_emulation(capsys):
    """The GPU check's CPU run: blocks held until the save is reported give exact copies;
    blocks handed on when it is queued give corrupt ones (as they may on a GPU)."""
    bench_mod = _load_benchmark("save_ordering")
    result = bench_mod.main(["--device", "cpu", "--small", "--emulate", "--rounds", "2",
                             "--num-layers", "2", "--warmup", "0", "--repeats", "1"])
    assert result["exact_rounds"] == {"protocol": 2, "early_free": 0}
    assert "exact copies: protocol 2/2, early free 0/2" in capsys.readouterr().out


# ---- CUDA ----

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_round_trip_pinned(layout):
    bases, views, dims = _make_layers([layout], device="cuda")
    original = views[0].clone()
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS)
    assert swapper.pin_memory and swapper.host_layer(0).is_pinned()
    src, cpu, dst = [3, 0, 7, 8], [5, 6, 7, 1], [9, 2, 4, 5]
    swapper.swap_out(src, cpu)
    swapper.wait_all()
    _fill_random_bits(bases[0], seed=3)
    garbage = bases[0].clone()
    swapper.swap_in(cpu, dst)
    swapper.synchronize()
    expected = _expected_after_swap_in(garbage, layout()[1], dims[0], original, src, dst)
    assert _bits_equal(bases[0], expected)


@pytest.mark.gpu
@gpu
def test_cuda_side_stream_waits_for_compute_and_layers_wait_for_copies():
    layers = [torch.zeros(NUM_DEVICE_BLOCKS, 64, 1024, device="cuda") for _ in range(3)]
    swapper = LayerwiseSwapper(layers, 0, NUM_CPU_BLOCKS)
    torch.cuda._sleep(100_000_000)  # keeps the compute stream busy
    for i, layer in enumerate(layers):
        layer.fill_(i + 1)  # still queued when swap_out_layer is called
        swapper.swap_out_layer(i, [4], [i])
    swapper.synchronize()
    assert [swapper.host_layer(i)[i].unique().tolist() for i in range(3)] == [[1.0], [2.0], [3.0]]

    for layer in layers:
        layer.zero_()
    with torch.cuda.stream(swapper._ordering._streams["load"]):
        torch.cuda._sleep(100_000_000)  # delays the copies behind it
    swapper.swap_in([0, 1, 2], [5, 6, 7])
    seen = []
    for i, layer in enumerate(layers):
        swapper.wait_layer(i)
        seen.append(layer[5 + i].clone())  # on the current stream, after the wait only
    torch.cuda.synchronize()
    assert [t.unique().tolist() for t in seen] == [[1.0], [2.0], [3.0]]


# ---- the CPU emulation of CUDA's worst-case ordering ---------------------


def test_emulation_runs_a_save_only_when_it_is_reported():
    """A save reads the device block as late as CUDA allows: when it is reported done."""
    bases, views, dims = _make_layers([_cpu_layout])
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS, emulate_lag=2)
    swapper.swap_out([3], [0], tag="req")
    views[0].select(dims[0], 3).fill_(7.0)  # the forward pass writes the block meanwhile
    assert swapper.finished_saves() == []  # one poll: not yet
    assert not swapper.query()
    assert swapper.finished_saves() == ["req"]
    assert swapper.host_layer(0)[0].unique().tolist() == [7.0]  # read at the last moment
    assert swapper.query()


def test_emulation_runs_a_load_at_its_layers_wait():
    bases, views, dims = _make_layers([_cpu_layout, _cpu_layout])
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS, emulate_lag=1)
    for i in range(2):
        swapper.host_layer(i)[4].fill_(float(i + 1))
    swapper.swap_in([4], [2])
    assert views[0].select(dims[0], 2).ne(1.0).any()  # queued, not done
    swapper.wait_layer(0)
    assert views[0].select(dims[0], 2).unique().tolist() == [1.0]
    assert views[1].select(dims[1], 2).ne(2.0).any()  # layer 1 still waits
    swapper.wait_loads()
    assert views[1].select(dims[1], 2).unique().tolist() == [2.0]


def test_emulation_keeps_the_orderings_dependencies():
    """A load from a CPU block an earlier save writes runs that save first (and the
    device block it overwrites is read by that save first), as the CUDA ordering's
    cross-stream wait makes it."""
    bases, views, dims = _make_layers([_flash_layout, _cpu_layout])
    originals = [v.clone() for v in views]
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS, emulate_lag=5)
    swapper.swap_out([2, 5], [0, 1])
    swapper.swap_out([2, 9], [6, 3])
    swapper.swap_in([6, 0, 3], [7, 8, 2])
    swapper.wait_loads()  # the saves it depends on run first
    for view, original, dim in zip(views, originals, dims):
        assert _bits_equal(view.select(dim, 7), original.select(dim, 2))
        assert _bits_equal(view.select(dim, 8), original.select(dim, 2))
        assert _bits_equal(view.select(dim, 2), original.select(dim, 9))


def test_emulation_poisons_a_block_handed_on_before_its_save_ran():
    bases, views, dims = _make_layers([_cpu_layout, _flash_layout])
    swapper = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS, emulate_lag=1)
    originals = [v.clone() for v in views]
    swapper.swap_out([1, 6], [0, 1], tag="paused")
    assert swapper.poison_reused([6, 8]) == 2  # block 6, in both layers
    assert swapper.num_poisoned_blocks == 2
    assert swapper.finished_saves() == ["paused"]
    for i in range(2):
        assert _bits_equal(swapper.host_layer(i)[0], originals[i].select(dims[i], 1))
        assert not torch.equal(swapper.host_layer(i)[1], originals[i].select(dims[i], 6))
    assert swapper.poison_reused([6]) == 0  # nothing left to read it
    plain = LayerwiseSwapper(views, dims, NUM_CPU_BLOCKS)
    plain.swap_out([1], [0], tag="t")
    assert plain.poison_reused([1]) == 0 and plain.finished_saves() == ["t"]
