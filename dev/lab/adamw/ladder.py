"""The adamw ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py, ../adamw.md)."""

from __future__ import annotations

import ctypes
import math

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr


# one AdamW step at GPT-2's defaults (pyllmc.optim), at step 3 so both bias corrections matter
ADAMW = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)


def _adamw_inputs(shape, gen):
    (n,) = shape
    # a state mid-training: m of either sign, v positive and of the size of g^2
    g = torch.randn(n, generator=gen)
    return {"param": torch.randn(n, generator=gen), "grad": g, "exp_avg": 0.1 * torch.randn(n, generator=gen),
            "exp_avg_sq": 0.01 * torch.rand(n, generator=gen) + 1e-4}


def _adamw_reference(inputs):
    h = ADAMW
    # the rung updates its inputs in place: the reference starts from what it was given (lab.check)
    p, g, m, v = (inputs["_before"][k].double() for k in ("param", "grad", "exp_avg", "exp_avg_sq"))
    m = m + (1 - h["beta1"]) * (g - m)
    v = h["beta2"] * v + (1 - h["beta2"]) * g * g
    step_size = h["lr"] / (1 - h["beta1"] ** h["step"])
    bc2_sqrt = math.sqrt(1 - h["beta2"] ** h["step"])
    p = p * (1 - h["lr"] * h["weight_decay"]) - step_size * m / (v.sqrt() / bc2_sqrt + h["eps"])
    return {"param": p, "exp_avg": m, "exp_avg_sq": v}


def _adamw_call(entry, inputs, err):
    h = ADAMW
    return entry(ptr(inputs["param"]), ptr(inputs["grad"]), ptr(inputs["exp_avg"]), ptr(inputs["exp_avg_sq"]),
                 ctypes.c_longlong(inputs["param"].numel()), ctypes.c_float(h["lr"]), ctypes.c_float(h["beta1"]),
                 ctypes.c_float(h["beta2"]), ctypes.c_float(h["eps"]), ctypes.c_float(h["weight_decay"]),
                 ctypes.c_int(h["step"]), err, ERR_LEN)


LADDER = Ladder(
    name="adamw",
    rungs=[Rung("1_three_kernels.cu", "three kernels: m, then v, then the parameter",
                # three launches move 10 streams, not 7: g read twice, m and v written then read back
                unique_bytes=lambda shape: 10 * 4 * shape[0]),
           Rung("2_fused.cu", "one fused kernel: each stream read or written once"),
           Rung("3_packed128.cu", "float4: one 128-bit access per stream per 4 elements"),
           Rung("4_today.cu", "today's csrc/adamw.cu (multi-tensor table) through its launcher",
                # + its tensor table: one 80-byte row, a 4-byte map entry per 2048-element chunk
                unique_bytes=lambda shape: 7 * 4 * shape[0] + 80 + 4 * (shape[0] // 2048))],
    today=["adamw"], headers=["adamw_math.cuh"],
    call=_adamw_call, make_inputs=_adamw_inputs, reference=_adamw_reference,
    outputs=("param", "exp_avg", "exp_avg_sq"), tolerance=(1e-6, 1e-5),
    check_shapes=[(1,), (37,), (2049,), (4103,)], counter_shape=(8192,),
    ideal_bytes=lambda shape: 7 * 4 * shape[0],
    gpu_shape=(16 * 1024 * 1024,),  # 470 MB of traffic per step
    mutants={
        "second_pass": Mutant(
            "second_pass", "2_fused.cu",
            "        p[i] = adamw_update(p[i], g[i], mi, vi, h);\n"
            "        m[i] = mi;\n"
            "        v[i] = vi;\n",
            "        adamw_update(p[i], g[i], mi, vi, h);\n"
            "        m[i] = mi;\n"
            "        v[i] = vi;\n"
            "        p[i] = p[i] * h.decay - h.step_size * m[i] / "
            "(sqrtf(v[i]) / h.bias_correction2_sqrt + h.eps);\n",
            "every rung still answers right; which row and columns moved? Find the line with --sites."),
    })
