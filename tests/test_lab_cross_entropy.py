"""The kernel lab's cross_entropy_forward and fused_classifier ladders (dev/lab/): the counter
orderings their tutorials claim, the numbers they quote from --sites, today's mean loss and
n_valid (which only the last rungs write), and their planted bugs in the columns the exercises name.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lab_rows import lab, rows  # tests/lab_rows.py: dev/lab/lab.py and its rows, shared


def vector_requests(row) -> int:
    """Requests of the rung's 128-bit global accesses (the row's float4 loads and stores)."""
    return sum(s.requests for l in row.launches for s in l.sites if s.space == "global" and s.width == 16)


def target_loads(launch) -> int:
    """Requests of a launch's 8-byte global loads: the int64 targets (one per warp that reads one)."""
    return sum(s.requests for s in launch.sites if s.space == "global" and s.width == 8 and not s.write)


def test_cross_entropy_forward_counters_tell_the_tutorials_story():
    r = rows("cross_entropy_forward")
    per_row, block, online, packed, today = (r[k] for k in ("1_thread_per_row", "2_block_shared",
                                                           "3_online_softmax", "4_packed128", "5_today"))
    N, V = lab.LADDERS["cross_entropy_forward"].counter_shape
    # 1: lanes are rows V floats apart: one sector per active lane (7 rows with a target) for what
    # one sector could carry; two passes over the row, 8x the bytes each
    row_loads = [s for l in per_row.launches for s in l.sites if s.space == "global" and s.requests == V]
    assert len(row_loads) == 2  # the max pass and the sum pass
    assert all(s.sectors == 7 * s.requests and s.ideal_sectors == s.requests for s in row_loads)
    assert f"{per_row.sectors_per_request:.1f} ({per_row.ideal_per_request:.1f})" == "7.0 (1.0)"  # the table's cell
    assert 15.9 < per_row.moved_over_ideal < 16.0
    # 2: coalesced, a conflict-free tree, and still two reads of the row
    assert block.sectors == block.ideal_sectors and block.ways == 1.0
    assert 2.0 < block.moved_over_ideal < 2.02
    # 3: online softmax reads the row once: about half of rung 2's requests and bytes
    assert online.sectors == online.ideal_sectors and online.ways == 1.0
    assert 1.0 < online.moved_over_ideal < 1.02
    assert 1.9 < block.requests / online.requests < 2.0
    # 4: float4, the same bytes in fewer than a third of the requests, each 16 sectors at the ideal
    assert packed.moved_bytes == online.moved_bytes and packed.sectors == packed.ideal_sectors
    assert packed.requests * 3 < online.requests
    assert vector_requests(packed) == (N - 1) * V // 4 // 32  # a warp request per 32 float4s of a row
    # 5: today's row kernel makes rung 4's vector requests; two one-block launches follow
    assert today.grid.count("+") == 2 and today.grid.startswith(f"{N} x 1024")
    assert vector_requests(today) == vector_requests(packed)
    assert today.moved_over_ideal < 1.05
    # most of its extra requests: each of a row's 32 warps loads the target, against rung 4's 8
    assert (target_loads(today.launches[0]), target_loads(packed.launches[0])) == (32 * N, 8 * N)
    assert (today.requests - packed.requests) - (32 * N - 8 * N) < 10
    for row in r.values():  # every rung moves the op's least DRAM bytes (today: + its two small launches)
        assert row.unique_bytes >= row.ideal_bytes


def test_fused_classifier_counters_tell_the_tutorials_story():
    r = rows("fused_classifier")
    two, fused, today = (r[k] for k in ("1_two_kernels", "2_fused", "3_today"))
    N, V = lab.LADDERS["fused_classifier"].counter_shape
    logits_read = 4 * (N - 1) * V  # the rows with a target
    # 1 -> 2: both ask for each row twice (the sectors differ by the round trip of the pairs and targets) ...
    assert two.grid.count("+") == 1 and fused.grid.count("+") == 0
    # (pass 1's loads, pass 2's loads and stores: a warp request per 32 float4s of each row with a target)
    assert vector_requests(two) == vector_requests(fused) == 3 * logits_read // 16 // 32
    assert 0 < two.moved_bytes - fused.moved_bytes < 0.01 * fused.moved_bytes
    # ... but the fused kernel's second read is within one block (an L2 hit on a GPU), the two-kernel
    # backward's is a launch later: a DRAM read of every logit again
    forward, backward = two.launches
    assert forward.unique_read >= logits_read and backward.unique_read >= logits_read
    assert fused.unique_bytes == fused.ideal_bytes
    assert two.unique_bytes - fused.unique_bytes == logits_read + 8 * N + 8 * N + 8 * (N - 1)
    assert 1.45 < two.unique_bytes / fused.unique_bytes < 1.5
    # in place: the fused launch writes dlogits and the losses, nothing else
    (only,) = fused.launches
    assert only.unique_written == 4 * N * V + 4 * N
    # 3: today's row kernel moves rung 2's bytes (+ the 4-byte n_valid it reads), its vector requests
    count, row_kernel, mean = today.launches
    assert (row_kernel.unique_read, row_kernel.unique_written) == (only.unique_read + 4, only.unique_written)
    assert vector_requests(today) == vector_requests(fused)
    # its extra requests: each of a row's 32 warps loads the target (8 warps in rung 2) and n_valid
    assert (target_loads(row_kernel), target_loads(only)) == (32 * N, 8 * N)
    # (n_valid: a 4-byte load by every warp of the 7 rows with a target)
    assert any(s.space == "global" and s.width == 4 and not s.write and s.requests == 32 * (N - 1)
               for s in row_kernel.sites)
    assert (today.requests - fused.requests) - (32 * N - 8 * N) - 32 * (N - 1) < 10


