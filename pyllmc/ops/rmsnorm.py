"""ops.rmsnorm and ops.fused_residual_rmsnorm: RMSNorm over the last dim C (Llama's norm).

    rmsnorm(x, weight=None, eps)                          -> y = x * rstd * weight,  rstd = 1 / sqrt(mean(x^2) + eps)
    fused_residual_rmsnorm(residual, x, weight=None, eps) -> (h, rmsnorm(h)),  h = residual + x

The semantics of torch.nn.functional.rms_norm(x, (C,), weight, eps). weight=None is RMSNorm
without a gain (nanochat's norm, also its QK-norm over the head dim: C = 64 or 128, many rows).
The fused op reads residual and x once and writes h and y in one pass (a pre-norm block's
residual stream and its next norm); its backward gives residual and x the same gradient
dh = d(h) + RMS-backward(dy).

eps. The default is 1e-6 (Llama 1's norm_eps); pass the model's own: Llama 2 and 3 use 1e-5 (their
configurations' rms_norm_eps, also llama2.c's), nanochat calls F.rms_norm without one, i.e.
torch.finfo(x.dtype).eps (1.19e-7 for float32: the dtype these kernels compute in; 7.8e-3 if its
bf16 activations set it). F.rms_norm's eps=None is not taken here: the kernels compute in float32
whatever the storage dtype, so a dtype-dependent eps would be a surprise; eps is explicit.

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the ops survive torch.compile), as pyllmc/ops/layernorm.py. The forward
ops also return rstd, float32 (rows,), which the backward reuses. dweight is summed over rows
deterministically: per-block float32 partial sums in a scratch buffer allocated here, then a
fixed-order reduction. Without a weight the custom ops return an empty (0,) dweight (a custom op
returns tensors, never None) and autograd gets None. The "torch" backend is plain F.rms_norm, the
reference the tests compare against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    aligned16,
    check_same_device,
    check_same_dtype,
    check_tensor,
    cuda_ext,
    cuda_launch,
    dtype_code,
    triton_kernels,
    triton_launch,
)
# LayerNorm's row limits per backend and its row count: RMSNorm runs on the same row tiles
from .layernorm import _resolve, _rows, cuda_num_partials

DEFAULT_EPS = 1e-6


def rmsnorm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = DEFAULT_EPS, *,
            backend: Optional[str] = None) -> torch.Tensor:
    """RMSNorm of x (..., C) over its last dim; weight (C,) of x's dtype, or None (no gain).

    Any strides: a non-contiguous x (or weight) is copied to a contiguous tensor first (one extra
    read + write of it), as ops.layernorm does; y is contiguous."""
    _check_inputs(x, weight, eps)
    name = _resolve(backend, x)
    if name == "torch":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # the copies are ordinary autograd ops: the gradients come back in the inputs' own layouts
    x, weight = x.contiguous(), None if weight is None else weight.contiguous()
    y, _ = torch.ops.pyllmc.rmsnorm_forward(x, weight, float(eps), name)
    return y


def fused_residual_rmsnorm(residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                           eps: float = DEFAULT_EPS, *,
                           backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rmsnorm(h)) with h = residual + x; residual and x (..., C) of one shape, dtype, device.
    Any strides: each non-contiguous input is copied to a contiguous tensor first (one extra read +
    write of it); h and y are contiguous."""
    _check_inputs(x, weight, eps)
    check_tensor("residual", residual, min_ndim=1, contiguous=False)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    check_same_dtype(x=x, residual=residual)
    check_same_device(x=x, residual=residual)
    name = _resolve(backend, x)
    if name == "torch":
        h = residual + x
        return h, F.rms_norm(h, (h.shape[-1],), weight, eps)
    residual, x, weight = residual.contiguous(), x.contiguous(), None if weight is None else weight.contiguous()
    h, y, _ = torch.ops.pyllmc.fused_residual_rmsnorm_forward(residual, x, weight, float(eps), name)
    return h, y


