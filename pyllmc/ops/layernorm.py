"""ops.layernorm and ops.fused_residual_layernorm: LayerNorm over the last dim C.

    layernorm(x, weight, bias, eps)                          -> y = (x - mean) * rstd * weight + bias
    fused_residual_layernorm(residual, x, weight, bias, eps) -> (h, layernorm(h)),  h = residual + x

The fused op reads residual and x once and writes h and y in one pass (GPT-2's block:
the residual stream and the next LayerNorm). Its backward gives residual and x the same
gradient dh = d(h) + LN-backward(dy).

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the ops survive torch.compile). The forward ops also return
mean and rstd, float32 (rows,), which the backward reuses. dweight and dbias are summed
over rows deterministically: per-block float32 partial sums in a scratch buffer allocated
here, then a fixed-order reduction. The "torch" backend is plain F.layer_norm, the
reference the tests compare against.

Layouts: x, residual, weight and bias may have any strides. The kernels take dense
(rows, C) rows (row r at r * C), so a non-contiguous tensor is copied to a contiguous one
first: one extra read and write of it (for weight / bias, C elements). The outputs are
contiguous and the gradients come back in each input's shape (through the copy's autograd).
Why a copy and not a row stride: only x's rows could use one (a view whose leading dims
collapse into one stride, last dim contiguous: x[:, -1], x[..., :C]); a transposed x (last
dim strided) needs the copy anyway. A row stride would have to reach the CUDA kernels'
128-bit row loads (alignment of every row start), both backward kernels (which read the
saved x again) and dx (written with x's strides), for layouts GPT-2 never produces, while
a copy costs one pass over x only when the caller asks for such a layout.
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
    multiprocessor_count,
    resolve_backend,
    triton_kernels,
    triton_launch,
)

# The Triton kernels keep a row of next_power_of_2(C) elements in one program.
TRITON_MAX_C = 65536
# The CUDA launchers take C as a 32-bit int.
CUDA_MAX_C = 2**31 - 1


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm of x (..., C) over its last dim; weight, bias (C,) of x's dtype.

    Any strides: a non-contiguous x (or weight, bias) is copied to a contiguous tensor first
    (one extra read + write of it); y is contiguous.
    """
    _check_inputs(x, weight, bias, eps)
    name = _resolve(backend, x)
    if name == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    y, _, _ = torch.ops.pyllmc.layernorm_forward(x, weight, bias, float(eps), name)
    return y


def fused_residual_layernorm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float = 1e-5, *,
                             backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, layernorm(h)) with h = residual + x; residual and x (..., C) of one shape, dtype, device.

    Any strides: each non-contiguous input is copied to a contiguous tensor first (one extra
    read + write of it); h and y are contiguous.
    """
    _check_inputs(x, weight, bias, eps)
    check_tensor("residual", residual, min_ndim=1, contiguous=False)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    check_same_dtype(x=x, residual=residual)
    check_same_device(x=x, residual=residual)
    name = _resolve(backend, x)
    if name == "torch":
        h = residual + x
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    residual, x, weight, bias = residual.contiguous(), x.contiguous(), weight.contiguous(), bias.contiguous()
    h, y, _, _ = torch.ops.pyllmc.fused_residual_layernorm_forward(residual, x, weight, bias, float(eps), name)
    return h, y


def _check_inputs(x, weight, bias, eps) -> None:
    check_tensor("x", x, min_ndim=1, contiguous=False)
    C = x.shape[-1]
    if C == 0:
        raise ValueError(f"x must have a last dim C >= 1; got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=1, contiguous=False)
    check_tensor("bias", bias, ndim=1, contiguous=False)
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape (C,) = ({C},), C being x's last dim; got {tuple(t.shape)}")
    check_same_dtype(x=x, weight=weight, bias=bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0; got {eps!r}")


def _resolve(backend: Optional[str], x: torch.Tensor) -> str:
    name = resolve_backend(backend, x.device)
    C = x.shape[-1]
    if name == "triton" and C > TRITON_MAX_C:
        raise ValueError(f"x's last dim must be <= {TRITON_MAX_C} on the triton backend; got {C}")
    if name == "cuda" and C > CUDA_MAX_C:
        raise ValueError(f"x's last dim must be <= {CUDA_MAX_C} on the cuda backend; got {C}")
    return name


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


# ---- raw kernel calls ------------------------------------------------------------------

def _dense(*tensors: torch.Tensor) -> tuple:
    """The tensors, each contiguous (a copy only for one that is not): the kernels' layout."""
    return tuple(t.contiguous() for t in tensors)


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of x's shape and dtype: the kernels' outputs (and their fakes)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def cuda_num_partials(rows: int, device: torch.device) -> int:
    """Blocks of the CUDA backward (= rows of its partial-sum scratch): two per SM fills the
    GPU with one wave; each block owns a contiguous range of rows."""
    return max(1, min(rows, 2 * multiprocessor_count(device)))


