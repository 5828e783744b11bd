"""pyllmc's op test cases and tolerances, defined once (as torch.testing is for PyTorch).

The test suite (tests/), the GPU smoke (dev/gpu_smoke.py) and the CUDA driver (dev/cuda_driver.py)
build every op case here: its inputs, its reference (the torch backend's math by PyTorch autograd, in
float64 for the truth and in the kernel's dtype for "PyTorch's own error") and which results (outputs
and gradients) are compared, by which criterion:

    case = layernorm_case((37, 768), torch.bfloat16, device, fused=True)
    results = case.run("cuda")          # {"h": ..., "y": ..., "dresidual": ..., "dx": ..., ...}
    case.check(results)                 # AssertionError naming every result out of tolerance
    case.compare(results)               # or the verdicts, one Comparison per result

Comparisons run on the device the results are on, in float64, _CHUNK elements at a time: the GPU
smoke judges GPT-2-sized results without copying them to the CPU, with the same code as the tests.

The one table of numerical tolerances, and the two ways results are compared:

1. Elementwise ops (one rounding from float32 to the output dtype):
   |kernel - reference| <= atol + rtol * |reference|, reference computed in float64.
2. Composite ops (reductions, matmuls: the error grows with the size), flash-attention's
   criterion: the kernel's max error against the float64 reference is at most
   2x PyTorch's own max error in the same dtype, plus a small epsilon.

This module imports only torch and pyllmc: it ships in the package, and tests/ and dev/ import it
from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from pyllmc import ops
from pyllmc.ops.attention import attention_reference
from pyllmc.ops.rope import rope_reference
from pyllmc.optim import AdamW

# dtype -> (rtol, atol) for elementwise results
#
# float32, 1e-6 and 1e-6, and the GPU's fast math. The elementwise fp32 results checked with it are
# LayerNorm's h = residual + x (one IEEE add: correctly rounded everywhere, 0.5 ulp) and GELU.
# Under the interpreter GELU runs in numpy (exp, division correctly rounded or nearly); on the GPU
# Triton compiles tl.exp to ex2.approx.ftz.f32 of x * log2(e) and the division 1 / (1 + e) to
# div.full.f32 (tests/test_triton_gpu_compile.py), each documented to be off by at most 2 ulp,
# i.e. a relative error of 2 * 2^-23 = 2.4e-7 (ftz only flushes e < 2^-126 to 0, when |u| > 43.7
# and gelu(x) < 1e-36: absolute error below atol). GELU with e = exp(-2|u|), inv = 1 / (1 + e):
#   x >= 0: y = x * inv. Relative error <= err(inv) + 2 multiplies + e / (1 + e) * err(e)
#           <= (2 + 0.5) + 2 * 0.5 + 0.5 * 2 ulp, plus the fp32 rounding of u carried into e,
#           weighted by 2u * e^(-2u) <= 1/e: < 6 ulp = 7.2e-7 < rtol. y' has the same terms plus
#           sech^2 = 4 e inv^2 weighted by x * e-terms (< 1): < 8 ulp = 9.5e-7, and |y'| <= 1.13
#           so the bound is 1e-6 * (1 + 1 / 1.13) = 1.9e-6 relative (16 ulp).
#   x < 0:  |y| <= 0.17 and |y'| <= 1.13, so atol alone allows >= 5.9e-6 and 1.9e-6 relative (49
#           and 16 ulp); the error (two 2-ulp instructions, roundings, and 2|u| times u's rounding
#           where e is small, which is where |y| decays like e) stays below that.
# Checked numerically as well: emulating the GPU in numpy float32 with both instructions off by
# 2 ulp in either direction, over x in [-15, 15] (2M points) and 3M draws of 3 * N(0, 1), the
# worst error is 0.28 of this tolerance for y and 0.20 for y'. So 1e-6 holds on the GPU without
# round-to-nearest intrinsics; the interpreter and the CUDA kernel (expf, IEEE division) are closer.
# SwiGLU (silu(a) * b from e = exp(-|a|), the same two instructions): the same emulation over a in
# [-15, 15] (2M points) and 2M draws of 3 N(0, 1), with b, dy = N(0, 1), gives at worst 0.28 of this
# tolerance for y and db and 0.54 for da (the most roundings: dy b s (1 + a (1 - s))).
ELEMENTWISE = {
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (2.0**-7, 1e-6),  # one bf16 ulp: "within bf16 rounding"
    torch.float16: (2.0**-10, 1e-6),  # one fp16 ulp
}

# dtype -> epsilon added to 2x PyTorch's own error, for composite ops
FLASH_EPS = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}

_CHUNK = 1 << 25  # elements per float64 pass: bounds a comparison's scratch memory (~1 GB) at GPT-2's sizes
_FP32_EPS = torch.finfo(torch.float32).eps


# ---- comparisons ---------------------------------------------------------------------------------

@dataclass
class Comparison:
    """The verdict on one result (an output or a gradient) of a case."""
    name: str
    criterion: str      # "elementwise" | "flash" | "exact" | "zero" | "shape" (wrong shape or dtype)
    ok: bool
    max_abs_err: float
    max_rel_err: float  # max abs error / max |reference|
    ratio: float        # error / allowed: <= 1 passes (exact and zero: 0 or inf)
    note: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"{self.name} ({self.criterion}): {verdict}, max abs error {self.max_abs_err:.3e}, "
                f"{self.ratio:.3g} of its bound; {self.note}")


def assert_ok(comparisons: Sequence[Comparison], context: str = "") -> None:
    """Raises AssertionError listing every comparison that failed (or if there were none: a check
    that compared nothing cannot fail)."""
    if not comparisons:
        raise AssertionError(f"{context}nothing was compared")
    failed = [c for c in comparisons if not c.ok]
    if failed:
        raise AssertionError("\n".join(f"{context}{c}" for c in failed))


def _float64_chunks(*tensors: torch.Tensor) -> Iterator[tuple[int, list]]:
    """(offset, aligned float64 pieces of the flattened tensors), _CHUNK elements at a time, on the
    first tensor's device (the others are copied there piece by piece)."""
    device = tensors[0].device
    flat = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), _CHUNK):
        yield start, [f[start:start + _CHUNK].to(device=device, dtype=torch.float64) for f in flat]


