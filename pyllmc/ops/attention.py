"""ops.attention and ops.qkv_attention: causal multi-head self-attention,
softmax(Q K^T / sqrt(D) + causal mask) V.

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the ops survive torch.compile), as in pyllmc/ops/gelu.py. The
forward custom ops return (out, lse); lse (B, H, T) float32, the natural-log log-sum-exp of
each row of scaled scores, is what the backward needs to recompute P tile by tile. The
"torch" backend is plain math in float32 (it builds the T x T score matrix): the reference.

Two entry points on the same kernels:
- attention(q, k, v): (B, H, T, D) tensors of any strides -> a new (B, H, T, D) output.
- qkv_attention(qkv, num_heads): GPT-2's layout. qkv (B, T, 3C) is the c_attn output
  [q | k | v] with the heads side by side; the result (B, T, C) is what c_proj reads. The
  kernels read q, k, v in place (position stride 3C), write the output straight in
  (B, T, H, D) order and, in the backward, dq, dk, dv straight into one (B, T, 3C) buffer,
  the gradient of qkv: no transpose copies, no stacking of three gradients, one autograd node.

Strides: the Triton kernels read any strides (stride 0 too: an expanded k or v shared by the
heads). The CUDA kernels need the head dim D contiguous (stride 1); the tensor-core kernels
(bf16/fp16) copy 16-byte chunks, so their other strides must also be multiples of 8 elements
and their pointers 16-byte aligned (GPT-2's always are); a tensor that is not is copied to a
contiguous one first (one extra read + write of it). Outputs and gradients are fresh
contiguous tensors of the inputs' shapes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    _dtype_names,
    check_same_device,
    check_same_dtype,
    check_tensor,
    cuda_ext,
    cuda_launch,
    dtype_code,
    resolve_backend,
    triton_kernels,
    triton_launch,
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


# The CUDA tensor-core kernels (bfloat16 / float16: mma.sync, cp.async, ldmatrix) need this compute
# capability; float32 runs on any GPU (csrc/attention.cu checks it again before a launch).
CUDA_TENSOR_CORE_CAPABILITY = (8, 0)


def _cuda_compute_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of the GPU the cuda backend runs on for `device` (the simulated one on CPU)."""
    if device.type == "cpu":
        from .. import cuda_sim

        return tuple(cuda_sim.device()["compute_capability"])
    return torch.cuda.get_device_capability(device)


def _check_cuda_capability(device: torch.device, dtype: torch.dtype, what: str) -> None:
    if dtype == torch.float32:
        return
    capability = _cuda_compute_capability(device)
    if tuple(capability) < CUDA_TENSOR_CORE_CAPABILITY:
        raise ValueError(
            f"{what}: attention in {_dtype_names([dtype])} on backend 'cuda' needs compute capability 8.0+ "
            f"(mma.sync, cp.async, ldmatrix); this GPU is {capability[0]}.{capability[1]}: use float32, "
            f"or the triton/torch backend")


def _resolve(backend: Optional[str], device: torch.device, head_dim: int, dtype: torch.dtype, what: str) -> str:
    name = resolve_backend(backend, device)
    if name == "cuda":
        _check_cuda_capability(device, dtype, what)
    if not supports_head_dim(name, head_dim, dtype):
        table = SUPPORTED_HEAD_DIMS[name]
        raise ValueError(
            f"{what}: head dim D={head_dim} is not supported by backend {name!r} for {_dtype_names([dtype])} "
            f"(it takes D in {table[dtype] if dtype in table else ()}); backends that take D={head_dim}: "
            f"{', '.join(backends_for_head_dim(head_dim, dtype))}")
    return name


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
    name = _resolve(backend, device, q.shape[3], q.dtype, "q")
    if name == "torch":
        return attention_reference(q, k, v).to(q.dtype)
    out, _ = torch.ops.pyllmc.attention_forward(q, k, v, name)
    return out


