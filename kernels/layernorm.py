"""LayerNorm over the last dim, and the fused residual add + LayerNorm, in Triton.

    forward:  mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
              xhat = (x - mean) * rstd,  y = xhat * weight + bias
    backward: g = dy * weight,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
              dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
    fused:    h = residual + x (stored, rounded to the storage dtype), y = layernorm(h);
              d(residual) = d(x) = dh = d(h_out) + LN-backward(dy)

Each program takes a (BLOCK_ROWS, BLOCK_C) tile: BLOCK_ROWS whole rows, BLOCK_C the next
power of two >= C, so a row is loaded once and normalized in registers (two-pass variance).
The backward is deterministic: program p owns a fixed contiguous range of rows, sums
dy * xhat and dy over them in float32 and writes one row of a (2, num_partials, C) float32
scratch buffer; a second kernel sums those partial rows in a fixed order into dweight and
dbias. No atomics. Offsets are int64 (rows * C may pass 2^31).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import to_storage as _to_storage

# Largest BLOCK_C: a row must fit in one program's registers.
MAX_BLOCK_C = 65536


@triton.jit
def layernorm_forward_kernel(
    y_ptr,         # (rows, C)
    h_ptr,         # (rows, C) residual + x, written when HAS_RESIDUAL
    mean_ptr,      # (rows,) float32
    rstd_ptr,      # (rows,) float32
    residual_ptr,  # (rows, C) read when HAS_RESIDUAL
    x_ptr,         # (rows, C)
    weight_ptr,    # (C,)
    bias_ptr,      # (C,)
    rows,
    C,
    eps,
    HAS_RESIDUAL: tl.constexpr,
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

    mean = tl.sum(x, axis=1) / C
    diff = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offsets, _to_storage(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row_ids, mean, mask=row_mask)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)


@triton.jit
def layernorm_backward_kernel(
    dx_ptr,       # (rows, C) dx, or dh = dh_out + dx when HAS_RESIDUAL
    partial_ptr,  # (2, num_partials, C) float32: [0] dweight, [1] dbias sums of each program
    dy_ptr,       # (rows, C)
    dh_out_ptr,   # (rows, C) gradient of the fused op's h output, read when HAS_RESIDUAL
    x_ptr,        # (rows, C) the normalized input (h for the fused op)
    weight_ptr,   # (C,)
    mean_ptr,     # (rows,) float32
    rstd_ptr,     # (rows,) float32
    rows,
    C,
    rows_per_program,
    num_partials,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # (BLOCK_ROWS, BLOCK_C): one running sum per row slot, summed over the slots at the end
    # (_common.column_sum_tile_rows says why)
    dweight = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)

    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    for row_start in range(row_begin, row_end, BLOCK_ROWS):
        row_ids = row_start + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # (BLOCK_ROWS,)
        row_mask = row_ids < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_ids[:, None] * C + cols[None, :]              # (BLOCK_ROWS, BLOCK_C)

        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_g_xhat = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_g_xhat[:, None])
        if HAS_RESIDUAL:
            dx += tl.load(dh_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, _to_storage(dx, dx_ptr.dtype.element_ty), mask=mask)

        dweight += dy * xhat
        dbias += dy  # masked elements are 0

    tl.store(partial_ptr + pid * C + cols, tl.sum(dweight, axis=0), mask=col_mask)
    tl.store(partial_ptr + (num_partials + pid) * C + cols, tl.sum(dbias, axis=0), mask=col_mask)


@triton.jit
def layernorm_reduce_partials_kernel(
    dweight_ptr,  # (C,)
    dbias_ptr,    # (C,)
    partial_ptr,  # (2, num_partials, C) float32
    num_partials,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < C
    dweight = tl.zeros((BLOCK_P, BLOCK_COLS), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_P, BLOCK_COLS), dtype=tl.float32)
    for p_start in range(0, num_partials, BLOCK_P):
        p = p_start + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = (p < num_partials)[:, None] & col_mask[None, :]
        dweight += tl.load(partial_ptr + p[:, None] * C + cols[None, :], mask=mask, other=0.0)
        dbias += tl.load(partial_ptr + (num_partials + p[:, None]) * C + cols[None, :], mask=mask, other=0.0)
    tl.store(dweight_ptr + cols, _to_storage(tl.sum(dweight, axis=0), dweight_ptr.dtype.element_ty), mask=col_mask)
    tl.store(dbias_ptr + cols, _to_storage(tl.sum(dbias, axis=0), dbias_ptr.dtype.element_ty), mask=col_mask)


# ---- launch configuration ----------------------------------------------------------------

def _block_c(C: int) -> int:
    block_c = triton.next_power_of_2(C)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"the triton layernorm takes C <= {MAX_BLOCK_C}; got C={C}")
    return block_c


# Row tiles and the backward's grid: _common's, shared with the RMSNorm kernels (kernels/rmsnorm.py).
_block_rows = _common.row_tile_rows
_num_warps = _common.row_tile_warps


def num_partials(rows: int, C: int, device: torch.device) -> int:
    """Programs (and scratch rows) of the backward: _common.row_programs."""
    return _common.row_programs(rows, _block_rows(rows, _block_c(C), device), device)


# ---- launchers -------------------------------------------------------------------------

def _forward(x, weight, bias, eps, residual):
    C = x.shape[-1]
    rows = x.numel() // C
    block_c = _block_c(C)
    block_rows = _block_rows(rows, block_c, x.device)
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        layernorm_forward_kernel[(triton.cdiv(rows, block_rows),)](
            y, h if h is not None else y, mean, rstd, residual if residual is not None else x, x, weight, bias,
            rows, C, eps, HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c,
            num_warps=_num_warps(block_rows, block_c), enable_fp_fusion=_common.FP_FUSION)
    return y, h, mean, rstd


def _backward(dy, dh_out, x, weight, mean, rstd):
    C = x.shape[-1]
    rows = x.numel() // C
    block_c = _block_c(C)
    partials = num_partials(rows, C, x.device)
    rows_per_program = max(1, triton.cdiv(rows, partials))
    block_rows = _common.column_sum_tile_rows(rows_per_program, block_c, x.device)
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    scratch = torch.empty((2, partials, C), device=x.device, dtype=torch.float32)
    layernorm_backward_kernel[(partials,)](
        dx, scratch, dy, dh_out if dh_out is not None else dy, x, weight, mean, rstd,
        rows, C, rows_per_program, partials, HAS_RESIDUAL=dh_out is not None, BLOCK_ROWS=block_rows,
        BLOCK_C=block_c, num_warps=_num_warps(block_rows, block_c), enable_fp_fusion=_common.FP_FUSION)
    # narrow column blocks: C = 768 gives 24 programs, each summing (num_partials, 32) floats
    block_cols = min(32, triton.next_power_of_2(C))
    layernorm_reduce_partials_kernel[(triton.cdiv(C, block_cols),)](
        dweight, dbias, scratch, partials, C, BLOCK_P=64, BLOCK_COLS=block_cols, num_warps=4,
        enable_fp_fusion=_common.FP_FUSION)
    return dx, dweight, dbias


def layernorm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(y, mean, rstd) for a contiguous x (..., C); mean, rstd: (rows,) float32."""
    y, _, mean, rstd = _forward(x, weight, bias, eps, None)
    return y, mean, rstd


def layernorm_backward(dy, x, weight, mean, rstd):
    """(dx, dweight, dbias); dy, x contiguous (..., C); dweight, dbias in weight's dtype."""
    return _backward(dy, None, x, weight, mean, rstd)


def fused_residual_layernorm_forward(residual, x, weight, bias, eps: float):
    """(h, y, mean, rstd) with h = residual + x and y = layernorm(h)."""
    y, h, mean, rstd = _forward(x, weight, bias, eps, residual)
    return h, y, mean, rstd


def fused_residual_layernorm_backward(dh_out, dy, h, weight, mean, rstd):
    """(dh, dweight, dbias) with dh = dh_out + LN-backward(dy), the gradient of residual and of x."""
    return _backward(dy, dh_out, h, weight, mean, rstd)
