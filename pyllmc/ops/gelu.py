"""ops.gelu: GPT-2's GELU, tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

Input checks, then the raw kernel calls per backend, then the custom op + autograd glue
(torch.library.custom_op so the op survives torch.compile). The "torch" backend is plain
F.gelu, the reference the tests compare against.

Layouts: GELU is elementwise, so the kernels run flat over memory. A tensor whose elements
fill one dense block in any order (contiguous, or a permutation of it such as a transposed
matrix) is read in place, and the output and the gradient get the input's strides, as
F.gelu's do. Any other layout (a slice with gaps, an expanded / broadcast view with stride 0)
is first copied to a contiguous tensor: one extra read and write of the input, and the output
is contiguous. (Handling arbitrary strides in the kernels would cost index arithmetic on the
hot path of GPT-2's dense case for a layout the model never produces.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import aligned16, check_tensor, cuda_ext, cuda_launch, dense_in_storage, dtype_code, resolve_backend, \
    same_layout, storage_flat, triton_kernels, triton_launch


def gelu(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """GELU (tanh approximation) of x, any shape, float32 / bfloat16 / float16, any strides.

    A dense x in any dim order is read in place and the result has x's strides; other views
    (gaps, stride 0) are copied to a contiguous tensor first (one extra read + write of x).
    """
    check_tensor("x", x, contiguous=False)
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return F.gelu(x, approximate="tanh")
    # the copy is an ordinary autograd op: x's gradient comes back in x's shape through it
    return torch.ops.pyllmc.gelu_forward(_dense(x), name)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy of it when its elements do not fill one dense block."""
    return x if dense_in_storage(x) else x.contiguous()


# ---- raw kernel calls ------------------------------------------------------------------

# x is dense_in_storage and the outputs are empty_like(x) (x's strides): the kernels run over
# the memory block flat. dout has x's layout (_autograd_backward sees to it).

def _forward(x: torch.Tensor, backend: str) -> torch.Tensor:
    x = _dense(x)
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("gelu").gelu_forward(x)
    out = torch.empty_like(x)
    inp = aligned16(storage_flat(x))
    with cuda_launch(x) as stream:
        cuda_ext().gelu_forward(out=out.data_ptr(), inp=inp.data_ptr(), n=x.numel(), dtype=dtype_code(x),
                                stream=stream)
    return out


def _backward(x: torch.Tensor, dout: torch.Tensor, backend: str) -> torch.Tensor:
    x = _dense(x)
    dout = _like(dout, x)
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("gelu").gelu_backward(x, dout)
    dinp = torch.empty_like(x)
    inp, dout = aligned16(storage_flat(x)), aligned16(storage_flat(dout))
    with cuda_launch(x) as stream:
        cuda_ext().gelu_backward(dinp=dinp.data_ptr(), inp=inp.data_ptr(), dout=dout.data_ptr(), n=x.numel(),
                                 dtype=dtype_code(x), stream=stream)
    return dinp


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it in x's layout (x dense_in_storage), so that both read flat alike."""
    return t if same_layout(t, x) else torch.empty_like(x).copy_(t)


# ---- custom ops and autograd -------------------------------------------------------------

@torch.library.custom_op("pyllmc::gelu_forward", mutates_args=())
def gelu_forward_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _forward(x, backend)


@gelu_forward_op.register_fake
def _(x, backend):
    return torch.empty_like(_dense(x))


@torch.library.custom_op("pyllmc::gelu_backward", mutates_args=())
def gelu_backward_op(x: torch.Tensor, dout: torch.Tensor, backend: str) -> torch.Tensor:
    return _backward(x, dout, backend)


@gelu_backward_op.register_fake
def _(x, dout, backend):
    return torch.empty_like(_dense(x))


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _autograd_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    # dout from autograd can be a broadcast or transposed view; the kernels read it flat in x's
    # layout (a copy only when it differs); dx has x's shape and strides
    return gelu_backward_op(x, _like(dout, x), ctx.backend), None


gelu_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