def _max(values: Iterable) -> float:
    """The largest value, NaN if any is NaN (Python's max() would drop it), 0.0 for none."""
    values = [float(v) for v in values]
    return math.nan if any(v != v for v in values) else max(values, default=0.0)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 on a's device; NaN if any difference is NaN; 0.0 for empty tensors."""
    return _max((x - y).abs().max() for _, (x, y) in _float64_chunks(a, b))


def _layout_problem(name: str, actual: torch.Tensor, reference: torch.Tensor,
                    dtype: Optional[torch.dtype]) -> Optional[Comparison]:
    """A failed comparison when `actual` has the wrong shape, or not `dtype` (when given)."""
    if tuple(actual.shape) != tuple(reference.shape) or (dtype is not None and actual.dtype != dtype):
        want = f"{tuple(reference.shape)}" + (f" {dtype}" if dtype is not None else "")
        return Comparison(name, "shape", False, math.inf, math.inf, math.inf,
                          f"got {tuple(actual.shape)} {actual.dtype}, want {want}")
    return None


def compare_elementwise(actual: torch.Tensor, reference: torch.Tensor, name: str = "result", *,
                        dtype: Optional[torch.dtype] = None) -> Comparison:
    """Criterion 1: every element within atol + rtol * |reference| (ELEMENTWISE[actual.dtype]);
    a NaN is out of tolerance, equal infinities are equal. dtype: the dtype actual must have."""
    problem = _layout_problem(name, actual, reference, dtype)
    if problem:
        return problem
    rtol, atol = ELEMENTWISE[actual.dtype]
    errs, ratios, scales = [], [], []
    n_bad, first_bad = 0, None
    for start, (a, r) in _float64_chunks(actual, reference):
        diff = (a - r).abs()
        allowed = atol + rtol * r.abs()
        equal = a == r  # also equal infinities, whose difference is NaN
        bad = ~(equal | (diff <= allowed))
        errs.append(torch.where(equal, 0.0, diff).max())
        ratios.append(torch.where(equal, 0.0, diff / allowed).max())
        scales.append(r.abs().max())
        bad_here = int(bad.sum())
        if bad_here and first_bad is None:
            i = int(bad.nonzero()[0, 0])
            where = [int(k) for k in torch.unravel_index(torch.tensor(start + i), tuple(actual.shape))] \
                if actual.dim() else []
            first_bad = f"first at {where}: got {a[i].item()!r}, want {r[i].item()!r}"
        n_bad += bad_here
    err, ratio, scale = _max(errs), _max(ratios), _max(scales)
    note = f"rtol {rtol:g}, atol {atol:g}"
    if n_bad:
        note = f"{n_bad} of {actual.numel()} elements out of tolerance ({note}); {first_bad}"
    return Comparison(name, "elementwise", n_bad == 0, err, err / scale if scale else err,
                      ratio if math.isfinite(ratio) else math.inf, note)


def compare_flash(actual: torch.Tensor, reference: torch.Tensor, torch_same_dtype: torch.Tensor,
                  name: str = "result", *, dtype: Optional[torch.dtype] = None) -> Comparison:
    """Criterion 2 (flash-attention's): actual finite and max |actual - reference| <= 2 x max
    |torch_same_dtype - reference| + FLASH_EPS[actual.dtype]. reference: the float64 (or float32)
    truth; torch_same_dtype: PyTorch's own result computed in actual's dtype from the same inputs.
    dtype: the dtype actual must have."""
    problem = _layout_problem(name, actual, reference, dtype)
    if problem:
        return problem
    errs, scales, finite = [], [], True
    for _, (a, r) in _float64_chunks(actual, reference):
        finite = finite and bool(a.isfinite().all())
        errs.append((a - r).abs().max())
        scales.append(r.abs().max())
    err, scale = _max(errs), _max(scales)
    torch_err = max_abs_err(torch_same_dtype, reference)
    eps = FLASH_EPS[actual.dtype]
    bound = 2 * torch_err + eps
    ok = finite and err <= bound
    return Comparison(name, "flash", ok, err, err / scale if scale else err, err / bound if finite else math.inf,
                      f"bound 2 x torch's {torch_err:.2e} + {eps:g}" + ("" if finite else "; non-finite values"))


def compare_exact(name: str, a: torch.Tensor, b: torch.Tensor) -> Comparison:
    """Bitwise equality (determinism: two identical calls)."""
    same = tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and torch.equal(a, b)
    err = 0.0 if same else (max_abs_err(a, b) if a.shape == b.shape else math.inf)
    return Comparison(name, "exact", same, err, err, 0.0 if same else math.inf, "two identical calls, bitwise")


def compare_zero(name: str, t: torch.Tensor) -> Comparison:
    """Every element exactly 0 (a gradient that must not leak into padding)."""
    nonzero = int((t != 0).sum())
    err = _max([t.abs().max()]) if t.numel() else 0.0
    return Comparison(name, "zero", nonzero == 0, err, err, 0.0 if nonzero == 0 else math.inf,
                      f"{nonzero} nonzero entries")


