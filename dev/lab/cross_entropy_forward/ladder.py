"""The cross_entropy_forward ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py,
../cross_entropy_forward.md)."""

from __future__ import annotations

import ctypes

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr

IGNORE_INDEX = -100  # PyTorch's default: a target that marks a padding row, no loss


def _ignored_rows(N: int) -> int:
    return 1 if N > 1 else 0  # row 1 of every batch of 2 rows or more is padding


def _cross_entropy_inputs(shape, gen):
    N, V = shape
    targets = torch.randint(0, V, (N,), generator=gen)
    if _ignored_rows(N):
        targets[1] = IGNORE_INDEX
    # logits: (N, V) of a spread like a trained model's; targets: (N,) int64
    return {"logits": torch.randn(N, V, generator=gen) * 2.0, "targets": targets,
            "losses": torch.full((N,), float("nan")), "stats": torch.full((N, 2), float("nan")),
            # today's launcher also writes the mean loss () and n_valid () (rung 5 only)
            "loss_n_valid": torch.full((2,), float("nan"))}


def _cross_entropy_reference(inputs):
    x, t = inputs["logits"].double(), inputs["targets"]
    ignored = t == IGNORE_INDEX
    m = x.max(-1).values
    d = torch.exp(x - m[:, None]).sum(-1)
    x_target = x.gather(1, t.clamp(min=0)[:, None])[:, 0]
    losses = torch.where(ignored, 0.0, m + torch.log(d) - x_target)
    # an ignored row's stats are (0, 1): lse 0, never read
    stats = torch.stack([torch.where(ignored, 0.0, m), torch.where(ignored, 1.0, d)], dim=1)
    return {"losses": losses, "stats": stats}


def _args(inputs):
    N, V = inputs["logits"].shape
    return [ptr(inputs["losses"]), ptr(inputs["stats"]), ptr(inputs["logits"]), ptr(inputs["targets"]),
            ctypes.c_longlong(N), ctypes.c_int(V), ctypes.c_longlong(IGNORE_INDEX)]


def _cross_entropy_call(entry, inputs, err):
    return entry(*_args(inputs), err, ERR_LEN)


def _today_call(entry, inputs, err):
    # the launcher's mean loss and n_valid go to a buffer of their own
    return entry(*_args(inputs), ptr(inputs["loss_n_valid"]), err, ERR_LEN)


def _ideal_bytes(shape):
    N, V = shape
    # the rows with a target read once, the targets read, a loss and a (max, sum) pair written per row
    return 4 * (N - _ignored_rows(N)) * V + 8 * N + 4 * N + 8 * N


LADDER = Ladder(
    name="cross_entropy_forward",
    rungs=[Rung("1_thread_per_row.cu", "one thread per row, two passes over the row"),
           Rung("2_block_shared.cu", "a block per row, shared-memory trees for max then sum"),
           Rung("3_online_softmax.cu", "online softmax: one pass, (max, sum) merged by shuffles"),
           Rung("4_packed128.cu", "+ float4 loads, a scalar head and tail"),
           Rung("5_today.cu", "today's csrc/cross_entropy.cu forward through its launcher",
                call=_today_call,
                # + its two one-block launches: n_valid reads the targets again and writes 4 bytes;
                # the mean reads the row losses back and n_valid, and writes the 4-byte loss
                unique_bytes=lambda shape: _ideal_bytes(shape) + (8 * shape[0] + 4) + (4 * shape[0] + 4 + 4))],
    today=["cross_entropy"], headers=[],
    call=_cross_entropy_call, make_inputs=_cross_entropy_inputs, reference=_cross_entropy_reference,
    outputs=("losses", "stats"), tolerance=(1e-5, 2e-5),
    check_shapes=[(1, 1001), (5, 37), (4, 2051), (3, 4096)], counter_shape=(8, 8192),
    ideal_bytes=_ideal_bytes,
    gpu_shape=(4096, 50257),  # GPT-2's vocabulary at B T = 4096: 823 MB of logits
    mutants={
        "no_rescale": Mutant(
            "no_rescale", "3_online_softmax.cu",
            "            st.sum = st.sum * expf(st.max - v) + 1.0f;",
            "            st.sum = st.sum + 1.0f;",
            "one rung now answers wrong: which one? Follow its running (max, sum) over the values 1, then 3."),
    })
