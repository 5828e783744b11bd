"""ops.cross_entropy: mean cross-entropy over the vocabulary, with llm.c's fused classifier.

    loss = sum_i (logsumexp(logits_i) - logits_i,t_i) / n_valid      over rows with t_i != ignore_index

Input checks, then the raw kernel calls per backend, then the custom ops + autograd glue
(torch.library.custom_op so the op survives torch.compile). The "torch" backend is plain
F.cross_entropy with the same conventions (float32 mean, 0.0 when every row is ignored).

Two paths on the kernel backends:
- default: the forward saves the per-row log-sum-exp (float32 (N,)); the backward writes a
  fresh dlogits = (softmax - onehot) * dloss / n_valid.
- inplace_backward=True, llm.c's fused classifier: one kernel computes the loss and writes
  dlogits (for dloss = 1) over the logits' own storage, so the (N, V) gradient needs no
  memory of its own and the logits are read once instead of twice. The op is declared as
  mutating `logits` (custom_op mutates_args), which bumps its version counter: autograd
  then refuses to run a backward that needs the old logits ("one of the variables needed
  for gradient computation has been modified by an inplace operation") instead of
  silently using the gradient as if it were logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import check_same_device, check_tensor, cuda_ext, cuda_launch, dtype_code, resolve_backend, \
    triton_kernels

TARGET_DTYPES = (torch.int64, torch.int32)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1, *,
                  inplace_backward: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` (N, V) against class ids `targets` (N,).

    Returns a float32 0-dim tensor: the mean of -log softmax(logits_i)[t_i] over the rows
    whose target is not `ignore_index`, computed in float32 whatever the logits' dtype.
    If every row is ignored (or N == 0) the loss is defined as 0.0 and all gradients are
    zero (F.cross_entropy gives NaN there).

    logits: float32 / bfloat16 / float16, any V >= 1. The last dim must have stride 1, but
        rows may lie further apart than V: the (N, V) view of padded (N, Vp) logits is read
        in place, without a copy. The gradient has the same layout as logits.
    targets: int64 or int32 (N,). Ids must lie in [0, V) or equal ignore_index, else
        ValueError. Checking this needs one device-to-host sync per call (a single
        vectorised test of the whole target vector, done right before the kernels run).
    inplace_backward: the fused classifier. One kernel computes the loss and overwrites
        `logits` with d(loss)/d(logits) for an upstream gradient of 1; the backward multiplies
        in the actual upstream gradient in place when it is not 1 (rounding once more in
        the logits' dtype) and hands back that storage as the gradient. The padding
        columns [V, row stride) of every row are set to zero when the logits' storage holds
        them (the view of padded logits; a column slice of a wider tensor loses the columns
        it leaves out, so pass only views whose extra columns you own). After the call `logits` no longer holds the
        logits: nothing else may use them, and an op that saved them for its own backward
        makes the backward raise (version counter). logits must be an intermediate result
        (e.g. the output of a matmul), not a leaf that requires grad nor a view of one.
        One backward per forward (retain_graph cannot replay it). When no gradient is
        needed (no grad mode, or logits does not require grad) nothing is overwritten.
        The torch backend ignores the flag.
    """
    _check_inputs(logits, targets, ignore_index)
    name = resolve_backend(backend, logits.device)
    if name == "torch":
        _check_target_values(targets, logits.shape[1], ignore_index)
        return _torch_cross_entropy(logits, targets.long(), ignore_index)
    targets = targets.contiguous().long()
    if inplace_backward and torch.is_grad_enabled() and logits.requires_grad:
        _check_may_overwrite(logits)
        return _FusedCrossEntropy.apply(logits, targets, ignore_index, name)
    loss, _, _ = torch.ops.pyllmc.cross_entropy_forward(logits, targets, ignore_index, name)
    return loss


# ---- input checks --------------------------------------------------------------------------