def test_the_tutorials_quote_the_sites_unique_bytes():
    """fused_classifier.md quotes each launch's unique bytes from --sites: they must be today's."""
    text = lab.doc_path("fused_classifier").read_text()
    for rung in ("1_two_kernels", "2_fused", "3_today"):
        for launch in rows("fused_classifier")[rung].launches:
            quote = f"{launch.name}  grid {launch.blocks} x {launch.threads_per_block} thr  " \
                    f"unique bytes read {launch.unique_read}, written {launch.unique_written}"
            assert quote in text, f"fused_classifier.md: quote `{quote}` (python dev/lab/run.py fused_classifier --sites)"


@pytest.mark.parametrize("name", ["cross_entropy_forward", "fused_classifier"])
def test_today_writes_the_mean_loss_and_n_valid(name):
    """The launchers' outputs the other rungs do not have: the mean loss over the rows with a target."""
    rows(name)  # builds (or skips)
    ladder = lab.LADDERS[name]
    handle, _ = lab.library(ladder)
    today = ladder.rungs[-1]
    for shape in ladder.check_shapes:
        inputs = ladder.make_inputs(shape, torch.Generator().manual_seed(7))
        before = {k: v.clone() for k, v in inputs.items()}
        err = ctypes.create_string_buffer(lab.ERR_LEN)
        assert ladder.call_of(today)(lab.entry(handle, ladder, today), inputs, err) == 0, err.value
        losses = ladder.reference({**inputs, "_before": before})["losses"]
        n_valid = int((before["targets"] != -100).sum())
        loss, got_n_valid = inputs["loss_n_valid"].tolist()
        assert got_n_valid == n_valid
        assert loss == pytest.approx(float(losses.sum()) / n_valid, rel=1e-5)


def test_the_mutants_show_in_the_columns_the_exercises_name():
    # cross_entropy_forward: the running sum not rescaled when the max grows: rung 3 alone is wrong
    # (rung 4 keeps its own update), and no counter moves
    good, bad = rows("cross_entropy_forward"), rows("cross_entropy_forward", "no_rescale")
    assert not bad["3_online_softmax"].correct and "losses wrong" in bad["3_online_softmax"].error
    assert all(v.correct for k, v in bad.items() if k != "3_online_softmax")
    assert {k: (v.requests, v.sectors) for k, v in bad.items()} == {k: (v.requests, v.sectors) for k, v in good.items()}
    # fused_classifier: the target's logit read after pass 2 wrote over it: rung 2's losses are wrong,
    # its gradient right
    good, bad = rows("fused_classifier"), rows("fused_classifier", "late_target")
    assert not bad["2_fused"].correct and "losses wrong" in bad["2_fused"].error
    assert all(v.correct for k, v in bad.items() if k != "2_fused")
    assert {k: (v.requests, v.sectors) for k, v in bad.items()} == {k: (v.requests, v.sectors) for k, v in good.items()}
    ladder = lab.LADDERS["fused_classifier"]
    handle, _ = lab.library(ladder, ladder.mutants["late_target"])
    inputs = ladder.make_inputs((5, 37), torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in inputs.items()}
    err = ctypes.create_string_buffer(lab.ERR_LEN)
    assert ladder.call_of(ladder.rungs[1])(lab.entry(handle, ladder, ladder.rungs[1]), inputs, err) == 0
    want = ladder.reference({**inputs, "_before": before})
    torch.testing.assert_close(inputs["dlogits"].double(), want["dlogits"], atol=1e-9, rtol=2e-5)
    # the loss took the target's gradient, p_t - 1 scaled by 1 / n_valid, for its logit
    valid = before["targets"] != -100
    x_t = before["logits"].double()[valid].gather(1, before["targets"][valid][:, None])[:, 0]
    g_t = want["dlogits"][valid].gather(1, before["targets"][valid][:, None])[:, 0]
    torch.testing.assert_close(inputs["losses"].double()[valid], want["losses"][valid] + x_t - g_t,
                               atol=1e-5, rtol=2e-5)