def _forward(x, weight, bias, eps: float, backend: str):
    """(y, mean, rstd)."""
    x, weight, bias = _dense(x, weight, bias)  # no-ops from the public ops, which copied already
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("layernorm").layernorm_forward(x, weight, bias, eps)
    x, weight, bias = aligned16(x), aligned16(weight), aligned16(bias)
    rows = _rows(x)
    y = torch.empty_like(x)
    mean, rstd = _stats_like(x), _stats_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().layernorm_forward(out=y.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr(),
                                     inp=x.data_ptr(), weight=weight.data_ptr(), bias=bias.data_ptr(),
                                     rows=rows, C=x.shape[-1], eps=eps, dtype=dtype_code(x), stream=stream)
    return y, mean, rstd


def _backward(dy, x, weight, mean, rstd, backend: str):
    """(dx, dweight, dbias)."""
    dy, x, weight = _dense(dy, x, weight)
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("layernorm").layernorm_backward(dy, x, weight, mean, rstd)
    dy, x, weight = aligned16(dy), aligned16(x), aligned16(weight)
    rows, C = _rows(x), x.shape[-1]
    partials = cuda_num_partials(rows, x.device)
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    scratch = torch.empty((2, partials, C), device=x.device, dtype=torch.float32)
    with cuda_launch(x) as stream:
        cuda_ext().layernorm_backward(dinp=dx.data_ptr(), dweight=dweight.data_ptr(), dbias=dbias.data_ptr(),
                                      scratch=scratch.data_ptr(), dout=dy.data_ptr(), inp=x.data_ptr(),
                                      weight=weight.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr(),
                                      rows=rows, C=C, num_partials=partials, dtype=dtype_code(x), stream=stream)
    return dx, dweight, dbias


def _fused_forward(residual, x, weight, bias, eps: float, backend: str):
    """(h, y, mean, rstd)."""
    residual, x, weight, bias = _dense(residual, x, weight, bias)
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("layernorm").fused_residual_layernorm_forward(residual, x, weight, bias, eps)
    residual, x, weight, bias = aligned16(residual), aligned16(x), aligned16(weight), aligned16(bias)
    rows = _rows(x)
    h = torch.empty_like(x)
    y = torch.empty_like(x)
    mean, rstd = _stats_like(x), _stats_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().fused_residual_layernorm_forward(h_out=h.data_ptr(), out=y.data_ptr(),
                                                    mean=mean.data_ptr(), rstd=rstd.data_ptr(),
                                                    residual=residual.data_ptr(), inp=x.data_ptr(),
                                                    weight=weight.data_ptr(), bias=bias.data_ptr(),
                                                    rows=rows, C=x.shape[-1], eps=eps, dtype=dtype_code(x),
                                                    stream=stream)
    return h, y, mean, rstd


