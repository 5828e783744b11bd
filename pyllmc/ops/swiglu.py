"""ops.swiglu, ops.swiglu_packed and ops.relu2: the gated MLP activations.

    swiglu(a, b) = silu(a) * b          Llama's MLP: w2(silu(w1 x) * w3 x)
    swiglu_packed(x) = swiglu(x[..., :H], x[..., H:])   x = x @ [w1 | w3]^T, one matmul
    relu2(x) = relu(x)^2                nanochat's MLP

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the ops survive torch.compile), as in pyllmc/ops/gelu.py. The "torch"
backend is plain F.silu(a) * b and F.relu(x).square(), the reference the tests compare against.

Two entry points on the same kernels (as ops.attention and ops.qkv_attention): the kernels read
(rows, H) operands with any row stride and the last dim contiguous, and write the gradients the
same way.
- swiglu(a, b): two tensors of one shape (..., H), any layout. A view whose rows are evenly spaced
  with the last dim contiguous (the halves of a packed tensor, `a, b = x.chunk(2, -1)`) is read in
  place; any other layout is copied first. Returns (..., H) contiguous; the gradients are two
  contiguous (..., H) tensors.
- swiglu_packed(x): the output x (..., 2H) of one fused w1|w3 matmul, read in place; returns
  (..., H). Its gradient is one (..., 2H) buffer, da and db written straight into its halves by the
  backward kernel, which the fused matmul's backward then reads as it is.

Why the packed form (bytes at B*T = N rows, s bytes per element; bf16 s = 2). Forward: both read
a and b and write the output, 3 N H s, whether a and b are two tensors or the halves of one (views
are taken in place; copying the halves first would add 4 N H s). Backward: the kernel reads dout,
a, b and writes da, db: 5 N H s either way. But after swiglu(*x.chunk(2, -1)) autograd's backward
of chunk concatenates da and db into the gradient of x, one more copy: reads 2 N H s and writes
2 N H s, 9 N H s in all and a second launch. swiglu_packed's gradient is that tensor already: 5 N H
s, 44% fewer bytes in the backward (the writes into one buffer are what saves it: torch's chunk
backward copies even when da and db are views of one buffer, so swiglu(a, b) gains nothing by
writing them so, and writes two fresh tensors). Beside the activation, the packed form lets the
model run one (N, C) x (C, 2H) matmul instead of two, and one for each of its gradients.

relu2 is GELU's sibling: a flat elementwise op on a contiguous tensor (others are copied first).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import check_same_device, check_same_dtype, check_tensor, cuda_ext, cuda_launch, dtype_code, \
    resolve_backend, triton_kernels, triton_launch


def swiglu(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """silu(a) * b for a, b of one shape, float32 / bfloat16 / float16, any layout (see the module's doc)."""
    check_tensor("a", a, contiguous=False)
    check_tensor("b", b, contiguous=False)
    check_same_dtype(a=a, b=b)
    device = check_same_device(a=a, b=b)
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}; got {tuple(b.shape)}")
    name = resolve_backend(backend, device)
    if name == "torch":
        return F.silu(a) * b
    return torch.ops.pyllmc.swiglu_forward(a, b, name)


