"""ops.rope: rotary position embedding (RoPE) for the Llama family, with rope_tables and rope_reference.

    cos, sin = rope_tables(T_max, D)                  # float32 (T_max, D/2), theta = 10000
    q = ops.rope(q, cos, sin)                         # q (B, T, H, D) -> a new contiguous (B, T, H, D)
    k = ops.rope(k, cos, sin, start=pos)              # KV-cache decoding: positions pos..pos+T-1

Convention, "rotate halves" (Hugging Face Llama, nanochat): with half = D / 2, x1 = x[..., :half],
x2 = x[..., half:] and position p = start + t,

    out1 = x1 cos[p] - x2 sin[p]        out2 = x1 sin[p] + x2 cos[p]

i.e. the pair (x1[j], x2[j]) is turned by the angle p theta^(-2j/D). Meta's Llama and llama2.c rotate
adjacent pairs (x[2j], x[2j+1]) instead; the two layouts differ by a permutation of the rows of the
q and k projection weights, and converting between them happens at checkpoint import / export, never
here. All math in float32 whatever the storage dtype; one rounding to x's dtype. The backward is the
inverse rotation (the transpose): dx1 = dy1 cos + dy2 sin, dx2 = -dy1 sin + dy2 cos; cos and sin
get no gradient.

Inputs: x (B, T, H, D), D even, float32 / bfloat16 / float16, any strides on B, T, H and the last
dim contiguous: q and k are views of the packed (B, T, (H + 2 H_kv) D) qkv projection, viewed as
(B, T, H + 2 H_kv, D) and sliced on the head dim, read in place without a copy. cos, sin: float32,
contiguous, (T_max, D / 2) on x's device, T_max >= start + T (rows start..start+T-1 are used). The
result is a new contiguous (B, T, H, D) tensor in x's dtype; the gradient of x is a contiguous
(B, T, H, D) tensor (autograd puts it into the qkv gradient's slice). Bad input raises ValueError
naming the argument.

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the op survives torch.compile), as in pyllmc/ops/swiglu.py. The "torch"
backend is rope_reference: plain PyTorch, the reference the tests compare against.

Design decision: a standalone op on q and k rather than a rotation fused into the attention kernels'
loads. Bytes (s bytes per element; bf16 s = 2): the standalone op reads q and k and writes their
rotated copies, 2 (H + H_kv) D B T s per forward, and the same again per backward (dq, dk rotated
back). Fusing would save exactly that, but would put the rotation into every attention kernel
variant (the forward, dQ and dK/dV kernels, fp32 and tensor-core paths, the tile shapes of three GPU
generations) and into the GQA head indexing, and tie the attention kernels to one RoPE layout and
table format. For a Llama 2 110M-like model (B = 32, T = 1024, H = H_kv = 12, D = 64, bf16): RoPE
moves 2 x 24 x 64 x 32768 x 2 B = 201 MB per layer each way (forward and backward), while the
attention forward's own compulsory traffic (read q, k, v, write out and lse) is 203 MB per layer and
its work is 51.5 GFLOP (causal), a compute-bound kernel; the backward's is ~406 MB and 2.5x the
FLOPs. So the standalone op roughly doubles the attention's bytes but not its time: at ~3 TB/s it is
~0.07 ms per layer each way, a few percent of a training step, for kernels that stay simple. A model
that later measures it worth fusing can do so without changing this op's contract.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from ._common import check_same_device, check_tensor, cuda_ext, cuda_launch, dtype_code, resolve_backend, \
    triton_kernels, triton_launch


def rope_tables(T: int, D: int, theta: float = 10000.0, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 (T, D // 2): angle[p, i] = p * theta^(-2i / D) for positions p = 0..T-1
    and pairs i = 0..D/2-1, computed in float64 and rounded once to float32 (float32 angles would lose
    ~4 digits of the phase at p ~ 10^4)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be an int >= 0; got {T!r}")
    if isinstance(D, bool) or not isinstance(D, int) or D <= 0 or D % 2:
        raise ValueError(f"D must be a positive even int (the halves x1 | x2); got {D!r}")
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a positive finite number; got {theta!r}")
    i = torch.arange(D // 2, dtype=torch.float64, device=device)
    inv_freq = float(theta) ** (-2.0 * i / D)                                      # (D/2,)
    angles = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The rotation in plain PyTorch (differentiable; the torch backend and the tests' truth): computed
    in float32, or in x's dtype where that is wider (float64), and returned in x's dtype, contiguous."""
    B, T, H, D = x.shape
    half = D // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    c = cos[start:start + T].to(compute).view(1, T, 1, half)  # (1, T, 1, D/2)
    s = sin[start:start + T].to(compute).view(1, T, 1, half)
    x1, x2 = x.to(compute).split(half, dim=-1)                 # (B, T, H, D/2) each
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def _check_start(start, T: int, rows: int) -> int:
    """start as a Python int (a numpy or 0-dim torch integer is taken), positions start..start+T-1 in the tables."""
    try:
        if isinstance(start, bool):
            raise TypeError
        start = operator.index(start)
    except TypeError:
        raise ValueError(f"start must be an int; got {type(start).__name__}") from None
    if start < 0:
        raise ValueError(f"start must be >= 0; got {start}")
    if start + T > rows:
        raise ValueError(f"cos and sin have {rows} rows, fewer than start + T = {start} + {T}: positions up to "
                         f"{start + T - 1} need rope_tables(T_max >= {start + T}, D)")
    return start


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, start: int = 0,
         backend: Optional[str] = None) -> torch.Tensor:
    """x (B, T, H, D) rotated by the angles of positions start..start+T-1 ("rotate halves", see the
    module's doc): cos, sin float32 (T_max, D // 2) from rope_tables, T_max >= start + T. x: float32 /
    bfloat16 / float16, D even, any strides on B, T, H with the last dim contiguous (a view of q or k
    inside the packed qkv buffer is read in place). Returns a new contiguous (B, T, H, D) in x's dtype."""
    check_tensor("x", x, ndim=4, contiguous=False)
    B, T, H, D = x.shape
    if D == 0 or D % 2:
        raise ValueError(f"x's last dim D must be even and > 0 (the halves x1 | x2); got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have stride 1 along its last dim; got strides {x.stride()} for shape "
                         f"{tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtypes=(torch.float32,), ndim=2)
        if t.shape[1] != D // 2:
            raise ValueError(f"{name} must have shape (T_max, D // 2) = (T_max, {D // 2}) for x of shape "
                             f"{tuple(x.shape)}; got {tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}; got {tuple(sin.shape)}")
    device = check_same_device(x=x, cos=cos, sin=sin)
    start = _check_start(start, T, cos.shape[0])
    name = resolve_backend(backend, device)
    if name == "torch":
        return rope_reference(x, cos, sin, start)
    return torch.ops.pyllmc.rope_forward(x, cos, sin, start, name)


# ---- raw kernel calls: out and inp (B, T, H, D), the last dim contiguous; out written in place ------------

def _rotate_into(out: torch.Tensor, inp: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                 backend: str, inverse: bool) -> None:
    """out = inp rotated by +angle (the forward) or -angle (inverse: the backward)."""
    if backend == "triton":
        with triton_launch(inp):
            k = triton_kernels("rope")
            (k.rope_backward if inverse else k.rope_forward)(inp, cos, sin, out, start)
        return
    B, T, H, D = inp.shape
    ext = cuda_ext()
    launcher = ext.rope_backward if inverse else ext.rope_forward
    names = ("dinp", "dout") if inverse else ("out", "inp")
    with cuda_launch(inp) as stream:
        launcher(**{names[0]: out.data_ptr(), names[1]: inp.data_ptr(),
                    f"{names[0]}_stride_b": out.stride(0), f"{names[0]}_stride_t": out.stride(1),
                    f"{names[0]}_stride_h": out.stride(2), f"{names[1]}_stride_b": inp.stride(0),
                    f"{names[1]}_stride_t": inp.stride(1), f"{names[1]}_stride_h": inp.stride(2)},
                 cos=cos.data_ptr(), sin=sin.data_ptr(), B=B, T=T, H=H, D=D, start=start,
                 table_rows=cos.shape[0], dtype=dtype_code(inp), stream=stream)


# ---- custom ops and autograd ---------------------------------------------------------------------

@torch.library.custom_op("pyllmc::rope_forward", mutates_args=())
def rope_forward_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, backend: str) -> torch.Tensor:
    """(B, T, H, D) contiguous, x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _rotate_into(out, x, cos, sin, start, backend, inverse=False)
    return out


@rope_forward_op.register_fake
def _(x, cos, sin, start, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("pyllmc::rope_backward", mutates_args=())
def rope_backward_op(dout: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                     backend: str) -> torch.Tensor:
    """dx (B, T, H, D) contiguous: dout rotated back."""
    dx = torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)
    if dx.numel():
        _rotate_into(dx, dout, cos, sin, start, backend, inverse=True)
    return dx


@rope_backward_op.register_fake
def _(dout, cos, sin, start, backend):
    return torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)


def _setup_context(ctx, inputs, output):
    x, cos, sin, start, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.start = start
    ctx.backend = backend


def _autograd_backward(ctx, dout):
    cos, sin = ctx.saved_tensors
    # dout from autograd may be any view (a broadcast, a transpose): the kernels take any strides on
    # B, T, H but need the last dim contiguous
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()
    return rope_backward_op(dout, cos, sin, ctx.start, ctx.backend), None, None, None, None


rope_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
