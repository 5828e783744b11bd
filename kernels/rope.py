"""Rotary position embedding (RoPE) in Triton, forward and backward, as csrc/rope.cu.

    x (B, T, H, D), D even, half = D / 2; position p = start + t; cos, sin: (rows, half) float32 tables
    x1 = x[..., :half], x2 = x[..., half:]                       ("rotate halves": Hugging Face, nanochat)
    out1 = x1 cos[p] - x2 sin[p],   out2 = x1 sin[p] + x2 cos[p]
    dx1 = dy1 cos[p] + dy2 sin[p],  dx2 = -dy1 sin[p] + dy2 cos[p]   (the inverse rotation)

The backward is the forward with sin negated: both kernels run _rope_tile with the sign of sin a
constexpr. x is read where it is (any strides on B, T, H, the last dim contiguous: q and k as views of
the packed qkv projection); out is written with its own strides (a fresh contiguous tensor from the
ops layer). One program per (token, block of heads): the table rows of position start + t are loaded
once, (BLOCK_HALF,), and broadcast over the program's (BLOCK_H, BLOCK_HALF) tile of x1 and x2; loads
in the storage dtype, float32 math, one rounding to the storage dtype (_common.to_storage). Offsets are
int64 (program ids cast before they multiply a stride).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import to_storage as _to_storage

MAX_TILE = 4096  # elements of x1 per program (and as many of x2): BLOCK_H * BLOCK_HALF


@triton.jit
def _rope_tile(
    out_ptr,   # (B, T, H, D), strides out_sb, out_st, out_sh, 1
    inp_ptr,   # (B, T, H, D), strides inp_sb, inp_st, inp_sh, 1
    cos_ptr,   # (rows, half) float32, contiguous
    sin_ptr,   # (rows, half) float32, contiguous
    T, H, half, start,
    out_sb, out_st, out_sh, inp_sb, inp_st, inp_sh,
    SIN_SIGN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # b * T + t
    b = token // T
    t = token - b * T
    heads = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    pairs = tl.arange(0, BLOCK_HALF)                                          # (BLOCK_HALF,)
    pair_mask = pairs < half
    table = (start + t) * half + pairs
    c = tl.load(cos_ptr + table, mask=pair_mask, other=0.0)[None, :]
    s = SIN_SIGN * tl.load(sin_ptr + table, mask=pair_mask, other=0.0)[None, :]
    mask = (heads < H)[:, None] & pair_mask[None, :]
    x1_ptrs = inp_ptr + b * inp_sb + t * inp_st + heads[:, None] * inp_sh + pairs[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x1 * s + x2 * c
    o1_ptrs = out_ptr + b * out_sb + t * out_st + heads[:, None] * out_sh + pairs[None, :]
    tl.store(o1_ptrs, _to_storage(y1, out_ptr.dtype.element_ty), mask=mask)
    tl.store(o1_ptrs + half, _to_storage(y2, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_forward_kernel(
    out_ptr, inp_ptr, cos_ptr, sin_ptr,
    T, H, half, start,
    out_sb, out_st, out_sh, inp_sb, inp_st, inp_sh,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    _rope_tile(out_ptr, inp_ptr, cos_ptr, sin_ptr, T, H, half, start, out_sb, out_st, out_sh, inp_sb, inp_st, inp_sh,
               1.0, BLOCK_H, BLOCK_HALF)


@triton.jit
def rope_backward_kernel(
    dinp_ptr, dout_ptr, cos_ptr, sin_ptr,
    T, H, half, start,
    dinp_sb, dinp_st, dinp_sh, dout_sb, dout_st, dout_sh,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    _rope_tile(dinp_ptr, dout_ptr, cos_ptr, sin_ptr, T, H, half, start, dinp_sb, dinp_st, dinp_sh, dout_sb, dout_st,
               dout_sh, -1.0, BLOCK_H, BLOCK_HALF)


def _launch(kernel, out: torch.Tensor, inp: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> None:
    B, T, H, D = inp.shape
    half = D // 2
    if not (B and T and H and half):
        return
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(H), MAX_TILE // block_half))
    # warps so that each thread holds 16 bytes of x1 (and of x2): one 128-bit access each, not two
    # 64-bit ones (Llama 2 110M's bf16 tile, 16 x 32, takes 2 warps)
    tile_bytes = block_h * block_half * inp.element_size()
    num_warps = max(1, min(8, tile_bytes // (16 * 32)))
    grid = (B * T, triton.cdiv(H, block_h))
    kernel[grid](out, inp, cos, sin, T, H, half, start, *out.stride()[:3], *inp.stride()[:3],
                 BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps, enable_fp_fusion=_common.FP_FUSION)


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, start: int = 0) -> None:
    """out = x rotated by the angles of positions start..start+T-1. x, out (B, T, H, D), the last dim
    contiguous, any other strides (out's rows must not overlap); cos, sin (rows, D / 2) float32 contiguous."""
    _launch(rope_forward_kernel, out, x, cos, sin, start)


def rope_backward(dout: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dx: torch.Tensor, start: int = 0) -> None:
    """dx = dout rotated back (the inverse rotation); shapes as rope_forward's."""
    _launch(rope_backward_kernel, dx, dout, cos, sin, start)