def swiglu_packed(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """swiglu(x[..., :H], x[..., H:]) of x (..., 2H), float32 / bfloat16 / float16, the last dim
    contiguous -> (..., H). The gradient of x is one (..., 2H) buffer (see the module's doc)."""
    check_tensor("x", x, min_ndim=1, contiguous=False)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (the halves a | b); got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have stride 1 along its last dim; got strides {x.stride()}")
    name = resolve_backend(backend, x.device)
    if name == "torch":
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b
    return torch.ops.pyllmc.swiglu_packed_forward(x, name)


def relu2(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """relu(x)^2 of x, any shape, float32 / bfloat16 / float16, any strides: a non-contiguous x is
    copied to a contiguous tensor first (one extra read + write of x); the result is contiguous."""
    check_tensor("x", x, contiguous=False)
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return F.relu(x).square()
    return torch.ops.pyllmc.relu2_forward(x.contiguous(), name)  # the copy's autograd gives x's layout back


# ---- layouts ---------------------------------------------------------------------------

def _matrix(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t as a (rows, cols) view that the kernels read in place: the last dim contiguous, rows evenly
    spaced at least cols apart. A contiguous copy when t's layout has no such view (a transpose, a
    broadcast)."""
    try:
        m = t.view(-1, cols)
    except RuntimeError:  # the leading dims do not collapse into one stride
        m = None
    if m is None or (cols > 1 and m.stride(1) != 1) or (m.shape[0] > 1 and m.stride(0) < cols):
        m = t.contiguous().view(-1, cols)
    return m


def _halves(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, H) views [a | b] of m (rows, 2H)."""
    H = m.shape[1] // 2
    return m[:, :H], m[:, H:]


# ---- raw kernel calls: (rows, cols) operands, last dim contiguous, outputs written in place ----------

def _forward_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str) -> None:
    if backend == "triton":
        with triton_launch(a):
            triton_kernels("swiglu").swiglu_forward(a, b, out)
        return
    rows, cols = out.shape
    with cuda_launch(a) as stream:
        cuda_ext().swiglu_forward(out=out.data_ptr(), a=a.data_ptr(), b=b.data_ptr(), rows=rows, cols=cols,
                                  out_stride=out.stride(0), a_stride=a.stride(0), b_stride=b.stride(0),
                                  dtype=dtype_code(a), stream=stream)


def _backward_into(da: torch.Tensor, db: torch.Tensor, dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   backend: str) -> None:
    if backend == "triton":
        with triton_launch(a):
            triton_kernels("swiglu").swiglu_backward(dout, a, b, da, db)
        return
    rows, cols = da.shape
    with cuda_launch(a) as stream:
        cuda_ext().swiglu_backward(da=da.data_ptr(), db=db.data_ptr(), dout=dout.data_ptr(), a=a.data_ptr(),
                                   b=b.data_ptr(), rows=rows, cols=cols, da_stride=da.stride(0),
                                   db_stride=db.stride(0), dout_stride=dout.stride(0), a_stride=a.stride(0),
                                   b_stride=b.stride(0), dtype=dtype_code(a), stream=stream)


def _relu2_forward(x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("swiglu").relu2_forward(x)
    out = torch.empty_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().relu2_forward(out=out.data_ptr(), inp=x.data_ptr(), n=x.numel(), dtype=dtype_code(x), stream=stream)
    return out


def _relu2_backward(x: torch.Tensor, dout: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("swiglu").relu2_backward(x, dout)
    dinp = torch.empty_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().relu2_backward(dinp=dinp.data_ptr(), inp=x.data_ptr(), dout=dout.data_ptr(), n=x.numel(),
                                  dtype=dtype_code(x), stream=stream)
    return dinp


def _cols(t: torch.Tensor) -> int:
    return t.shape[-1] if t.dim() else 1


# ---- custom ops and autograd: swiglu(a, b) -----------------------------------------------------

@torch.library.custom_op("pyllmc::swiglu_forward", mutates_args=())
def swiglu_forward_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.numel():
        cols = _cols(a)
        _forward_into(out.view(-1, cols), _matrix(a, cols), _matrix(b, cols), backend)
    return out


@swiglu_forward_op.register_fake
def _(a, b, backend):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("pyllmc::swiglu_backward", mutates_args=())
def swiglu_backward_op(dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db), each a's shape, contiguous."""
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.numel():
        cols = _cols(a)
        _backward_into(da.view(-1, cols), db.view(-1, cols), _matrix(dout, cols), _matrix(a, cols),
                       _matrix(b, cols), backend)
    return da, db


@swiglu_backward_op.register_fake
def _(dout, a, b, backend):
    return (torch.empty(a.shape, dtype=a.dtype, device=a.device),
            torch.empty(a.shape, dtype=a.dtype, device=a.device))


def _setup_context(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _autograd_backward(ctx, dout):
    a, b = ctx.saved_tensors
    # dout may be any view (a broadcast, a transpose): _matrix reads it in place or copies it
    da, db = swiglu_backward_op(dout, a, b, ctx.backend)
    return da, db, None


swiglu_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---- custom ops and autograd: swiglu_packed(x) ----------------------------------------------------

@torch.library.custom_op("pyllmc::swiglu_packed_forward", mutates_args=())
def swiglu_packed_forward_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    """(..., H) for x (..., 2H)."""
    H = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], H), dtype=x.dtype, device=x.device)
    if out.numel():
        _forward_into(out.view(-1, H), *_halves(_matrix(x, 2 * H)), backend)
    return out


@swiglu_packed_forward_op.register_fake
def _(x, backend):
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)


@torch.library.custom_op("pyllmc::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward_op(dout: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    """dx (..., 2H), contiguous: da and db written straight into its halves."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    H = x.shape[-1] // 2
    if dx.numel():
        _backward_into(*_halves(dx.view(-1, 2 * H)), _matrix(dout, H), *_halves(_matrix(x, 2 * H)), backend)
    return dx


@swiglu_packed_backward_op.register_fake
def _(dout, x, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _packed_setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _packed_autograd_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    return swiglu_packed_backward_op(dout, x, ctx.backend), None


swiglu_packed_forward_op.register_autograd(_packed_autograd_backward, setup_context=_packed_setup_context)


# ---- custom ops and autograd: relu2(x) ---------------------------------------------------------

@torch.library.custom_op("pyllmc::relu2_forward", mutates_args=())
def relu2_forward_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _relu2_forward(x, backend)


@relu2_forward_op.register_fake
def _(x, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pyllmc::relu2_backward", mutates_args=())
def relu2_backward_op(x: torch.Tensor, dout: torch.Tensor, backend: str) -> torch.Tensor:
    return _relu2_backward(x, dout, backend)


@relu2_backward_op.register_fake
def _(x, dout, backend):
    return torch.empty_like(x)


def _relu2_setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _relu2_autograd_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    # dout from autograd can be a broadcast or transposed view; the kernels read it flat
    return relu2_backward_op(x, dout.contiguous(), ctx.backend), None


relu2_forward_op.register_autograd(_relu2_autograd_backward, setup_context=_relu2_setup_context)