def _check_inputs(logits, targets, ignore_index) -> None:
    check_tensor("logits", logits, ndim=2, contiguous=False)
    check_tensor("targets", targets, dtypes=TARGET_DTYPES, ndim=1, contiguous=False)
    check_same_device(logits=logits, targets=targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    N, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have at least one class (V >= 1); got shape {tuple(logits.shape)}")
    if V > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have stride 1 along the vocabulary (last) dim; got strides "
                         f"{logits.stride()} for shape {tuple(logits.shape)}")
    if N > 1 and logits.stride(0) < V:
        raise ValueError(f"logits rows must not overlap (stride(0) >= V); got strides {logits.stride()} "
                         f"for shape {tuple(logits.shape)}")
    if targets.shape[0] != N:
        raise ValueError(f"targets must have shape ({N},) to match logits {tuple(logits.shape)}; "
                         f"got {tuple(targets.shape)}")


def _check_target_values(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """ValueError unless every target is in [0, V) or ignore_index. One sync (the .item())."""
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= V)
    if bad.any().item():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"targets[{first}] = {int(targets[first])}")


def _check_may_overwrite(logits: torch.Tensor) -> None:
    if logits.is_leaf:
        raise ValueError("inplace_backward=True overwrites logits with their gradient, so logits must be "
                         "an intermediate result (e.g. x @ W.T), not a leaf tensor that requires grad")
    base = logits._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError("inplace_backward=True overwrites logits with their gradient; logits is a view of a "
                         "leaf tensor that requires grad, whose values would be destroyed")


def _owns_padding(logits: torch.Tensor, row_stride: int) -> bool:
    """Whether every row's padding columns [V, row_stride) lie inside logits' storage."""
    N = logits.shape[0]
    storage_elems = logits.untyped_storage().nbytes() // logits.element_size()
    return logits.storage_offset() + N * row_stride <= storage_elems


# ---- the torch reference --------------------------------------------------------------------

def _torch_cross_entropy(logits, targets, ignore_index):
    # per-row losses in the logits' dtype (torch computes them in float32 inside), summed in float32
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return losses.float().sum() / n_valid


# ---- raw kernel calls (no checks: the custom ops below check first) --------------------------------

def _row_stride(logits: torch.Tensor) -> int:
    N, V = logits.shape
    return logits.stride(0) if (N > 1 or logits.stride(0) >= V) else V


def _new_scalar(like: torch.Tensor) -> torch.Tensor:
    return torch.empty((), device=like.device, dtype=torch.float32)


def _forward(logits, targets, ignore_index: int, backend: str):
    """(loss, lse (N,), n_valid) all float32."""
    if backend == "triton":
        return triton_kernels("cross_entropy").cross_entropy_forward(logits, targets, ignore_index)
    N, V = logits.shape
    loss, n_valid = _new_scalar(logits), _new_scalar(logits)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    row_losses = torch.empty_like(lse)  # workspace: per-row losses, summed in a fixed order
    with cuda_launch(logits) as stream:
        cuda_ext().cross_entropy_forward(loss.data_ptr(), lse.data_ptr(), n_valid.data_ptr(), row_losses.data_ptr(),
                                         logits.data_ptr(), targets.data_ptr(), N, V, _row_stride(logits),
                                         ignore_index, dtype_code(logits), stream)
    return loss, lse, n_valid


def _new_grad_like(logits: torch.Tensor) -> torch.Tensor:
    """An (N, V) tensor with logits' row stride, over a buffer holding every row's padding."""
    N, V = logits.shape
    row_stride = _row_stride(logits)
    buffer = torch.empty(N * row_stride, device=logits.device, dtype=logits.dtype)
    return buffer.as_strided((N, V), (row_stride, 1))


