"""The layernorm_backward ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py, ../layernorm_backward.md)."""

from __future__ import annotations

import ctypes

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr

LAYERNORM_EPS = 1e-5

# Blocks of the backward (rungs 3 to 5) = rows of the partial-sum scratch. The cuda backend takes 2
# per SM (pyllmc.ops.layernorm.cuda_num_partials: 264 on an H100, so 249 rows per block at GPT-2's
# 65536 rows); at the lab's 32 rows that would be one row per block, 7 of 8 warps idle and a scratch
# as large as the op. 4 blocks keep the GPT-2 picture: each warp of a block gets a row, and every
# block owns a range of rows whose sums it folds into one partial row.
NUM_PARTIALS = 4


def num_partials(rows: int) -> int:
    return max(1, min(rows, NUM_PARTIALS))


def _backward_inputs(shape, gen):
    rows, C = shape
    # mean and rstd come from a float32 forward, as the training step saves them
    inp = torch.randn(rows, C, generator=gen) + 2.0
    mean = inp.mean(-1)
    rstd = torch.rsqrt(inp.var(-1, unbiased=False) + LAYERNORM_EPS)
    nan = float("nan")
    return {"dout": torch.randn(rows, C, generator=gen), "inp": inp, "weight": torch.randn(C, generator=gen),
            "mean": mean, "rstd": rstd,
            "dinp": torch.full((rows, C), nan), "dweight": torch.full((C,), nan), "dbias": torch.full((C,), nan),
            "scratch": torch.full((2, num_partials(rows), C), nan)}  # (2, num_partials, C): dweight, dbias partials


def _backward_reference(inputs):
    dy, x, w = (inputs[k].double() for k in ("dout", "inp", "weight"))
    # the saved float32 mean and rstd, as the kernels read them
    xhat = (x - inputs["mean"].double()[:, None]) * inputs["rstd"].double()[:, None]
    g = dy * w
    dinp = inputs["rstd"].double()[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return {"dinp": dinp, "dweight": (dy * xhat).sum(0), "dbias": dy.sum(0)}


def _backward_call(entry, inputs, err):
    rows, C = inputs["inp"].shape
    if inputs["inp"].is_cuda:  # run.py --gpu: as many blocks as the cuda backend launches (2 per SM)
        from pyllmc.ops.layernorm import cuda_num_partials

        partials = cuda_num_partials(rows, inputs["inp"].device)
        if inputs["scratch"].shape[1] != partials:
            inputs["scratch"] = torch.empty((2, partials, C), device=inputs["inp"].device)
    return entry(ptr(inputs["dinp"]), ptr(inputs["dweight"]), ptr(inputs["dbias"]), ptr(inputs["scratch"]),
                 ptr(inputs["dout"]), ptr(inputs["inp"]), ptr(inputs["weight"]), ptr(inputs["mean"]),
                 ptr(inputs["rstd"]), ctypes.c_longlong(rows), ctypes.c_int(C), ctypes.c_int(inputs["scratch"].shape[1]),
                 err, ERR_LEN)


def _ideal_bytes(shape):
    rows, C = shape
    # read dout, inp, weight, mean, rstd; write dinp, dweight, dbias
    return 4 * (3 * rows * C + 3 * C + 2 * rows)


def _scratch_bytes(shape):
    # the partial sums (2, num_partials, C) float32: written by the row kernel, read by the reduce kernel
    return 2 * 4 * 2 * num_partials(shape[0]) * shape[1]


LADDER = Ladder(
    name="layernorm_backward",
    rungs=[Rung("1_naive.cu", "a thread per row for dinp, a thread per column for dweight, dbias",
                # two kernels: the column kernel reads dout, inp, mean and rstd a second time
                unique_bytes=lambda shape: _ideal_bytes(shape) + 4 * (2 * shape[0] * shape[1] + 2 * shape[0])),
           Rung("2_warp_atomic.cu", "a warp per row, shuffles; atomicAdd into dweight, dbias",
                # the zeroing kernel writes dweight, dbias; the atomics read them back before adding
                unique_bytes=lambda shape: _ideal_bytes(shape) + 2 * 4 * 2 * shape[1]),
           Rung("3_block_partials.cu", "per-block partial sums, a fixed-order reduce kernel: no atomics",
                unique_bytes=lambda shape: _ideal_bytes(shape) + _scratch_bytes(shape)),
           Rung("4_packed128.cu", "+ float4 loads, the row kept in registers",
                unique_bytes=lambda shape: _ideal_bytes(shape) + _scratch_bytes(shape)),
           Rung("5_today.cu", "today's csrc/layernorm.cu backward through its launcher",
                unique_bytes=lambda shape: _ideal_bytes(shape) + _scratch_bytes(shape))],
    today=["layernorm"], headers=[],
    call=_backward_call, make_inputs=_backward_inputs, reference=_backward_reference,
    outputs=("dinp", "dweight", "dbias"), tolerance=(3e-5, 1e-5),
    check_shapes=[(1, 768), (5, 37), (7, 200), (13, 1024), (2, 1023)], counter_shape=(32, 768),
    ideal_bytes=_ideal_bytes, gpu_shape=(64 * 1024, 768),  # GPT-2 at llm.c's B = 64, T = 1024: 201 MB a tensor, 4x an H100's L2
    mutants={
        "scalar_shared": Mutant(
            "scalar_shared", "4_packed128.cu",
            "                    sums4[j] = turn == 0 ? dw[i] : add4(sums4[j], dw[i]);\n"
            "                    sums4[vectors + j] = turn == 0 ? db[i] : add4(sums4[vectors + j], db[i]);\n",
            "                    for (int k = 0; k < 4; ++k) {  // the lane's 4 columns, one word at a time\n"
            "                        float* w = block_sums + 4 * j + k;\n"
            "                        float* b = block_sums + C + 4 * j + k;\n"
            "                        *w = (turn == 0 ? 0.0f : *w) + (&dw[i].x)[k];\n"
            "                        *b = (turn == 0 ? 0.0f : *b) + (&db[i].x)[k];\n"
            "                    }\n",
            "every rung still answers right; which row and column moved? Draw the banks warp 0's lanes hit."),
    },
)
