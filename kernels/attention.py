"""Causal self-attention in Triton, FlashAttention-2 style: forward and backward.

    S = scale * Q K^T (scale = 1/sqrt(D)),  P = softmax(S + causal mask),  O = P V
    lse_i = log sum_j exp(S_ij)                         (natural log, over j <= i)
    backward: delta_i = sum_d dO_id O_id,  dP = dO V^T,  dS = P * (dP - delta)
              dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO

Forward: one program per (BLOCK_M query rows, head, batch). It keeps its Q tile on chip and
streams K/V tiles, holding the running row max m, row sum l and an fp32 output accumulator
(online softmax), so the T x T score matrix never exists in memory. The exponentials use
exp2 with log2(e) folded into the scale. The K/V loop has two stages: the tiles strictly
left of the diagonal need no mask at all, and only the tiles that cross the diagonal
(BLOCK_M / BLOCK_N of them) apply the causal mask and the end-of-sequence bound. Tiles
right of the diagonal are never visited. The program saves O and lse for the backward.

Backward (no atomics, so the result is bitwise reproducible): P is recomputed tile by
tile from Q, K and the saved lse.
  1. delta kernel: delta = rowsum(dO * O), one program per BLOCK_M rows.
  2. dK/dV kernel: one program owns BLOCK_N keys; it walks the query tiles at and below
     the diagonal (masked while they cross it), accumulating dK and dV in fp32.
  3. dQ kernel: one program owns BLOCK_M queries; it walks the key tiles left of and on
     the diagonal, accumulating dQ in fp32.
Rows past the end of the sequence load lse = +inf, so their P is exactly 0 and they add
nothing; the kernels never read or write outside [0, T).

Grouped-query attention (GQA): k, v (and dk, dv) have H_kv heads, H_kv dividing H; query head
h reads kv head h // GROUP, GROUP = H // H_kv, straight from k and v (no repeated copy). The
forward and dQ grids run per query head. The dK/dV grid runs per kv head: a program owns
BLOCK_N keys of one kv head and loops over the GROUP query heads in head order, accumulating
into the same fp32 dK, dV: the group's sum in a fixed order, no atomics.

Layout: q, k, v (and dO) may be any strided (B, H, T, D) views (k, v: (B, H_kv, T, D); GPT-2's
qkv split gives rows of stride 3C); every tensor comes with its own four strides. out, dq, dk, dv are
allocated contiguous here; lse and delta are contiguous float32 (B, H, T). The batch and
head offsets are computed in int64; the within-head offsets (t * stride_t + d * stride_d)
are checked to fit in int32 by the launchers.

Matmuls run on tensor cores (tl.dot) for bf16/fp16 with fp32 accumulation; float32 inputs
use input_precision="ieee" so fp32 results are fp32-accurate (not TF32). Block sizes come
from a small per-head-dim table (no autotuning); head dims 16, 32, 64 and 128. The table is
written for sm_80 and sm_90; on a GPU with less shared memory per block (a T4's 64 KB, the
99 KB of sm_86 / sm_89 / sm_120) an entry whose estimated shared memory does not fit drops
pipeline stages, then halves its tiles, until it does (gpu_block_config).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common

HEAD_DIMS = (16, 32, 64, 128)
# kernels may read only constexpr globals
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, on the GPU. BLOCK_M is always the
# query tile, BLOCK_N the key tile. The two-stage loops need: forward and dQ BLOCK_M %
# BLOCK_N == 0 (the diagonal query tile is covered by whole key tiles), dK/dV BLOCK_N %
# BLOCK_M == 0. The dK/dV kernel keeps two (BLOCK_N, D) fp32 accumulators, so it takes
# small query tiles; the dQ kernel keeps one, so it takes large query tiles. Every entry
# compiles without register spills (checked with ptxas -v for sm_90a and sm_80; the D = 64
# entries at GPT-2's real launch specialization by tests/test_triton_gpu_compile.py).
_SMALL_D_16BIT = {"fwd": (128, 64, 4, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 64, 8, 3)}
_HOPPER_16BIT = {  # sm_90 (wgmma)
    16: _SMALL_D_16BIT,
    32: _SMALL_D_16BIT,
    64: _SMALL_D_16BIT,
    128: {"fwd": (128, 64, 8, 3), "dkdv": (16, 64, 8, 2), "dq": (128, 32, 8, 2)},
}
_AMPERE_16BIT = {  # sm_80 (mma.sync) and every other architecture with tensor-core dots
    16: _SMALL_D_16BIT,
    32: _SMALL_D_16BIT,
    64: {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 32, 8, 3)},
    128: {"fwd": (64, 64, 8, 3), "dkdv": (32, 64, 8, 3), "dq": (64, 32, 8, 2)},
}
# float32 "ieee" dots run on the FMA units, not tensor cores, and hold their operands in
# registers: small tiles, one stage.
_FP32 = {
    16: {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 8, 1), "dq": (64, 32, 8, 1)},
    32: {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 8, 1), "dq": (64, 32, 8, 1)},
    # dkdv (32, 32, 8, 1) spills on sm_90 once the JIT makes the unit strides constants
    64: {"fwd": (64, 32, 8, 1), "dkdv": (16, 64, 8, 1), "dq": (64, 32, 8, 1)},
    128: {"fwd": (16, 16, 4, 1), "dkdv": (16, 32, 8, 1), "dq": (32, 16, 8, 1)},
}
# bf16 where the tensor cores lack it (sm_75): FMA-unit dots over operands converted to float32,
# the float32 table's shapes, smaller where bf16's conversions spilled (ptxas -v for sm_75).
_FMA_16BIT = {**_FP32, 64: {"fwd": (64, 32, 8, 1), "dkdv": (16, 32, 8, 1), "dq": (32, 16, 8, 1)}}
# Register pressure, not shared memory: entries of the tables above that spill registers on
# another architecture (ptxas allocates differently there; dev/triton_report.py at GPT-2's
# launches), replaced on it. (capability, dtype, head_dim, kernel) -> config.
_SPILL_FREE_OVERRIDES = {
    ((8, 6), torch.float32, 64, "fwd"): (64, 16, 8, 1),  # (64, 32, 8, 1) spills 24 B
    ((8, 9), torch.float32, 64, "fwd"): (64, 16, 8, 1),
    ((12, 0), torch.float32, 64, "dkdv"): (16, 32, 8, 1),  # (16, 64, 8, 1) spills 32 B
}
# Under the CPU interpreter every program and every loop step is a Python iteration and a
# tile op costs about the same whatever its size: few, large tiles. BLOCK_M != BLOCK_N on
# purpose, so the multi-step diagonal loops run in the CPU tests too.
_INTERPRETER_BLOCKS = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}


def _tensor_core_dots(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Whether tl.dot on `dtype` runs on tensor cores here: fp16 from Turing (sm_75) on, bf16
    from Ampere (sm_80) on. Elsewhere (float32 "ieee", bf16 on a T4) the dots run on the FMA
    units and take small tiles (_FP32, _FMA_16BIT)."""
    if dtype == torch.float16:
        return capability >= (7, 5)
    return dtype == torch.bfloat16 and capability >= (8, 0)


