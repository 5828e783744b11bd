"""The gated MLP activations in Triton, forward and backward: Llama's SwiGLU and nanochat's relu^2.

    swiglu(a, b) = silu(a) * b,  silu(a) = a s,  s = sigmoid(a) = 1 / (1 + exp(-a))
    da = dout * b * silu'(a),    silu'(a) = s + a s (1 - s) = s (1 + a (1 - s))
    db = dout * silu(a)
    relu2(x) = relu(x)^2,        dx = dout * 2 relu(x)

s and 1 - s come from e = exp(-|a|) in (0, 1] (a >= 0: s = 1 / (1 + e), 1 - s = e / (1 + e); a < 0
the two swap): exp never overflows at any |a|, and 1 - s keeps float32's relative accuracy where s
rounds to 1. As csrc/swiglu.cu.

swiglu's operands are (rows, cols) matrices, the last dim contiguous, each with its own row stride:
a and b may be the halves [a | b] of one (rows, 2 cols) tensor (one fused w1|w3 matmul's output),
read in place, and the backward writes da and db into the halves of one (rows, 2 cols) buffer.
Contiguous operands (every stride == cols) are launched as one row of rows * cols. Each program
takes BLOCK_SIZE contiguous elements of one row (program id -> row, block of the row: one division
per program, no loop), loads in the storage dtype, computes in float32 and rounds once to the
storage dtype (_common.to_storage). relu2 is a flat op like gelu.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import to_storage as _to_storage

BLOCK_SIZE = 1024


@triton.jit
def _sigmoid_and_complement(a):
    # s = sigmoid(a) and 1 - s from e = exp(-|a|): no overflow, no cancellation in 1 - s
    e = tl.exp(-tl.abs(a))
    inv = 1.0 / (1.0 + e)
    s = tl.where(a >= 0, inv, e * inv)
    one_minus_s = tl.where(a >= 0, e * inv, inv)
    return s, one_minus_s


@triton.jit
def swiglu_forward_kernel(
    out_ptr,  # (rows, cols), row stride out_stride
    a_ptr,    # (rows, cols), row stride a_stride
    b_ptr,    # (rows, cols), row stride b_stride
    cols,
    out_stride, a_stride, b_stride,
    blocks_per_row,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    cols_here = (pid - row * blocks_per_row) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols_here < cols
    a = tl.load(a_ptr + row * a_stride + cols_here, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_stride + cols_here, mask=mask, other=0.0).to(tl.float32)
    s, _ = _sigmoid_and_complement(a)
    y = a * s * b
    tl.store(out_ptr + row * out_stride + cols_here, _to_storage(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(
    da_ptr,    # (rows, cols), row stride da_stride
    db_ptr,    # (rows, cols), row stride db_stride
    dout_ptr,  # (rows, cols), row stride dout_stride
    a_ptr,     # (rows, cols), row stride a_stride
    b_ptr,     # (rows, cols), row stride b_stride
    cols,
    da_stride, db_stride, dout_stride, a_stride, b_stride,
    blocks_per_row,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    cols_here = (pid - row * blocks_per_row) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols_here < cols
    dy = tl.load(dout_ptr + row * dout_stride + cols_here, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row * a_stride + cols_here, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_stride + cols_here, mask=mask, other=0.0).to(tl.float32)
    s, one_minus_s = _sigmoid_and_complement(a)
    da = dy * b * (s * (1.0 + a * one_minus_s))
    db = dy * (a * s)
    tl.store(da_ptr + row * da_stride + cols_here, _to_storage(da, da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + row * db_stride + cols_here, _to_storage(db, db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu2_forward_kernel(
    out_ptr,  # (n,)
    inp_ptr,  # (n,)
    n,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    r = tl.maximum(tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + offsets, _to_storage(r * r, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu2_backward_kernel(
    dinp_ptr,  # (n,)
    inp_ptr,   # (n,)
    dout_ptr,  # (n,)
    n,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    r = tl.maximum(tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
    dy = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dinp_ptr + offsets, _to_storage(dy * (2.0 * r), dinp_ptr.dtype.element_ty), mask=mask)


def _launch_shape(rows: int, cols: int, *tensors: torch.Tensor) -> tuple[int, int, list[int]]:
    """(rows, cols, row strides) to launch with: contiguous operands (every row stride == cols) as one
    row of rows * cols, so that a row's partial last block is paid once, not per row."""
    strides = [t.stride(0) for t in tensors]
    if rows > 1 and all(s == cols for s in strides):
        return 1, rows * cols, [rows * cols] * len(tensors)
    return rows, cols, strides


def swiglu_forward(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = silu(a) * b; a, b, out (rows, cols) with the last dim contiguous, any row strides >= cols."""
    rows, cols, strides = _launch_shape(*out.shape, out, a, b)
    if rows and cols:
        blocks_per_row = triton.cdiv(cols, BLOCK_SIZE)
        swiglu_forward_kernel[(rows * blocks_per_row,)](out, a, b, cols, *strides, blocks_per_row,
                                                        BLOCK_SIZE=BLOCK_SIZE, enable_fp_fusion=_common.FP_FUSION)
    return out


def swiglu_backward(dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor, da: torch.Tensor,
                    db: torch.Tensor) -> None:
    """da = dout * b * silu'(a), db = dout * silu(a); all (rows, cols) like swiglu_forward's."""
    rows, cols, strides = _launch_shape(*da.shape, da, db, dout, a, b)
    if rows and cols:
        blocks_per_row = triton.cdiv(cols, BLOCK_SIZE)
        swiglu_backward_kernel[(rows * blocks_per_row,)](da, db, dout, a, b, cols, *strides, blocks_per_row,
                                                         BLOCK_SIZE=BLOCK_SIZE, enable_fp_fusion=_common.FP_FUSION)


def relu2_forward(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 for a contiguous x of any shape."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        relu2_forward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](out, x, n, BLOCK_SIZE=BLOCK_SIZE,
                                                            enable_fp_fusion=_common.FP_FUSION)
    return out


def relu2_backward(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """dL/dx = dout * 2 relu(x); x and dout contiguous, same shape."""
    dinp = torch.empty_like(x)
    n = x.numel()
    if n:
        relu2_backward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dinp, x, dout, n, BLOCK_SIZE=BLOCK_SIZE,
                                                             enable_fp_fusion=_common.FP_FUSION)
    return dinp
