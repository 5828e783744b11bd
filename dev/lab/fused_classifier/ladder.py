"""The fused_classifier ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py,
../fused_classifier.md)."""

from __future__ import annotations

import ctypes

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr

IGNORE_INDEX = -100  # PyTorch's default: a target that marks a padding row, no loss and no gradient


def _ignored_rows(N: int) -> int:
    return 1 if N > 1 else 0  # row 1 of every batch of 2 rows or more is padding


def _classifier_inputs(shape, gen):
    N, V = shape
    targets = torch.randint(0, V, (N,), generator=gen)
    if _ignored_rows(N):
        targets[1] = IGNORE_INDEX
    # logits: (N, V) of a spread like a trained model's; targets: (N,) int64
    return {"logits": torch.randn(N, V, generator=gen) * 2.0, "targets": targets,
            "losses": torch.full((N,), float("nan")), "dlogits": torch.full((N, V), float("nan")),
            "stats": torch.full((N, 2), float("nan")),  # rung 1's (max, sum) between its two launches
            "loss_n_valid": torch.full((2,), float("nan"))}  # today's mean loss () and n_valid ()


def _classifier_reference(inputs):
    # the rungs write over the logits: the reference reads the copies taken before the call
    x = inputs["_before"]["logits"].double().requires_grad_(True)
    t = inputs["_before"]["targets"]
    losses = torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE_INDEX, reduction="none")
    loss = torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE_INDEX, reduction="mean")
    (dlogits,) = torch.autograd.grad(loss, x)  # dloss = 1: the mean's gradient, 1 / n_valid per row
    return {"losses": losses.detach(), "dlogits": dlogits}


def _common_args(inputs):
    N, V = inputs["logits"].shape
    # the mean's 1 / n_valid, passed in as llm.c passes dloss = 1 / (B T): the caller knows its
    # padding rows (today's launcher counts them on the device instead)
    grad_scale = 1.0 / max(N - _ignored_rows(N), 1)
    return [ptr(inputs["targets"]), ctypes.c_longlong(N), ctypes.c_int(V), ctypes.c_longlong(IGNORE_INDEX),
            ctypes.c_float(grad_scale)]


def _two_kernels_call(entry, inputs, err):
    # a gradient buffer of its own, and the (max, sum) kept between its launches
    return entry(ptr(inputs["losses"]), ptr(inputs["stats"]), ptr(inputs["dlogits"]), ptr(inputs["logits"]),
                 *_common_args(inputs), err, ERR_LEN)


def _fused_call(entry, inputs, err):
    inputs["dlogits"] = inputs["logits"]  # the fused rungs write dlogits over the logits
    return entry(ptr(inputs["losses"]), ptr(inputs["logits"]), *_common_args(inputs), err, ERR_LEN)


def _today_call(entry, inputs, err):
    inputs["dlogits"] = inputs["logits"]
    return entry(ptr(inputs["losses"]), ptr(inputs["logits"]), *_common_args(inputs), ptr(inputs["loss_n_valid"]),
                 err, ERR_LEN)


def _ideal_bytes(shape):
    N, V = shape
    # the rows with a target read once, dlogits written once (an ignored row's zeros too), the
    # targets read, a loss written per row
    return 4 * (N - _ignored_rows(N)) * V + 4 * N * V + 8 * N + 4 * N


def _two_kernels_bytes(shape):
    N, V = shape
    valid = N - _ignored_rows(N)
    # the forward also writes the (max, sum) pairs; the backward reads the targets, the pairs of the
    # rows it differentiates, and the logits again: each launch's bytes are its own DRAM traffic
    return _ideal_bytes(shape) + 8 * N + 8 * N + 8 * valid + 4 * valid * V


def _today_bytes(shape):
    (N, _) = shape
    # + the n_valid launch (targets read, 4 bytes written), the row kernel's read of n_valid, and
    # the mean launch (the row losses and n_valid read back, the 4-byte loss written)
    return _ideal_bytes(shape) + (8 * N + 4) + 4 + (4 * N + 4 + 4)


LADDER = Ladder(
    name="fused_classifier",
    rungs=[Rung("1_two_kernels.cu", "forward (loss, max, sum), then backward into a new buffer",
                call=_two_kernels_call, unique_bytes=_two_kernels_bytes),
           Rung("2_fused.cu", "one kernel per row: stats, then dlogits over the logits", call=_fused_call),
           Rung("3_today.cu", "today's csrc/cross_entropy.cu fused classifier through its launcher",
                call=_today_call, unique_bytes=_today_bytes)],
    today=["cross_entropy"], headers=["softmax_row.cuh"],
    call=_two_kernels_call, make_inputs=_classifier_inputs, reference=_classifier_reference,
    outputs=("losses", "dlogits"), tolerance=(1e-9, 2e-5),
    check_shapes=[(1, 1001), (5, 37), (4, 2051), (3, 4096)], counter_shape=(8, 8192),
    ideal_bytes=_ideal_bytes,
    gpu_shape=(4096, 50257),  # GPT-2's vocabulary at B T = 4096: 823 MB of logits
    mutants={
        "late_target": Mutant(
            "late_target", "2_fused.cu",
            "    if (threadIdx.x == 0) losses[row] = (st.max - x_target) + logf(st.sum);",
            "    __syncthreads();  // every thread's pass 2 is done\n"
            "    if (threadIdx.x == 0) losses[row] = (st.max - x[target]) + logf(st.sum);",
            "one rung now answers wrong, in one of its two outputs: which, by how much, and why?"),
    })
