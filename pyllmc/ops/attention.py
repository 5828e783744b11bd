"""ops.attention: causal multi-head self-attention, softmax(Q K^T / sqrt(D) + causal mask) V.

Input checks, then the raw kernel calls per backend, then the custom op + autograd glue
(torch.library.custom_op so the op survives torch.compile), as in pyllmc/ops/gelu.py. The
forward custom op returns (out, lse); lse (B, H, T) float32, the natural-log log-sum-exp of
each row of scaled scores, is what the backward needs to recompute P tile by tile. The
"torch" backend is plain math in float32 (it builds the T x T score matrix): the reference.

Layout: q, k, v are (B, H, T, D) and may be strided views, as GPT-2's qkv split gives
(qkv.view(B, T, 3, H, D) -> q = qkv[:, :, 0].transpose(1, 2) has stride 3C along T). The
Triton kernels read any strides, so the model makes no copy before attention. The CUDA
kernels take contiguous tensors: the cuda backend calls .contiguous() (a copy only for
strided inputs). The output is always a new contiguous (B, H, T, D) tensor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    _dtype_names,
    aligned16,
    check_same_device,
    check_same_dtype,
    check_tensor,
    cuda_ext,
    cuda_launch,
    dtype_code,
    resolve_backend,
    triton_kernels,
)

# The head dims each backend takes, per dtype: the one table that the checks and the error
# messages read. None: any head dim. (The CUDA kernels specialise on D; their float32 path
# is a slower, simpler one that also takes D = 32. The Triton kernels take powers of two
# from 16 to 128, in every dtype.)
SUPPORTED_HEAD_DIMS: dict[str, Optional[dict[torch.dtype, tuple[int, ...]]]] = {
    "cuda": {torch.float32: (32, 64, 128), torch.bfloat16: (64, 128), torch.float16: (64, 128)},
    "triton": {torch.float32: (16, 32, 64, 128), torch.bfloat16: (16, 32, 64, 128), torch.float16: (16, 32, 64, 128)},
    "torch": None,
}


def supports_head_dim(backend: str, head_dim: int, dtype: torch.dtype) -> bool:
    table = SUPPORTED_HEAD_DIMS[backend]
    return table is None or head_dim in table.get(dtype, ())


def backends_for_head_dim(head_dim: int, dtype: torch.dtype) -> list[str]:
    """The backends (available here or not) whose kernels take head dim `head_dim` in `dtype`."""
    return [name for name in SUPPORTED_HEAD_DIMS if supports_head_dim(name, head_dim, dtype)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, T, D), scale 1/sqrt(D) -> (B, H, T, D) in q's dtype.

    float32 / bfloat16 / float16; q, k, v of one shape, dtype and device; any strides.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, contiguous=False)
    check_same_dtype(q=q, k=k, v=v)
    device = check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape (B, H, T, D) = {tuple(q.shape)}; got {tuple(t.shape)}")
    head_dim = q.shape[3]
    name = resolve_backend(backend, device)
    if not supports_head_dim(name, head_dim, q.dtype):
        table = SUPPORTED_HEAD_DIMS[name]
        raise ValueError(
            f"q: head dim D={head_dim} is not supported by backend {name!r} for {_dtype_names([q.dtype])} "
            f"(it takes D in {table[q.dtype] if q.dtype in table else ()}); backends that take D={head_dim}: "
            f"{', '.join(backends_for_head_dim(head_dim, q.dtype))}")
    if name == "torch":
        return attention_reference(q, k, v).to(q.dtype)
    out, _ = torch.ops.pyllmc.attention_forward(q, k, v, name)
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain math causal attention computed in `compute_dtype` (result in compute_dtype).

    Builds the (B, H, T, T) scores: the reference the kernels are tested against, not a
    fast path. Differentiable with ordinary autograd.
    """
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    T, D = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention (F.scaled_dot_product_attention, causal): the speed baseline.
    Which SDPA kernel runs is chosen by torch (or by torch.nn.attention.sdpa_kernel)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---- raw kernel calls ------------------------------------------------------------------

def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    if backend == "triton":
        return triton_kernels("attention").attention_forward(q, k, v)
    q, k, v = (aligned16(t.contiguous()) for t in (q, k, v))
    B, H, T, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel():
        with cuda_launch(q) as stream:
            cuda_ext().attention_forward(out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                         B, H, T, D, dtype_code(q), stream)
    return out, lse


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, backend: str):
    if backend == "triton":
        return triton_kernels("attention").attention_backward(dout, q, k, v, out, lse)
    dout, q, k, v, out = (aligned16(t.contiguous()) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    B, H, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # the kernel's rowsum(dout * out)
    if dq.numel():
        with cuda_launch(q) as stream:
            cuda_ext().attention_backward(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr(),
                                          dout.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                          q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                          B, H, T, D, dtype_code(q), stream)
    return dq, dk, dv


# ---- custom ops and autograd -------------------------------------------------------------

def _new_like(q: torch.Tensor) -> torch.Tensor:
    # the kernels always write fresh contiguous tensors, whatever q's strides
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("pyllmc::attention_forward", mutates_args=())
def attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, backend)


@attention_forward_op.register_fake
def _(q, k, v, backend):
    B, H, T, _ = q.shape
    return _new_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("pyllmc::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, out, lse, backend)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, backend):
    return _new_like(q), _new_like(q), _new_like(q)


def _setup_context(ctx, inputs, output):
    q, k, v, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.backend = backend
    # lse is a by-product for the backward; ops.attention never returns it
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, ctx.backend)
    return dq, dk, dv, None


attention_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
