"""ops.cross_entropy: mean cross-entropy over the vocabulary, with llm.c's fused classifier.

    loss = loss_scale * sum_i (logsumexp(x_i) - x_i,t_i) / n_valid      over rows with t_i != ignore_index
    logsumexp(x_i) = m_i + log d_i,   m_i = max_j x_ij,   d_i = sum_j exp(x_ij - m_i)
    dloss/dx_ij = (exp(x_ij - m_i) * (1 / d_i) - [j == t_i]) * loss_scale * dloss / n_valid

where x_i is row i of logits, or its first num_classes columns when the rest is padding.

Every backend keeps the row max m and the sum d apart in the gradient (as PyTorch and Liger do):
exp(x - lse) with lse rounded to one float32 number would give every probability of the row the
relative error of that rounding, up to half an ulp of |lse| (2e-6 at logit scale 10, |lse| ~ 40),
about 5x PyTorch's own error. With m and d: exp(x - m) has an exact argument where p is large
(x - m is exact for x within a factor 2 of m), and 1 / d is rounded once per row, so each p is
off by exp's error + d's summation error + 2 roundings of 2^-24 (the reciprocal, the product), a
few 1e-7 relative. The multiplication by the row's 1 / d (rather than a division per element)
costs that one extra rounding and keeps the gradient pass one read, one multiply and one write
per element.

Input checks, then the raw calls per backend (cuda: csrc/cross_entropy.cu, triton:
kernels/cross_entropy.py, torch: plain PyTorch below), then the custom ops + autograd glue
(torch.library.custom_op so the op survives torch.compile). Every backend runs inside the
same four custom ops, so they share one contract, the fused path included; the torch backend
is plain PyTorch math, the reference the kernels are compared with.

Two paths:
- default: the forward saves each row's statistics (m, d), float32 (N, 2): 8 bytes a row (the
  lse alone was 4), 64 KB at GPT-2's 8192 rows beside the 0.8 GB of bf16 logits, so the precision
  costs nothing measurable. d rather than log d: exp(x - m - log d) would bring back a rounded
  exponent (half an ulp of log d, up to 5e-7 at V = 50257) and an exp of it, and the backward
  needs 1 / d, one division per row. Ignored rows get (0, 1) and are never read. The backward
  writes a fresh dlogits = (softmax - onehot) * dloss / n_valid.
- inplace_backward=True, llm.c's fused classifier: one kernel computes the loss and writes
  dlogits (for dloss = 1) over the logits' own storage, so the (N, V) gradient needs no
  memory of its own and the logits are read once instead of twice. loss_scale (the
  trainer's 1 / grad_accum_steps, llm.c's 1 / (B*T*grad_accum)) is baked into that kernel:
  the op returns loss_scale * mean and its gradient is already in place, so loss.backward()
  costs nothing more. Only an upstream gradient other than 1 (e.g. loss.backward(g)) runs
  cross_entropy_scale_grad, one more read and write of the (N, V) gradient (the kernels read
  the upstream gradient on the device and move nothing when it is 1). The op is declared as
  mutating `logits` (custom_op mutates_args), which bumps its version counter: autograd then
  refuses to run a backward that needs the old logits ("one of the variables needed for
  gradient computation has been modified by an inplace operation") instead of silently
  using the gradient as if it were logits.

Padded logits: GPT-2's (N, Vp) logits have Vp = 50304 columns for the kernels' alignment and
V = 50257 classes. Passed whole with num_classes=V, the padding columns take no part, get a
zero gradient, and autograd receives the padded tensor's gradient as one buffer. (The
(N, V) column view works too, without a copy, but autograd's backward of the slice then
allocates zeros (N, Vp) and copies the gradient into it.)

Target ids are checked (in [0, V) or ignore_index) with one device-to-host sync per call, or,
inside `with ops.deferred_target_checks():`, with no sync at all: the check runs on the device
and the block's end reads its one flag (after the caller's own sync, e.g. loss.item()). A bad
id then raises the same ValueError at the end of the block; meanwhile its row's loss is NaN
(the kernels never read out of bounds for it).

CUDA graphs: while a stream captures, nothing may wait for the device. A call outside
deferred_target_checks() then raises a RuntimeError before its sync, saying to use the block;
a block that ends during the capture leaves its device flags unread, and `checks.check()`
after each replay of the graph reads them (every replay rewrites them).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Optional

import torch

from ._common import check_same_device, check_tensor, cuda_ext, cuda_launch, dtype_code, graph_capture_underway, \
    resolve_backend, triton_kernels, triton_launch

TARGET_DTYPES = (torch.int64, torch.int32)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1, *,
                  num_classes: Optional[int] = None, inplace_backward: bool = False, loss_scale: float = 1.0,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` (N, V) against class ids `targets` (N,), times loss_scale.

    Returns a float32 0-dim tensor: loss_scale times the mean of -log softmax(logits_i)[t_i]
    over the rows whose target is not `ignore_index`, computed in float32 whatever the
    logits' dtype. If every row is ignored (or N == 0) the loss is defined as 0.0 and all
    gradients are zero (F.cross_entropy gives NaN there).

    logits: float32 / bfloat16 / float16 (N, W). The last dim must have stride 1, but rows may
        lie further apart than W (a column view of a wider tensor is read in place). The
        gradient has logits' shape and row stride.
    num_classes: V, when only the first V <= W columns are classes and the rest is padding
        (GPT-2: W = 50304, V = 50257). The padding is ignored and its gradient is zero.
        Default: W.
    targets: int64 or int32 (N,). Ids must lie in [0, V) or equal ignore_index (which may be
        any int, also >= V), else ValueError; see deferred_target_checks for the sync this costs.
    inplace_backward: the fused classifier. One kernel computes the loss and overwrites
        `logits` with d(loss)/d(logits) for an upstream gradient of 1 (zeros in the padding
        columns); the backward multiplies in the actual upstream gradient in place when it is
        not 1 (rounding once more in the logits' dtype) and hands back that storage as the
        gradient. After the call `logits` no longer holds the logits: nothing else may use
        them, and an op that saved them for its own backward makes the backward raise (version
        counter). logits must be an intermediate result (e.g. the output of a matmul), not a
        leaf that requires grad nor a view of one. One backward per forward (retain_graph
        cannot replay it). When no gradient is needed (no grad mode, or logits does not
        require grad) nothing is overwritten.
    loss_scale: a finite float multiplying the loss (gradient accumulation passes
        1 / grad_accum_steps). With inplace_backward it is part of the fused kernel, so the
        gradient needs no extra pass; otherwise it is an ordinary multiplication.
    """
    V = _check_inputs(logits, targets, ignore_index, num_classes)
    loss_scale = _check_loss_scale(loss_scale)
    name = resolve_backend(backend, logits.device)
    targets = targets.contiguous().long()
    if inplace_backward and torch.is_grad_enabled() and logits.requires_grad:
        _check_may_overwrite(logits)
        return _FusedCrossEntropy.apply(logits, targets, ignore_index, V, loss_scale, name)
    loss, _, _ = torch.ops.pyllmc.cross_entropy_forward(logits, targets, ignore_index, V, name)
    return loss if loss_scale == 1.0 else loss * loss_scale


