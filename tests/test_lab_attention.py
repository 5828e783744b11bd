"""The attention ladder of the kernel lab (dev/lab/attention/, dev/lab/attention.md): the counter
orderings its tutorial claims, and its two exercises visible in the columns the tutorial names.
tests/test_lab.py checks every rung's answers, least bytes and the tutorial's tables."""

from __future__ import annotations

from lab_rows import lab, rows  # tests/lab_rows.py: dev/lab/lab.py and its rows, shared

RUNGS = ("1_naive", "2_online_softmax", "3_smem_tiles", "4_mma_bf16", "5_today_fp32", "6_today")


def shared_loads(row) -> list:
    return [s for l in row.launches for s in l.sites if s.space == "shared" and not s.write]


def test_attention_counters_tell_the_tutorials_story():
    r = rows("attention")
    naive, online, tiled, mma, today_fp32, today = (r[k] for k in RUNGS)
    B, H, T, D = lab.LADDERS["attention"].counter_shape
    # 1: three launches, every access at its least sectors; what it pays is the (B, H, T, T) S in memory:
    # written, read and written, read (4 T^2 floats a head) on top of the op's own bytes
    assert naive.grid.count("+") == 2
    assert naive.sectors == naive.ideal_sectors
    assert naive.unique_bytes - naive.ideal_bytes == 4 * 4 * B * H * T * T
    # 2: one launch, no S (the op's least unique bytes), less than half rung 1's traffic ...
    assert online.grid.count("+") == 0 and online.unique_bytes == online.ideal_bytes
    assert 2 * online.moved_bytes < naive.moved_bytes
    assert online.sectors == online.ideal_sectors and online.wavefronts == 0
    # ... but row i reads keys and values 0..i itself: q, out (D / 32 requests a row each), K and V
    # (D / 32 a key each), one lse store a row
    per_lane = D // 32
    assert online.requests == B * H * (2 * (T * (T + 1) // 2) * per_lane + 2 * T * per_lane + T)
    assert online.moved_over_ideal > 10
    # 3: 16 rows share each K / V tile: over 8x less traffic than rung 2, conflict-free thanks to the pad
    assert 8 * tiled.moved_bytes < online.moved_bytes
    assert tiled.sectors == tiled.ideal_sectors
    assert tiled.wavefronts > 0 and tiled.ways == 1.0
    assert int(tiled.grid.split(" x ")[0]) * 16 == B * H * T  # a block per 16 query rows
    assert tiled.moved_over_ideal < 2.1
    # 4: bf16 (half the bytes), tiles shared by 64 rows: every block reads K and V once at T = 64
    bf16_bytes = 2 * 4 * B * H * T * D + 4 * B * H * T
    assert mma.unique_bytes == today.unique_bytes == bf16_bytes
    assert mma.ideal_sectors * 32 == bf16_bytes
    assert int(mma.grid.split(" x ")[0]) * 64 == B * H * T
    assert mma.ways == 1.0
    # 5: today's float32 path is rung 2
    assert (today_fp32.requests, today_fp32.sectors, today_fp32.grid) == (online.requests, online.sectors,
                                                                          online.grid)
    # 6: today's tensor-core kernel moves rung 4's global traffic; ldmatrix loads its fragments in far
    # fewer shared-memory requests than rung 4's 32- and 16-bit loads, as conflict-free
    assert (today.requests, today.sectors, today.grid) == (mma.requests, mma.sectors, mma.grid)
    assert today.ways == 1.0
    assert sum(s.requests for s in shared_loads(mma)) > 5 * sum(s.requests for s in shared_loads(today))
    # all it moves beyond the bf16 least: the out stores, a 4-byte pair per lane over 8 rows (8 sectors, 4 would do)
    (store,) = [s for l in today.launches for s in l.sites if s.space == "global" and s.write and s.width == 4
                and s.per_request == 8.0]
    assert today.moved_bytes - bf16_bytes == 32 * (store.sectors - store.ideal_sectors) == 32 * store.requests * 4


def test_the_attention_mutants_show_in_the_columns_the_exercises_name():
    good = rows("attention")
    # the online rescale of acc forgotten: rung 2 answers wrong, and not one counter moves
    bad = rows("attention", "stale_accumulator")
    assert not bad["2_online_softmax"].correct and "out wrong" in bad["2_online_softmax"].error
    assert all(bad[k].correct for k in RUNGS if k != "2_online_softmax")
    assert (bad["2_online_softmax"].requests, bad["2_online_softmax"].sectors) == \
        (good["2_online_softmax"].requests, good["2_online_softmax"].sectors)
    # the K / V rows unpadded: every answer right, rung 3's K reads 32-way bank conflicts
    bad = rows("attention", "unpadded_tiles")
    assert all(row.correct for row in bad.values())
    assert bad["3_smem_tiles"].ways > 8 * good["3_smem_tiles"].ways
    assert max(s.ways for s in shared_loads(bad["3_smem_tiles"])) == 32.0
    assert max(s.ways for s in shared_loads(good["3_smem_tiles"])) == 1.0
    assert {k: (v.requests, v.sectors) for k, v in bad.items()} == {k: (v.requests, v.sectors) for k, v in good.items()}
