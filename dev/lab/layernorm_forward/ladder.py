"""The layernorm_forward ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py, ../layernorm_forward.md)."""

from __future__ import annotations

import ctypes

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr


def _layernorm_inputs(shape, gen):
    rows, C = shape
    # an offset mean, as activations have: a one-pass E[x^2] - mean^2 variance would lose digits
    return {"inp": torch.randn(rows, C, generator=gen) + 2.0,
            "weight": torch.randn(C, generator=gen), "bias": torch.randn(C, generator=gen),
            "out": torch.full((rows, C), float("nan")), "mean": torch.full((rows,), float("nan")),
            "rstd": torch.full((rows,), float("nan"))}


LAYERNORM_EPS = 1e-5


def _layernorm_reference(inputs):
    x = inputs["inp"].double()
    mean = x.mean(-1)
    var = ((x - mean[:, None]) ** 2).mean(-1)
    rstd = 1.0 / torch.sqrt(var + LAYERNORM_EPS)
    out = (x - mean[:, None]) * rstd[:, None] * inputs["weight"].double() + inputs["bias"].double()
    return {"out": out, "mean": mean, "rstd": rstd}


def _layernorm_call(entry, inputs, err):
    rows, C = inputs["inp"].shape
    return entry(ptr(inputs["out"]), ptr(inputs["mean"]), ptr(inputs["rstd"]), ptr(inputs["inp"]),
                 ptr(inputs["weight"]), ptr(inputs["bias"]), ctypes.c_longlong(rows), ctypes.c_int(C),
                 ctypes.c_float(LAYERNORM_EPS), err, ERR_LEN)


LADDER = Ladder(
    name="layernorm_forward",
    rungs=[Rung("1_thread_per_row.cu", "one thread per row, three passes over the row"),
           Rung("2_block_shared.cu", "a block per row, shared-memory tree reductions"),
           Rung("3_warp_shuffle.cu", "a warp per row, __shfl_xor_sync reductions"),
           Rung("4_warp_packed128.cu", "+ float4 loads, the row kept in registers"),
           Rung("5_today.cu", "today's csrc/layernorm.cu forward through its launcher")],
    today=["layernorm"], headers=[],
    call=_layernorm_call, make_inputs=_layernorm_inputs, reference=_layernorm_reference,
    outputs=("out", "mean", "rstd"), tolerance=(3e-5, 1e-5),
    check_shapes=[(1, 768), (5, 37), (7, 200), (3, 1024), (2, 1023)], counter_shape=(32, 768),
    ideal_bytes=lambda shape: 4 * (2 * shape[0] * shape[1] + 2 * shape[1] + 2 * shape[0]),
    gpu_shape=(64 * 1024, 768),  # GPT-2 at llm.c's B = 64, T = 1024: 201 MB a tensor, 4x an H100's L2
    mutants={
        "interleaved_tree": Mutant(
            "interleaved_tree", "2_block_shared.cu",
            "    for (int s = kBlock / 2; s > 0; s /= 2) {\n"
            "        if (t < s) scratch[t] += scratch[t + s];",
            "    for (int s = 1; s < kBlock; s *= 2) {  // thread t adds element 2 s t + s into 2 s t\n"
            "        if (2 * s * t < kBlock) scratch[2 * s * t] += scratch[2 * s * t + s];",
            "every rung still answers right; which row and column moved? Draw the banks warp 0 reads."),
    })