# ---- deferred target checks ---------------------------------------------------------------------

class TargetChecks:
    """The target checks of one `deferred_target_checks` block: device flags, read once."""

    def __init__(self):
        self._pending: list = []  # (targets, V, ignore_index, bad-any flag on the device)
        self.captured = False     # recorded inside a CUDA graph capture: check() after each replay

    def add(self, targets: torch.Tensor, V: int, ignore_index: int) -> None:
        self._pending.append((targets, V, ignore_index, _bad_targets(targets, V, ignore_index).any()))

    def check(self) -> None:
        """ValueError for the first bad target id recorded so far (one read of the device).
        For a block recorded in a CUDA graph, call it after a replay, outside the capture: the
        flags stay (each replay rewrites them)."""
        if graph_capture_underway():
            raise RuntimeError("TargetChecks.check() reads the device, which a CUDA graph capture forbids; "
                               "call it after replaying the graph")
        pending = self._pending
        if not self.captured:
            self._pending = []
        if pending and torch.stack([flag for *_, flag in pending]).any().item():
            for targets, V, ignore_index, _ in pending:
                _raise_for_bad_targets(targets, V, ignore_index)


_deferred: contextvars.ContextVar[Optional[TargetChecks]] = contextvars.ContextVar("pyllmc_target_checks",
                                                                                  default=None)


