"""The attention ladder: its rungs, inputs, float64 reference and exercises (see ../lab.py, ../attention.md)."""

from __future__ import annotations

import ctypes
import math

import torch

from lab import ERR_LEN, Ladder, Mutant, Rung, ptr

# A ladder shape is (B, H, T, D): batch, heads, sequence length, head dim; q, k, v, out are (B, H, T, D).


def _attention_inputs(shape, gen):
    B, H, T, D = shape
    return {"q": torch.randn(B, H, T, D, generator=gen), "k": torch.randn(B, H, T, D, generator=gen),
            "v": torch.randn(B, H, T, D, generator=gen),
            "out": torch.full((B, H, T, D), float("nan")), "lse": torch.full((B, H, T), float("nan"))}


def _attention_reference(inputs):
    q, k, v = (inputs[name].double() for name in ("q", "k", "v"))
    T, D = q.shape[-2:]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)                      # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    lse = scores.logsumexp(-1)                                           # (B, H, T)
    return {"out": torch.exp(scores - lse[..., None]) @ v, "lse": lse}


def _sizes(inputs):
    B, H, T, D = inputs["q"].shape
    return ctypes.c_int(B), ctypes.c_int(H), ctypes.c_int(T), ctypes.c_int(D)


def _attention_call(entry, inputs, err):
    return entry(ptr(inputs["out"]), ptr(inputs["lse"]), ptr(inputs["q"]), ptr(inputs["k"]), ptr(inputs["v"]),
                 *_sizes(inputs), err, ERR_LEN)


def _naive_call(entry, inputs, err):
    B, H, T, D = inputs["q"].shape
    if "scores" not in inputs:  # the workspace eager allocates: (B, H, T, T), kept for a timed loop's next call
        inputs["scores"] = torch.empty(B, H, T, T, device=inputs["q"].device)
    scores = inputs["scores"]
    return entry(ptr(inputs["out"]), ptr(inputs["lse"]), ptr(scores), ptr(inputs["q"]), ptr(inputs["k"]),
                 ptr(inputs["v"]), *_sizes(inputs), err, ERR_LEN)


def _bf16_call(entry, inputs, err):
    """q, k, v rounded to bf16 in place (so the float64 reference sees the values the kernel gets), the
    rung run on bf16 copies (out_bf16; _bf16_finish widens it into `out`); lse is float32 either way. The
    copies are made on the first call and kept in `inputs`, so that a timed loop of calls times the kernel."""
    if "q_bf16" not in inputs:
        for name in ("q", "k", "v"):
            inputs[name].copy_(inputs[name].bfloat16().float())
            inputs[f"{name}_bf16"] = inputs[name].bfloat16()
        inputs["out_bf16"] = torch.empty_like(inputs["q_bf16"])
    return entry(ptr(inputs["out_bf16"]), ptr(inputs["lse"]), ptr(inputs["q_bf16"]), ptr(inputs["k_bf16"]),
                 ptr(inputs["v_bf16"]), *_sizes(inputs), err, ERR_LEN)


def _bf16_finish(inputs):
    inputs["out"].copy_(inputs["out_bf16"].float())


def _ideal_bytes(shape):
    """Read q, k, v once, write out once (float32), write lse (float32)."""
    B, H, T, D = shape
    return 4 * (4 * B * H * T * D) + 4 * B * H * T


def _naive_bytes(shape):
    # + the (B, H, T, T) float32 scores: written by the scores kernel, read and written by the softmax,
    # read by P v (each launch's reads and writes count once)
    B, H, T, D = shape
    return _ideal_bytes(shape) + 4 * (4 * B * H * T * T)


def _flops(shape):
    """S = q k^T and P v over the causal half: 2 products of 2 B H T^2 D / 2 FLOPs each."""
    B, H, T, D = shape
    return 2 * B * H * T * T * D


def _bf16_bytes(shape):
    # q, k, v, out in bf16 (2 bytes an element: half of float32's), lse float32
    B, H, T, D = shape
    return 2 * (4 * B * H * T * D) + 4 * B * H * T


BF16_TOLERANCE = (1e-2, 1e-2)  # out is bf16 (8 bits of mantissa), and so is P in P v

LADDER = Ladder(
    name="attention",
    rungs=[Rung("1_naive.cu", "three kernels: S = q k^T, softmax, P v; the (T, T) S in memory",
                call=_naive_call, unique_bytes=_naive_bytes),
           Rung("2_online_softmax.cu", "one kernel, a warp per query row, online softmax: no S"),
           Rung("3_smem_tiles.cu", "a block of 16 rows shares K / V tiles in shared memory (rows padded)"),
           Rung("4_mma_bf16.cu", "bf16 mma.sync tensor cores: a warp per 16 rows, tiles shared by 64",
                call=_bf16_call, finish=_bf16_finish, tolerance=BF16_TOLERANCE, least_bytes=_bf16_bytes,
                dtype="bf16"),
           Rung("5_today_fp32.cu", "today's csrc/attention.cu float32 path through its launcher"),
           Rung("6_today.cu", "today's csrc/attention.cu tensor-core path (bf16) through its launcher",
                call=_bf16_call, finish=_bf16_finish, tolerance=BF16_TOLERANCE, least_bytes=_bf16_bytes,
                dtype="bf16")],
    today=["attention"], headers=[],
    call=_attention_call, make_inputs=_attention_inputs, reference=_attention_reference,
    outputs=("out", "lse"), tolerance=(1e-5, 1e-5),
    check_shapes=[(1, 1, 1, 64), (1, 2, 17, 64), (2, 1, 70, 64), (1, 1, 130, 128)], counter_shape=(1, 2, 64, 64),
    ideal_bytes=_ideal_bytes, flops=_flops,
    gpu_shape=(4, 12, 1024, 64),  # GPT-2 small's heads at B = 4, T = 1024 (rung 1's S alone: 200 MB)
    mutants={
        "stale_accumulator": Mutant(
            "stale_accumulator", "2_online_softmax.cu",
            "acc[c] = acc[c] * correction + p * v[j * D + lane + 32 * c];",
            "acc[c] = acc[c] + p * v[j * D + lane + 32 * c];",
            "one rung now answers wrong, and no counter moved. Which line of the online softmax is missing?"),
        "unpadded_tiles": Mutant(
            "unpadded_tiles", "3_smem_tiles.cu",
            "constexpr int kPad = 1;",
            "constexpr int kPad = 0;",
            "every rung still answers right; which row and column moved? Draw the banks of warp 0's K reads."),
    })