def qkv_attention(qkv: torch.Tensor, num_heads: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """GPT-2's causal self-attention on the packed c_attn output.

    qkv: (B, T, 3C), float32 / bfloat16 / float16: q, k, v side by side, each (B, T, C) with
        C = num_heads * D, head h in columns [h D, (h + 1) D). Any batch and position strides
        are read in place; a last dim with a stride other than 1 is copied to a contiguous
        tensor first (one extra read + write of qkv; the kernels load a head's D elements as
        one contiguous run).
    Returns (B, T, C): the attention output with the heads side by side (the layout c_proj
    takes). Its gradient is one (B, T, 3C) buffer.
    """
    check_tensor("qkv", qkv, ndim=3, contiguous=False)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    B, T, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim must be 3 * num_heads * D; got {C3} for num_heads={num_heads}")
    if C3 > 1 and qkv.stride(2) != 1:
        qkv = qkv.contiguous()  # an autograd op: the gradient comes back in qkv's shape through it
    name = _resolve(backend, qkv.device, C3 // (3 * num_heads), qkv.dtype, "qkv")
    y, _ = torch.ops.pyllmc.qkv_attention_forward(qkv, num_heads, name)
    return y


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


# ---- layouts ---------------------------------------------------------------------------

def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T, D): views of qkv (B, T, 3C), position stride 3C, no copy."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def heads_of(y: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The (B, H, T, D) view of a (B, T, C) tensor with the heads side by side."""
    B, T, C = y.shape
    return y.view(B, T, num_heads, C // num_heads).transpose(1, 2)


# ---- raw kernel calls: (B, H, T, D) operands of any strides, outputs written in place ----------------------

def _head_strides(t: torch.Tensor) -> list[int]:
    return list(t.stride()[:3])


def _cuda_ready(t: torch.Tensor) -> bool:
    """Whether the CUDA kernels take t as it is (the float32 path takes anything with D contiguous)."""
    if t.shape[3] > 1 and t.stride(3) != 1:
        return False
    if t.dtype == torch.float32:
        return True
    return t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3])


def _cuda_input(t: torch.Tensor) -> torch.Tensor:
    """t, or an aligned contiguous copy of it when the CUDA kernels cannot read it in place."""
    return t if _cuda_ready(t) else t.clone(memory_format=torch.contiguous_format)


def _forward_into(out, q, k, v, backend: str) -> torch.Tensor:
    """out (B, H, T, D) = attention(q, k, v); returns lse (B, H, T) float32."""
    B, H, T, D = q.shape
    if backend == "triton":
        with triton_launch(q):
            _, lse = triton_kernels("attention").attention_forward(q, k, v, out=out)
        return lse
    if backend == "torch":
        return _torch_forward_into(out, q, k, v)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    target = out if _cuda_ready(out) else torch.empty_like(q, memory_format=torch.contiguous_format)
    q, k, v = (_cuda_input(t) for t in (q, k, v))
    if out.numel():
        with cuda_launch(q) as stream:
            cuda_ext().attention_forward(out=target.data_ptr(), lse=lse.data_ptr(),
                                         q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                                         strides=sum((_head_strides(t) for t in (target, q, k, v)), []),
                                         B=B, H=H, T=T, D=D, dtype=dtype_code(q), stream=stream)
    if target is not out:
        out.copy_(target)
    return lse


def _backward_into(dq, dk, dv, dout, q, k, v, out, lse, backend: str) -> None:
    """dq, dk, dv (B, H, T, D) = the gradients of attention(q, k, v) for dout."""
    B, H, T, D = q.shape
    if backend == "triton":
        with triton_launch(q):
            triton_kernels("attention").attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv)
        return
    if backend == "torch":
        _torch_backward_into(dq, dk, dv, dout, q, k, v)
        return
    targets = [g if _cuda_ready(g) else torch.empty_like(q, memory_format=torch.contiguous_format)
               for g in (dq, dk, dv)]
    dout, q, k, v, out = (_cuda_input(t) for t in (dout, q, k, v, out))
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # the kernel's rowsum(dout * out)
    if q.numel():
        with cuda_launch(q) as stream:
            dq_target, dk_target, dv_target = targets
            cuda_ext().attention_backward(dq=dq_target.data_ptr(), dk=dk_target.data_ptr(), dv=dv_target.data_ptr(),
                                          delta=delta.data_ptr(), dout=dout.data_ptr(), out=out.data_ptr(),
                                          lse=lse.contiguous().data_ptr(),
                                          q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                                          strides=sum((_head_strides(t) for t in (*targets, dout, out, q, k, v)), []),
                                          B=B, H=H, T=T, D=D, dtype=dtype_code(q), stream=stream)
    for g, target in zip((dq, dk, dv), targets):
        if target is not g:
            g.copy_(target)