def _async_pipeline_buffers(stages: int, capability: tuple[int, int]) -> int:
    """Shared-memory copies of each tile a loop streams, at num_stages = `stages`.
    Hopper's wgmma and datacenter Blackwell's tcgen05 (9.x, 10.x) keep `stages` buffers;
    mma.sync GPUs (sm_75 to sm_89, and sm_120) keep stages - 1 in flight, but up to two when
    nothing is pipelined (stages = 1: an operand and its transposed copy), so count at least two.
    Measured with metadata.shared of the AOT builds (dev/triton_report.py)."""
    if capability[0] in (9, 10):
        return stages
    return max(2, stages - 1)


def shared_memory_estimate(kernel: str, head_dim: int, dtype: torch.dtype, config: tuple,
                           capability: tuple[int, int]) -> int:
    """An upper bound of the shared memory (bytes) kernel "fwd" | "dkdv" | "dq" uses at
    `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages), e = the element size, D = head_dim:

        resident + buffers * streamed + BLOCK_M * BLOCK_N * e (+ output + 1 KB on 10.x)

      fwd:  resident Q (BLOCK_M * D * e), streamed K and V (2 * BLOCK_N * D * e)
      dkdv: resident K and V (2 * BLOCK_N * D * e), streamed Q, dO (2 * BLOCK_M * D * e) and
            lse, delta (2 * BLOCK_M * 4)
      dq:   resident Q and dO (2 * BLOCK_M * D * e), streamed K and V (2 * BLOCK_N * D * e)

    buffers: _async_pipeline_buffers. The (BLOCK_M, BLOCK_N) term is P or dS on its way to the
    next dot's operand layout. On sm_100 (tcgen05: accumulators in tensor memory) add the
    output tile (its rows * D * e: O, dK / dV, dQ), staged on its way out, and 1 KB of
    barriers. Dots without tensor cores (float32, bf16 on sm_75) count e = 4: their operands are
    converted to float32 on the way. Checked against the compiler's own number
    (metadata.shared) for every launch dev/triton_report.py builds:
    never below it, exact for several (e.g. the dkdv and dq kernels at D = 128 on sm_80)."""
    block_m, block_n, _, stages = config
    e = dtype.itemsize if _tensor_core_dots(dtype, capability) else 4
    if kernel == "fwd":
        resident, streamed = block_m * head_dim * e, 2 * block_n * head_dim * e
    elif kernel == "dkdv":
        resident, streamed = 2 * block_n * head_dim * e, 2 * block_m * head_dim * e + 2 * block_m * 4
    elif kernel == "dq":
        resident, streamed = 2 * block_m * head_dim * e, 2 * block_n * head_dim * e
    else:
        raise ValueError(f"kernel must be 'fwd', 'dkdv' or 'dq'; got {kernel!r}")
    tensor_memory_epilogue = 0
    if capability[0] == 10:
        output_rows = block_n if kernel == "dkdv" else block_m
        tensor_memory_epilogue = output_rows * head_dim * e + 1024
    return (resident + _async_pipeline_buffers(stages, capability) * streamed + block_m * block_n * e
            + tensor_memory_epilogue)


