"""GELU (GPT-2's tanh approximation) in Triton, forward and backward.

    gelu(x)  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
    gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

A flat elementwise op: each program takes BLOCK_SIZE contiguous elements, loads them in
their storage dtype, computes in float32 and stores in the storage dtype.
"""

import torch
import triton
import triton.language as tl

from . import _common

BLOCK_SIZE = 1024


@triton.jit
def _inner(x):
    # u = sqrt(2/pi) * (x + 0.044715 x^3). The constants are literals: a @triton.jit function
    # may not read a plain Python global on the GPU (the interpreter allows it), and a
    # tl.constexpr global does not mix with tensors under the interpreter.
    return 0.7978845608028654 * (x + 0.044715 * x * x * x)


@triton.jit
def _du_dx(x):
    return 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)


@triton.jit
def _one_plus_tanh_and_sech2(u):
    # 1 + tanh(u) and 1 - tanh(u)^2 from e = exp(-2|u|), in (0, 1]:
    #   u >= 0: 1 + tanh = 2 / (1 + e),  u < 0: 1 + tanh = 2e / (1 + e),  1 - tanh^2 = 4e / (1 + e)^2.
    # No cancellation for large |u| (unlike 1 + tanh(u) with tanh(u) ~ -1), so the result
    # keeps float32's relative accuracy in the far negative tail; and it needs only exp,
    # which runs the same under the CPU interpreter.
    e = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + e)
    one_plus_tanh = tl.where(u >= 0, 2.0 * inv, 2.0 * e * inv)
    sech2 = 4.0 * e * inv * inv
    return one_plus_tanh, sech2


@triton.jit
def gelu_forward_kernel(
    out_ptr,  # (n,)
    inp_ptr,  # (n,)
    n,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    one_plus_tanh, _ = _one_plus_tanh_and_sech2(_inner(x))
    y = 0.5 * x * one_plus_tanh
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gelu_backward_kernel(
    dinp_ptr,  # (n,)
    inp_ptr,   # (n,)
    dout_ptr,  # (n,)
    n,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    one_plus_tanh, sech2 = _one_plus_tanh_and_sech2(_inner(x))
    dx = dy * (0.5 * one_plus_tanh + 0.5 * x * sech2 * _du_dx(x))
    tl.store(dinp_ptr + offsets, dx.to(dinp_ptr.dtype.element_ty), mask=mask)


def gelu_forward(x: torch.Tensor) -> torch.Tensor:
    """gelu(x) for an x of any shape whose elements fill one dense block of memory (contiguous, or
    a permutation of it): the kernel runs over the block flat; the output has x's strides."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        gelu_forward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](out, x, n, BLOCK_SIZE=BLOCK_SIZE,
                                                           enable_fp_fusion=_common.FP_FUSION)
    return out


def gelu_backward(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """dL/dx = dout * gelu'(x); x dense in memory (as in gelu_forward), dout with x's strides."""
    dinp = torch.empty_like(x)
    n = x.numel()
    if n:
        gelu_backward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dinp, x, dout, n, BLOCK_SIZE=BLOCK_SIZE,
                                                            enable_fp_fusion=_common.FP_FUSION)
    return dinp
