"""RMSNorm over the last dim, and the fused residual add + RMSNorm, in Triton.

    forward:  rstd = 1 / sqrt(sum(x^2) / C + eps),  xhat = x * rstd,  y = xhat * weight  (no weight: y = xhat)
    backward: g = dy * weight (no weight: g = dy),  dx = rstd * (g - xhat * mean(g * xhat))
              dweight = sum_rows(dy * xhat)
    fused:    h = residual + x (stored, rounded to the storage dtype), y = rmsnorm(h);
              d(residual) = d(x) = dh = d(h_out) + RMS-backward(dy)

LayerNorm's kernels (kernels/layernorm.py) without the mean and the bias, on _common's row tiles:
each program takes BLOCK_ROWS whole rows of BLOCK_C = next_power_of_2(C) elements, so a row is
loaded once; QK-norm's short rows (C = 64 over the head dim) make tiles of many rows. The
backward is deterministic: program p owns a fixed contiguous range of rows, sums dy * xhat over
them in float32 and writes one row of a (num_partials, C) float32 scratch buffer; a second kernel
sums those partial rows in a fixed order into dweight. No atomics. Without a weight (HAS_WEIGHT
off) there is no dweight: no scratch, no second kernel. Offsets are int64 (rows * C may pass 2^31).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import to_storage as _to_storage

# Largest BLOCK_C: a row must fit in one program's registers.
MAX_BLOCK_C = 65536


@triton.jit
def rmsnorm_forward_kernel(
    y_ptr,         # (rows, C)
    h_ptr,         # (rows, C) residual + x, written when HAS_RESIDUAL
    rstd_ptr,      # (rows,) float32
    residual_ptr,  # (rows, C) read when HAS_RESIDUAL
    x_ptr,         # (rows, C)
    weight_ptr,    # (C,) read when HAS_WEIGHT
    rows,
    C,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_ids = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # (BLOCK_ROWS,)
    cols = tl.arange(0, BLOCK_C)                                          # (BLOCK_C,)
    row_mask = row_ids < rows
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = row_ids[:, None] * C + cols[None, :]                         # (BLOCK_ROWS, BLOCK_C)

    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = _to_storage(x + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32),
                        h_ptr.dtype.element_ty)
        tl.store(h_ptr + offsets, h, mask=mask)
        x = h.to(tl.float32)  # normalize the stored (rounded) h, the tensor the backward reads

    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)  # masked elements are 0
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, _to_storage(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)


@triton.jit
def rmsnorm_backward_kernel(
    dx_ptr,       # (rows, C) dx, or dh = dh_out + dx when HAS_RESIDUAL
    partial_ptr,  # (num_partials, C) float32: the dweight sums of each program, written when HAS_WEIGHT
    dy_ptr,       # (rows, C)
    dh_out_ptr,   # (rows, C) gradient of the fused op's h output, read when HAS_RESIDUAL
    x_ptr,        # (rows, C) the normalized input (h for the fused op)
    weight_ptr,   # (C,) read when HAS_WEIGHT
    rstd_ptr,     # (rows,) float32
    rows,
    C,
    rows_per_program,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # (BLOCK_ROWS, BLOCK_C): one running sum per row slot of the tile, summed over the slots once at the
    # end. Each float32 chain is rows_per_program / BLOCK_ROWS adds, then BLOCK_ROWS (a tree on a GPU)
    dweight = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)

    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    for row_start in range(row_begin, row_end, BLOCK_ROWS):
        row_ids = row_start + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # (BLOCK_ROWS,)
        row_mask = row_ids < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_ids[:, None] * C + cols[None, :]              # (BLOCK_ROWS, BLOCK_C)

        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)

        xhat = x * rstd[:, None]  # masked elements are 0
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        mean_g_xhat = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - xhat * mean_g_xhat[:, None])
        if HAS_RESIDUAL:
            dx += tl.load(dh_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, _to_storage(dx, dx_ptr.dtype.element_ty), mask=mask)
        dweight += dy * xhat

    if HAS_WEIGHT:
        tl.store(partial_ptr + pid * C + cols, tl.sum(dweight, axis=0), mask=col_mask)


@triton.jit
def rmsnorm_reduce_partials_kernel(
    dweight_ptr,  # (C,)
    partial_ptr,  # (num_partials, C) float32
    num_partials,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < C
    dweight = tl.zeros((BLOCK_P, BLOCK_COLS), dtype=tl.float32)
    for p_start in range(0, num_partials, BLOCK_P):
        p = p_start + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = (p < num_partials)[:, None] & col_mask[None, :]
        dweight += tl.load(partial_ptr + p[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(dweight_ptr + cols, _to_storage(tl.sum(dweight, axis=0), dweight_ptr.dtype.element_ty), mask=col_mask)


# ---- launch configuration ----------------------------------------------------------------

def _block_c(C: int) -> int:
    block_c = triton.next_power_of_2(C)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"the triton rmsnorm takes C <= {MAX_BLOCK_C}; got C={C}")
    return block_c


def num_partials(rows: int, C: int, device: torch.device) -> int:
    """Programs (and scratch rows) of the backward: _common.row_programs."""
    return _common.row_programs(rows, _common.row_tile_rows(rows, _block_c(C), device), device)


# ---- launchers -------------------------------------------------------------------------

def _forward(x, weight, eps, residual):
    C = x.shape[-1]
    rows = x.numel() // C
    block_c = _block_c(C)
    block_rows = _common.row_tile_rows(rows, block_c, x.device)
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        rmsnorm_forward_kernel[(triton.cdiv(rows, block_rows),)](
            y, h if h is not None else y, rstd, residual if residual is not None else x, x,
            weight if weight is not None else x, rows, C, eps, HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c,
            num_warps=_common.row_tile_warps(block_rows, block_c), enable_fp_fusion=_common.FP_FUSION)
    return y, h, rstd


def _backward(dy, dh_out, x, weight, rstd):
    C = x.shape[-1]
    rows = x.numel() // C
    block_c = _block_c(C)
    partials = num_partials(rows, C, x.device)
    rows_per_program = max(1, triton.cdiv(rows, partials))
    block_rows = _common.column_sum_tile_rows(rows_per_program, block_c, x.device)
    dx = torch.empty_like(x)
    has_weight = weight is not None
    # without a weight nothing is summed over rows: the scratch argument is a placeholder never touched
    scratch = torch.empty((partials, C) if has_weight else (1,), device=x.device, dtype=torch.float32)
    rmsnorm_backward_kernel[(partials,)](
        dx, scratch, dy, dh_out if dh_out is not None else dy, x, weight if has_weight else x, rstd,
        rows, C, rows_per_program, HAS_RESIDUAL=dh_out is not None, HAS_WEIGHT=has_weight, BLOCK_ROWS=block_rows,
        BLOCK_C=block_c, num_warps=_common.row_tile_warps(block_rows, block_c), enable_fp_fusion=_common.FP_FUSION)
    if not has_weight:
        return dx, None
    dweight = torch.empty_like(weight)
    # narrow column blocks: C = 768 gives 24 programs, each summing (num_partials, 32) floats
    block_cols = min(32, triton.next_power_of_2(C))
    rmsnorm_reduce_partials_kernel[(triton.cdiv(C, block_cols),)](
        dweight, scratch, partials, C, BLOCK_P=64, BLOCK_COLS=block_cols, num_warps=4,
        enable_fp_fusion=_common.FP_FUSION)
    return dx, dweight


def rmsnorm_forward(x: torch.Tensor, weight, eps: float):
    """(y, rstd) for a contiguous x (..., C); weight (C,) or None; rstd: (rows,) float32."""
    y, _, rstd = _forward(x, weight, eps, None)
    return y, rstd


def rmsnorm_backward(dy, x, weight, rstd):
    """(dx, dweight); dy, x contiguous (..., C); dweight in weight's dtype, None without a weight."""
    return _backward(dy, None, x, weight, rstd)


def fused_residual_rmsnorm_forward(residual, x, weight, eps: float):
    """(h, y, rstd) with h = residual + x and y = rmsnorm(h)."""
    y, h, rstd = _forward(x, weight, eps, residual)
    return h, y, rstd


def fused_residual_rmsnorm_backward(dh_out, dy, h, weight, rstd):
    """(dh, dweight) with dh = dh_out + RMS-backward(dy), the gradient of residual and of x."""
    return _backward(dy, dh_out, h, weight, rstd)
