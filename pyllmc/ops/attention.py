"""ops.attention and ops.qkv_attention: causal multi-head self-attention,
softmax(Q K^T / sqrt(D) + causal mask) V, with grouped-query attention (GQA).

GQA: k and v may have fewer heads than q, H_kv dividing H (H_kv = H: multi-head attention;
H_kv = 1: multi-query). Query head h attends with kv head h // (H // H_kv). The kernels index
that kv head in place (no repeated K/V in memory); the backward's dk, dv (B, H_kv, T, D) are
the sums over each group's query heads, computed in a fixed order (deterministic, no atomics).

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the ops survive torch.compile), as in pyllmc/ops/gelu.py. The
forward custom ops return (out, lse); lse (B, H, T) float32, the natural-log log-sum-exp of
each row of scaled scores, is what the backward needs to recompute P tile by tile. The
"torch" backend is plain math in float32 (it builds the T x T score matrix): the reference.

Two entry points on the same kernels:
- attention(q, k, v): q (B, H, T, D), k, v (B, H_kv, T, D), any strides -> a new (B, H, T, D) output.
- qkv_attention(qkv, num_heads, num_kv_heads=None): GPT-2's layout. qkv (B, T, (H + 2 H_kv) D)
  is the c_attn output [q heads | k heads | v heads] with the heads side by side (3C when
  H_kv = H); the result (B, T, C), C = H D, is what c_proj reads. The kernels read q, k, v in
  place (position stride (H + 2 H_kv) D), write the output straight in (B, T, H, D) order and,
  in the backward, dq, dk, dv straight into one buffer of qkv's shape, the gradient of qkv: no
  transpose copies, no stacking of three gradients, one autograd node.

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


def _check_kv_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k and v: (B, H_kv, T, D) with q's B, T, D and H_kv dividing q's H; the same shape."""
    B, H, T, D = q.shape
    for name, t in (("k", k), ("v", v)):
        b, h_kv, t_len, d = t.shape
        if (b, t_len, d) != (B, T, D) or (h_kv == 0 and H != 0) or (h_kv and H % h_kv):
            raise ValueError(f"{name} must have q's shape (B, H, T, D) = {tuple(q.shape)}, or (B, H_kv, T, D) with "
                             f"H_kv dividing H = {H} (grouped-query attention); got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape (B, H_kv, T, D) = {tuple(k.shape)}; got {tuple(v.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Causal attention, scale 1/sqrt(D) -> (B, H, T, D) in q's dtype.

    q (B, H, T, D); k, v (B, H_kv, T, D) with H_kv dividing H: grouped-query attention, query
    head h attends with kv head h // (H // H_kv) (H_kv = H: multi-head; H_kv = 1: multi-query).
    float32 / bfloat16 / float16; one dtype and device; any strides.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, contiguous=False)
    check_same_dtype(q=q, k=k, v=v)
    device = check_same_device(q=q, k=k, v=v)
    _check_kv_shapes(q, k, v)
    name = _resolve(backend, device, q.shape[3], q.dtype, "q")
    if name == "torch":
        return attention_reference(q, k, v).to(q.dtype)
    out, _ = torch.ops.pyllmc.attention_forward(q, k, v, name)
    return out