def _smaller_configs(kernel: str, config: tuple):
    """`config`, then ever cheaper ones: fewer pipeline stages first (down to 1), then smaller
    tiles: the streamed one halved down to 16 (its buffers are what the stages multiply), then
    the resident one, down to 16 x 16. Every config keeps the two-stage loops' divisibility
    rule (fwd, dq: BLOCK_M % BLOCK_N == 0; dkdv: BLOCK_N % BLOCK_M == 0)."""
    block_m, block_n, warps, stages = config
    while True:
        for s in range(stages, 0, -1):
            yield block_m, block_n, warps, s
        resident, streamed = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
        if streamed > 16:
            streamed //= 2
        elif resident > 16:
            resident //= 2
        else:
            return
        block_m, block_n = (streamed, resident) if kernel == "dkdv" else (resident, streamed)


def gpu_block_config(kernel: str, head_dim: int, dtype: torch.dtype, capability: tuple[int, int],
                     shared_memory: Optional[int] = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel "fwd" | "dkdv" | "dq" on a GPU of
    compute capability `capability` whose blocks may use `shared_memory` bytes (opt-in; default:
    the architecture's, _common.SHARED_MEMORY_PER_BLOCK). The table's entry when it fits by
    shared_memory_estimate (every entry does on sm_80 and sm_90), else the first that fits of
    _smaller_configs."""
    if shared_memory is None:
        arch = capability[0] * 10 + capability[1]
        if arch not in _common.SHARED_MEMORY_PER_BLOCK:
            raise ValueError(f"no shared-memory size known for sm_{arch}: pass shared_memory")
        shared_memory = _common.SHARED_MEMORY_PER_BLOCK[arch]
    if dtype == torch.float32:
        preferred = _FP32[head_dim][kernel]
    elif not _tensor_core_dots(dtype, capability):
        preferred = _FMA_16BIT[head_dim][kernel]
    else:
        table = _HOPPER_16BIT if capability[0] == 9 else _AMPERE_16BIT
        preferred = table[head_dim][kernel]
    preferred = _SPILL_FREE_OVERRIDES.get((tuple(capability), dtype, head_dim, kernel), preferred)
    for config in _smaller_configs(kernel, preferred):
        if shared_memory_estimate(kernel, head_dim, dtype, config, capability) <= shared_memory:
            return config
    raise ValueError(f"attention {kernel} (D={head_dim}, {dtype}): no tile fits in {shared_memory} bytes of "
                     f"shared memory per block")


def block_config(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device, seq_len: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel "fwd" | "dkdv" | "dq"."""
    gpu = _common.gpu_of(device)
    if gpu is not None:
        return gpu_block_config(kernel, head_dim, dtype, gpu.capability, gpu.shared_memory_per_block)
    block_m, block_n, warps, stages = _INTERPRETER_BLOCKS[kernel]
    # tiny sequences: shrink both tiles together (keeps the divisibility rule)
    while min(block_m, block_n) > 16 and max(block_m, block_n) >= 2 * seq_len:
        block_m, block_n = block_m // 2, block_n // 2
    return block_m, block_n, warps, stages


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # acc + a @ b in fp32; "ieee" keeps float32 inputs off TF32
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ---- forward ----------------------------------------------------------------------------

@triton.jit
def _forward_inner(
    acc, m_i, l_i,             # (BLOCK_M, D) fp32, (BLOCK_M,) fp32, (BLOCK_M,) fp32
    q,                         # (BLOCK_M, D) this program's queries
    k_head, v_head,            # pointers to this (batch, head)'s K and V
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m,                    # (BLOCK_M,) query positions
    lo, hi, T, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr, IEEE: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_head + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (BLOCK_N, D)
        v_ptrs = v_head + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if ON_DIAGONAL:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        qk = qk * qk_scale_log2  # (BLOCK_M, BLOCK_N) scores in log2 units
        if ON_DIAGONAL:
            # keys past T sit right of every real query, so the causal mask removes them too
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if ON_DIAGONAL:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_forward_kernel(
    out_ptr,  # (B, H, T, D)
    lse_ptr,  # (B, H, T) float32, contiguous
    q_ptr,    # (B, H, T, D)
    k_ptr,    # (B, H_kv, T, D)
    v_ptr,    # (B, H_kv, T, D)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    H, GROUP, T, qk_scale_log2,  # GROUP = H // H_kv: query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    # the last query tiles do the most work: launch them first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    off_kv = off_h // GROUP  # this query head's kv head
    q_head = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_head = k_ptr + off_b * stride_kb + off_kv * stride_kh
    v_head = v_ptr + off_b * stride_vb + off_kv * stride_vh
    q = tl.load(q_head + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # key tiles fully left of the diagonal: [0, start_m), no mask
    acc, m_i, l_i = _forward_inner(acc, m_i, l_i, q, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, 0, start_m, T, qk_scale_log2,
                                   HEAD_DIM, BLOCK_M, BLOCK_N, False, IEEE)
    # key tiles crossing the diagonal: [start_m, min(start_m + BLOCK_M, T)), causal mask
    acc, m_i, l_i = _forward_inner(acc, m_i, l_i, q, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale_log2,
                                   HEAD_DIM, BLOCK_M, BLOCK_N, True, IEEE)
    # every row, padding rows included, saw key 0 (or its own position): l_i >= 1
    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(lse_ptr + (off_b * H + off_h) * T + offs_m, lse, mask=row_ok)
    out_head = out_ptr + off_b * stride_ob + off_h * stride_oh
    tl.store(out_head + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---- backward ---------------------------------------------------------------------------

@triton.jit
def attention_delta_kernel(
    delta_ptr,  # (B, H, T) float32, contiguous
    out_ptr,    # (B, H, T, D)
    dout_ptr,   # (B, H, T, D)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_gb, stride_gh, stride_gt, stride_gd,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(out_ptr + off_b * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)   # (BLOCK_M, D)
    do = tl.load(dout_ptr + off_b * stride_gb + off_h * stride_gh
                 + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, D)
    tl.store(delta_ptr + (off_b * H + off_h) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv,                    # (BLOCK_N, D) fp32 accumulators
    k, v,                      # (BLOCK_N, D) this program's keys and values
    q_head, do_head,           # pointers to this (batch, head)'s Q and dO
    lse_head, delta_head,      # pointers to this (batch, head)'s lse and delta rows
    stride_qt, stride_qd, stride_gt, stride_gd,
    offs_n,                    # (BLOCK_N,) key positions
    lo, hi, T, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr, IEEE: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(q_head + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        # lse = +inf past T: those query rows get P = 0 and contribute nothing
        lse_log2 = tl.load(lse_head + offs_m, mask=row_ok, other=float("inf")) * LOG2E
        qk_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE)
        p_t = tl.exp2(qk_t * qk_scale_log2 - lse_log2[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if ON_DIAGONAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_head + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                     mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        dv = _dot(p_t.to(do.dtype), do, dv, IEEE)
        delta = tl.load(delta_head + offs_m, mask=row_ok, other=0.0)
        dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) = dS^T
        dk = _dot(ds_t.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit
def attention_dkdv_kernel(
    dk_ptr,     # (B, H_kv, T, D)
    dv_ptr,     # (B, H_kv, T, D)
    q_ptr,      # (B, H, T, D)
    k_ptr,      # (B, H_kv, T, D)
    v_ptr,      # (B, H_kv, T, D)
    dout_ptr,   # (B, H, T, D)
    lse_ptr,    # (B, H, T) float32, contiguous
    delta_ptr,  # (B, H, T) float32, contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_db, stride_dh, stride_dt, stride_dd,  # dk and dv (same layout)
    H, GROUP, T, qk_scale_log2, sm_scale,  # GROUP = H // H_kv: query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    # the first key tiles see the most queries; program 0 is launched first
    start_n = tl.program_id(0) * BLOCK_N
    off_h = tl.program_id(1).to(tl.int64)  # the kv head
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T

    k = tl.load(k_ptr + off_b * stride_kb + off_h * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(v_ptr + off_b * stride_vb + off_h * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    # the kv head's query heads off_h * GROUP + g, in order: dK, dV are their sum
    for g in range(0, GROUP):
        off_hq = off_h * GROUP + g
        q_head = q_ptr + off_b * stride_qb + off_hq * stride_qh
        do_head = dout_ptr + off_b * stride_gb + off_hq * stride_gh
        row0 = (off_b * H + off_hq) * T
        lse_head = lse_ptr + row0
        delta_head = delta_ptr + row0
        # query tiles crossing the diagonal: [start_n, min(start_n + BLOCK_N, T)), causal mask
        dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                             stride_qt, stride_qd, stride_gt, stride_gd, offs_n,
                             start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale_log2,
                             HEAD_DIM, BLOCK_M, BLOCK_N, True, IEEE)
        # query tiles fully below the diagonal: [start_n + BLOCK_N, T), no causal mask
        dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                             stride_qt, stride_qd, stride_gt, stride_gd, offs_n,
                             start_n + BLOCK_N, T, T, qk_scale_log2,
                             HEAD_DIM, BLOCK_M, BLOCK_N, False, IEEE)
    d_offsets = off_b * stride_db + off_h * stride_dh + offs_n[:, None] * stride_dt + offs_d[None, :] * stride_dd
    tl.store(dk_ptr + d_offsets, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + d_offsets, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_inner(
    dq,                        # (BLOCK_M, D) fp32 accumulator
    q, do,                     # (BLOCK_M, D) this program's queries and output gradients
    lse_log2, delta,           # (BLOCK_M,) fp32
    k_head, v_head,            # pointers to this (batch, head)'s K and V
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m,                    # (BLOCK_M,) query positions
    lo, hi, T, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ON_DIAGONAL: tl.constexpr, IEEE: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_head + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (BLOCK_N, D)
        v_ptrs = v_head + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if ON_DIAGONAL:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        p = tl.exp2(qk * qk_scale_log2 - lse_log2[:, None])  # (BLOCK_M, BLOCK_N)
        if ON_DIAGONAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit
def attention_dq_kernel(
    dq_ptr,     # (B, H, T, D)
    q_ptr,      # (B, H, T, D)
    k_ptr,      # (B, H_kv, T, D)
    v_ptr,      # (B, H_kv, T, D)
    dout_ptr,   # (B, H, T, D)
    lse_ptr,    # (B, H, T) float32, contiguous
    delta_ptr,  # (B, H, T) float32, contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_db, stride_dh, stride_dt, stride_dd,
    H, GROUP, T, qk_scale_log2, sm_scale,  # GROUP = H // H_kv: query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    # the last query tiles see the most keys: launch them first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(dout_ptr + off_b * stride_gb + off_h * stride_gh
                 + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    row0 = (off_b * H + off_h) * T
    # lse = +inf past T: those rows get P = 0 (they are not stored either)
    lse_log2 = tl.load(lse_ptr + row0 + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + row0 + offs_m, mask=row_ok, other=0.0)
    off_kv = off_h // GROUP  # this query head's kv head
    k_head = k_ptr + off_b * stride_kb + off_kv * stride_kh
    v_head = v_ptr + off_b * stride_vb + off_kv * stride_vh

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # key tiles fully left of the diagonal: [0, start_m), no mask
    dq = _dq_inner(dq, q, do, lse_log2, delta, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, 0, start_m, T, qk_scale_log2, HEAD_DIM, BLOCK_M, BLOCK_N, False, IEEE)
    # key tiles crossing the diagonal: [start_m, min(start_m + BLOCK_M, T)), causal mask
    dq = _dq_inner(dq, q, do, lse_log2, delta, k_head, v_head, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale_log2,
                   HEAD_DIM, BLOCK_M, BLOCK_N, True, IEEE)
    tl.store(dq_ptr + off_b * stride_db + off_h * stride_dh
             + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd,
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---- launchers --------------------------------------------------------------------------

def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_head_extent(name: str, t: torch.Tensor) -> None:
    # within one (batch, head) the kernels index in int32: t * stride_t + d * stride_d
    _, _, T, D = t.shape
    extent = (T - 1) * abs(t.stride(2)) + (D - 1) * abs(t.stride(3))
    require(extent < 2**31, f"{name}: one head spans {extent} elements; at most 2**31 - 1 are supported")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """The checks of the launchers; returns GROUP = H // H_kv."""
    heads_ok = q.dim() == 4 and k.dim() == 4 and (q.shape[1] == k.shape[1] == 0
                                                  or (k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0))
    require(heads_ok and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:],
            f"q must be (B, H, T, D) and k, v (B, H_kv, T, D) with H_kv dividing H; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}")
    require(q.shape[3] in HEAD_DIMS, f"head dim D={q.shape[3]} is not one of the Triton kernel's {HEAD_DIMS}")
    require(q.dtype == k.dtype == v.dtype, "q, k, v must share one dtype")
    # heads and batches are grid axes 1 and 2, at most 65535 programs each
    require(q.shape[0] <= 65535 and q.shape[1] <= 65535, f"B and H must be <= 65535; got {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_head_extent(name, t)
    return q.shape[1] // k.shape[1] if k.shape[1] else 1


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None):
    """Causal attention of q (B, H, T, D), k, v (B, H_kv, T, D) (any strides; query head h reads kv
    head h // (H // H_kv)) -> (out (B, H, T, D), lse (B, H, T) float32: the natural-log log-sum-exp
    of each row of scaled scores). out: written in place when given (any strides, e.g. the
    (B, T, H, D) layout the model's c_proj reads), else new."""
    group = _check_qkv(q, k, v)
    B, H, T, D = q.shape
    if out is None:
        out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    require(out.shape == q.shape and out.dtype == q.dtype, "out must have q's shape and dtype")
    _check_head_extent("out", out)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_m, block_n, warps, stages = block_config("fwd", D, q.dtype, q.device, T)
    assert block_m % block_n == 0
    sm_scale = 1.0 / math.sqrt(D)
    grid = (triton.cdiv(T, block_m), H, B)
    attention_forward_kernel[grid](
        out, lse, q, k, v,
        *out.stride(), *q.stride(), *k.stride(), *v.stride(),
        H, group, T, sm_scale * LOG2E.value,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages, enable_fp_fusion=_common.FP_FUSION,
    )
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, dq: Optional[torch.Tensor] = None,
                       dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None):
    """Gradients dq (B, H, T, D) and dk, dv (B, H_kv, T, D) (summed over each kv head's query
    heads) of causal attention; out and lse from attention_forward; dout (B, H, T, D), any
    strides. dq, dk, dv: written in place when given (any strides, dk and dv alike: e.g. views of
    one (B, T, 3, H, D) qkv gradient), else new contiguous tensors. Deterministic (no atomics)."""
    group = _check_qkv(q, k, v)
    B, H, T, D = q.shape
    require(dout.shape == q.shape and out.shape == q.shape, "dout and out must have q's shape")
    require(dout.dtype == q.dtype and out.dtype == q.dtype, "dout and out must have q's dtype")
    require(lse.shape == (B, H, T) and lse.dtype == torch.float32 and lse.is_contiguous(),
            "lse must be a contiguous float32 (B, H, T) tensor")
    _check_head_extent("dout", dout)
    _check_head_extent("out", out)
    if dq is None:
        dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        dk, dv = (torch.empty(k.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    for name, t, like in (("dq", dq, "q"), ("dk", dk, "k"), ("dv", dv, "v")):
        require(t is not None and t.shape == {"q": q, "k": k, "v": v}[like].shape and t.dtype == q.dtype,
                f"{name} must have {like}'s shape and dtype")
        _check_head_extent(name, t)
    require(dk.stride() == dv.stride(), "dk and dv must have the same strides (one launch writes both)")
    if dq.numel() == 0:
        return dq, dk, dv
    sm_scale = 1.0 / math.sqrt(D)
    ieee = q.dtype == torch.float32

    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    delta_block = 64 if D <= 64 else 32
    attention_delta_kernel[(triton.cdiv(T, delta_block), H, B)](
        delta, out, dout, *out.stride(), *dout.stride(), H, T,
        HEAD_DIM=D, BLOCK_M=delta_block, enable_fp_fusion=_common.FP_FUSION,
    )

    block_m, block_n, warps, stages = block_config("dkdv", D, q.dtype, q.device, T)
    assert block_n % block_m == 0
    attention_dkdv_kernel[(triton.cdiv(T, block_n), H // group, B)](  # one program per kv head
        dk, dv, q, k, v, dout, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(),
        H, group, T, sm_scale * LOG2E.value, sm_scale,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        num_warps=warps, num_stages=stages, enable_fp_fusion=_common.FP_FUSION,
    )

    block_m, block_n, warps, stages = block_config("dq", D, q.dtype, q.device, T)
    assert block_m % block_n == 0
    attention_dq_kernel[(triton.cdiv(T, block_m), H, B)](
        dq, q, k, v, dout, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, group, T, sm_scale * LOG2E.value, sm_scale,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        num_warps=warps, num_stages=stages, enable_fp_fusion=_common.FP_FUSION,
    )
    return dq, dk, dv