def _torch_scores(q, k):
    """Scaled, causally masked scores (B, H, T, T) in float32."""
    T, D = q.shape[-2], q.shape[-1]
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(D))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def _torch_forward_into(out, q, k, v) -> torch.Tensor:
    scores = _torch_scores(q, k)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T)
    out.copy_(torch.exp(scores - lse[..., None]) @ v.float())
    return lse


def _torch_backward_into(dq, dk, dv, dout, q, k, v) -> None:
    """The textbook backward in float32: dV = P^T dO, dS = P (dP - rowsum(dP P)), dQ = dS K / sqrt(D),
    dK = dS^T Q / sqrt(D), with P = softmax(scores) and dP = dO V^T."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(_torch_scores(q, k), dim=-1)  # (B, H, T, T)
    do = dout.float()
    dv.copy_(p.transpose(-2, -1) @ do)
    dp = do @ v.float().transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq.copy_((ds @ k.float()) * scale)
    dk.copy_((ds.transpose(-2, -1) @ q.float()) * scale)


# ---- custom ops and autograd -------------------------------------------------------------

def _new_like(q: torch.Tensor) -> torch.Tensor:
    # ops.attention always returns fresh contiguous tensors, whatever q's strides
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    B, H, T, _ = q.shape
    return q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("pyllmc::attention_forward", mutates_args=())
def attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = _new_like(q)
    return out, _forward_into(out, q, k, v, backend)


@attention_forward_op.register_fake
def _(q, k, v, backend):
    return _new_like(q), _lse_like(q)


@torch.library.custom_op("pyllmc::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _new_like(q), _new_like(q), _new_like(q)
    _backward_into(dq, dk, dv, dout, q, k, v, out, lse, backend)
    return dq, dk, dv


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


def _qkv_lse_like(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, _ = qkv.shape
    return qkv.new_empty((B, num_heads, T), dtype=torch.float32)


@torch.library.custom_op("pyllmc::qkv_attention_forward", mutates_args=())
def qkv_attention_forward_op(qkv: torch.Tensor, num_heads: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (B, T, C), lse (B, H, T)) for qkv (B, T, 3C)."""
    B, T, C3 = qkv.shape
    y = qkv.new_empty((B, T, C3 // 3))
    lse = _forward_into(heads_of(y, num_heads), *split_heads(qkv, num_heads), backend)
    return y, lse


@qkv_attention_forward_op.register_fake
def _(qkv, num_heads, backend):
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, T, C3 // 3)), _qkv_lse_like(qkv, num_heads)


@torch.library.custom_op("pyllmc::qkv_attention_backward", mutates_args=())
def qkv_attention_backward_op(dy: torch.Tensor, qkv: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                              num_heads: int, backend: str) -> torch.Tensor:
    """dqkv (B, T, 3C): dq, dk, dv written straight into one buffer."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward_into(*split_heads(dqkv, num_heads), heads_of(dy, num_heads), *split_heads(qkv, num_heads),
                   heads_of(y, num_heads), lse, backend)
    return dqkv


@qkv_attention_backward_op.register_fake
def _(dy, qkv, y, lse, num_heads, backend):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _qkv_setup_context(ctx, inputs, output):
    qkv, num_heads, backend = inputs
    y, lse = output
    ctx.save_for_backward(qkv, y, lse)
    ctx.num_heads = num_heads
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _qkv_autograd_backward(ctx, dy, _dlse):
    qkv, y, lse = ctx.saved_tensors
    # dy (B, T, C) comes from c_proj's matmul: already contiguous (then this copies nothing)
    return qkv_attention_backward_op(dy.contiguous(), qkv, y, lse, ctx.num_heads, ctx.backend), None, None


qkv_attention_forward_op.register_autograd(_qkv_autograd_backward, setup_context=_qkv_setup_context)
