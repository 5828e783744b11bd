"""Cross-entropy over the vocabulary in Triton: forward, backward, and the fused classifier.

    m_i     = max_j x_ij,  d_i = sum_j exp(x_ij - m_i)  (row max and sum, kept apart)
    loss_i  = (m_i - x_i,t_i) + log d_i                 (= lse_i - x_i,t_i; 0 for ignored rows)
    loss    = sum_i loss_i / max(n_valid, 1)            (n_valid: rows not ignored)
    dx_ij   = (exp(x_ij - m_i) * (1 / d_i) - [j == t_i]) * dloss / max(n_valid, 1)

The gradient never goes through lse = m + log d rounded to one float32 number: that rounding,
up to half an ulp of |lse| (2e-6 relative at |lse| ~ 40), would be every probability's relative
error, 5x PyTorch's. exp(x - m) is exact in its argument where p is large (x - m is exact for x
within a factor 2 of m) and 1 / d is one IEEE division per row (tl.div_rn), so each p is off by
exp2's error (2 ulp on the GPU) + d's summation error + two roundings (the reciprocal, the
product). Multiplying by the row's 1 / d rather than dividing each element keeps the gradient
pass one multiply per element, for one more rounding (2^-24 relative).

Design: one program per row, looping over the vocabulary in BLOCK-wide chunks, so any V
fits and the softmax is never materialised. The forward keeps an online softmax: a running
row max (one cross-lane max per chunk) and per-lane sums of exp(x - max) rescaled when the
max grows (one exp per element), merged once at the end. It saves (m, d) per row for the
backward: float32 (N, 2), 8 bytes a row. Everything is float32 whatever the
storage dtype; exponentials are exp2 of values pre-scaled by log2(e); the divisions by n_valid
are IEEE (tl.div_rn: the GPU's `/` is div.full, 2 ulp) and bf16 gradients are rounded to nearest
even by hand (the interpreter's cast truncates), so the GPU and the interpreter agree.

Vector width: each row runs an unmasked loop over its V // BLOCK full chunks and one masked
loop for the partial chunk at the end (and the padding). A mask with a bound that is not a
multiple of 8 (V = 50257) would keep every load and store scalar; without it a thread moves
its 8 consecutive elements with one 128-bit access, as long as the row starts 16-byte
aligned: Triton's JIT marks row_stride divisible by 16 when it is (GPT-2's 50304), and the
base pointer when it is aligned. Other layouts (odd V, odd strides, unaligned views) compile
to narrower accesses and give the same results. Ignored rows take a scalar branch that reads
nothing (and writes zeros in the backward): no loop over an empty mask.

The loss is reduced deterministically: per-row losses, then one program sums them in a
fixed order (no atomics). n_valid is counted by another single-program kernel.

Rows may be further apart than V (row_stride >= V): GPT-2 passes the (N, V) view of its
padded (N, Vp) logits. Gradients are written with the same layout; the padding columns
[V, row_stride) get zeros where the caller owns them (pad_end).

The fused classifier (llm.c's idea) computes the loss and overwrites the logits with
dlogits in one kernel: pass 1 reads the row for the max and sum, pass 2 reads it again
(from L2 on a GPU) and writes the gradient in place. It takes a loss scale s (the trainer's
1 / grad_accum_steps): the loss it returns is s times the mean and the gradient it writes is
that of the scaled loss, for dloss = 1, so loss.backward() moves no more bytes. Only an
upstream gradient other than 1 costs cross_entropy_scale_grad, a pass over (N, V).

Options (Liger-Kernel's; ops.cross_entropy's docstring has the math), all in float32:

    z_ij   = softcap * tanh(x_ij / softcap)                    soft-capped logits, softcap > 0
    loss_i = (1 - eps) (lse_i - z_i,t_i) + eps (lse_i - mean_j z_ij) + zs lse_i^2
    dz_ij  = exp(z_ij - m_i) * (1 / d_i) (1 + 2 zs lse_i) - (1 - eps) [j == t_i] - eps / V
    dx_ij  = dz_ij * (1 - t_ij)(1 + t_ij),  t_ij = tanh(x_ij / softcap)

They are constexpr specializations: OPTS (label smoothing or z-loss or a cap) and SOFTCAP; with
both False the kernels compile to the plain loss, the same code as without options. The row's
scale is dloss / n_valid for reduction "mean" (constexpr MEAN), dloss for "sum", dloss[row] for
"none" (dloss_stride 1: a runtime stride, once per row). tanh is computed from exp (the interpreter has no libdevice): an odd
polynomial below |u| = 0.3, where (1 - e) / (1 + e) would cancel.

Targets outside [0, V) other than ignore_index are rejected by the op layer; the kernels
never read out of bounds for them anyway (the target column is matched, never indexed) and
their row loss comes out NaN.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import to_storage

# Constants used inside the kernels are written there as literals: a @triton.jit function
# may not read a plain Python global on the GPU (the interpreter allows it, which hid it).
#   1.4426950408889634 = log2(e): exp(x) = exp2(x * log2(e)).
#   -1.0e38: the start of every running max: finite, so (running max - new max) is never
#   inf - inf, and small enough that scaling it by log2(e) cannot overflow.
MAX_BLOCK = 4096      # vocabulary chunk per loop iteration on a GPU
# Under the CPU interpreter every chunk costs Python overhead (tl.max per chunk): larger
# chunks, still several per row at GPT-2's vocabulary so the chunk loop is exercised.
INTERPRETER_MAX_BLOCK = 16384
REDUCE_BLOCK = 1024   # chunk of the single-program reductions over rows


@triton.jit
def _tanh(u):
    """tanh(u) in float32 to a few ulp: (1 - e) / (1 + e) with e = exp(-2|u|) where |u| >= 0.3 (1 - e
    then loses at most 2 bits: e <= 0.55), its Taylor series to u^11 below (truncation < 1e-9 relative)."""
    a = tl.abs(u)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|u|): 2 log2(e); 0 for |u| = inf
    big = tl.div_rn(1.0 - e, 1.0 + e)
    u2 = u * u
    series = u * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (
        -0.05396825396825397 + u2 * (0.021869488536155203 + u2 * -0.008863235529902197)))))
    return tl.where(a < 0.3, series, tl.where(u < 0.0, -big, big))


@triton.jit
def _cap(x, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    """The logit the softmax sees: softcap * tanh(x / softcap), or x."""
    if SOFTCAP:
        x = softcap * _tanh(x * inv_softcap)
    return x


@triton.jit
def _online_step(x, cols, target, running_max, lane_sum, lane_target):
    """Fold one chunk x (BLOCK,) float32 into the running max, the per-lane sums of
    exp(x - running max) and the per-lane pick of x[target]."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    rescale = tl.exp2((running_max - new_max) * 1.4426950408889634)
    lane_sum = lane_sum * rescale + tl.exp2((x - new_max) * 1.4426950408889634)
    lane_target += tl.where(cols == target, x, 0.0)
    return new_max, lane_sum, lane_target


