"""ops.cross_entropy: cross-entropy over the vocabulary, with llm.c's fused classifier and Liger-Kernel's options.

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

Options (Liger-Kernel's, on both paths and every backend, all in float32 inside the kernels):

    z_ij   = softcap * tanh(x_ij / softcap)              softcap > 0 (Gemma 2, nanochat): soft-capped logits;
                                                         m, d, lse and the loss are those of z
    loss_i = (1 - eps) (lse_i - z_i,t_i)                 label_smoothing eps in [0, 1), PyTorch's definition
             + eps (lse_i - mean_j z_ij)                 (F.cross_entropy's, over the V classes, not the padding)
             + zs lse_i^2                                lse_square_scale zs >= 0: PaLM's z-loss
    dz_ij  = exp(z_ij - m_i) * ((1 / d_i)(1 + 2 zs lse_i)) - (1 - eps)[j == t_i] - eps / V
    dx_ij  = dz_ij * (1 - t_ij)(1 + t_ij) * scale_i,     t_ij = tanh(x_ij / softcap) (1 without a cap)

The (m, d) design stays: the z-loss multiplies the row's 1 / d by (1 + 2 zs lse) once per row, so
each p is still exp(z - m) times one per-row factor (one more rounding of that factor, none per
element). reduction: "mean" (over the rows not ignored, the default), "sum", or "none" (the
per-row losses, float32 (N,), 0 for ignored rows); scale_i is dloss / n_valid, dloss, or dloss_i.
The kernels specialize at compile time (CUDA: a kOpts template flag; Triton: OPTS / SOFTCAP
constexprs): with the options at their defaults they run the plain loss's code, unchanged; the
reduction is a runtime choice, one branch per row. return_z_loss=True also returns the z-loss part
of the loss (reduced and scaled like it; no gradient of its own: it is inside the loss), computed
from the saved (m, d) with N-sized torch ops.

reduction "none" with inplace_backward=True: the fused kernel writes each row's gradient of its own
loss (times loss_scale), and the backward scales row i by the upstream gradient's entry i (the
scale-gradient kernel with one factor per row; a row whose factor is 1 moves nothing). That is the
exact gradient for any upstream vector, e.g. per-token weights (loss * w).sum(), for one extra pass
over (N, V) only when the upstream is not all ones: a user choosing the fused classifier for its
memory keeps it with per-token losses, where a refusal would force the (N, V) gradient buffer back.

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
                  reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False,
                  backend: Optional[str] = None):
    """Cross-entropy of `logits` (N, V) against class ids `targets` (N,), times loss_scale.

    Returns a float32 tensor: loss_scale times the mean of -log softmax(logits_i)[t_i]
    over the rows whose target is not `ignore_index` (reduction "mean", 0-dim), their sum
    ("sum", 0-dim) or the per-row losses ("none", (N,), 0 for ignored rows), computed in
    float32 whatever the logits' dtype. If every row is ignored (or N == 0) the mean is
    defined as 0.0 and all gradients are zero (F.cross_entropy gives NaN there).

    logits: float32 / bfloat16 / float16 (N, W). Rows with the last dim at stride 1 are read in
        place, also when they lie further apart than W (a column view of a wider tensor); the
        gradient then has logits' shape and row stride. Any other layout (a transposed view, rows
        that overlap) is copied to a contiguous tensor first (one extra read + write of the logits),
        except with inplace_backward, which refuses it (the gradient would be written into a copy).
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
    reduction: "mean" | "sum" | "none" (see above). With inplace_backward and "none" the fused
        kernel writes each row's gradient and the backward scales row i by the upstream dloss[i].
    label_smoothing: eps in [0, 1), F.cross_entropy's: the target distribution is (1 - eps)
        onehot + eps / V over the V classes (never the padding columns).
    lse_square_scale: zs >= 0, PaLM's z-loss: adds zs * lse_i^2 to each valid row's loss.
    softcap: None, or c > 0: the logits go through c * tanh(x / c) before the softmax (Gemma 2's
        soft-capped head); the gradient flows through the tanh.
    return_z_loss: also return the z-loss part of the loss, reduced and scaled like it (a float32
        tensor of the loss's shape, without a gradient): (loss, z_loss).
    """
    if not inplace_backward and _needs_copy(logits):
        logits = logits.contiguous()  # an ordinary autograd op: the gradient comes back in logits' layout
    V = _check_inputs(logits, targets, ignore_index, num_classes)
    loss_scale = _check_loss_scale(loss_scale)
    options = _check_options(reduction, label_smoothing, lse_square_scale, softcap)
    reduction = options[0]
    name = resolve_backend(backend, logits.device)
    targets = targets.contiguous().long()
    if inplace_backward and torch.is_grad_enabled() and logits.requires_grad:
        _check_may_overwrite(logits)
        loss, stats, n_valid = _FusedCrossEntropy.apply(logits, targets, ignore_index, V, loss_scale, name,
                                                        options, return_z_loss)
    else:
        loss, stats, n_valid = torch.ops.pyllmc.cross_entropy_forward(logits, targets, ignore_index, V, name,
                                                                      *options)
        loss = loss if loss_scale == 1.0 else loss * loss_scale
    if not return_z_loss:
        return loss
    return loss, _z_loss(stats, targets, ignore_index, n_valid, options, loss_scale)


REDUCTIONS = ("mean", "sum", "none")
_REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}  # the CUDA launchers' numbering
DEFAULT_OPTIONS = ("mean", 0.0, 0.0, 0.0)  # (reduction, label_smoothing, lse_square_scale, softcap: 0 = none)


def _z_loss(stats, targets, ignore_index: int, n_valid, options: tuple, loss_scale: float) -> torch.Tensor:
    """The z-loss part of the loss, reduced like it: zs * lse^2 per valid row from the saved (m, d)
    (N, 2) (ignored rows hold (0, 1): lse 0), times loss_scale; no gradient (it is inside the loss)."""
    reduction, _, z_scale, _ = options
    stats = stats.detach()
    lse = stats[:, 0] + torch.log(stats[:, 1])  # (N,)
    rows = torch.where(targets != ignore_index, z_scale * lse * lse, 0.0)
    if reduction == "none":
        return rows * loss_scale
    total = rows.sum()
    if reduction == "mean":
        total = total / n_valid.detach().clamp(min=1)
    return total * loss_scale


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


def _needs_copy(logits) -> bool:
    """A 2-D tensor whose rows the kernels cannot read in place: the last dim strided, or rows overlapping."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        return False  # _check_inputs says what is wrong
    N, W = logits.shape
    return (W > 1 and logits.stride(1) != 1) or (N > 1 and logits.stride(0) < W)


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


def _check_options(reduction, label_smoothing, lse_square_scale, softcap) -> tuple:
    """(reduction, label_smoothing, lse_square_scale, softcap) as the kernels take them (softcap 0.0 for
    None), after checking each; ValueError naming the argument."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")

    def number(label, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat)):
            raise ValueError(f"{label} must be a float; got {value!r}")
        return value

    number("label_smoothing", label_smoothing)
    number("lse_square_scale", lse_square_scale)
    if softcap is not None:
        number("softcap", softcap)
    if torch.compiler.is_compiling():  # symbolic floats: checked in eager calls only (as loss_scale)
        return reduction, label_smoothing, lse_square_scale, 0.0 if softcap is None else softcap
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0.0):
        raise ValueError(f"lse_square_scale (the z-loss scale) must be a finite float >= 0; got {lse_square_scale!r}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be None or a finite float > 0; got {softcap!r}")
    return reduction, float(label_smoothing), float(lse_square_scale), 0.0 if softcap is None else float(softcap)


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


def _torch_forward(x, targets, ignore_index: int, reduction: str = "mean", label_smoothing: float = 0.0,
                   lse_square_scale: float = 0.0, softcap: float = 0.0):
    """The torch backend: (loss, stats (N, 2), n_valid) in float32 for x (N, V); loss () or, for
    reduction "none", (N,); stats: each row's (max, sum of exp(z - max)) over the (capped) logits z,
    (0, 1) for ignored rows."""
    V = x.shape[1]
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    z = x.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    row_max = z.amax(dim=1)
    row_sum = torch.exp(z - row_max[:, None]).sum(dim=1)
    picked = z.gather(1, torch.where(in_range, targets, 0)[:, None]).squeeze(1)
    log_sum = torch.log(row_sum)
    # (max - x_t) + log(sum) rather than lse - x_t: no cancellation for confident rows
    row_loss = (row_max - picked) + log_sum
    if label_smoothing:  # PyTorch's: (1 - eps) nll + eps mean_j (lse - z_j)
        smooth = (row_max - z.sum(dim=1) / V) + log_sum
        row_loss = (1.0 - label_smoothing) * row_loss + label_smoothing * smooth
    if lse_square_scale:
        lse = row_max + log_sum
        row_loss = row_loss + lse_square_scale * lse * lse
    row_loss = torch.where(in_range, row_loss, float("nan"))  # bad id: NaN
    row_loss = torch.where(valid, row_loss, 0.0)
    n_valid = valid.sum().float()
    stats = torch.stack([torch.where(valid, row_max, 0.0), torch.where(valid, row_sum, 1.0)], dim=1)
    if reduction == "none":
        return row_loss, stats, n_valid
    total = row_loss.sum()
    return (total / n_valid.clamp(min=1) if reduction == "mean" else total), stats, n_valid


def _torch_write_grad(out, x, targets, stats, scale, ignore_index: int, label_smoothing: float = 0.0,
                      lse_square_scale: float = 0.0, softcap: float = 0.0) -> None:
    """The torch backend: out (N, V) = dloss/dx * scale, zero for ignored rows (softmax - onehot without
    options); out may be x itself (the fused path). stats: (N, 2) (max, sum); scale: () or (N, 1)
    float32 on the device."""
    V = x.shape[1]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < V)
    z = x.float()
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    inv_sum = 1.0 / stats[:, 1:]  # (N, 1)
    if lse_square_scale:  # the z-loss's 2 zs lse p, folded into the row's factor
        inv_sum = inv_sum * (1.0 + 2.0 * lse_square_scale * (stats[:, :1] + torch.log(stats[:, 1:])))
    grad = torch.exp(z - stats[:, :1]) * inv_sum  # (N, V) softmax: exp(z - m) * (1 / d)
    grad.scatter_add_(1, torch.where(valid, targets, 0)[:, None], -(1.0 - label_smoothing) * valid.float()[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / V)
    grad.mul_(scale)
    if softcap:
        grad.mul_((1.0 - t) * (1.0 + t))  # tanh' = 1 - t^2
    # ignored rows: zero, by a fill rather than a product (their (0, 1) stats make exp(x) overflow past x ~ 88,
    # and inf * 0 is NaN)
    grad.masked_fill_((targets == ignore_index)[:, None], 0.0)
    out.copy_(grad)


def _option_kwargs(reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float) -> dict:
    return dict(reduction=reduction, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                softcap=softcap)


def _cuda_options(reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float) -> dict:
    return dict(reduction=_REDUCTION_CODE[reduction], label_smoothing=label_smoothing,
                lse_square_scale=lse_square_scale, softcap=softcap)


def _forward(logits, targets, ignore_index: int, V: int, backend: str, *, reduction: str = "mean",
             label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float = 0.0):
    """(loss, stats (N, 2): each row's (max, sum of exp(z - max)), n_valid) all float32; loss () or,
    for reduction "none", (N,)."""
    x = _classes(logits, V)
    options = (reduction, label_smoothing, lse_square_scale, softcap)
    if backend == "torch":
        return _torch_forward(x, targets, ignore_index, *options)
    if backend == "triton":
        with triton_launch(x):
            return triton_kernels("cross_entropy").cross_entropy_forward(x, targets, ignore_index,
                                                                         **_option_kwargs(*options))
    N = x.shape[0]
    loss, n_valid = _new_scalar(x), _new_scalar(x)
    stats = torch.empty((N, 2), device=x.device, dtype=torch.float32)
    row_losses = torch.empty(N, device=x.device, dtype=torch.float32)  # workspace: summed in a fixed order
    with cuda_launch(x) as stream:
        cuda_ext().cross_entropy_forward(loss=loss.data_ptr(), stats=stats.data_ptr(), n_valid=n_valid.data_ptr(),
                                         row_losses=row_losses.data_ptr(), logits=x.data_ptr(),
                                         targets=targets.data_ptr(), N=N, V=V, row_stride=_row_stride(x),
                                         ignore_index=ignore_index, dtype=dtype_code(x), stream=stream,
                                         **_cuda_options(*options))
    return (row_losses if reduction == "none" else loss), stats, n_valid


def _backward(logits, targets, stats, n_valid, dloss, ignore_index: int, V: int, backend: str, *,
              reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
              softcap: float = 0.0) -> torch.Tensor:
    """dlogits of logits' shape and row stride: the class columns written, the rest zero. dloss: ()
    float32, or (N,) contiguous for reduction "none"."""
    x = _classes(logits, V)
    options = (reduction, label_smoothing, lse_square_scale, softcap)
    if backend == "triton":
        with triton_launch(x):
            dx = triton_kernels("cross_entropy").cross_entropy_backward(x, targets, stats, n_valid, dloss,
                                                                        ignore_index, **_option_kwargs(*options))
        return dx.as_strided(logits.shape, (_row_stride(dx), 1))  # its buffer's padding is zeroed too
    dlogits = _new_grad_like(logits)
    if backend == "torch":
        scale = {"mean": lambda: dloss / n_valid.clamp(min=1), "sum": lambda: dloss,
                 "none": lambda: dloss[:, None]}[reduction]()
        _torch_write_grad(_classes(dlogits, V), x, targets, stats, scale, ignore_index, *options[1:])
        dlogits[:, V:].zero_()
        return dlogits
    N = x.shape[0]
    with cuda_launch(x) as stream:  # the kernel zeroes each row's columns [V, row_stride) too
        cuda_ext().cross_entropy_backward(dlogits=dlogits.data_ptr(), logits=x.data_ptr(),
                                          targets=targets.data_ptr(), stats=stats.data_ptr(),
                                          n_valid=n_valid.data_ptr(), dloss=dloss.data_ptr(),
                                          N=N, V=V, row_stride=_row_stride(x), ignore_index=ignore_index,
                                          dtype=dtype_code(x), stream=stream, **_cuda_options(*options))
    return dlogits


def _fused(logits, targets, ignore_index: int, V: int, loss_scale: float, backend: str, *,
           reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
           softcap: float = 0.0, return_stats: bool = False):
    """(loss_scale * reduced loss, n_valid) (+ stats (N, 2) with return_stats); logits overwritten with
    its gradient for dloss = 1 (for reduction "none": each row's gradient of loss_scale * its own loss),
    the padding columns [V, W) with zeros. The loss is () or, for "none", (N,)."""
    x = _classes(logits, V)
    pad_end = logits.shape[1]  # zeros exactly over the padding columns logits holds
    options = (reduction, label_smoothing, lse_square_scale, softcap)
    N = x.shape[0]
    if backend == "torch":
        loss, stats, n_valid = _torch_forward(x, targets, ignore_index, *options)
        scale = loss_scale / n_valid.clamp(min=1) if reduction == "mean" else loss_scale
        _torch_write_grad(x, x, targets, stats, scale, ignore_index, *options[1:])
        logits[:, V:].zero_()
        loss = loss * loss_scale
    elif backend == "triton":
        stats = torch.empty((N, 2), device=x.device, dtype=torch.float32) if return_stats else None
        with triton_launch(x):
            loss, n_valid = triton_kernels("cross_entropy").cross_entropy_fused_forward_backward(
                x, targets, ignore_index, pad_end, loss_scale, stats=stats, **_option_kwargs(*options))
        if reduction == "none":
            loss = loss * loss_scale
    else:
        loss, n_valid = _new_scalar(x), _new_scalar(x)
        row_losses = torch.empty(N, device=x.device, dtype=torch.float32)
        stats = torch.empty((N, 2), device=x.device, dtype=torch.float32) if return_stats else None
        with cuda_launch(x) as stream:
            cuda_ext().cross_entropy_fused_forward_backward(loss=loss.data_ptr(), n_valid=n_valid.data_ptr(),
                                                            row_losses=row_losses.data_ptr(), logits=x.data_ptr(),
                                                            targets=targets.data_ptr(),
                                                            N=N, V=V, row_stride=_row_stride(x), pad_end=pad_end,
                                                            ignore_index=ignore_index, loss_scale=loss_scale,
                                                            dtype=dtype_code(x), stream=stream,
                                                            stats=0 if stats is None else stats.data_ptr(),
                                                            **_cuda_options(*options))
        if reduction == "none":
            loss = row_losses * loss_scale
    return (loss, n_valid, stats) if return_stats else (loss, n_valid)


def _scale_grad(dlogits, dloss, V: int, backend: str) -> None:
    """dlogits' class columns *= dloss, in place (the padding stays zero); dloss () or, for reduction
    "none", (N,) contiguous: row i times dloss[i]."""
    x = _classes(dlogits, V)
    per_row = dloss.dim() == 1
    if backend == "torch":
        # On the CPU reading dloss costs nothing, and the usual dloss = 1 then moves no bytes.
        if x.device.type != "cpu" or graph_capture_underway() or not bool((dloss == 1.0).all()):
            x.mul_(dloss.to(x.dtype)[:, None] if per_row else dloss.to(x.dtype))
        return
    if backend == "triton":
        with triton_launch(x):
            triton_kernels("cross_entropy").cross_entropy_scale_grad(x, dloss)
        return
    N = x.shape[0]
    with cuda_launch(x) as stream:
        cuda_ext().cross_entropy_scale_grad(dlogits=x.data_ptr(), dloss=dloss.data_ptr(), N=N, V=V,
                                            row_stride=_row_stride(x), dtype=dtype_code(x), stream=stream,
                                            per_row=per_row)


# ---- custom ops and autograd ----------------------------------------------------------------------
#
# The options travel as (reduction: str, label_smoothing, lse_square_scale, softcap: float, 0 = none),
# trailing arguments with the defaults of the plain loss.

@torch.library.custom_op("pyllmc::cross_entropy_forward", mutates_args=())
def cross_entropy_forward_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
                             backend: str, reduction: str = "mean", label_smoothing: float = 0.0,
                             lse_square_scale: float = 0.0,
                             softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # checked here, on real tensors, so that a compiled graph keeps the op whole
    _check_target_values(targets, num_classes, ignore_index)
    return _forward(logits, targets, ignore_index, num_classes, backend,
                    **_option_kwargs(reduction, label_smoothing, lse_square_scale, softcap))


@cross_entropy_forward_op.register_fake
def _(logits, targets, ignore_index, num_classes, backend, reduction="mean", label_smoothing=0.0,
      lse_square_scale=0.0, softcap=0.0):
    N = logits.shape[0]
    scalar = logits.new_empty((), dtype=torch.float32)
    loss = logits.new_empty((N,), dtype=torch.float32) if reduction == "none" else torch.empty_like(scalar)
    return loss, logits.new_empty((N, 2), dtype=torch.float32), scalar


@torch.library.custom_op("pyllmc::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                              n_valid: torch.Tensor, dloss: torch.Tensor, ignore_index: int, num_classes: int,
                              backend: str, reduction: str = "mean", label_smoothing: float = 0.0,
                              lse_square_scale: float = 0.0, softcap: float = 0.0) -> torch.Tensor:
    return _backward(logits, targets, stats, n_valid, dloss, ignore_index, num_classes, backend,
                     **_option_kwargs(reduction, label_smoothing, lse_square_scale, softcap))


@cross_entropy_backward_op.register_fake
def _(logits, targets, stats, n_valid, dloss, ignore_index, num_classes, backend, reduction="mean",
      label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0):
    return _new_grad_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, num_classes, backend, *options = inputs
    _, stats, n_valid = output
    ctx.mark_non_differentiable(stats, n_valid)
    ctx.save_for_backward(logits, targets, stats, n_valid)
    ctx.ignore_index = ignore_index
    ctx.num_classes = num_classes
    ctx.backend = backend
    ctx.options = tuple(options) + DEFAULT_OPTIONS[len(options):]
    ctx.n_inputs = len(inputs)


def _autograd_backward(ctx, dloss, _dstats, _dn_valid):
    logits, targets, stats, n_valid = ctx.saved_tensors
    dlogits = cross_entropy_backward_op(logits, targets, stats, n_valid, dloss.float().contiguous(), ctx.ignore_index,
                                        ctx.num_classes, ctx.backend, *ctx.options)
    return (dlogits,) + (None,) * (ctx.n_inputs - 1)


cross_entropy_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("pyllmc::cross_entropy_fused_forward_backward", mutates_args=("logits",))
def cross_entropy_fused_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
                           loss_scale: float, backend: str, reduction: str = "mean", label_smoothing: float = 0.0,
                           lse_square_scale: float = 0.0, softcap: float = 0.0,
                           return_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, n_valid, stats): stats (N, 2) with return_stats, else an empty (0, 2)."""
    _check_target_values(targets, num_classes, ignore_index)  # before anything is overwritten (unless deferred)
    out = _fused(logits, targets, ignore_index, num_classes, loss_scale, backend, return_stats=return_stats,
                 **_option_kwargs(reduction, label_smoothing, lse_square_scale, softcap))
    stats = out[2] if return_stats else torch.empty((0, 2), device=logits.device, dtype=torch.float32)
    return out[0], out[1], stats


@cross_entropy_fused_op.register_fake
def _(logits, targets, ignore_index, num_classes, loss_scale, backend, reduction="mean", label_smoothing=0.0,
      lse_square_scale=0.0, softcap=0.0, return_stats=False):
    N = logits.shape[0]
    scalar = logits.new_empty((), dtype=torch.float32)
    loss = logits.new_empty((N,), dtype=torch.float32) if reduction == "none" else torch.empty_like(scalar)
    return loss, scalar, logits.new_empty((N if return_stats else 0, 2), dtype=torch.float32)


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
    mutation is still visible to autograd through the version counter the custom op bumps.
    Returns (loss, stats, n_valid) like the forward op (stats (N, 2) only with want_stats)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, num_classes, loss_scale, backend, options=DEFAULT_OPTIONS,
                want_stats=False):
        loss, n_valid, stats = cross_entropy_fused_op(logits, targets, ignore_index, num_classes, loss_scale,
                                                      backend, *options, return_stats=want_stats)
        ctx.save_for_backward(logits)  # now holding the gradient of the scaled loss for dloss = 1 (per row)
        ctx.num_classes = num_classes
        ctx.backend = backend
        ctx.mark_non_differentiable(stats, n_valid)
        return loss, stats, n_valid

    @staticmethod
    def backward(ctx, dloss, _dstats, _dn_valid):
        (dlogits,) = ctx.saved_tensors
        dlogits = dlogits.detach()  # the storage, without the logits' autograd history
        # the fallback for an upstream gradient other than 1 (the kernel reads it; 1 moves nothing);
        # reduction "none": one factor per row
        cross_entropy_scale_grad_op(dlogits, dloss.float().contiguous(), ctx.num_classes, ctx.backend)
        return dlogits, None, None, None, None, None, None, None