@contextlib.contextmanager
def deferred_target_checks() -> Iterator[TargetChecks]:
    """Check ops.cross_entropy's target ids inside the block without a device-to-host sync.

    The check of every call runs on the device; leaving the block reads the result once
    (cheap right after the caller's own sync, e.g. the trainer's loss.item()) and raises the
    ValueError naming the first bad id. Until then a bad id's row has a NaN loss.
    """
    checks = TargetChecks()
    token = _deferred.set(checks)
    try:
        yield checks
    finally:
        _deferred.reset(token)
    if graph_capture_underway():
        checks.captured = True  # nothing may read the device now: the caller checks after a replay
        return
    checks.check()


def _bad_targets(targets: torch.Tensor, V: int, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index) & ((targets < 0) | (targets >= V))  # ignore_index may be >= V


def _raise_for_bad_targets(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    bad = _bad_targets(targets, V, ignore_index)
    if bad.any().item():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"targets[{first}] = {int(targets[first])}")


def _check_target_values(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """ValueError unless every target is in [0, V) or ignore_index: now (one sync), or at the
    end of the enclosing deferred_target_checks block."""
    checks = _deferred.get()
    if checks is not None:
        checks.add(targets, V, ignore_index)
    elif graph_capture_underway():
        raise RuntimeError("ops.cross_entropy checks its target ids with a device-to-host sync, which a CUDA "
                           "graph capture forbids: make the call inside `with ops.deferred_target_checks() as "
                           "checks:` (the check then runs on the device) and call checks.check() after each "
                           "replay of the graph")
    else:
        _raise_for_bad_targets(targets, V, ignore_index)


# ---- input checks --------------------------------------------------------------------------

def _check_inputs(logits, targets, ignore_index, num_classes) -> int:
    """The number of classes V, after checking every argument."""
    check_tensor("logits", logits, ndim=2, contiguous=False)
    check_tensor("targets", targets, dtypes=TARGET_DTYPES, ndim=1, contiguous=False)
    check_same_device(logits=logits, targets=targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    N, W = logits.shape
    if W < 1:
        raise ValueError(f"logits must have at least one class (V >= 1); got shape {tuple(logits.shape)}")
    if W > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have stride 1 along the vocabulary (last) dim; got strides "
                         f"{logits.stride()} for shape {tuple(logits.shape)}")
    if N > 1 and logits.stride(0) < W:
        raise ValueError(f"logits rows must not overlap (stride(0) >= V); got strides {logits.stride()} "
                         f"for shape {tuple(logits.shape)}")
    if targets.shape[0] != N:
        raise ValueError(f"targets must have shape ({N},) to match logits {tuple(logits.shape)}; "
                         f"got {tuple(targets.shape)}")
    if num_classes is None:
        return W
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= W:
        raise ValueError(f"num_classes must be an int in [1, {W}] (logits' last dim); got {num_classes!r}")
    return num_classes


def _check_loss_scale(loss_scale) -> float:
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float, torch.SymFloat)):
        raise ValueError(f"loss_scale must be a finite float; got {loss_scale!r}")
    if torch.compiler.is_compiling():
        # torch.compile may trace a float argument as a symbol (a recompile for a new value makes
        # it dynamic): its value is only known at run time, so only eager calls check it here
        return loss_scale
    if not math.isfinite(loss_scale):
        raise ValueError(f"loss_scale must be a finite float; got {loss_scale!r}")
    return float(loss_scale)