@triton.jit
def _row_stats(
    row_ptr,  # (V,) one row of logits
    V,
    target,
    softcap,
    inv_softcap,
    BLOCK: tl.constexpr,
    OPTS: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """(row max, sum of exp(x - row max), x[target], sum of x) for one row, in float32; x the capped
    logits with SOFTCAP; the sum of x only with OPTS (label smoothing's mean logit), else 0.

    x[target] is picked up by matching the column while the row streams past, never by
    indexing with the target: a bad id cannot read out of bounds, and in the fused kernel
    the value is captured before pass 2 overwrites it.

    The V // BLOCK full chunks load without a mask (128-bit loads when the row start is
    16-byte aligned: the JIT sees row_stride % 16 == 0 and an aligned base); only the last,
    partial chunk is masked. Lane j sums columns j, j + BLOCK, ... in order, as one masked
    loop over every chunk would.
    """
    offsets = tl.arange(0, BLOCK)
    n_full = (V // BLOCK) * BLOCK
    running_max = tl.full((), -1.0e38, tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    lane_target = tl.zeros((BLOCK,), tl.float32)
    sum_z = tl.full((), 0.0, tl.float32)  # a running scalar (one tree sum per chunk): no lane vector to keep
    for start in range(0, n_full, BLOCK):
        cols = start + offsets
        x = _cap(tl.load(row_ptr + cols).to(tl.float32), softcap, inv_softcap, SOFTCAP)
        if OPTS:
            sum_z += tl.sum(x, axis=0)
        running_max, lane_sum, lane_target = _online_step(x, cols, target, running_max, lane_sum, lane_target)
    for start in range(n_full, V, BLOCK):  # the partial chunk: at most one iteration
        cols = start + offsets
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if SOFTCAP:  # the cap would turn the masked lanes' -inf into -softcap
            x = tl.where(in_row, _cap(x, softcap, inv_softcap, SOFTCAP), float("-inf"))
        if OPTS:
            sum_z += tl.sum(tl.where(in_row, x, 0.0), axis=0)
        running_max, lane_sum, lane_target = _online_step(x, cols, target, running_max, lane_sum, lane_target)
    return running_max, tl.sum(lane_sum, axis=0), tl.sum(lane_target, axis=0), sum_z


@triton.jit
def _row_loss(row_max, row_sum, x_target, in_range):
    """The loss of a row that is not ignored."""
    # (max - x_t) + log(sum) rather than lse - x_t: no cancellation for confident rows
    loss = (row_max - x_target) + tl.log(row_sum)
    return tl.where(in_range, loss, float("nan"))  # flags a bad target id


@triton.jit
def _row_loss_opts(row_max, row_sum, x_target, sum_z, in_range, V_float, smoothing, z_scale):
    """The loss of a row that is not ignored, with label smoothing and z-loss (x_target: capped)."""
    log_sum = tl.log(row_sum)
    nll = (row_max - x_target) + log_sum
    smooth = (row_max - tl.div_rn(sum_z, V_float)) + log_sum  # mean_j (lse - z_j)
    loss = tl.where(smoothing != 0.0, (1.0 - smoothing) * nll + smoothing * smooth, nll)
    lse = row_max + log_sum
    loss = loss + z_scale * lse * lse
    return tl.where(in_range, loss, float("nan"))


@triton.jit
def _row_grad(x, cols, row_max, inv_sum, target, scale):
    p = tl.exp2((x - row_max) * 1.4426950408889634) * inv_sum  # exp(x - m) / d
    return (p - tl.where(cols == target, 1.0, 0.0)) * scale


@triton.jit
def _logit_grad(x, cols, row_max, p_scale, target, scale, target_w, uniform, softcap, inv_softcap,
                OPTS: tl.constexpr, SOFTCAP: tl.constexpr):
    """The gradient of logits x: _row_grad's without options (p_scale = 1 / d); with OPTS
    (p exp(z - m) p_scale - target_w [j == t] - uniform) * scale, times tanh' = (1 - t)(1 + t) with SOFTCAP."""
    if OPTS:
        z = x
        dcap = x  # replaced below with SOFTCAP; unused without
        if SOFTCAP:
            t = _tanh(x * inv_softcap)
            z = softcap * t
            dcap = (1.0 - t) * (1.0 + t)  # 1 - t^2 without its cancellation near |t| = 1
        p = tl.exp2((z - row_max) * 1.4426950408889634) * p_scale
        grad = ((p - tl.where(cols == target, target_w, 0.0)) - uniform) * scale
        if SOFTCAP:
            grad = grad * dcap
    else:
        grad = _row_grad(x, cols, row_max, p_scale, target, scale)
    return grad


@triton.jit
def _grad_row(row_max, row_sum, V_float, smoothing, z_scale, OPTS: tl.constexpr):
    """A row's gradient constants (p_scale, target_w, uniform): (1 / d, 1, 0) without options, else
    ((1 / d)(1 + 2 zs lse), 1 - eps, eps / V)."""
    inv_sum = tl.div_rn(1.0, row_sum)  # once per row: IEEE, as the interpreter
    p_scale = inv_sum
    target_w = tl.full((), 1.0, tl.float32)
    uniform = tl.full((), 0.0, tl.float32)
    if OPTS:
        lse = row_max + tl.log(row_sum)
        p_scale = inv_sum * (1.0 + 2.0 * z_scale * lse)
        target_w = 1.0 - smoothing
        uniform = tl.div_rn(smoothing, V_float)
    return p_scale, target_w, uniform


@triton.jit
def _write_row_grad(
    out_row_ptr,  # (V,) dlogits row (may be the logits row itself)
    in_row_ptr,   # (V,) logits row
    V,
    pad_end,      # zeros go to columns [V, pad_end)
    row_max,      # the row's max m
    p_scale,      # 1 / d, d = sum of exp(x - m) over the row (with OPTS times 1 + 2 zs lse)
    target,
    scale,
    valid,
    target_w,     # with OPTS: 1 - eps
    uniform,      # with OPTS: eps / V
    softcap,
    inv_softcap,
    BLOCK: tl.constexpr,
    OPTS: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """dlogits of one row: (softmax - onehot) * scale over [0, V), zeros over [V, pad_end);
    all zeros, reading nothing, for an ignored row (valid false: a scalar branch).

    Full chunks of [0, V) load and store without a mask (128-bit accesses on aligned rows);
    the last partial chunk and the padding after it are written by one masked loop."""
    offsets = tl.arange(0, BLOCK)
    n_full = (V // BLOCK) * BLOCK
    if valid:
        for start in range(0, n_full, BLOCK):
            cols = start + offsets
            x = tl.load(in_row_ptr + cols).to(tl.float32)
            grad = _logit_grad(x, cols, row_max, p_scale, target, scale, target_w, uniform, softcap, inv_softcap,
                               OPTS, SOFTCAP)
            tl.store(out_row_ptr + cols, to_storage(grad, out_row_ptr.dtype.element_ty))
        for start in range(n_full, pad_end, BLOCK):
            cols = start + offsets
            in_row = cols < V
            x = tl.load(in_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            grad = tl.where(in_row, _logit_grad(x, cols, row_max, p_scale, target, scale, target_w, uniform,
                                                softcap, inv_softcap, OPTS, SOFTCAP), 0.0)
            tl.store(out_row_ptr + cols, to_storage(grad, out_row_ptr.dtype.element_ty), mask=cols < pad_end)
    else:
        zeros = tl.zeros((BLOCK,), tl.float32).to(out_row_ptr.dtype.element_ty)
        for start in range(0, n_full, BLOCK):
            tl.store(out_row_ptr + start + offsets, zeros)
        for start in range(n_full, pad_end, BLOCK):
            cols = start + offsets
            tl.store(out_row_ptr + cols, zeros, mask=cols < pad_end)


@triton.jit
def cross_entropy_forward_kernel(
    stats_ptr,      # (N, 2) float32: (row max, sum of exp(x - max))
    row_loss_ptr,   # (N,) float32
    logits_ptr,     # (N, V), rows row_stride apart
    targets_ptr,    # (N,) int64
    V,
    row_stride,
    ignore_index,
    V_float,        # V as a float32 (OPTS: the divisions by V; an int V = 1 would be a constexpr)
    smoothing,      # label smoothing eps (OPTS)
    z_scale,        # z-loss scale zs (OPTS)
    softcap,        # (SOFTCAP)
    inv_softcap,    # 1 / softcap (SOFTCAP)
    BLOCK: tl.constexpr,
    OPTS: tl.constexpr,     # label smoothing, z-loss or a cap: else the plain loss
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    row_max = tl.full((), 0.0, tl.float32)  # ignored rows: (0, 1) (lse 0, never read), loss 0, nothing read
    row_sum = tl.full((), 1.0, tl.float32)
    loss = tl.full((), 0.0, tl.float32)
    if target != ignore_index:
        in_range = (target >= 0) & (target < V)
        row_max, row_sum, x_target, sum_z = _row_stats(logits_ptr + row * row_stride, V, target, softcap,
                                                       inv_softcap, BLOCK, OPTS, SOFTCAP)
        if OPTS:
            loss = _row_loss_opts(row_max, row_sum, x_target, sum_z, in_range, V_float, smoothing, z_scale)
        else:
            loss = _row_loss(row_max, row_sum, x_target, in_range)
    tl.store(stats_ptr + 2 * row, row_max)
    tl.store(stats_ptr + 2 * row + 1, row_sum)
    tl.store(row_loss_ptr + row, loss)


@triton.jit
def cross_entropy_backward_kernel(
    dlogits_ptr,   # (N, V), rows row_stride apart (+ padding up to pad_end)
    logits_ptr,    # (N, V), rows row_stride apart
    targets_ptr,   # (N,) int64
    stats_ptr,     # (N, 2) float32: (row max, sum of exp(x - max)) from the forward
    n_valid_ptr,   # () float32
    dloss_ptr,     # () float32, or (N,) with dloss_stride 1 (reduction "none")
    dloss_stride,
    V,
    row_stride,
    pad_end,
    ignore_index,
    V_float,
    smoothing,
    z_scale,
    softcap,
    inv_softcap,
    BLOCK: tl.constexpr,
    OPTS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MEAN: tl.constexpr,  # reduction "mean": divide by n_valid
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    dloss = tl.load(dloss_ptr + row * dloss_stride)
    scale = dloss
    if MEAN:
        scale = tl.div_rn(dloss, tl.maximum(tl.load(n_valid_ptr), 1.0))
    row_max = tl.load(stats_ptr + 2 * row)
    p_scale, target_w, uniform = _grad_row(row_max, tl.load(stats_ptr + 2 * row + 1), V_float, smoothing, z_scale,
                                           OPTS)
    _write_row_grad(dlogits_ptr + row * row_stride, logits_ptr + row * row_stride, V, pad_end, row_max, p_scale,
                    target, scale, valid, target_w, uniform, softcap, inv_softcap, BLOCK, OPTS, SOFTCAP)


@triton.jit
def cross_entropy_fused_kernel(
    row_loss_ptr,  # (N,) float32
    stats_ptr,     # (N, 2) float32 (row max, sum of exp(x - max)), written with WRITE_STATS
    logits_ptr,    # (N, V), rows row_stride apart: read as logits, overwritten with dlogits
    targets_ptr,   # (N,) int64
    n_valid_ptr,   # () float32, counted before this kernel runs
    V,
    row_stride,
    pad_end,
    ignore_index,
    loss_scale,    # float32: the gradient is that of loss_scale * the reduced loss
    V_float,
    smoothing,
    z_scale,
    softcap,
    inv_softcap,
    BLOCK: tl.constexpr,
    OPTS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MEAN: tl.constexpr,  # reduction "mean": divide by n_valid ("sum", "none": each row's own gradient)
    WRITE_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * row_stride
    row_max = tl.full((), 0.0, tl.float32)
    row_sum = tl.full((), 1.0, tl.float32)
    loss = tl.full((), 0.0, tl.float32)
    if valid:
        in_range = (target >= 0) & (target < V)
        row_max, row_sum, x_target, sum_z = _row_stats(row_ptr, V, target, softcap, inv_softcap, BLOCK, OPTS,
                                                       SOFTCAP)
        if OPTS:
            loss = _row_loss_opts(row_max, row_sum, x_target, sum_z, in_range, V_float, smoothing, z_scale)
        else:
            loss = _row_loss(row_max, row_sum, x_target, in_range)
    tl.store(row_loss_ptr + row, loss)
    if WRITE_STATS:
        tl.store(stats_ptr + 2 * row, row_max)
        tl.store(stats_ptr + 2 * row + 1, row_sum)
    scale = loss_scale
    if MEAN:
        scale = tl.div_rn(loss_scale, tl.maximum(tl.load(n_valid_ptr), 1.0))
    p_scale, target_w, uniform = _grad_row(row_max, row_sum, V_float, smoothing, z_scale, OPTS)
    _write_row_grad(row_ptr, row_ptr, V, pad_end, row_max, p_scale, target, scale, valid, target_w, uniform,
                    softcap, inv_softcap, BLOCK, OPTS, SOFTCAP)


@triton.jit
def cross_entropy_scale_grad_kernel(
    dlogits_ptr,  # (N, V), rows row_stride apart
    dloss_ptr,    # () float32, or (N,) with dloss_stride 1 (reduction "none": row i scaled by dloss[i])
    dloss_stride,
    V,
    row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(dloss_ptr + row * dloss_stride)
    if scale != 1.0:  # the usual case (loss.backward()) moves no bytes
        row_ptr = dlogits_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK)
        n_full = (V // BLOCK) * BLOCK
        for start in range(0, n_full, BLOCK):  # full chunks: no mask
            cols = start + offsets
            g = tl.load(row_ptr + cols).to(tl.float32)
            tl.store(row_ptr + cols, to_storage(g * scale, dlogits_ptr.dtype.element_ty))
        for start in range(n_full, V, BLOCK):
            cols = start + offsets
            mask = cols < V
            g = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(row_ptr + cols, to_storage(g * scale, dlogits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_count_kernel(
    n_valid_ptr,  # () float32
    targets_ptr,  # (N,) int64
    N,
    ignore_index,
    BLOCK: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        idx = start + offsets
        t = tl.load(targets_ptr + idx, mask=idx < N, other=ignore_index)
        count += tl.where(t != ignore_index, 1.0, 0.0)
    tl.store(n_valid_ptr, tl.sum(count, axis=0))


@triton.jit
def cross_entropy_mean_kernel(
    loss_ptr,      # () float32
    row_loss_ptr,  # (N,) float32
    n_valid_ptr,   # () float32
    N,
    loss_scale,    # float32: loss = loss_scale * mean (or sum)
    BLOCK: tl.constexpr,
    MEAN: tl.constexpr,  # divide by n_valid (reduction "mean"), else the sum
):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        idx = start + offsets
        total += tl.load(row_loss_ptr + idx, mask=idx < N, other=0.0)
    reduced = tl.sum(total, axis=0)
    if MEAN:
        reduced = tl.div_rn(reduced, tl.maximum(tl.load(n_valid_ptr), 1.0))
    tl.store(loss_ptr, reduced * loss_scale)


# ---- launchers ---------------------------------------------------------------------------

def _row_block(V: int, device: torch.device) -> int:
    gpu = _common.gpu_of(device)
    return min(triton.next_power_of_2(V), MAX_BLOCK if gpu is not None else INTERPRETER_MAX_BLOCK)


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _row_options(V: int, device: torch.device) -> dict:
    """BLOCK, num_warps and the fp contraction of the per-row kernels: BLOCK = 4096 at 16 warps
    on a GPU for GPT-2's vocabulary (8 elements, one 128-bit bf16 load, per thread and chunk)."""
    block = _row_block(V, device)
    return dict(BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=_common.FP_FUSION)


def row_stride_of(logits: torch.Tensor) -> int:
    """Distance between rows in elements: logits.stride(0), or V for a single row whose
    stride says nothing (e.g. an expanded (1, V))."""
    N, V = logits.shape
    return logits.stride(0) if (N > 1 or logits.stride(0) >= V) else V


def _check_layout(logits: torch.Tensor, targets: Optional[torch.Tensor] = None) -> None:
    """What the kernels' addressing assumes; the op layer checks it with friendlier messages."""
    N, V = logits.shape
    if V < 1 or (V > 1 and logits.stride(1) != 1) or (N > 1 and logits.stride(0) < V):
        raise ValueError(f"logits must be (N, V >= 1) with stride(1) == 1 and stride(0) >= V; got shape "
                         f"{tuple(logits.shape)}, strides {logits.stride()}")
    if targets is None:
        return
    if targets.dtype != torch.int64 or targets.shape != (N,) or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous int64 ({N},); got {targets.dtype} {tuple(targets.shape)}")


REDUCTIONS = ("mean", "sum", "none")


def _option_args(reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float) -> tuple:
    """(runtime args smoothing, z_scale, softcap, inv_softcap; constexprs OPTS, SOFTCAP) of the per-row
    kernels, after checking what their math assumes; softcap 0 means none."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if not 0.0 <= lse_square_scale < float("inf"):
        raise ValueError(f"lse_square_scale must be a finite float >= 0; got {lse_square_scale!r}")
    if not 0.0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be > 0 (or 0: none); got {softcap!r}")
    opts = label_smoothing != 0.0 or lse_square_scale != 0.0 or softcap != 0.0
    inv_softcap = 1.0 / softcap if softcap else 0.0
    return (float(label_smoothing), float(lse_square_scale), float(softcap), inv_softcap), \
        dict(OPTS=opts, SOFTCAP=softcap != 0.0)


def _mean(reduction: str) -> dict:
    return dict(MEAN=reduction == "mean")


def _finish_mean(loss, row_losses, n_valid, N, loss_scale=1.0, reduction="mean"):
    cross_entropy_mean_kernel[(1,)](loss, row_losses, n_valid, N, float(loss_scale), BLOCK=REDUCE_BLOCK,
                                    enable_fp_fusion=_common.FP_FUSION, **_mean(reduction))


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, *,
                          reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                          softcap: float = 0.0):
    """(loss, stats (N, 2), n_valid ()) all float32, for logits (N, V) with stride(1) == 1 and
    any row stride >= V, targets (N,) int64 contiguous. loss: () for reduction "mean" / "sum", the
    per-row losses (N,) for "none" (0 for ignored rows). stats: each row's (max, sum of exp(z - max))
    over the (capped) logits z, (0, 1) for ignored rows, for the backward."""
    _check_layout(logits, targets)
    args, flags = _option_args(reduction, label_smoothing, lse_square_scale, softcap)
    N, V = logits.shape
    device = logits.device
    loss = torch.empty((), device=device, dtype=torch.float32)
    n_valid = torch.empty((), device=device, dtype=torch.float32)
    stats = torch.empty((N, 2), device=device, dtype=torch.float32)
    row_losses = torch.empty(N, device=device, dtype=torch.float32)
    if N:
        cross_entropy_forward_kernel[(N,)](stats, row_losses, logits, targets, V, row_stride_of(logits),
                                           ignore_index, float(V), *args, **flags, **_row_options(V, device))
    cross_entropy_count_kernel[(1,)](n_valid, targets, N, ignore_index, BLOCK=REDUCE_BLOCK,
                                     enable_fp_fusion=_common.FP_FUSION)
    if reduction == "none":
        return row_losses, stats, n_valid
    _finish_mean(loss, row_losses, n_valid, N, reduction=reduction)
    return loss, stats, n_valid


def cross_entropy_backward(logits, targets, stats, n_valid, dloss, ignore_index: int, *, reduction: str = "mean",
                           label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                           softcap: float = 0.0) -> torch.Tensor:
    """dlogits with logits' layout (same row stride; padding columns zeroed); stats: (N, 2) float32
    contiguous from cross_entropy_forward; dloss: () float32, or (N,) contiguous for reduction "none"."""
    _check_layout(logits, targets)
    args, flags = _option_args(reduction, label_smoothing, lse_square_scale, softcap)
    N, V = logits.shape
    row_stride = row_stride_of(logits)
    buffer = torch.empty(N * row_stride, device=logits.device, dtype=logits.dtype)
    dlogits = buffer.as_strided((N, V), (row_stride, 1))
    if N:
        cross_entropy_backward_kernel[(N,)](dlogits, logits, targets, stats, n_valid, dloss,
                                            int(reduction == "none"), V, row_stride, row_stride, ignore_index,
                                            float(V), *args, **flags, **_mean(reduction),
                                            **_row_options(V, logits.device))
    return dlogits


def cross_entropy_fused_forward_backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                         pad_end: int, loss_scale: float = 1.0, *, reduction: str = "mean",
                                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                                         softcap: float = 0.0, stats: Optional[torch.Tensor] = None):
    """The fused classifier: returns (loss_scale * reduced loss, n_valid ()) and overwrites
    logits (N, V) with the gradient of that scaled loss (dloss = 1; for reduction "none", each row's
    gradient of loss_scale times its own loss, and the first result is the per-row losses (N,), not
    yet times loss_scale); also zeros each row's columns [V, pad_end), pad_end <= the row stride:
    padding the caller owns. stats: an (N, 2) float32 buffer for each row's (max, sum), or None."""
    _check_layout(logits, targets)
    args, flags = _option_args(reduction, label_smoothing, lse_square_scale, softcap)
    N, V = logits.shape
    device = logits.device
    loss = torch.empty((), device=device, dtype=torch.float32)
    n_valid = torch.empty((), device=device, dtype=torch.float32)
    row_losses = torch.empty(N, device=device, dtype=torch.float32)
    cross_entropy_count_kernel[(1,)](n_valid, targets, N, ignore_index, BLOCK=REDUCE_BLOCK,
                                     enable_fp_fusion=_common.FP_FUSION)
    if N:
        row_stride = row_stride_of(logits)
        if not V <= pad_end <= row_stride:
            raise ValueError(f"pad_end must be in [V, row_stride] = [{V}, {row_stride}]; got {pad_end}")
        cross_entropy_fused_kernel[(N,)](row_losses, row_losses if stats is None else stats, logits, targets,
                                         n_valid, V, row_stride, pad_end, ignore_index, float(loss_scale),
                                         float(V), *args, **flags, **_mean(reduction),
                                         WRITE_STATS=stats is not None, **_row_options(V, device))
    if reduction == "none":
        return row_losses, n_valid
    _finish_mean(loss, row_losses, n_valid, N, loss_scale, reduction)
    return loss, n_valid


def cross_entropy_scale_grad(dlogits: torch.Tensor, dloss: torch.Tensor) -> None:
    """dlogits *= dloss in place (columns [0, V) of each row); dloss () or, for reduction "none",
    (N,) contiguous (row i times dloss[i]). Each program reads its factor and moves nothing when it
    is 1, so the usual loss.backward() costs no pass and no host sync."""
    _check_layout(dlogits)
    N, V = dlogits.shape
    if N:
        cross_entropy_scale_grad_kernel[(N,)](dlogits, dloss, int(dloss.dim() == 1), V, row_stride_of(dlogits),
                                              **_row_options(V, dlogits.device))