def assert_elementwise_close(actual: torch.Tensor, reference: torch.Tensor, name: str = "result") -> None:
    """compare_elementwise, raising AssertionError when out of tolerance."""
    assert_ok([compare_elementwise(actual, reference, name)])


def assert_flash_close(actual: torch.Tensor, reference: torch.Tensor, torch_same_dtype: torch.Tensor,
                       name: str = "result") -> None:
    """compare_flash, raising AssertionError when out of tolerance."""
    assert_ok([compare_flash(actual, reference, torch_same_dtype, name)])


# ---- random inputs -------------------------------------------------------------------------------

def _source(device, generator: Optional[torch.Generator]) -> torch.device:
    """Where numbers are drawn: on the generator's device when one is given (the same seed gives the
    same inputs on every device, as the CUDA driver's digests need), else on `device` from the global RNG."""
    return generator.device if generator is not None else torch.device(device)


def _randn(shape, dtype: torch.dtype, device, generator: Optional[torch.Generator] = None, *,
           scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """scale * N(0, 1) + shift, rounded to dtype, on device."""
    t = torch.randn(shape, generator=generator, device=_source(device, generator))
    return (scale * t + shift).to(dtype).to(device)


def _randint(high: int, shape, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator, device=_source(device, generator)).to(device)


# ---- the cases -----------------------------------------------------------------------------------

class OpCase:
    """One call of an op on given inputs, and how each of its results is judged.

    inputs: the op's tensor arguments by name, in its order; grad_outputs: the upstream gradient of
    each output by name. Results are named by output ("y", "h", "out") and, for input "x", "dx".
    Subclasses say how the op is called (call: through pyllmc.ops on a backend) and what it computes
    (math: plain PyTorch, the torch backend's math, in the inputs' dtype).
    """
    op = ""
    outputs: tuple = ()             # the op's outputs, in the order it returns them
    differentiable: tuple = ()      # the inputs whose gradients are results
    elementwise = frozenset()       # results judged elementwise (one rounding); the others by the flash criterion

    def __init__(self, inputs: dict, grad_outputs: dict):
        self.inputs = inputs
        self.grad_outputs = grad_outputs

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[self.differentiable[0]].dtype

    @property
    def device(self) -> torch.device:
        return self.inputs[self.differentiable[0]].device

    def call(self, backend: str, **inputs):
        raise NotImplementedError

    def math(self, **inputs):
        raise NotImplementedError

    def _autograd(self, fn, dtype: Optional[torch.dtype] = None) -> dict:
        """fn(**leaves), then backward with grad_outputs. leaves: the inputs detached (the differentiable
        ones cast to dtype when given, else sharing the inputs' storage and strides), the differentiable
        ones requiring grad."""
        leaves = {}
        for name, t in self.inputs.items():
            t = t.detach()
            if name in self.differentiable:
                t = (t if dtype is None else t.to(dtype)).requires_grad_(True)
            leaves[name] = t
        outs = fn(**leaves)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        upstream = [self.grad_outputs[name].to(device=o.device, dtype=o.dtype) for name, o in zip(self.outputs, outs)]
        torch.autograd.backward(outs, upstream)
        results = {name: o.detach() for name, o in zip(self.outputs, outs)}
        results.update({f"d{name}": leaves[name].grad for name in self.differentiable})
        return results

    def run(self, backend: str) -> dict:
        """The op's outputs and gradients, computed by pyllmc.ops on `backend`."""
        return self._autograd(lambda **leaves: self.call(backend, **leaves))

    def reference(self, dtype: torch.dtype = torch.float64) -> dict:
        """The same results by PyTorch autograd of the plain math, inputs cast to dtype, on their device."""
        return self._autograd(self.math, dtype)

    def compare(self, results: dict) -> list:
        """One Comparison per result given (a subset of run()'s is fine), in results' order."""
        truth = self.reference()
        unknown = set(results) - set(truth)
        if unknown:
            raise KeyError(f"{self.op} has no results {sorted(unknown)}; its results: {sorted(truth)}")
        same = self.reference(self.dtype) if set(results) - self.elementwise else {}
        return [compare_elementwise(got, truth[name], name, dtype=self.dtype) if name in self.elementwise
                else compare_flash(got, truth[name], same[name], name, dtype=self.dtype)
                for name, got in results.items()]

    def check(self, results: dict) -> None:
        """compare(), raising AssertionError naming every result out of tolerance."""
        assert_ok(self.compare(results), f"{self.op}: ")


class GeluCase(OpCase):
    """ops.gelu (tanh approximation): inputs x; results y, dx, both elementwise."""
    op = "gelu"
    outputs = ("y",)
    differentiable = ("x",)
    elementwise = frozenset({"y", "dx"})

    def call(self, backend, x):
        return ops.gelu(x, backend=backend)

    def math(self, x):
        return F.gelu(x, approximate="tanh")


class SwigluCase(OpCase):
    """ops.swiglu (silu(a) * b): inputs a, b; results y, da, db. With one input x (..., 2H),
    ops.swiglu_packed: swiglu of x's halves, results y, dx. All elementwise (one rounding)."""
    elementwise = frozenset({"y", "da", "db", "dx"})
    outputs = ("y",)

    def __init__(self, inputs: dict, grad_outputs: dict):
        super().__init__(inputs, grad_outputs)
        self.packed = "x" in inputs
        self.op = "swiglu_packed" if self.packed else "swiglu"
        self.differentiable = tuple(inputs)

    def call(self, backend, a=None, b=None, x=None):
        if x is not None:
            return ops.swiglu_packed(x, backend=backend)
        return ops.swiglu(a, b, backend=backend)

    def math(self, a=None, b=None, x=None):
        if x is not None:
            a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class Relu2Case(OpCase):
    """ops.relu2 (relu(x)^2): inputs x; results y, dx, both elementwise."""
    op = "relu2"
    outputs = ("y",)
    differentiable = ("x",)
    elementwise = frozenset({"y", "dx"})

    def call(self, backend, x):
        return ops.relu2(x, backend=backend)

    def math(self, x):
        return F.relu(x).square()


class RopeCase(OpCase):
    """ops.rope (rotary position embedding, "rotate halves"): inputs x (B, T, H, D) and the float32
    tables cos, sin (T_max, D/2), positions start..start+T-1; results y, dx, both elementwise: each
    output element is x1 c -/+ x2 s in float32, then one rounding. In float32 the kernels' error is
    at most ~ulp(|x| max) / 2 + ulp(|y|) / 2 absolute (with or without an FMA), under atol for |x| < 8."""
    op = "rope"
    outputs = ("y",)
    differentiable = ("x",)
    elementwise = frozenset({"y", "dx"})

    def __init__(self, inputs: dict, grad_outputs: dict, start: int = 0):
        super().__init__(inputs, grad_outputs)
        self.start = start

    def call(self, backend, x, cos, sin):
        return ops.rope(x, cos, sin, start=self.start, backend=backend)

    def math(self, x, cos, sin):
        return rope_reference(x, cos, sin, self.start)


class LayerNormCase(OpCase):
    """ops.layernorm: inputs x, weight, bias; results y, dx, dweight, dbias. With a residual input,
    ops.fused_residual_layernorm: h = residual + x (judged elementwise: one rounding) and y = LN(h),
    plus dresidual. The rest by the flash criterion."""
    elementwise = frozenset({"h"})

    def __init__(self, inputs: dict, grad_outputs: dict, eps: float = 1e-5):
        super().__init__(inputs, grad_outputs)
        self.eps = eps
        self.fused = "residual" in inputs
        self.op = "fused_residual_layernorm" if self.fused else "layernorm"
        self.outputs = ("h", "y") if self.fused else ("y",)
        self.differentiable = tuple(inputs)

    def call(self, backend, x, weight, bias, residual=None):
        if residual is None:
            return ops.layernorm(x, weight, bias, self.eps, backend=backend)
        return ops.fused_residual_layernorm(residual, x, weight, bias, self.eps, backend=backend)

    def math(self, x, weight, bias, residual=None):
        if residual is None:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        h = residual + x
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, self.eps)