def _check_may_overwrite(logits: torch.Tensor) -> None:
    if logits.is_leaf:
        raise ValueError("inplace_backward=True overwrites logits with their gradient, so logits must be "
                         "an intermediate result (e.g. x @ W.T), not a leaf tensor that requires grad")
    base = logits._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError("inplace_backward=True overwrites logits with their gradient; logits is a view of a "
                         "leaf tensor that requires grad, whose values would be destroyed")


# ---- raw calls per backend (no checks: the custom ops below check first) ----------------------------
#
# `logits` is (N, W) with row stride >= W; the classes are its first V columns.

def _row_stride(logits: torch.Tensor) -> int:
    N, W = logits.shape
    return logits.stride(0) if (N > 1 or logits.stride(0) >= W) else W


def _classes(logits: torch.Tensor, V: int) -> torch.Tensor:
    """The (N, V) class columns of logits, a view."""
    return logits if V == logits.shape[1] else logits[:, :V]


def _new_scalar(like: torch.Tensor) -> torch.Tensor:
    return torch.empty((), device=like.device, dtype=torch.float32)


def _new_grad_like(logits: torch.Tensor) -> torch.Tensor:
    """A tensor of logits' shape and row stride, over a buffer holding every row's padding."""
    N, W = logits.shape
    row_stride = _row_stride(logits)
    buffer = torch.empty(N * row_stride, device=logits.device, dtype=logits.dtype)
    return buffer.as_strided((N, W), (row_stride, 1))


def _torch_forward(x, targets, ignore_index: int):
    """The torch backend: (loss, stats (N, 2), n_valid) in float32 for x (N, V); stats: each row's
    (max, sum of exp(x - max)), (0, 1) for ignored rows."""
    V = x.shape[1]
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    xf = x.float()
    row_max = xf.amax(dim=1)
    row_sum = torch.exp(xf - row_max[:, None]).sum(dim=1)
    picked = xf.gather(1, torch.where(in_range, targets, 0)[:, None]).squeeze(1)
    # (max - x_t) + log(sum) rather than lse - x_t: no cancellation for confident rows
    row_loss = torch.where(in_range, (row_max - picked) + torch.log(row_sum), float("nan"))  # bad id: NaN
    row_loss = torch.where(valid, row_loss, 0.0)
    n_valid = valid.sum().float()
    stats = torch.stack([torch.where(valid, row_max, 0.0), torch.where(valid, row_sum, 1.0)], dim=1)
    return row_loss.sum() / n_valid.clamp(min=1), stats, n_valid


def _torch_write_grad(out, x, targets, stats, scale, ignore_index: int) -> None:
    """The torch backend: out (N, V) = (softmax(x) - onehot) * scale, zero for ignored rows;
    out may be x itself (the fused path). stats: (N, 2) (max, sum); scale: () float32 on the device."""
    V = x.shape[1]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < V)
    grad = torch.exp(x.float() - stats[:, :1]) * (1.0 / stats[:, 1:])  # (N, V) softmax: exp(x - m) * (1 / d)
    grad.scatter_add_(1, torch.where(valid, targets, 0)[:, None], -valid.float()[:, None])
    grad.mul_(scale)
    # ignored rows: zero, by a fill rather than a product (their (0, 1) stats make exp(x) overflow past x ~ 88,
    # and inf * 0 is NaN)
    grad.masked_fill_((targets == ignore_index)[:, None], 0.0)
    out.copy_(grad)


def _forward(logits, targets, ignore_index: int, V: int, backend: str):
    """(loss, stats (N, 2): each row's (max, sum of exp(x - max)), n_valid) all float32."""
    x = _classes(logits, V)
    if backend == "torch":
        return _torch_forward(x, targets, ignore_index)
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("cross_entropy").cross_entropy_forward(x, targets, ignore_index)
    N = x.shape[0]
    loss, n_valid = _new_scalar(x), _new_scalar(x)
    stats = torch.empty((N, 2), device=x.device, dtype=torch.float32)
    row_losses = torch.empty(N, device=x.device, dtype=torch.float32)  # workspace: summed in a fixed order
    with cuda_launch(x) as stream:
        cuda_ext().cross_entropy_forward(loss=loss.data_ptr(), stats=stats.data_ptr(), n_valid=n_valid.data_ptr(),
                                         row_losses=row_losses.data_ptr(), logits=x.data_ptr(),
                                         targets=targets.data_ptr(), N=N, V=V, row_stride=_row_stride(x),
                                         ignore_index=ignore_index, dtype=dtype_code(x), stream=stream)
    return loss, stats, n_valid