def _backward(logits, targets, lse, n_valid, dloss, ignore_index: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return triton_kernels("cross_entropy").cross_entropy_backward(logits, targets, lse, n_valid, dloss,
                                                                      ignore_index)
    N, V = logits.shape
    dlogits = _new_grad_like(logits)
    with cuda_launch(logits) as stream:
        cuda_ext().cross_entropy_backward(dlogits.data_ptr(), logits.data_ptr(), targets.data_ptr(), lse.data_ptr(),
                                          n_valid.data_ptr(), dloss.data_ptr(), N, V, _row_stride(logits),
                                          ignore_index, dtype_code(logits), stream)
    return dlogits


def _fused(logits, targets, ignore_index: int, backend: str):
    """(loss, n_valid); logits overwritten with the gradient for dloss = 1."""
    row_stride = _row_stride(logits)
    zero_padding = row_stride > logits.shape[1] and _owns_padding(logits, row_stride)
    if backend == "triton":
        return triton_kernels("cross_entropy").cross_entropy_fused_forward_backward(logits, targets, ignore_index,
                                                                                    zero_padding)
    N, V = logits.shape
    loss, n_valid = _new_scalar(logits), _new_scalar(logits)
    row_losses = torch.empty(N, device=logits.device, dtype=torch.float32)
    with cuda_launch(logits) as stream:
        cuda_ext().cross_entropy_fused_forward_backward(loss.data_ptr(), n_valid.data_ptr(), row_losses.data_ptr(),
                                                        logits.data_ptr(), targets.data_ptr(), N, V, row_stride,
                                                        ignore_index, zero_padding, dtype_code(logits),
                                                        stream)
    return loss, n_valid


def _scale_grad(dlogits, dloss, backend: str) -> None:
    if backend == "triton":
        triton_kernels("cross_entropy").cross_entropy_scale_grad(dlogits, dloss)
        return
    N, V = dlogits.shape
    with cuda_launch(dlogits) as stream:
        cuda_ext().cross_entropy_scale_grad(dlogits.data_ptr(), dloss.data_ptr(), N, V, _row_stride(dlogits),
                                            dtype_code(dlogits), stream)


# ---- custom ops and autograd ----------------------------------------------------------------------

@torch.library.custom_op("pyllmc::cross_entropy_forward", mutates_args=())
def cross_entropy_forward_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # checked here, on real tensors, so that a compiled graph keeps the op whole
    _check_target_values(targets, logits.shape[1], ignore_index)
    return _forward(logits, targets, ignore_index, backend)


@cross_entropy_forward_op.register_fake
def _(logits, targets, ignore_index, backend):
    N = logits.shape[0]
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, logits.new_empty((N,), dtype=torch.float32), torch.empty_like(scalar)


@torch.library.custom_op("pyllmc::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, n_valid: torch.Tensor,
                              dloss: torch.Tensor, ignore_index: int, backend: str) -> torch.Tensor:
    return _backward(logits, targets, lse, n_valid, dloss, ignore_index, backend)


@cross_entropy_backward_op.register_fake
def _(logits, targets, lse, n_valid, dloss, ignore_index, backend):
    return _new_grad_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, backend = inputs
    _, lse, n_valid = output
    ctx.mark_non_differentiable(lse, n_valid)
    ctx.save_for_backward(logits, targets, lse, n_valid)
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _autograd_backward(ctx, dloss, _dlse, _dn_valid):
    logits, targets, lse, n_valid = ctx.saved_tensors
    dlogits = cross_entropy_backward_op(logits, targets, lse, n_valid, dloss.float().contiguous(), ctx.ignore_index,
                                        ctx.backend)
    return dlogits, None, None, None


cross_entropy_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("pyllmc::cross_entropy_fused_forward_backward", mutates_args=("logits",))
def cross_entropy_fused_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_target_values(targets, logits.shape[1], ignore_index)  # before anything is overwritten
    return _fused(logits, targets, ignore_index, backend)


@cross_entropy_fused_op.register_fake
def _(logits, targets, ignore_index, backend):
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, torch.empty_like(scalar)


@torch.library.custom_op("pyllmc::cross_entropy_scale_grad", mutates_args=("dlogits",))
def cross_entropy_scale_grad_op(dlogits: torch.Tensor, dloss: torch.Tensor, backend: str) -> None:
    _scale_grad(dlogits, dloss, backend)


@cross_entropy_scale_grad_op.register_fake
def _(dlogits, dloss, backend):
    return None


class _FusedCrossEntropy(torch.autograd.Function):
    """The fused classifier under autograd. A mutating custom op cannot carry its own autograd
    formula, so this Function wraps it. logits is deliberately not marked dirty: its history
    (the matmul that produced it) must stay, since the gradient flows back through it; the
    mutation is still visible to autograd through the version counter the custom op bumps."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, backend):
        loss, _ = cross_entropy_fused_op(logits, targets, ignore_index, backend)
        ctx.save_for_backward(logits)  # now holding the gradient for dloss = 1
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (dlogits,) = ctx.saved_tensors
        dlogits = dlogits.detach()  # the storage, without the logits' autograd history
        cross_entropy_scale_grad_op(dlogits, dloss.float().contiguous(), ctx.backend)
        return dlogits, None, None, None