def _check_inputs(x, weight, eps) -> None:
    check_tensor("x", x, min_ndim=1, contiguous=False)
    C = x.shape[-1]
    if C == 0:
        raise ValueError(f"x must have a last dim C >= 1; got shape {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, contiguous=False)
        if weight.shape[0] != C:
            raise ValueError(f"weight must have shape (C,) = ({C},), C being x's last dim; got {tuple(weight.shape)}")
        check_same_dtype(x=x, weight=weight)
        check_same_device(x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0; got {eps!r}")


def _ptr(t: Optional[torch.Tensor]) -> int:
    """The data pointer, 0 (null) for an absent weight / dweight / scratch."""
    return 0 if t is None else t.data_ptr()


# ---- raw kernel calls ------------------------------------------------------------------

def _forward(x, weight, eps: float, backend: str):
    """(y, rstd)."""
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("rmsnorm").rmsnorm_forward(x, weight, eps)
    x = aligned16(x)
    weight = aligned16(weight) if weight is not None else None
    y = torch.empty_like(x)
    rstd = _stats_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().rmsnorm_forward(out=y.data_ptr(), rstd=rstd.data_ptr(), inp=x.data_ptr(), weight=_ptr(weight),
                                   rows=_rows(x), C=x.shape[-1], eps=eps, dtype=dtype_code(x), stream=stream)
    return y, rstd


def _cuda_backward_buffers(x, weight):
    """(dx, dweight, scratch, num_partials): dweight and scratch None without a weight."""
    rows, C = _rows(x), x.shape[-1]
    partials = cuda_num_partials(rows, x.device)
    dx = torch.empty_like(x)
    if weight is None:
        return dx, None, None, partials
    scratch = torch.empty((partials, C), device=x.device, dtype=torch.float32)
    return dx, torch.empty_like(weight), scratch, partials


def _backward(dy, x, weight, rstd, backend: str):
    """(dx, dweight or None)."""
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("rmsnorm").rmsnorm_backward(dy, x, weight, rstd)
    dy, x = aligned16(dy), aligned16(x)
    weight = aligned16(weight) if weight is not None else None
    dx, dweight, scratch, partials = _cuda_backward_buffers(x, weight)
    with cuda_launch(x) as stream:
        cuda_ext().rmsnorm_backward(dinp=dx.data_ptr(), dweight=_ptr(dweight), scratch=_ptr(scratch),
                                    dout=dy.data_ptr(), inp=x.data_ptr(), weight=_ptr(weight), rstd=rstd.data_ptr(),
                                    rows=_rows(x), C=x.shape[-1], num_partials=partials, dtype=dtype_code(x),
                                    stream=stream)
    return dx, dweight


def _fused_forward(residual, x, weight, eps: float, backend: str):
    """(h, y, rstd)."""
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("rmsnorm").fused_residual_rmsnorm_forward(residual, x, weight, eps)
    residual, x = aligned16(residual), aligned16(x)
    weight = aligned16(weight) if weight is not None else None
    h = torch.empty_like(x)
    y = torch.empty_like(x)
    rstd = _stats_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().fused_residual_rmsnorm_forward(h_out=h.data_ptr(), out=y.data_ptr(), rstd=rstd.data_ptr(),
                                                  residual=residual.data_ptr(), inp=x.data_ptr(),
                                                  weight=_ptr(weight), rows=_rows(x), C=x.shape[-1], eps=eps,
                                                  dtype=dtype_code(x), stream=stream)
    return h, y, rstd


def _fused_backward(dh_out, dy, h, weight, rstd, backend: str):
    """(dh, dweight or None), dh the gradient of both residual and x."""
    if backend == "triton":
        with triton_launch(h):
            return triton_kernels("rmsnorm").fused_residual_rmsnorm_backward(dh_out, dy, h, weight, rstd)
    dh_out, dy, h = aligned16(dh_out), aligned16(dy), aligned16(h)
    weight = aligned16(weight) if weight is not None else None
    dh, dweight, scratch, partials = _cuda_backward_buffers(h, weight)
    with cuda_launch(h) as stream:
        cuda_ext().fused_residual_rmsnorm_backward(dh=dh.data_ptr(), dweight=_ptr(dweight), scratch=_ptr(scratch),
                                                   dh_out=dh_out.data_ptr(), dout=dy.data_ptr(), h=h.data_ptr(),
                                                   weight=_ptr(weight), rstd=rstd.data_ptr(), rows=_rows(h),
                                                   C=h.shape[-1], num_partials=partials, dtype=dtype_code(h),
                                                   stream=stream)
    return dh, dweight


# ---- custom ops and autograd -------------------------------------------------------------

def _stats_like(x: torch.Tensor) -> torch.Tensor:
    """An empty float32 (rows,) tensor for x's per-row rstd."""
    return x.new_empty((_rows(x),), dtype=torch.float32)


def _dweight_like(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The custom ops' dweight: weight-shaped, or (0,) of x's dtype without a weight."""
    return torch.empty_like(weight) if weight is not None else x.new_empty((0,))


@torch.library.custom_op("pyllmc::rmsnorm_forward", mutates_args=())
def rmsnorm_forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd); rstd float32 (rows,)."""
    return _forward(x, weight, eps, backend)


@rmsnorm_forward_op.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x), _stats_like(x)


@torch.library.custom_op("pyllmc::rmsnorm_backward", mutates_args=())
def rmsnorm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight (0,) without a weight."""
    dx, dweight = _backward(dy, x, weight, rstd, backend)
    return dx, dweight if dweight is not None else _dweight_like(x, None)


@rmsnorm_backward_op.register_fake
def _(dy, x, weight, rstd, backend):
    return torch.empty_like(x), _dweight_like(x, weight)


@torch.library.custom_op("pyllmc::fused_residual_rmsnorm_forward", mutates_args=())
def fused_residual_rmsnorm_forward_op(
        residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, y, rstd) with h = residual + x, y = rmsnorm(h)."""
    return _fused_forward(residual, x, weight, eps, backend)


@fused_residual_rmsnorm_forward_op.register_fake
def _(residual, x, weight, eps, backend):
    return torch.empty_like(x), torch.empty_like(x), _stats_like(x)


@torch.library.custom_op("pyllmc::fused_residual_rmsnorm_backward", mutates_args=())
def fused_residual_rmsnorm_backward_op(
        dh_out: torch.Tensor, dy: torch.Tensor, h: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dweight); dweight (0,) without a weight."""
    dh, dweight = _fused_backward(dh_out, dy, h, weight, rstd, backend)
    return dh, dweight if dweight is not None else _dweight_like(h, None)


@fused_residual_rmsnorm_backward_op.register_fake
def _(dh_out, dy, h, weight, rstd, backend):
    return torch.empty_like(h), _dweight_like(h, weight)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, backend = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend


def _autograd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    # dy from autograd can be a broadcast or transposed view; the kernels read it flat
    dx, dweight = rmsnorm_backward_op(dy.contiguous(), x, weight, rstd, ctx.backend)
    return dx, (dweight if weight is not None else None), None, None


rmsnorm_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _fused_setup_context(ctx, inputs, output):
    _residual, _x, weight, _eps, backend = inputs
    h, _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h, weight, rstd)
    ctx.backend = backend


def _fused_autograd_backward(ctx, dh_out, dy, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh, dweight = fused_residual_rmsnorm_backward_op(dh_out.contiguous(), dy.contiguous(), h, weight, rstd,
                                                     ctx.backend)
    # h = residual + x: both get dh (autograd treats a gradient shared by two inputs like add's)
    return dh, dh, (dweight if weight is not None else None), None, None


fused_residual_rmsnorm_forward_op.register_autograd(_fused_autograd_backward, setup_context=_fused_setup_context)