def _backward(logits, targets, stats, n_valid, dloss, ignore_index: int, V: int, backend: str) -> torch.Tensor:
    """dlogits of logits' shape and row stride: the class columns written, the rest zero."""
    x = _classes(logits, V)
    if backend == "triton":
        with triton_launch(x):
            dx = triton_kernels("cross_entropy").cross_entropy_backward(x, targets, stats, n_valid, dloss,
                                                                        ignore_index)
        return dx.as_strided(logits.shape, (_row_stride(dx), 1))  # its buffer's padding is zeroed too
    dlogits = _new_grad_like(logits)
    if backend == "torch":
        _torch_write_grad(_classes(dlogits, V), x, targets, stats, dloss / n_valid.clamp(min=1), ignore_index)
        dlogits[:, V:].zero_()
        return dlogits
    N = x.shape[0]
    with cuda_launch(x) as stream:  # the kernel zeroes each row's columns [V, row_stride) too
        cuda_ext().cross_entropy_backward(dlogits=dlogits.data_ptr(), logits=x.data_ptr(),
                                          targets=targets.data_ptr(), stats=stats.data_ptr(),
                                          n_valid=n_valid.data_ptr(), dloss=dloss.data_ptr(),
                                          N=N, V=V, row_stride=_row_stride(x), ignore_index=ignore_index,
                                          dtype=dtype_code(x), stream=stream)
    return dlogits


def _fused(logits, targets, ignore_index: int, V: int, loss_scale: float, backend: str):
    """(loss_scale * mean loss, n_valid); logits overwritten with its gradient for dloss = 1,
    the padding columns [V, W) with zeros."""
    x = _classes(logits, V)
    pad_end = logits.shape[1]  # zeros exactly over the padding columns logits holds
    if backend == "torch":
        loss, stats, n_valid = _torch_forward(x, targets, ignore_index)
        _torch_write_grad(x, x, targets, stats, loss_scale / n_valid.clamp(min=1), ignore_index)
        logits[:, V:].zero_()
        return loss * loss_scale, n_valid
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("cross_entropy").cross_entropy_fused_forward_backward(x, targets, ignore_index,
                                                                                        pad_end, loss_scale)
    N = x.shape[0]
    loss, n_valid = _new_scalar(x), _new_scalar(x)
    row_losses = torch.empty(N, device=x.device, dtype=torch.float32)
    with cuda_launch(x) as stream:
        cuda_ext().cross_entropy_fused_forward_backward(loss=loss.data_ptr(), n_valid=n_valid.data_ptr(),
                                                        row_losses=row_losses.data_ptr(), logits=x.data_ptr(),
                                                        targets=targets.data_ptr(),
                                                        N=N, V=V, row_stride=_row_stride(x), pad_end=pad_end,
                                                        ignore_index=ignore_index, loss_scale=loss_scale,
                                                        dtype=dtype_code(x), stream=stream)
    return loss, n_valid


def _scale_grad(dlogits, dloss, V: int, backend: str) -> None:
    """dlogits' class columns *= dloss, in place (the padding stays zero)."""
    x = _classes(dlogits, V)
    if backend == "torch":
        # On the CPU reading dloss costs nothing, and the usual dloss = 1 then moves no bytes.
        if x.device.type != "cpu" or graph_capture_underway() or dloss.item() != 1.0:
            x.mul_(dloss.to(x.dtype))
        return
    if backend == "triton":
        with triton_launch(x):
            triton_kernels("cross_entropy").cross_entropy_scale_grad(x, dloss)
        return
    N = x.shape[0]
    with cuda_launch(x) as stream:
        cuda_ext().cross_entropy_scale_grad(dlogits=x.data_ptr(), dloss=dloss.data_ptr(), N=N, V=V,
                                            row_stride=_row_stride(x), dtype=dtype_code(x), stream=stream)