class RMSNormCase(OpCase):
    """ops.rmsnorm: inputs x and, when given, weight; results y, dx (, dweight). With a residual input,
    ops.fused_residual_rmsnorm: h = residual + x (judged elementwise: one rounding) and y = RMSNorm(h),
    plus dresidual. The rest by the flash criterion against F.rms_norm."""
    elementwise = frozenset({"h"})

    def __init__(self, inputs: dict, grad_outputs: dict, eps: float = 1e-6):
        super().__init__(inputs, grad_outputs)
        self.eps = eps
        self.fused = "residual" in inputs
        self.op = "fused_residual_rmsnorm" if self.fused else "rmsnorm"
        self.outputs = ("h", "y") if self.fused else ("y",)
        self.differentiable = tuple(inputs)

    def call(self, backend, x, weight=None, residual=None):
        if residual is None:
            return ops.rmsnorm(x, weight, self.eps, backend=backend)
        return ops.fused_residual_rmsnorm(residual, x, weight, self.eps, backend=backend)

    def math(self, x, weight=None, residual=None):
        if residual is None:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        h = residual + x
        return h, F.rms_norm(h, (h.shape[-1],), weight, self.eps)

class AttentionCase(OpCase):
    """ops.attention (causal): inputs q (B, H, T, D), k, v (B, H_kv, T, D) (H_kv dividing H: grouped-query
    attention; H_kv = H: multi-head); results out, dq, dk, dv, by the flash criterion against plain-math
    attention (pyllmc.ops.attention.attention_reference, which repeats K/V per query head)."""
    op = "attention"
    outputs = ("out",)
    differentiable = ("q", "k", "v")

    def call(self, backend, q, k, v):
        return ops.attention(q, k, v, backend=backend)

    def math(self, q, k, v):
        return attention_reference(q, k, v, compute_dtype=q.dtype)


