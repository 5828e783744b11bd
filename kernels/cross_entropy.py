"""Cross-entropy over the vocabulary in Triton: forward, backward, and the fused classifier.

    lse_i   = log sum_j exp(x_ij)                       (log-sum-exp of row i)
    loss_i  = lse_i - x_i,t_i                           (0 for rows whose target is ignore_index)
    loss    = sum_i loss_i / max(n_valid, 1)            (n_valid: rows not ignored)
    dx_ij   = (softmax_ij - [j == t_i]) * dloss / max(n_valid, 1)

Design: one program per row, looping over the vocabulary in BLOCK-wide chunks, so any V
fits and the softmax is never materialised. The forward keeps an online softmax: a running
row max (one cross-lane max per chunk) and per-lane sums of exp(x - max) rescaled when the
max grows (one exp per element), merged once at the end. Everything is float32 whatever the
storage dtype; exponentials are exp2 of values pre-scaled by log2(e).

The loss is reduced deterministically: per-row losses, then one program sums them in a
fixed order (no atomics). n_valid is counted by another single-program kernel.

Rows may be further apart than V (row_stride >= V): GPT-2 passes the (N, V) view of its
padded (N, Vp) logits. Gradients are written with the same layout; the padding columns
[V, row_stride) get zeros where the caller owns them (pad_end).

The fused classifier (llm.c's idea) computes the loss and overwrites the logits with
dlogits for dloss = 1 in one kernel: pass 1 reads the row for the max and sum, pass 2
reads it again (from L2 on a GPU) and writes the gradient in place. A later upstream
gradient other than 1 is multiplied in by cross_entropy_scale_grad.

Targets outside [0, V) other than ignore_index are rejected by the op layer; the kernels
never read out of bounds for them anyway (the target column is matched, never indexed) and
their row loss comes out NaN.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

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
def _row_stats(
    row_ptr,  # (V,) one row of logits
    V,
    target,
    valid,
    BLOCK: tl.constexpr,
):
    """(row max, sum of exp(x - row max), x[target]) for one row, in float32.

    x[target] is picked up by matching the column while the row streams past, never by
    indexing with the target: a bad id cannot read out of bounds, and in the fused kernel
    the value is captured before pass 2 overwrites it. Rows that are not valid read nothing.
    """
    offsets = tl.arange(0, BLOCK)
    n_read = tl.where(valid, V, 0)  # columns to read: (cols < V) & valid, in one compare
    running_max = tl.full((), -1.0e38, tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    lane_target = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        lane_sum = lane_sum * tl.exp2((running_max - new_max) * 1.4426950408889634) + tl.exp2((x - new_max) * 1.4426950408889634)
        running_max = new_max
        lane_target += tl.where(cols == target, x, 0.0)
    return running_max, tl.sum(lane_sum, axis=0), tl.sum(lane_target, axis=0)


@triton.jit
def _row_loss_and_lse(row_max, row_sum, x_target, valid, in_range):
    log_sum = tl.log(tl.where(valid, row_sum, 1.0))  # ignored rows read nothing: row_sum is 0
    # (max - x_t) + log(sum) rather than lse - x_t: no cancellation for confident rows
    loss = (row_max - x_target) + log_sum
    loss = tl.where(in_range, loss, float("nan"))  # flags a bad target id
    return tl.where(valid, row_max + log_sum, 0.0), tl.where(valid, loss, 0.0)


@triton.jit
def _write_row_grad(
    out_row_ptr,  # (V,) dlogits row (may be the logits row itself)
    in_row_ptr,   # (V,) logits row
    V,
    pad_end,      # zeros go to columns [V, pad_end)
    lse,
    target,
    scale,
    valid,
    BLOCK: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    n_read = tl.where(valid, V, 0)  # ignored rows read nothing and write zeros
    for start in range(0, V, BLOCK):
        cols = start + offsets
        in_row = cols < V
        x = tl.load(in_row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        p = tl.exp2((x - lse) * 1.4426950408889634)
        grad = (p - tl.where(cols == target, 1.0, 0.0)) * scale
        grad = tl.where(valid, grad, 0.0)
        tl.store(out_row_ptr + cols, grad.to(out_row_ptr.dtype.element_ty), mask=in_row)
    for start in range(V, pad_end, BLOCK):
        cols = start + offsets
        tl.store(out_row_ptr + cols, tl.zeros((BLOCK,), tl.float32).to(out_row_ptr.dtype.element_ty),
                 mask=cols < pad_end)


@triton.jit
def cross_entropy_forward_kernel(
    lse_ptr,        # (N,) float32
    row_loss_ptr,   # (N,) float32
    logits_ptr,     # (N, V), rows row_stride apart
    targets_ptr,    # (N,) int64
    V,
    row_stride,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    row_max, row_sum, x_target = _row_stats(logits_ptr + row * row_stride, V, target, valid, BLOCK)
    lse, loss = _row_loss_and_lse(row_max, row_sum, x_target, valid, in_range)
    tl.store(lse_ptr + row, lse)
    tl.store(row_loss_ptr + row, loss)


@triton.jit
def cross_entropy_backward_kernel(
    dlogits_ptr,   # (N, V), rows row_stride apart (+ padding up to pad_end)
    logits_ptr,    # (N, V), rows row_stride apart
    targets_ptr,   # (N,) int64
    lse_ptr,       # (N,) float32
    n_valid_ptr,   # () float32
    dloss_ptr,     # () float32
    V,
    row_stride,
    pad_end,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    scale = tl.load(dloss_ptr) / tl.maximum(tl.load(n_valid_ptr), 1.0)
    lse = tl.load(lse_ptr + row)
    _write_row_grad(dlogits_ptr + row * row_stride, logits_ptr + row * row_stride, V, pad_end, lse, target,
                    scale, valid, BLOCK)


@triton.jit
def cross_entropy_fused_kernel(
    row_loss_ptr,  # (N,) float32
    logits_ptr,    # (N, V), rows row_stride apart: read as logits, overwritten with dlogits
    targets_ptr,   # (N,) int64
    n_valid_ptr,   # () float32, counted before this kernel runs
    V,
    row_stride,
    pad_end,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    row_ptr = logits_ptr + row * row_stride
    row_max, row_sum, x_target = _row_stats(row_ptr, V, target, valid, BLOCK)
    lse, loss = _row_loss_and_lse(row_max, row_sum, x_target, valid, in_range)
    tl.store(row_loss_ptr + row, loss)
    scale = 1.0 / tl.maximum(tl.load(n_valid_ptr), 1.0)
    _write_row_grad(row_ptr, row_ptr, V, pad_end, lse, target, scale, valid, BLOCK)


@triton.jit
def cross_entropy_scale_grad_kernel(
    dlogits_ptr,  # (N, V), rows row_stride apart
    dloss_ptr,    # () float32
    V,
    row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(dloss_ptr)
    if scale != 1.0:  # the usual case (loss.backward()) moves no bytes
        row_ptr = dlogits_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            cols = start + offsets
            mask = cols < V
            g = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(row_ptr + cols, (g * scale).to(dlogits_ptr.dtype.element_ty), mask=mask)


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
    BLOCK: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        idx = start + offsets
        total += tl.load(row_loss_ptr + idx, mask=idx < N, other=0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / tl.maximum(tl.load(n_valid_ptr), 1.0))


# ---- launchers ---------------------------------------------------------------------------

def _row_block(V: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(V), MAX_BLOCK if device.type == "cuda" else INTERPRETER_MAX_BLOCK)


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


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


def _finish_mean(loss, row_losses, n_valid, N):
    cross_entropy_mean_kernel[(1,)](loss, row_losses, n_valid, N, BLOCK=REDUCE_BLOCK)


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """(loss (), lse (N,), n_valid ()) all float32, for logits (N, V) with stride(1) == 1 and
    any row stride >= V, targets (N,) int64 contiguous."""
    _check_layout(logits, targets)
    N, V = logits.shape
    device = logits.device
    loss = torch.empty((), device=device, dtype=torch.float32)
    n_valid = torch.empty((), device=device, dtype=torch.float32)
    lse = torch.empty(N, device=device, dtype=torch.float32)
    row_losses = torch.empty(N, device=device, dtype=torch.float32)
    if N:
        block = _row_block(V, logits.device)
        cross_entropy_forward_kernel[(N,)](lse, row_losses, logits, targets, V, row_stride_of(logits),
                                           ignore_index, BLOCK=block, num_warps=_num_warps(block))
    cross_entropy_count_kernel[(1,)](n_valid, targets, N, ignore_index, BLOCK=REDUCE_BLOCK)
    _finish_mean(loss, row_losses, n_valid, N)
    return loss, lse, n_valid


def cross_entropy_backward(logits, targets, lse, n_valid, dloss, ignore_index: int) -> torch.Tensor:
    """dlogits with logits' layout (same row stride; padding columns zeroed); dloss: () float32."""
    _check_layout(logits, targets)
    N, V = logits.shape
    row_stride = row_stride_of(logits)
    buffer = torch.empty(N * row_stride, device=logits.device, dtype=logits.dtype)
    dlogits = buffer.as_strided((N, V), (row_stride, 1))
    if N:
        block = _row_block(V, logits.device)
        cross_entropy_backward_kernel[(N,)](dlogits, logits, targets, lse, n_valid, dloss, V, row_stride,
                                            row_stride, ignore_index, BLOCK=block, num_warps=_num_warps(block))
    return dlogits