def qkv_attention(qkv: torch.Tensor, num_heads: int, *, num_kv_heads: Optional[int] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """GPT-2's causal self-attention on the packed c_attn output, with grouped-query attention.

    qkv: (B, T, (H + 2 H_kv) D), float32 / bfloat16 / float16, H = num_heads, H_kv =
        num_kv_heads (default: num_heads, GPT-2's (B, T, 3C)): the H query heads, then the
        H_kv key heads, then the H_kv value heads, side by side, head h of each part in its
        columns [h D, (h + 1) D). H_kv must divide H; query head h attends with kv head
        h // (H // H_kv). Any batch and position strides are read in place; a last dim with a
        stride other than 1 is copied to a contiguous tensor first (one extra read + write of
        qkv; the kernels load a head's D elements as one contiguous run).
    Returns (B, T, C), C = H D: the attention output with the heads side by side (the layout
    c_proj takes). Its gradient is one buffer of qkv's shape.
    """
    check_tensor("qkv", qkv, ndim=3, contiguous=False)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    if (isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1
            or num_heads % num_kv_heads):
        raise ValueError(f"num_kv_heads must be a positive int dividing num_heads={num_heads}; got {num_kv_heads!r}")
    B, T, C3 = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if C3 % heads:
        parts = "3 * num_heads" if num_kv_heads == num_heads else "(num_heads + 2 * num_kv_heads)"
        raise ValueError(f"qkv's last dim must be {parts} * D; got {C3} for num_heads={num_heads}, "
                         f"num_kv_heads={num_kv_heads}")
    if C3 > 1 and qkv.stride(2) != 1:
        qkv = qkv.contiguous()  # an autograd op: the gradient comes back in qkv's shape through it
    name = _resolve(backend, qkv.device, C3 // heads, qkv.dtype, "qkv")
    y, _ = torch.ops.pyllmc.qkv_attention_forward(qkv, num_heads, num_kv_heads, name)
    return y


def repeat_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, num_heads, T, D): kv head j repeated for its num_heads // H_kv query
    heads (a copy; for the plain-math reference only: the kernels index the kv head in place).
    Its gradient sums over each group's query heads."""
    if t.shape[1] in (0, num_heads):
        return t
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain math causal attention computed in `compute_dtype` (result in compute_dtype).

    q (B, H, T, D); k, v (B, H_kv, T, D), H_kv dividing H (grouped-query: K/V repeated per
    query head). Builds the (B, H, T, T) scores: the reference the kernels are tested
    against, not a fast path. Differentiable with ordinary autograd.
    """
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
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

def split_heads(qkv: torch.Tensor, num_heads: int,
                num_kv_heads: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, D) and k, v (B, H_kv, T, D): views of qkv (B, T, (H + 2 H_kv) D) laid out
    [q heads | k heads | v heads], position stride (H + 2 H_kv) D, no copy. H_kv defaults to H
    (GPT-2's (B, T, 3C))."""
    B, T, C3 = qkv.shape
    if num_kv_heads is None or num_kv_heads == num_heads:
        return qkv.view(B, T, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    D = C3 // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.split((num_heads * D, num_kv_heads * D, num_kv_heads * D), dim=2)
    return heads_of(q, num_heads), heads_of(k, num_kv_heads), heads_of(v, num_kv_heads)


def heads_of(y: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The (B, H, T, D) view of a (B, T, C) tensor (C = H D; any position stride, unit last stride)
    with the heads side by side."""
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
    """out (B, H, T, D) = attention(q, k, v), k, v (B, H_kv, T, D); returns lse (B, H, T) float32."""
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
                                         B=B, H=H, H_kv=k.shape[1], T=T, D=D, dtype=dtype_code(q), stream=stream)
    if target is not out:
        out.copy_(target)
    return lse


def _backward_into(dq, dk, dv, dout, q, k, v, out, lse, backend: str) -> None:
    """dq (B, H, T, D), dk, dv (B, H_kv, T, D) = the gradients of attention(q, k, v) for dout: dk, dv
    summed over each kv head's query heads."""
    B, H, T, D = q.shape
    if backend == "triton":
        with triton_launch(q):
            triton_kernels("attention").attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv)
        return
    if backend == "torch":
        _torch_backward_into(dq, dk, dv, dout, q, k, v)
        return
    targets = [g if _cuda_ready(g) else torch.empty_like(g, memory_format=torch.contiguous_format)
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
                                          B=B, H=H, H_kv=k.shape[1], T=T, D=D, dtype=dtype_code(q), stream=stream)
    for g, target in zip((dq, dk, dv), targets):
        if target is not g:
            g.copy_(target)


def _torch_scores(q, k):
    """Scaled, causally masked scores (B, H, T, T) in float32; k (B, H, T, D), already repeated per query head."""
    T, D = q.shape[-2], q.shape[-1]
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(D))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def _torch_forward_into(out, q, k, v) -> torch.Tensor:
    H = q.shape[1]
    scores = _torch_scores(q, repeat_kv(k, H))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T)
    out.copy_(torch.exp(scores - lse[..., None]) @ repeat_kv(v, H).float())
    return lse


