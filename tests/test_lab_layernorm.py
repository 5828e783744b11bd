"""The kernel lab's layernorm_backward and residual_layernorm ladders (dev/lab/): the counter
orderings and numbers their tutorials (dev/lab/layernorm_backward.md, dev/lab/residual_layernorm.md)
claim, and their planted bugs visible in the columns the exercises name. tests/test_lab.py checks
every rung's answers, unique bytes and the tutorials' tables."""

from __future__ import annotations

import ctypes


import torch

from lab_rows import lab, rows  # tests/lab_rows.py: dev/lab/lab.py and its rows, shared


def _global_sites(row, launch=None):
    launches = row.launches if launch is None else [row.launches[launch]]
    return [s for l in launches for s in l.sites if s.space == "global"]


def _atomic_requests(row) -> int:
    # the simulator's atomicAdd is a read-modify-write in its header: a load and a store site there
    return sum(s.requests for s in _global_sites(row) if s.file.endswith("cuda_sim.h"))


def test_layernorm_backward_counters_tell_the_tutorials_story():
    r = rows("layernorm_backward")
    naive, atomic, block, packed, today = (r[k] for k in ("1_naive", "2_warp_atomic", "3_block_partials",
                                                          "4_packed128", "5_today"))
    n_rows, C = lab.LADDERS["layernorm_backward"].counter_shape
    partials = block.launches[0].blocks  # num_partials: one block per partial row
    # 1: two kernels; the row kernel's lanes are rows (32 sectors per request where 4 would do), the
    # column kernel is coalesced but has only C threads
    assert naive.grid.count("+") == 1
    assert any(s.per_request == 32.0 and s.ideal_per_request == 4.0 for s in _global_sites(naive, 0))
    assert all(s.at_ideal for s in _global_sites(naive, 1))
    assert naive.launches[1].blocks * naive.launches[1].threads_per_block < C + 128
    assert naive.moved_over_ideal > 10
    # 2: every access coalesced; the atomics: a load and a store per element of dout * xhat and dout
    assert atomic.sectors == atomic.ideal_sectors
    assert _atomic_requests(atomic) == 2 * 2 * n_rows * C // 32
    assert atomic.requests > naive.requests
    assert atomic.moved_bytes < naive.moved_bytes
    # 3: no atomics; the partial rows and the reduce replace them; conflict-free shared memory
    assert _atomic_requests(block) == 0 and _atomic_requests(packed) == 0 and _atomic_requests(today) == 0
    zeroing = sum(s.requests for s in _global_sites(atomic, 0))  # the kernel that clears dweight, dbias
    assert block.requests == (atomic.requests - _atomic_requests(atomic) - zeroing
                              + 2 * partials * C // 32       # partial rows stored
                              + 2 * partials * C // 32       # ... read by the reduce kernel
                              + 2 * C // 32)                 # dweight, dbias stored
    assert block.sectors == block.ideal_sectors and block.ways == 1.0
    assert block.moved_bytes < atomic.moved_bytes
    # ... what is left: the second read of dout and inp, weight in both passes, the scratch, mean / rstd
    assert block.moved_bytes - block.ideal_bytes == (4 * 2 * n_rows * C + 4 * (2 * n_rows * C - C)
                                                     + 2 * 4 * 2 * partials * C + 2 * n_rows * (32 - 4))
    # 4: float4, the row read once: a fraction of the requests, each at its ideal, below 2x the bytes
    assert packed.requests * 5 < block.requests
    assert packed.sectors == packed.ideal_sectors and packed.ways == 1.0
    assert packed.moved_over_ideal < 2.0
    # ... and what is left is weight read twice per row, the scratch, and a sector per one-lane mean / rstd
    assert packed.moved_bytes - packed.ideal_bytes == (4 * (2 * n_rows * C - C)
                                                       + 2 * 4 * 2 * partials * C
                                                       + 2 * n_rows * (32 - 4))
    # 5 is today's kernel: rung 4's row kernel and bytes; more, narrower requests for the partials
    assert (today.launches[0].blocks, today.launches[0].threads_per_block) == \
        (packed.launches[0].blocks, packed.launches[0].threads_per_block)
    assert today.moved_bytes == packed.moved_bytes
    assert today.requests > packed.requests and today.ways == 1.0


def test_atomic_order_changes_the_bits_of_dweight_and_the_partials_do_not():
    """Rung 2's atomics add the rows into dweight, dbias in the order the warps arrive: under another
    warp schedule of the simulator its bits change. Rungs 3 to 5 add in a fixed order: the same bits
    under every schedule."""
    ladder = lab.LADDERS["layernorm_backward"]
    rows("layernorm_backward")  # builds (or skips)
    handle, _ = lab.library(ladder)

    def grads(rung, order):
        inputs = ladder.make_inputs(ladder.counter_shape, torch.Generator().manual_seed(0))
        err = ctypes.create_string_buffer(lab.ERR_LEN)
        with lab.schedule(handle, *order):
            assert ladder.call_of(rung)(lab.entry(handle, ladder, rung), inputs, err) == 0, err.value
        return inputs["dinp"], inputs["dweight"], inputs["dbias"]

    orders = [("forward",), ("reverse",), ("random", 1), ("random", 2, True)]
    for rung in ladder.rungs:
        first, *others = [grads(rung, order) for order in orders]
        differ = [not all(torch.equal(a, b) for a, b in zip(first, other)) for other in others]
        if rung.stem == "2_warp_atomic":
            assert any(differ), "the atomics' order never changed a bit"
            assert all(torch.equal(first[0], other[0]) for other in others)  # dinp: no atomics
        else:
            assert not any(differ), rung.stem


def test_residual_layernorm_counters_tell_the_tutorials_story():
    r = rows("residual_layernorm")
    two, fused, today = (r[k] for k in ("1_two_kernels", "2_fused", "3_today"))
    n_rows, C = lab.LADDERS["residual_layernorm"].counter_shape
    # 1 -> 2: two launches to one; exactly one read of h (rows x C floats, float4) fewer
    assert two.grid.count("+") == 1 and fused.grid.count("+") == 0
    assert two.requests - fused.requests == n_rows * C // 4 // 32
    assert two.moved_bytes - fused.moved_bytes == 4 * n_rows * C
    assert two.unique_bytes - fused.unique_bytes == 4 * n_rows * C
    assert fused.unique_bytes == fused.ideal_bytes
    assert two.sectors == two.ideal_sectors and fused.sectors == fused.ideal_sectors
    # what the fused kernel has above the least: weight and bias per warp, a sector per mean / rstd store
    assert fused.moved_bytes - fused.ideal_bytes == 2 * 4 * (n_rows * C - C) + 2 * n_rows * (32 - 4)
    # 3 is today's kernel: rung 2's traffic
    assert (today.requests, today.sectors, today.grid) == (fused.requests, fused.sectors, fused.grid)


def test_the_layernorm_mutants_show_in_the_columns_the_exercises_name():
    good, bad = rows("layernorm_backward"), rows("layernorm_backward", "scalar_shared")
    assert bad["4_packed128"].correct
    assert bad["4_packed128"].ways > 3 * good["4_packed128"].ways
    assert {k: (v.requests, v.sectors) for k, v in bad.items()} == {k: (v.requests, v.sectors) for k, v in good.items()}
    assert {k: v.ways for k, v in bad.items() if k != "4_packed128"} == \
        {k: v.ways for k, v in good.items() if k != "4_packed128"}
    good, bad = rows("residual_layernorm"), rows("residual_layernorm", "reread_h")
    assert bad["2_fused"].correct
    # the "fused" kernel that reads h back moves what the two kernels move, in one launch
    assert (bad["2_fused"].requests, bad["2_fused"].moved_bytes) == \
        (good["1_two_kernels"].requests, good["1_two_kernels"].moved_bytes)
    assert bad["2_fused"].grid == good["2_fused"].grid
    assert bad["2_fused"].sectors == bad["2_fused"].ideal_sectors  # still coalesced
    assert {k: v.sectors for k, v in bad.items() if k != "2_fused"} == \
        {k: v.sectors for k, v in good.items() if k != "2_fused"}
