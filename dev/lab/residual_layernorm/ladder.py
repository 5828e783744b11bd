"""The residual_layernorm ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py, ../residual_layernorm.md)."""

from __future__ import annotations

import ctypes

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr

LAYERNORM_EPS = 1e-5


def _inputs(shape, gen):
    rows, C = shape
    nan = float("nan")
    # h = residual + inp centred at 2: the two-pass variance must not lose digits to the offset mean
    return {"residual": torch.randn(rows, C, generator=gen) + 2.0, "inp": torch.randn(rows, C, generator=gen),
            "weight": torch.randn(C, generator=gen), "bias": torch.randn(C, generator=gen),
            "h": torch.full((rows, C), nan), "out": torch.full((rows, C), nan),
            "mean": torch.full((rows,), nan), "rstd": torch.full((rows,), nan)}


def _reference(inputs):
    h = inputs["residual"].double() + inputs["inp"].double()
    mean = h.mean(-1)
    rstd = 1.0 / torch.sqrt(((h - mean[:, None]) ** 2).mean(-1) + LAYERNORM_EPS)
    out = (h - mean[:, None]) * rstd[:, None] * inputs["weight"].double() + inputs["bias"].double()
    return {"h": h, "out": out, "mean": mean, "rstd": rstd}


def _call(entry, inputs, err):
    rows, C = inputs["inp"].shape
    return entry(ptr(inputs["h"]), ptr(inputs["out"]), ptr(inputs["mean"]), ptr(inputs["rstd"]),
                 ptr(inputs["residual"]), ptr(inputs["inp"]), ptr(inputs["weight"]), ptr(inputs["bias"]),
                 ctypes.c_longlong(rows), ctypes.c_int(C), ctypes.c_float(LAYERNORM_EPS), err, ERR_LEN)


def _ideal_bytes(shape):
    rows, C = shape
    # read residual, inp, weight, bias; write h, out, mean, rstd
    return 4 * (4 * rows * C + 2 * C + 2 * rows)


LADDER = Ladder(
    name="residual_layernorm",
    rungs=[Rung("1_two_kernels.cu", "a residual-add kernel, then LayerNorm reads h back",
                # h goes to memory and comes back: one more read of rows x C floats
                unique_bytes=lambda shape: _ideal_bytes(shape) + 4 * shape[0] * shape[1]),
           Rung("2_fused.cu", "one fused kernel: h written, normalized from registers"),
           Rung("3_today.cu", "today's csrc/layernorm.cu fused forward through its launcher")],
    today=["layernorm"], headers=["row_chunks.cuh"],
    call=_call, make_inputs=_inputs, reference=_reference,
    outputs=("h", "out", "mean", "rstd"), tolerance=(3e-5, 1e-5),
    check_shapes=[(1, 768), (5, 37), (7, 200), (3, 1024), (2, 1023)], counter_shape=(32, 768),
    ideal_bytes=_ideal_bytes, gpu_shape=(64 * 1024, 768),  # GPT-2 at llm.c's B = 64, T = 1024: 201 MB a tensor, 4x an H100's L2
    mutants={
        "reread_h": Mutant(
            "reread_h", "2_fused.cu",
            "            // h is still in x[i]: the variance and the output need no global load\n",
            "            const vec_t<W> h_v = *as_vec<W>(h_out + base + c);  // h, read back from the memory just written\n"
            "            unpack(x[i], h_v);\n",
            "every rung still answers right; which row and columns moved, and by how much?"),
    },
)
