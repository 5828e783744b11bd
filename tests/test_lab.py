"""The kernel lab (dev/lab/): every rung of every ladder right on the simulator, the counter
orderings its tutorials claim, its planted bugs visible in the columns the tutorials name, and
the tutorials' tables equal to what `python dev/lab/run.py` prints today.

The lab builds its own small library per ladder (the simulator's counters build of the rungs and
of today's csrc/ file), loaded with ctypes, so it runs in this process whatever simulator variant
the rest of the suite uses. The first build takes about a minute on 2 cores and is cached.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lab_rows import lab, rows  # tests/lab_rows.py: dev/lab/lab.py and its rows, shared


@pytest.mark.parametrize("name", list(lab.LADDERS))
def test_every_rung_is_right_at_odd_shapes(name):
    got = rows(name)
    assert list(got) == [r.stem for r in lab.LADDERS[name].rungs]
    for r in got.values():
        assert r.correct, f"{name} {r.rung}: {r.error}"
        # every launch reads and writes each byte it must, and no other: the op's least DRAM traffic, or
        # the rung's own where it keeps more in memory (Rung.unique_bytes says why)
        rung = next(x for x in lab.LADDERS[name].rungs if x.stem == r.rung)
        shape = lab.LADDERS[name].counter_shape
        want = rung.unique_bytes(shape) if rung.unique_bytes else lab.LADDERS[name].least_bytes_of(rung, shape)
        assert r.unique_bytes == want, (r.rung, r.unique_bytes, want)


@pytest.mark.parametrize("name", list(lab.LADDERS))
def test_every_rung_is_right_under_another_warp_schedule(name):
    """The checks above run the simulator's default schedule (warps in order, in step); a missing
    __syncthreads or a read of another warp's unfinished work can pass there. Greedy random turns
    (each warp runs as far as it can, warps and lanes in a random order) expose most of them."""
    ladder = lab.LADDERS[name]
    rows(name)  # builds (or skips)
    handle, _ = lab.library(ladder)
    with lab.schedule(handle, "random", seed=1, greedy=True):
        for rung in ladder.rungs:
            for k, shape in enumerate(ladder.check_shapes):
                ok, _, message = lab.check(ladder, handle, rung, shape, seed=99 + k)
                assert ok, f"{rung.stem}: {message}"


def test_the_lab_catches_a_wrong_rung():
    """A rung that computes the wrong thing fails its row (the check is not vacuous)."""
    ladder = lab.LADDERS["gelu_forward"]
    rows("gelu_forward")  # builds (or skips)
    handle, _ = lab.library(ladder)
    wrong = lab.Ladder(**{**ladder.__dict__, "reference": lambda inputs: {"out": inputs["inp"].double()}})
    ok, _, message = lab.check(wrong, handle, ladder.rungs[1], (37,), seed=0)
    assert not ok and "out wrong at shape (37,)" in message


def test_gelu_forward_counters_tell_the_tutorials_story():
    r = rows("gelu_forward")
    strided, coalesced, grid_stride, packed, today = (r[k] for k in
                                                     ("1_strided", "2_coalesced", "3_grid_stride", "4_packed128",
                                                      "5_today"))
    # 1 -> 2: the same requests, 8x the sectors: 32 lanes in 32 sectors instead of one 128-byte line
    assert strided.requests == coalesced.requests
    assert strided.sectors_per_request == 32.0 and strided.ideal_per_request == 4.0
    assert coalesced.sectors == coalesced.ideal_sectors and coalesced.sectors_per_request == 4.0
    assert strided.moved_over_ideal == 8.0 and coalesced.moved_over_ideal == 1.0
    # 2 -> 3: grid-stride changes the launch, not the traffic
    assert (grid_stride.requests, grid_stride.sectors) == (coalesced.requests, coalesced.sectors)
    assert int(grid_stride.grid.split(" x ")[0]) < int(coalesced.grid.split(" x ")[0])
    # 3 -> 4: 128-bit accesses: a quarter of the requests, 16 sectors each, still the least
    assert packed.requests * 4 == coalesced.requests
    assert packed.sectors_per_request == 16.0 and packed.sectors == packed.ideal_sectors
    # 5 is today's kernel: rung 4's traffic
    assert (today.requests, today.sectors, today.grid) == (packed.requests, packed.sectors, packed.grid)


def test_layernorm_forward_counters_tell_the_tutorials_story():
    r = rows("layernorm_forward")
    per_row, block, warp, packed, today = (r[k] for k in ("1_thread_per_row", "2_block_shared", "3_warp_shuffle",
                                                         "4_warp_packed128", "5_today"))
    # 1: lanes are rows, C floats apart: every row access costs 32 sectors, the ideal is far below
    assert per_row.sectors_per_request > 5 * per_row.ideal_per_request
    assert per_row.moved_over_ideal > 10
    # 2: coalesced row accesses, a conflict-free shared-memory tree
    assert block.sectors == block.ideal_sectors
    assert block.wavefronts > 0 and block.ways == 1.0
    # 3: the same global traffic, no shared memory, 4 rows per block
    assert (warp.requests, warp.sectors) == (block.requests, block.sectors)
    assert warp.wavefronts == 0 and warp.ways is None
    assert int(warp.grid.split(" x ")[0]) * 4 == int(block.grid.split(" x ")[0])
    # three passes over the row from global memory: about 3x the row's bytes in sectors
    assert 2.5 < warp.moved_over_ideal < 3.0
    # 4: float4 and the row in registers: one read of the row, a fraction of the requests
    assert packed.requests * 5 < warp.requests
    assert packed.sectors == packed.ideal_sectors
    assert packed.moved_over_ideal < 2.0  # (what is left: each warp re-reads weight and bias)
    # 5 is today's kernel: rung 4's traffic
    assert (today.requests, today.sectors, today.grid) == (packed.requests, packed.sectors, packed.grid)


def test_adamw_counters_tell_the_tutorials_story():
    r = rows("adamw")
    three, fused, packed, today = (r[k] for k in ("1_three_kernels", "2_fused", "3_packed128", "4_today"))
    # 1 -> 2: three launches move 10 streams, the fused kernel the 7 the step needs
    assert three.grid.count("+") == 2 and fused.grid.count("+") == 0
    assert three.requests * 7 == fused.requests * 10
    assert three.moved_bytes * 7 == fused.moved_bytes * 10 and fused.moved_over_ideal == 1.0
    assert three.sectors == three.ideal_sectors and fused.sectors == fused.ideal_sectors
    # 2 -> 3: float4, a quarter of the requests, each 16 sectors at the ideal
    assert packed.requests * 4 == fused.requests
    assert packed.sectors_per_request == 16.0 and packed.sectors == packed.ideal_sectors
    # 4: today's kernel moves rung 3's streams plus its table (2 requests per warp), at the ideal
    warps = int(today.grid.split(" x ")[0]) * int(today.grid.split(" x ")[1]) // 32
    assert today.requests == packed.requests + 2 * warps
    assert today.sectors == today.ideal_sectors
    assert 2 * int(today.grid.split(" x ")[0]) == int(packed.grid.split(" x ")[0])


def test_the_mutants_show_in_the_columns_the_exercises_name():
    good, bad = rows("gelu_forward"), rows("gelu_forward", "chunked_loop")
    assert bad["3_grid_stride"].correct
    assert bad["3_grid_stride"].sectors_per_request > good["3_grid_stride"].sectors_per_request
    assert {k: v.sectors for k, v in bad.items() if k != "3_grid_stride"} == \
        {k: v.sectors for k, v in good.items() if k != "3_grid_stride"}
    good, bad = rows("layernorm_forward"), rows("layernorm_forward", "interleaved_tree")
    assert bad["2_block_shared"].correct
    assert bad["2_block_shared"].ways > 2 * good["2_block_shared"].ways
    assert bad["2_block_shared"].sectors == good["2_block_shared"].sectors
    good, bad = rows("adamw"), rows("adamw", "second_pass")
    assert bad["2_fused"].correct
    assert bad["2_fused"].requests > good["2_fused"].requests
    assert bad["2_fused"].moved_over_ideal > good["2_fused"].moved_over_ideal == 1.0
    assert bad["2_fused"].sectors_per_request == good["2_fused"].sectors_per_request  # still coalesced


@pytest.mark.parametrize("name", list(lab.LADDERS))
def test_the_tutorial_tables_are_the_commands_output(name):
    """dev/lab/<ladder>.md quotes run.py's tables between markers; they must be today's output
    (after a change: python dev/lab/run.py --all --write-docs, plus --mutant runs for the exercise)."""
    text = lab.doc_path(name).read_text()
    tables = lab.doc_tables(text)
    assert (name, "") in tables, f"{name}.md has no table of the plain ladder"
    for (ladder, mutant), table in tables.items():
        assert ladder == name
        assert table == lab.format_table(name, list(rows(name, mutant).values()), mutant), (
            f"{name}.md's table{' for --mutant ' + mutant if mutant else ''} is stale: run "
            f"python dev/lab/run.py {name}{' --mutant ' + mutant if mutant else ''} --write-docs")
    # every table sits under the command that prints it
    for (ladder, mutant) in tables:
        command = lab.command(name) + (f" --mutant {mutant}" if mutant else "")
        block = text.index(lab.doc_block(ladder, mutant, tables[(ladder, mutant)]))
        assert command in text[max(0, block - 400):block], f"{name}.md: write `{command}` above its table"


def test_the_gpu_build_compiles_every_rung_with_nvcc(tmp_path):
    """run.py --gpu builds the same files with nvcc and the package's flags: every ladder's rungs
    compile (for sm_90), and a linked library loads. Without a GPU a rung's launch comes back as an
    error code with CUDA's message, not a crash; on a GPU machine run.py --gpu checks and times the
    rungs there."""
    from pyllmc import _toolchain

    if _toolchain.find_cuda_home() is None:
        pytest.skip("nvcc not found: the GPU build of the lab cannot be compiled here")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: python dev/lab/run.py --all --gpu checks the rungs on it")
    for name, other in lab.LADDERS.items():  # every ladder's own files compile with nvcc (csrc/'s: the package build)
        assert all(obj.exists() for obj in lab.build_gpu(other, arch="90", rungs_only=True)), name
    ladder = lab.LADDERS["gelu_forward"]
    path = lab.build_gpu(ladder, arch="90")
    handle = ctypes.CDLL(str(path))
    inputs = ladder.make_inputs((37,), torch.Generator().manual_seed(0))
    for rung in (ladder.rungs[0], ladder.rungs[-1]):  # a lab kernel and today's launcher
        err = ctypes.create_string_buffer(lab.ERR_LEN)
        assert ladder.call_of(rung)(lab.entry(handle, ladder, rung), inputs, err) == 1
        assert err.value, rung.stem
    assert inputs["out"].isnan().all()  # nothing ran on the host's memory