def _fused_backward(dh_out, dy, h, weight, mean, rstd, backend: str):
    """(dh, dweight, dbias), dh the gradient of both residual and x."""
    dh_out, dy, h, weight = _dense(dh_out, dy, h, weight)
    if backend == "triton":
        with triton_launch(h):
            return triton_kernels("layernorm").fused_residual_layernorm_backward(dh_out, dy, h, weight, mean,
                                                                                 rstd)
    dh_out, dy, h, weight = aligned16(dh_out), aligned16(dy), aligned16(h), aligned16(weight)
    rows, C = _rows(h), h.shape[-1]
    partials = cuda_num_partials(rows, h.device)
    dh = torch.empty_like(h)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    scratch = torch.empty((2, partials, C), device=h.device, dtype=torch.float32)
    with cuda_launch(h) as stream:
        cuda_ext().fused_residual_layernorm_backward(dh=dh.data_ptr(), dweight=dweight.data_ptr(),
                                                     dbias=dbias.data_ptr(), scratch=scratch.data_ptr(),
                                                     dh_out=dh_out.data_ptr(), dout=dy.data_ptr(), h=h.data_ptr(),
                                                     weight=weight.data_ptr(), mean=mean.data_ptr(),
                                                     rstd=rstd.data_ptr(), rows=rows, C=C, num_partials=partials,
                                                     dtype=dtype_code(h), stream=stream)
    return dh, dweight, dbias


# ---- custom ops and autograd -------------------------------------------------------------

def _stats_like(x: torch.Tensor) -> torch.Tensor:
    """An empty float32 (rows,) tensor for x's per-row mean or rstd."""
    return x.new_empty((_rows(x),), dtype=torch.float32)


@torch.library.custom_op("pyllmc::layernorm_forward", mutates_args=())
def layernorm_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd float32 (rows,)."""
    return _forward(x, weight, bias, eps, backend)


@layernorm_forward_op.register_fake
def _(x, weight, bias, eps, backend):
    return _empty(x), _stats_like(x), _stats_like(x)


@torch.library.custom_op("pyllmc::layernorm_backward", mutates_args=())
def layernorm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias)."""
    return _backward(dy, x, weight, mean, rstd, backend)


@layernorm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, backend):
    return _empty(x), _empty(weight), _empty(weight)


@torch.library.custom_op("pyllmc::fused_residual_layernorm_forward", mutates_args=())
def fused_residual_layernorm_forward_op(
        residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, y, mean, rstd) with h = residual + x, y = layernorm(h)."""
    return _fused_forward(residual, x, weight, bias, eps, backend)


@fused_residual_layernorm_forward_op.register_fake
def _(residual, x, weight, bias, eps, backend):
    return _empty(x), _empty(x), _stats_like(x), _stats_like(x)


@torch.library.custom_op("pyllmc::fused_residual_layernorm_backward", mutates_args=())
def fused_residual_layernorm_backward_op(
        dh_out: torch.Tensor, dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
        rstd: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dweight, dbias)."""
    return _fused_backward(dh_out, dy, h, weight, mean, rstd, backend)


@fused_residual_layernorm_backward_op.register_fake
def _(dh_out, dy, h, weight, mean, rstd, backend):
    return _empty(h), _empty(weight), _empty(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _eps, backend = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.backend = backend


def _autograd_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    # dy from autograd can be a broadcast or transposed view; the kernels read it flat
    dx, dweight, dbias = layernorm_backward_op(dy.contiguous(), x, weight, mean, rstd, ctx.backend)
    return dx, dweight, dbias, None, None


layernorm_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _fused_setup_context(ctx, inputs, output):
    _residual, _x, weight, _bias, _eps, backend = inputs
    h, _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.backend = backend


def _fused_autograd_backward(ctx, dh_out, dy, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh, dweight, dbias = fused_residual_layernorm_backward_op(dh_out.contiguous(), dy.contiguous(), h, weight,
                                                              mean, rstd, ctx.backend)
    # h = residual + x: both get dh (autograd treats a gradient shared by two inputs like add's)
    return dh, dh, dweight, dbias, None, None


fused_residual_layernorm_forward_op.register_autograd(_fused_autograd_backward, setup_context=_fused_setup_context)