# ---- custom ops and autograd ----------------------------------------------------------------------

@torch.library.custom_op("pyllmc::cross_entropy_forward", mutates_args=())
def cross_entropy_forward_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # checked here, on real tensors, so that a compiled graph keeps the op whole
    _check_target_values(targets, num_classes, ignore_index)
    return _forward(logits, targets, ignore_index, num_classes, backend)


@cross_entropy_forward_op.register_fake
def _(logits, targets, ignore_index, num_classes, backend):
    N = logits.shape[0]
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, logits.new_empty((N, 2), dtype=torch.float32), torch.empty_like(scalar)


@torch.library.custom_op("pyllmc::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                              n_valid: torch.Tensor, dloss: torch.Tensor, ignore_index: int, num_classes: int,
                              backend: str) -> torch.Tensor:
    return _backward(logits, targets, stats, n_valid, dloss, ignore_index, num_classes, backend)


@cross_entropy_backward_op.register_fake
def _(logits, targets, stats, n_valid, dloss, ignore_index, num_classes, backend):
    return _new_grad_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, num_classes, backend = inputs
    _, stats, n_valid = output
    ctx.mark_non_differentiable(stats, n_valid)
    ctx.save_for_backward(logits, targets, stats, n_valid)
    ctx.ignore_index = ignore_index
    ctx.num_classes = num_classes
    ctx.backend = backend


def _autograd_backward(ctx, dloss, _dstats, _dn_valid):
    logits, targets, stats, n_valid = ctx.saved_tensors
    dlogits = cross_entropy_backward_op(logits, targets, stats, n_valid, dloss.float().contiguous(), ctx.ignore_index,
                                        ctx.num_classes, ctx.backend)
    return dlogits, None, None, None, None


cross_entropy_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("pyllmc::cross_entropy_fused_forward_backward", mutates_args=("logits",))
def cross_entropy_fused_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
                           loss_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_target_values(targets, num_classes, ignore_index)  # before anything is overwritten (unless deferred)
    return _fused(logits, targets, ignore_index, num_classes, loss_scale, backend)


@cross_entropy_fused_op.register_fake
def _(logits, targets, ignore_index, num_classes, loss_scale, backend):
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, torch.empty_like(scalar)


@torch.library.custom_op("pyllmc::cross_entropy_scale_grad", mutates_args=("dlogits",))
def cross_entropy_scale_grad_op(dlogits: torch.Tensor, dloss: torch.Tensor, num_classes: int, backend: str) -> None:
    _scale_grad(dlogits, dloss, num_classes, backend)


@cross_entropy_scale_grad_op.register_fake
def _(dlogits, dloss, num_classes, backend):
    return None


class _FusedCrossEntropy(torch.autograd.Function):
    """The fused classifier under autograd. A mutating custom op cannot carry its own autograd
    formula, so this Function wraps it. logits is deliberately not marked dirty: its history
    (the matmul that produced it) must stay, since the gradient flows back through it; the
    mutation is still visible to autograd through the version counter the custom op bumps."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, num_classes, loss_scale, backend):
        loss, _ = cross_entropy_fused_op(logits, targets, ignore_index, num_classes, loss_scale, backend)
        ctx.save_for_backward(logits)  # now holding the gradient of the scaled loss for dloss = 1
        ctx.num_classes = num_classes
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (dlogits,) = ctx.saved_tensors
        dlogits = dlogits.detach()  # the storage, without the logits' autograd history
        # the fallback for an upstream gradient other than 1 (the kernel reads it; 1 moves nothing)
        cross_entropy_scale_grad_op(dlogits, dloss.float().contiguous(), ctx.num_classes, ctx.backend)
        return dlogits, None, None, None, None, None
