"""ops.gelu: GPT-2's GELU, tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

Input checks, then the raw kernel calls per backend, then the custom op + autograd glue
(torch.library.custom_op so the op survives torch.compile). The "torch" backend is plain
F.gelu, the reference the tests compare against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import aligned16, check_tensor, cuda_ext, cuda_launch, dtype_code, resolve_backend, triton_kernels, \
    triton_launch


def gelu(x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """GELU (tanh approximation) of x, any shape, float32 / bfloat16 / float16, contiguous."""
    check_tensor("x", x)
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return F.gelu(x, approximate="tanh")
    return torch.ops.pyllmc.gelu_forward(x, name)


# ---- raw kernel calls ------------------------------------------------------------------

def _forward(x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("gelu").gelu_forward(x)
    x = aligned16(x)
    out = torch.empty_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().gelu_forward(out=out.data_ptr(), inp=x.data_ptr(), n=x.numel(), dtype=dtype_code(x), stream=stream)
    return out


def _backward(x: torch.Tensor, dout: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("gelu").gelu_backward(x, dout)
    x, dout = aligned16(x), aligned16(dout)
    dinp = torch.empty_like(x)
    with cuda_launch(x) as stream:
        cuda_ext().gelu_backward(dinp=dinp.data_ptr(), inp=x.data_ptr(), dout=dout.data_ptr(), n=x.numel(),
                                 dtype=dtype_code(x), stream=stream)
    return dinp


# ---- custom ops and autograd -------------------------------------------------------------

@torch.library.custom_op("pyllmc::gelu_forward", mutates_args=())
def gelu_forward_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _forward(x, backend)


@gelu_forward_op.register_fake
def _(x, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pyllmc::gelu_backward", mutates_args=())
def gelu_backward_op(x: torch.Tensor, dout: torch.Tensor, backend: str) -> torch.Tensor:
    return _backward(x, dout, backend)


@gelu_backward_op.register_fake
def _(x, dout, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _autograd_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    # dout from autograd can be a broadcast or transposed view; the kernels read it flat
    return gelu_backward_op(x, dout.contiguous(), ctx.backend), None


gelu_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
