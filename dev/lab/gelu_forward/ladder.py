"""The gelu_forward ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py, ../gelu_forward.md)."""

from __future__ import annotations

import ctypes

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr


def _gelu_inputs(shape, gen):
    (n,) = shape
    # a wide range: the tails of tanh are where formulas differ
    x = torch.randn(n, generator=gen) * 3.0
    return {"inp": x, "out": torch.full((n,), float("nan"))}


def _gelu_reference(inputs):
    return {"out": torch.nn.functional.gelu(inputs["inp"].double(), approximate="tanh")}


def _gelu_call(entry, inputs, err):
    return entry(ptr(inputs["out"]), ptr(inputs["inp"]), ctypes.c_longlong(inputs["inp"].numel()), err, ERR_LEN)


LADDER = Ladder(
    name="gelu_forward",
    rungs=[Rung("1_strided.cu", "one thread per element, lanes 1/32 of the array apart"),
           Rung("2_coalesced.cu", "thread t takes element t: a warp reads 128 contiguous bytes"),
           Rung("3_grid_stride.cu", "a fixed grid loops over the array (grid-stride)"),
           Rung("4_packed128.cu", "float4: one 128-bit load and store per 4 elements"),
           Rung("5_today.cu", "today's csrc/gelu.cu through its launcher")],
    today=["gelu"], headers=["gelu_math.cuh"],
    call=_gelu_call, make_inputs=_gelu_inputs, reference=_gelu_reference, outputs=("out",),
    tolerance=(2e-6, 2e-6), check_shapes=[(1,), (37,), (1023,), (4099,)], counter_shape=(8192,),
    ideal_bytes=lambda shape: 2 * 4 * shape[0],
    gpu_shape=(8 * 1024 * 3072,),  # GPT-2's MLP activation at B = 8, T = 1024: 100 MB in, 100 MB out
    mutants={
        "chunked_loop": Mutant(
            "chunked_loop", "3_grid_stride.cu",
            "    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;\n"
            "    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; "
            "i < n; i += stride) {",
            "    const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;\n"
            "    const long long per_thread = (n + threads - 1) / threads;  "
            "// each thread takes a contiguous chunk\n"
            "    const long long first = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) "
            "* per_thread;\n"
            "    for (long long i = first; i < n && i < first + per_thread; ++i) {",
            "every rung still answers right; which row and column moved, and why would anyone write it?"),
    })