def cross_entropy_fused_forward_backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                         zero_padding: bool):
    """The fused classifier: returns (loss (), n_valid ()) and overwrites logits with the
    gradient of the mean loss (dloss = 1); with zero_padding, also zeros each row's columns
    [V, row_stride), which the caller guarantees lie inside logits' storage."""
    _check_layout(logits, targets)
    N, V = logits.shape
    device = logits.device
    loss = torch.empty((), device=device, dtype=torch.float32)
    n_valid = torch.empty((), device=device, dtype=torch.float32)
    row_losses = torch.empty(N, device=device, dtype=torch.float32)
    cross_entropy_count_kernel[(1,)](n_valid, targets, N, ignore_index, BLOCK=REDUCE_BLOCK)
    if N:
        row_stride = row_stride_of(logits)
        block = _row_block(V, logits.device)
        cross_entropy_fused_kernel[(N,)](row_losses, logits, targets, n_valid, V, row_stride,
                                         row_stride if zero_padding else V, ignore_index,
                                         BLOCK=block, num_warps=_num_warps(block))
    _finish_mean(loss, row_losses, n_valid, N)
    return loss, n_valid


def cross_entropy_scale_grad(dlogits: torch.Tensor, dloss: torch.Tensor) -> None:
    """dlogits *= dloss in place (columns [0, V) of each row); each program reads dloss and
    moves nothing when it is 1, so the usual loss.backward() costs no pass and no host sync."""
    _check_layout(dlogits)
    N, V = dlogits.shape
    if N:
        block = _row_block(V, dlogits.device)
        cross_entropy_scale_grad_kernel[(N,)](dlogits, dloss, V, row_stride_of(dlogits), BLOCK=block,
                                              num_warps=_num_warps(block))