class CrossEntropyCase(OpCase):
    """ops.cross_entropy on logits (N, V) with class ids targets (N,) and upstream gradient dloss;
    results loss (float32, 0-dim), dlogits (N, V) and, when the logits are the first V columns of a
    wider buffer, "dlogits padding" (the gradient of the other columns: all zero).

    storage: the (N, Vp) buffer whose first V columns are the logits (default: the logits themselves).
    run() computes the op on an intermediate copy of it (leaf * 1.0, as the lm_head matmul's output:
    the fused path inplace_backward=True writes its gradient there), passed as its (N, V) view (row
    stride Vp) or, with whole_buffer, whole with num_classes=V as the model calls it.

    The criteria are flash-attention's, with one allowance for the loss's own rounding (below), and the
    references are computed a block of rows at a time: at GPT-2's size a float64 reference of the whole
    (8192, 50257) would need ~10 GB. Rows are independent and share only the 1 / n_valid factor.

    Options (ops.cross_entropy's): reduction ("none": loss and dloss are (N,)), label_smoothing (the
    reference is F.cross_entropy's own), lse_square_scale and softcap (PyTorch has none: the reference
    adds zs * logsumexp^2 to F.cross_entropy's per-row loss and caps the logits with torch.tanh, by
    autograd, in float64 for the truth).
    """
    op = "cross_entropy"
    outputs = ("loss",)
    differentiable = ("logits",)

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor, dloss: Optional[torch.Tensor] = None, *,
                 ignore_index: int = -1, storage: Optional[torch.Tensor] = None, inplace_backward: bool = False,
                 whole_buffer: bool = False, reduction: str = "mean", label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None):
        if dloss is None:
            dloss = torch.ones(logits.shape[:1] if reduction == "none" else (), device=logits.device)
        super().__init__({"logits": logits, "targets": targets}, {"loss": dloss})
        self.ignore_index = ignore_index
        self.storage = logits if storage is None else storage
        self.inplace_backward = inplace_backward
        self.whole_buffer = whole_buffer
        self.options = dict(reduction=reduction, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=softcap)

    @property
    def dloss(self) -> torch.Tensor:
        return self.grad_outputs["loss"]

    def _n_valid(self) -> torch.Tensor:
        return (self.inputs["targets"] != self.ignore_index).sum().clamp(min=1)

    def run(self, backend: str) -> dict:
        N, V = self.inputs["logits"].shape
        weight = self.storage.detach().requires_grad_(True)  # (N, Vp)
        buffer = weight * 1.0  # an intermediate (the fused path refuses leaves); exact
        if self.whole_buffer:
            loss = ops.cross_entropy(buffer, self.inputs["targets"], self.ignore_index, num_classes=V,
                                     inplace_backward=self.inplace_backward, backend=backend, **self.options)
        else:
            loss = ops.cross_entropy(buffer[:, :V], self.inputs["targets"], self.ignore_index,
                                     inplace_backward=self.inplace_backward, backend=backend, **self.options)
        loss.backward(self.dloss.to(weight.device))
        results = {"loss": loss.detach(), "dlogits": weight.grad[:, :V]}
        if weight.shape[1] > V:
            results["dlogits padding"] = weight.grad[:, V:]
        return results

    def reference(self, dtype: torch.dtype = torch.float64, rows: Optional[slice] = None) -> dict:
        """loss (this block's part of the mean when rows is given) and dlogits of the rows, by
        autograd of F.cross_entropy with pyllmc's conventions (mean over the rows not ignored, 0.0
        when all are), computed in dtype on the logits' device."""
        rows = rows or slice(None)
        x = self.inputs["logits"][rows].detach().to(dtype).requires_grad_(True)
        loss = self._loss_math(x, self.inputs["targets"][rows])
        dloss = self.dloss[rows] if self.dloss.dim() else self.dloss
        loss.backward(dloss.to(device=x.device, dtype=dtype))
        return {"loss": loss.detach(), "dlogits": x.grad}

    def _loss_math(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of rows x (n, V) in x's dtype: F.cross_entropy (with label smoothing), the cap and the
        z-loss in plain PyTorch; reduced as the options say (a part of the whole's mean for a block)."""
        o = self.options
        t = targets.long()
        z = x if o["softcap"] is None else o["softcap"] * torch.tanh(x / o["softcap"])
        rows = F.cross_entropy(z, t, ignore_index=self.ignore_index, reduction="none",
                               label_smoothing=o["label_smoothing"])  # (n,), 0 for ignored rows
        if o["lse_square_scale"]:
            lse = torch.logsumexp(z, dim=1)
            rows = rows + torch.where(t != self.ignore_index, o["lse_square_scale"] * lse * lse, 0.0)
        if o["reduction"] == "none":
            return rows
        total = rows.sum()
        return total / self._n_valid() if o["reduction"] == "mean" else total

    def _blocks(self) -> list:
        N, V = self.inputs["logits"].shape
        step = max(1, _CHUNK // max(V, 1))
        return [slice(a, min(a + step, N)) for a in range(0, N, step)]

    def compare(self, results: dict) -> list:
        unknown = set(results) - {"loss", "dlogits", "dlogits padding"}
        if unknown:
            raise KeyError(f"cross_entropy has no results {sorted(unknown)}")
        blocks = self._blocks()
        keep = len(blocks) == 1  # one block: its float64 reference serves both passes
        losses = []
        scale, kept = 0.0, None
        for rows in blocks:  # pass 1: the float64 loss and the gradient's largest entry
            ref = self.reference(torch.float64, rows)
            losses.append(ref["loss"])
            scale = max(scale, float(ref["dlogits"].abs().max()) if ref["dlogits"].numel() else 0.0)
            kept = ref if keep else None
        truth_loss = torch.cat(losses) if self.options["reduction"] == "none" else \
            torch.stack(losses).sum() if losses else torch.zeros((), dtype=torch.float64, device=self.device)
        out = []
        for name, got in results.items():
            if name == "loss":
                out.append(self._compare_loss(got, truth_loss))
            elif name == "dlogits":
                out.append(self._compare_dlogits(got, blocks, scale, kept))
            else:
                out.append(compare_zero(name, got))
        return out

    def _compare_loss(self, loss: torch.Tensor, truth: torch.Tensor) -> Comparison:
        """The flash criterion, or within 4 float32 ulps of the truth. The loss is one fp32 number
        whose rounding alone is half an ulp of its size: at a confident wrong loss of ~1e4 that is
        5e-4, far above FLASH_EPS. PyTorch's fp32 result can land on the correctly rounded value by
        luck, so "2 x torch's error" does not cover it."""
        if loss.dtype != torch.float32 or tuple(loss.shape) != tuple(truth.shape):
            return Comparison("loss", "shape", False, math.inf, math.inf, math.inf,
                              f"got {tuple(loss.shape)} {loss.dtype}, want float32 {tuple(truth.shape)}")
        with torch.no_grad():  # PyTorch's own loss in the logits' dtype, whole
            same = self._loss_math(self.inputs["logits"].detach(), self.inputs["targets"])
        flash = compare_flash(loss, truth, same, "loss")
        ulps = 4 * _FP32_EPS * float(truth.abs().max()) if truth.numel() else 0.0
        if flash.ok or not math.isfinite(flash.max_abs_err) or flash.max_abs_err > ulps:
            return flash
        return Comparison("loss", "flash", True, flash.max_abs_err, flash.max_rel_err,
                          flash.max_abs_err / ulps if ulps else 0.0, f"within 4 fp32 ulps of the truth ({ulps:.2e})")

    def _compare_dlogits(self, grad: torch.Tensor, blocks: list, scale: float, kept: Optional[dict]) -> Comparison:
        """The flash criterion on gradients divided by their largest reference entry (at V = 50257 the
        entries are ~1e-5, and an absolute epsilon alone could not fail), with no other allowance.

        None is needed since every backend keeps each row's max m and sum d apart in the gradient,
        p = exp(x - m) * (1 / d), as PyTorch does (pyllmc/ops/cross_entropy.py). Per element, relative
        to p: x - m is exact where p is large (x within a factor 2 of m; elsewhere it is off by half an
        ulp of |x - m|, worth p |x - m| 2^-24 <= 2^-24 / e of the largest p), exp2 is off by <= 2 ulp
        (ex2.approx on the GPU; the CPU's is within 1), d by its terms' error plus the summation's few
        ulp, 1 / d and the product by half an ulp each; then (p - onehot) and the scale round twice
        more. Some 8 ulp of the largest entry at most, 5e-7 after the division by it: below
        FLASH_EPS[float32] = 1e-5 whatever PyTorch's own error; bf16 and fp16 rounding dominate theirs.
        This criterion cannot see a 5x loss of fp32 precision at moderate logits (FLASH_EPS is 75x the
        error at logit scale 10); tests/test_cross_entropy.py's test_cross_entropy_gradient_precision
        holds that case to 2x PyTorch's own error with no epsilon.

        Gone: the kernels used to take p = exp(x - lse) with the log-sum-exp rounded to one float32
        number, so every p of a row carried up to half an ulp of |lse| as its relative error (2e-6 at
        logit scale 10, 5x PyTorch's; 6e-4 of the largest entry at |logits| ~ 1e4, ulp(3e4) = 0.002),
        and each element was allowed p x 2 ulps of |lse| x |dloss| / n_valid on top of the criterion."""
        dtype = self.inputs["logits"].dtype
        problem = _layout_problem("dlogits", grad, self.inputs["logits"], dtype)
        if problem:
            return problem
        s = max(scale, 1e-30)
        err = torch_err = 0.0
        finite = True
        for rows in blocks:
            truth = (kept or self.reference(torch.float64, rows))["dlogits"]
            same = self.reference(dtype, rows)["dlogits"]
            got = grad[rows].to(device=truth.device, dtype=torch.float64)
            if not got.numel():
                continue
            finite = finite and bool(got.isfinite().all())
            err = _max([err, ((got / s).to(dtype).double() - truth / s).abs().max()])
            torch_err = _max([torch_err, ((same.double() / s).to(dtype).double() - truth / s).abs().max()])
        eps = FLASH_EPS[dtype]
        bound = 2 * torch_err + eps
        ok = finite and err <= bound
        return Comparison("dlogits", "flash", ok, err * s, err, err / bound if finite else math.inf,
                          f"divided by {scale:.3g}; bound 2 x torch's {torch_err:.2e} + {eps:g}"
                          + ("" if finite else "; non-finite values"))


class LinearCrossEntropyCase(OpCase):
    """ops.linear_cross_entropy: inputs hidden (N, C), weight (W, C), targets (N,) and, when given,
    bias (W,); results loss (float32, 0-dim), dhidden, dweight (, dbias), all by the flash criterion
    against F.linear + F.cross_entropy (pyllmc's convention: mean over the rows not ignored, 0 when all
    are; the first num_classes columns are classes, the rest padding)."""
    op = "linear_cross_entropy"
    outputs = ("loss",)

    def __init__(self, inputs: dict, grad_outputs: dict, *, num_classes: int, loss_scale: float = 1.0,
                 chunk_rows: Optional[int] = None, ignore_index: int = -1):
        super().__init__(inputs, grad_outputs)
        self.num_classes, self.loss_scale, self.chunk_rows = num_classes, loss_scale, chunk_rows
        self.ignore_index = ignore_index
        self.differentiable = tuple(name for name in ("hidden", "weight", "bias") if name in inputs)

    def call(self, backend, hidden, weight, targets, bias=None):
        return ops.linear_cross_entropy(hidden, weight, targets, self.ignore_index, bias=bias,
                                        num_classes=self.num_classes, loss_scale=self.loss_scale,
                                        chunk_rows=self.chunk_rows, backend=backend)

    def math(self, hidden, weight, targets, bias=None):
        logits = F.linear(hidden, weight, bias)[..., :self.num_classes]
        t = targets.reshape(-1)
        total = F.cross_entropy(logits.reshape(t.numel(), -1), t, ignore_index=self.ignore_index, reduction="sum")
        return total * self.loss_scale / (t != self.ignore_index).sum().clamp(min=1)

    def compare(self, results: dict) -> list:
        truth = self.reference()
        same = self.reference(self.dtype)
        return [compare_flash(got, truth[name], same[name], name,
                              dtype=torch.float32 if name == "loss" else self.dtype)
                for name, got in results.items()]


class AdamWCase:
    """`steps` steps of pyllmc.optim.AdamW (lr 1e-3, betas (0.9, 0.95), eps 1e-8; weight decay 0.1 on
    the `decayed` tensors, 0 on the others; seed 7 for stochastic rounding) from given parameters and
    per-step gradients. Results: "params" and each state tensor ("exp_avg", "exp_avg_sq", "master"),
    concatenated over the tensors; judged elementwise against the torch backend (torch.optim.AdamW's
    math, the same dtype and, with stochastic rounding, the same random bits)."""
    op = "adamw"

    def __init__(self, params: list, grads: list, decayed: Sequence[bool], stochastic_rounding: bool = False):
        self.params = params          # the initial values
        self.grads = grads            # grads[step][i]: the gradient of params[i] at that step
        self.decayed = list(decayed)
        self.stochastic_rounding = stochastic_rounding

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def run(self, backend: str) -> dict:
        params = [p.detach().clone().requires_grad_(True) for p in self.params]
        groups = [{"params": [p for p, d in zip(params, self.decayed) if d], "weight_decay": 0.1},
                  {"params": [p for p, d in zip(params, self.decayed) if not d], "weight_decay": 0.0}]
        opt = AdamW([g for g in groups if g["params"]], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                    stochastic_rounding=self.stochastic_rounding, seed=7, backend=backend)
        for grads in self.grads:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results = {"params": torch.cat([p.detach().reshape(-1) for p in params])}
        for key in ("exp_avg", "exp_avg_sq", "master"):
            tensors = [opt.state[p][key].reshape(-1) for p in params if key in opt.state[p]]
            if tensors:
                results[key] = torch.cat(tensors)
        return results

    def reference(self) -> dict:
        return self.run("torch")

    def compare(self, results: dict) -> list:
        want = self.reference()
        if set(results) != set(want):
            return [Comparison("state", "shape", False, math.inf, math.inf, math.inf,
                               f"results {sorted(results)} != the torch backend's {sorted(want)}")]
        return [compare_elementwise(results[k], want[k], k) for k in want]

    def check(self, results: dict) -> None:
        assert_ok(self.compare(results), "adamw: ")


# ---- cases with random inputs --------------------------------------------------------------------
#
# Each draws its inputs in `dtype` on `device`: from the global RNG there, or from `generator` (on its
# own device, then copied) for inputs that a seed fixes on every device.

def gelu_case(shape, dtype: torch.dtype, device="cpu", *, generator: Optional[torch.Generator] = None) -> GeluCase:
    """x = 3 N(0, 1) (reaching both tails), dy = N(0, 1)."""
    x = _randn(shape, dtype, device, generator, scale=3.0)
    return GeluCase({"x": x}, {"y": _randn(shape, dtype, device, generator)})


def swiglu_case(shape, dtype: torch.dtype, device="cpu", *, layout: str = "two", bias: float = 0.0,
                generator: Optional[torch.Generator] = None) -> SwigluCase:
    """a = 3 N(0, 1) + bias (reaching both tails of silu), b = N(0, 1), dy = N(0, 1); shape (..., H) is
    the output's. layout: "two" (a, b two contiguous tensors), "views" (a, b the chunk(2, -1) halves
    of one (..., 2H) tensor, read in place) or "packed" (ops.swiglu_packed on that tensor, input x)."""
    *lead, H = shape
    x = torch.cat([_randn((*lead, H), dtype, device, generator, scale=3.0, shift=bias),
                   _randn((*lead, H), dtype, device, generator)], dim=-1)  # (..., 2H) = [a | b]
    grad_outputs = {"y": _randn(shape, dtype, device, generator)}
    if layout == "packed":
        return SwigluCase({"x": x}, grad_outputs)
    a, b = x.chunk(2, dim=-1)
    if layout == "two":
        a, b = a.contiguous(), b.contiguous()
    elif layout != "views":
        raise ValueError(f"layout must be 'two', 'views' or 'packed'; got {layout!r}")
    return SwigluCase({"a": a, "b": b}, grad_outputs)


def relu2_case(shape, dtype: torch.dtype, device="cpu", *, generator: Optional[torch.Generator] = None) -> Relu2Case:
    """x = N(0, 1) (half of it below zero), dy = N(0, 1)."""
    return Relu2Case({"x": _randn(shape, dtype, device, generator)}, {"y": _randn(shape, dtype, device, generator)})


def rope_case(shape, dtype: torch.dtype, device="cpu", *, layout: str = "contiguous", start: int = 0,
              extra_rows: int = 3, theta: float = 10000.0, generator: Optional[torch.Generator] = None) -> RopeCase:
    """x = N(0, 1) of shape (B, T, H, D), dy = N(0, 1); cos, sin = rope_tables(start + T + extra_rows, D,
    theta) (more rows than used). layout: "contiguous" (x its own tensor) or "packed" (x is the k
    heads [H:2H] of a (B, T, 3H, D) qkv buffer: position stride 3 H D, read in place)."""
    B, T, H, D = shape
    if layout == "packed":
        x = _randn((B, T, 3 * H, D), dtype, device, generator)[:, :, H:2 * H]
    elif layout == "contiguous":
        x = _randn(shape, dtype, device, generator)
    else:
        raise ValueError(f"layout must be 'contiguous' or 'packed'; got {layout!r}")
    cos, sin = ops.rope_tables(start + T + extra_rows, D, theta, device=device)
    return RopeCase({"x": x, "cos": cos, "sin": sin}, {"y": _randn(shape, dtype, device, generator)}, start)


def layernorm_case(shape, dtype: torch.dtype, device="cpu", *, fused: bool = False, eps: float = 1e-5,
                   generator: Optional[torch.Generator] = None) -> LayerNormCase:
    """x = 2 N(0, 1) + 0.5 (..., C), weight = 1 + 0.5 N(0, 1) (C,), bias = 0.5 N(0, 1) (C,), dy = N(0, 1);
    fused: residual = N(0, 1) and dh = N(0, 1) too."""
    C = shape[-1]
    inputs = {"x": _randn(shape, dtype, device, generator, scale=2.0, shift=0.5),
              "weight": _randn((C,), dtype, device, generator, scale=0.5, shift=1.0),
              "bias": _randn((C,), dtype, device, generator, scale=0.5)}
    grad_outputs = {"y": _randn(shape, dtype, device, generator)}
    if fused:
        inputs["residual"] = _randn(shape, dtype, device, generator)
        grad_outputs["h"] = _randn(shape, dtype, device, generator)
    return LayerNormCase(inputs, grad_outputs, eps)


def rmsnorm_case(shape, dtype: torch.dtype, device="cpu", *, fused: bool = False, weight: bool = True,
                 eps: float = 1e-6, generator: Optional[torch.Generator] = None) -> RMSNormCase:
    """x = 2 N(0, 1) + 0.5 (..., C), weight = 1 + 0.5 N(0, 1) (C,) unless weight=False (no gain), dy = N(0, 1);
    fused: residual = N(0, 1) and dh = N(0, 1) too."""
    C = shape[-1]
    inputs = {"x": _randn(shape, dtype, device, generator, scale=2.0, shift=0.5)}
    if weight:
        inputs["weight"] = _randn((C,), dtype, device, generator, scale=0.5, shift=1.0)
    grad_outputs = {"y": _randn(shape, dtype, device, generator)}
    if fused:
        inputs["residual"] = _randn(shape, dtype, device, generator)
        grad_outputs["h"] = _randn(shape, dtype, device, generator)
    return RMSNormCase(inputs, grad_outputs, eps)

def attention_case(shape, dtype: torch.dtype, device="cpu", *, num_kv_heads: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> AttentionCase:
    """q and dout of shape (B, H, T, D), k and v (B, H_kv, T, D), H_kv = num_kv_heads (default H), all N(0, 1)."""
    B, H, T, D = shape
    kv_shape = (B, H if num_kv_heads is None else num_kv_heads, T, D)
    q, k, v, dout = (_randn(s, dtype, device, generator) for s in (shape, kv_shape, kv_shape, shape))
    return AttentionCase({"q": q, "k": k, "v": v}, {"out": dout})


def linear_cross_entropy_case(N: int, C: int, W: int, dtype: torch.dtype, device="cpu", *,
                              num_classes: Optional[int] = None, bias: bool = False, ignore_every: int = 7,
                              loss_scale: float = 1.0, chunk_rows: Optional[int] = None,
                              generator: Optional[torch.Generator] = None) -> LinearCrossEntropyCase:
    """hidden = N(0, 1) (N, C), weight = N(0, 1) / sqrt(C) (W, C) (logits ~ N(0, 1)), bias N(0, 1) (W,)
    when asked; random targets in [0, num_classes) with every ignore_every-th row ignored (-1);
    dloss N(0, 1)."""
    V = num_classes or W
    inputs = {"hidden": _randn((N, C), dtype, device, generator),
              "weight": _randn((W, C), dtype, device, generator, scale=C ** -0.5)}
    targets = _randint(V, (N,), device, generator)
    if ignore_every:
        targets[::ignore_every] = -1
    inputs["targets"] = targets
    if bias:
        inputs["bias"] = _randn((W,), dtype, device, generator)
    return LinearCrossEntropyCase(inputs, {"loss": _randn((), torch.float32, device, generator)}, num_classes=V,
                                  loss_scale=loss_scale, chunk_rows=chunk_rows)


def cross_entropy_case(shape, dtype: torch.dtype, device="cpu", *, padded_vocab: Optional[int] = None,
                       inplace_backward: bool = False, whole_buffer: bool = False, ignore_every: int = 7,
                       dloss: Optional[float] = None, logit_scale: float = 2.0,
                       generator: Optional[torch.Generator] = None, **options) -> CrossEntropyCase:
    """logits (N, V) = logit_scale N(0, 1), the first V columns of an (N, padded_vocab) buffer; random
    targets with every ignore_every-th row ignored (-1); dloss N(0, 1) unless given ((N,) for
    reduction "none"). options: ops.cross_entropy's reduction, label_smoothing, lse_square_scale, softcap."""
    N, V = shape
    storage = _randn((N, padded_vocab or V), dtype, device, generator, scale=logit_scale)
    targets = _randint(V, (N,), device, generator)
    targets[::ignore_every] = -1
    dloss_shape = (N,) if options.get("reduction") == "none" else ()
    upstream = (_randn(dloss_shape, torch.float32, device, generator) if dloss is None
                else torch.full(dloss_shape, float(dloss), device=device))
    return CrossEntropyCase(storage[:, :V], targets, upstream, storage=storage, inplace_backward=inplace_backward,
                            whole_buffer=whole_buffer, **options)


def adamw_case(shapes: Sequence[tuple], dtype: torch.dtype, device="cpu", *, decayed: Optional[Sequence[bool]] = None,
               stochastic_rounding: bool = False, steps: int = 2,
               generator: Optional[torch.Generator] = None) -> AdamWCase:
    """Parameters of the given shapes and `steps` gradients each, all N(0, 1). decayed: which tensors
    get weight decay (default: those of 2 or more dims, as GPT-2's training groups them)."""
    params = [_randn(s, dtype, device, generator) for s in shapes]
    grads = [[_randn(s, dtype, device, generator) for s in shapes] for _ in range(steps)]
    if decayed is None:
        decayed = [len(s) >= 2 for s in shapes]
    return AdamWCase(params, grads, decayed, stochastic_rounding)