def _torch_backward_into(dq, dk, dv, dout, q, k, v) -> None:
    """The textbook backward in float32: dV = P^T dO, dS = P (dP - rowsum(dP P)), dQ = dS K / sqrt(D),
    dK = dS^T Q / sqrt(D), with P = softmax(scores) and dP = dO V^T."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    scale = 1.0 / math.sqrt(D)
    k, v = repeat_kv(k, H), repeat_kv(v, H)  # (B, H, T, D)
    p = torch.softmax(_torch_scores(q, k), dim=-1)  # (B, H, T, T)
    do = dout.float()

    def group_sum(g):  # (B, H, T, D) per query head -> (B, H_kv, T, D), summed over each group
        return g.view(B, H_kv, H // H_kv, T, D).sum(dim=2)

    dv.copy_(group_sum(p.transpose(-2, -1) @ do))
    dp = do @ v.float().transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq.copy_((ds @ k.float()) * scale)
    dk.copy_(group_sum((ds.transpose(-2, -1) @ q.float()) * scale))


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
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    _backward_into(dq, dk, dv, dout, q, k, v, out, lse, backend)
    return dq, dk, dv


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, backend):
    return _new_like(q), _new_like(k), _new_like(v)


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


def _qkv_out_like(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """y (B, T, C), C = H D, for qkv (B, T, (H + 2 H_kv) D)."""
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, T, C3 // (num_heads + 2 * num_kv_heads) * num_heads))


@torch.library.custom_op("pyllmc::qkv_attention_forward", mutates_args=())
def qkv_attention_forward_op(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (B, T, C), lse (B, H, T)) for qkv (B, T, (H + 2 H_kv) D), C = H D."""
    y = _qkv_out_like(qkv, num_heads, num_kv_heads)
    lse = _forward_into(heads_of(y, num_heads), *split_heads(qkv, num_heads, num_kv_heads), backend)
    return y, lse


@qkv_attention_forward_op.register_fake
def _(qkv, num_heads, num_kv_heads, backend):
    return _qkv_out_like(qkv, num_heads, num_kv_heads), _qkv_lse_like(qkv, num_heads)


@torch.library.custom_op("pyllmc::qkv_attention_backward", mutates_args=())
def qkv_attention_backward_op(dy: torch.Tensor, qkv: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                              num_heads: int, num_kv_heads: int, backend: str) -> torch.Tensor:
    """dqkv (B, T, (H + 2 H_kv) D): dq, dk, dv written straight into one buffer."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward_into(*split_heads(dqkv, num_heads, num_kv_heads), heads_of(dy, num_heads),
                   *split_heads(qkv, num_heads, num_kv_heads), heads_of(y, num_heads), lse, backend)
    return dqkv


@qkv_attention_backward_op.register_fake
def _(dy, qkv, y, lse, num_heads, num_kv_heads, backend):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _qkv_setup_context(ctx, inputs, output):
    qkv, num_heads, num_kv_heads, backend = inputs
    y, lse = output
    ctx.save_for_backward(qkv, y, lse)  # lse (B, H, T): one row per query head
    ctx.num_heads = num_heads
    ctx.num_kv_heads = num_kv_heads
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _qkv_autograd_backward(ctx, dy, _dlse):
    qkv, y, lse = ctx.saved_tensors
    # dy (B, T, C) comes from c_proj's matmul: already contiguous (then this copies nothing)
    dqkv = qkv_attention_backward_op(dy.contiguous(), qkv, y, lse, ctx.num_heads, ctx.num_kv_heads, ctx.backend)
    return dqkv, None, None, None


qkv_attention_forward_op.register_autograd(_qkv_autograd_backward, setup_context=_qkv_setup_context)
