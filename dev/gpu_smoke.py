"""Smoke test of every pyllmc op on both kernel backends against PyTorch, at GPT-2's shapes.

    python dev/gpu_smoke.py --out DIR          # DIR/smoke.jsonl, progress and a table on stdout

What runs. Every op (gelu, layernorm, fused_residual_layernorm, cross_entropy plain and fused
(inplace_backward=True), attention, AdamW) x backend {cuda, triton} x dtype {float32,
bfloat16}, forward and every gradient (AdamW: parameters and every state tensor after two
steps), at GPT-2 124M's shapes (B*T = 8192, C = 768, 4C = 3072, V = 50257 viewed in 50304,
B = 8, H = 12, T = 1024, D = 64; AdamW over the model's 148 tensors) and at odd ones (T = 1,
37, 1023; C = 1, 37, 1600; V = 1 and 50257 unpadded); plus determinism where the design
promises it (layernorm and attention backward, cross_entropy, AdamW): two identical calls
must give the same bits. Without a GPU (dev/gpu_check.sh --dry-run) the same cases run at
small shapes on CPU tensors: triton under its interpreter, cuda on the CPU simulator
(PYLLMC_CUDA_SIM=1) when it builds here.

Criteria: tests/tolerances.py's table, loaded by path, with the test suite's two ways of
comparing. The truth is the torch backend's math in float64; "PyTorch's own error" is the
torch backend (for attention: its plain-math reference) run in the kernel's dtype.
  elementwise (gelu, the residual sum h, AdamW's tensors): |kernel - truth| <= atol + rtol |truth|
  flash-attention's (layernorm, cross_entropy, attention): max |kernel - truth|
      <= 2 x max |torch in the same dtype - truth| + eps; cross-entropy gradients are
      compared after dividing by their largest reference entry, as the tests do (at V = 50257
      they are ~1e-5, which an absolute eps alone could not catch), and their references are
      computed a block of rows at a time (a whole float64 one would need ~10 GB per process).
The comparisons run on the device in float64 (tolerances.py's helpers copy to the CPU, which
at 412M logits would cost seconds per comparison); the formulas and constants are the same.

Rows: one JSON object per case in smoke.jsonl, written as soon as the case ends: op, backend,
dtype, shape, status (pass | fail | skip | error | crash | timeout | not run), max abs and
relative error, the worst output's error as a fraction of its bound ("ratio": <= 1 passes),
and every output's numbers. The first row ("kind": "plan") says how many cases there are, so
a reader can tell a finished run from one that was stopped.

Isolation: each (op, backend) runs in its own subprocess, all of them in parallel (the GPU
has memory for all; Triton's JIT compiles on the CPU cores). A case that raises is recorded
and the next one runs; a case that kills its process (a fault, a hang past --case-timeout)
is recorded as crash / timeout and the process restarts at the next case, so one broken
kernel cannot hide the others. --time-limit bounds the whole run.

Cost on an H200 (the GPU check gives this stage 90 s): 126 cases; the heaviest are the
cross-entropy references at (8192, 50257) (float64 logits: 3.3 GB, a few passes over them)
and attention at (8, 12, 1024, 64) (float64 plain math: 6 matmuls of 13 GFLOP, 0.8 GB of
scores); everything else is milliseconds of GPU time. The wall time is process start-up
(~5 s each, in parallel) and Triton's first compilation of each kernel specialization
(~1 s each, a few dozen, spread over the processes).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dev"))  # gpu_check_report (the table), also when imported by path

OPS = ("gelu", "layernorm", "fused_residual_layernorm", "cross_entropy", "cross_entropy_fused", "attention",
       "adamw")
BACKENDS = ("cuda", "triton")
# Statuses that pass; "skip" passes only on the CPU (a GPU run must run everything).
PASSING = ("pass",)
CONTEXT_LOST = 3  # a child's exit code: a CUDA error broke its context; restart it at the next case


def _cpu_defaults() -> None:
    """Without a GPU, run the kernels on CPU tensors: Triton's interpreter (must be on before
    pyllmc.kernels is imported) and the CUDA simulator, as tests/conftest.py does."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("PYLLMC_CUDA_SIM", "1")
    os.environ.setdefault("PYLLMC_CSRC", str(ROOT / "csrc"))


def _load_tolerances():
    spec = importlib.util.spec_from_file_location("pyllmc_tests_tolerances", ROOT / "tests" / "tolerances.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- comparisons ---------------------------------------------------------------------------

@dataclass
class Out:
    """One compared output of a case."""
    name: str
    criterion: str          # "elementwise" | "flash" | "exact" | "zero"
    ok: bool
    max_abs_err: float
    max_rel_err: float      # max abs error / max |truth|
    ratio: float            # error / allowed (<= 1 passes; exact: 0 or inf)
    note: str = ""


class Skip(Exception):
    """This case cannot run here (the reason is recorded)."""


_CHUNK = 1 << 25  # elements per float64 pass: bounds the comparison's scratch memory to ~1 GB


def _flat_pairs(*tensors):
    """Aligned float64 slices of the flattened tensors, _CHUNK elements at a time."""
    flat = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, max(flat[0].numel(), 1), _CHUNK):
        yield [f[start:start + _CHUNK].double() for f in flat]


def _max(values) -> float:
    """The largest value, NaN if any is NaN (Python's max() would drop it), 0.0 for none."""
    values = [float(v) for v in values]
    return math.nan if any(v != v for v in values) else max(values, default=0.0)


def _shape_problem(name, got, truth, dtype) -> Optional[Out]:
    if tuple(got.shape) != tuple(truth.shape) or got.dtype != dtype:
        return Out(name, "shape", False, math.inf, math.inf, math.inf,
                   f"got {tuple(got.shape)} {got.dtype}, want {tuple(truth.shape)} {dtype}")
    return None


def elementwise(tol, name: str, got, truth, dtype=None) -> Out:
    """tolerances.py criterion 1, with the table's (rtol, atol) for got's dtype."""
    problem = _shape_problem(name, got, truth, dtype or got.dtype)
    if problem:
        return problem
    rtol, atol = tol.ELEMENTWISE[got.dtype]
    errs, ratios, scales = [], [], []
    for g, t in _flat_pairs(got, truth):
        if g.numel():
            diff = (g - t).abs()
            errs.append(diff.max())
            ratios.append((diff / (atol + rtol * t.abs())).max())
            scales.append(t.abs().max())
    err, ratio, scale = _max(errs), _max(ratios), _max(scales)
    finite = math.isfinite(err) and math.isfinite(ratio)
    return Out(name, "elementwise", finite and ratio <= 1.0, err, err / scale if scale else err,
               ratio if finite else math.inf, f"rtol {rtol:g}, atol {atol:g}")


def _max_abs_diff(a, b) -> float:
    return _max((x - y).abs().max() for x, y in _flat_pairs(a, b) if x.numel())


def flash(tol, name: str, got, truth, same, dtype=None) -> Out:
    """tolerances.py criterion 2 (flash-attention's): err <= 2 x torch's own err + eps."""
    problem = _shape_problem(name, got, truth, dtype or got.dtype)
    if problem:
        return problem
    scale = _max(t.abs().max() for (t,) in _flat_pairs(truth) if t.numel())
    finite = all(bool(g.isfinite().all()) for (g,) in _flat_pairs(got))
    err = _max_abs_diff(got, truth)
    torch_err = _max_abs_diff(same, truth)
    eps = tol.FLASH_EPS[got.dtype]
    bound = 2 * torch_err + eps
    ok = finite and err <= bound
    return Out(name, "flash", ok, err, err / scale if scale else err, err / bound if finite else math.inf,
               f"2 x torch's {torch_err:.2e} + {eps:g}" + ("" if finite else "; non-finite values"))


def exact(name: str, a, b) -> Out:
    """Bitwise equality (determinism)."""
    import torch

    same = tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and torch.equal(a, b)
    err = 0.0 if same else (_max_abs_diff(a, b) if a.shape == b.shape else math.inf)
    return Out(name, "exact", same, err, err, 0.0 if same else math.inf, "two identical calls, bitwise")


def all_zero(name: str, t) -> Out:
    bad = int((t != 0).sum())
    err = _max([t.abs().max()]) if t.numel() else 0.0
    return Out(name, "zero", bad == 0, err, err, 0.0 if bad == 0 else math.inf, f"{bad} nonzero entries")


def run_autograd(fn, inputs, douts, dtype=None):
    """fn(*leaves) -> an output or a tuple of outputs, leaves being detached copies of `inputs`
    (cast to `dtype` when given) that require grad; backward with `douts`. Returns (outputs, grads)."""
    import torch

    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    torch.autograd.backward(outs, [d.to(o.dtype) for d, o in zip(douts, outs)])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


# ---- the cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    op: str
    backend: str
    dtype_name: str
    check: str        # "numerics" | "determinism"
    shape: str        # a label, e.g. "8192x768 (GPT-2)"
    run: Callable     # run(ctx) -> list[Out]; raises Skip

    @property
    def name(self) -> str:
        return f"{self.op} {self.check} {self.shape} {self.dtype_name}"


@dataclass
class Context:
    backend: str
    dtype: object
    device: object
    tol: object
    interpreted: bool  # triton under its CPU interpreter


def _randn(ctx, *shape, scale=1.0, shift=0.0):
    import torch

    return (scale * torch.randn(*shape, device=ctx.device) + shift).to(ctx.dtype)


def gelu_case(rows: int, cols: int):
    def run(ctx):
        import torch.nn.functional as F

        from pyllmc import ops

        x, dy = _randn(ctx, rows, cols, scale=3.0), _randn(ctx, rows, cols)
        (y,), (dx,) = run_autograd(lambda t: ops.gelu(t, backend=ctx.backend), [x], [dy])
        (y64,), (dx64,) = run_autograd(lambda t: F.gelu(t, approximate="tanh"), [x], [dy], dtype=_f64())
        return [elementwise(ctx.tol, "y", y, y64, ctx.dtype), elementwise(ctx.tol, "dx", dx, dx64, ctx.dtype)]
    return run


def _f64():
    import torch

    return torch.float64


def _layernorm_inputs(ctx, rows, C, fused):
    x = _randn(ctx, rows, C, scale=2.0, shift=0.5)
    w = _randn(ctx, C, scale=0.5, shift=1.0)
    b = _randn(ctx, C, scale=0.5)
    dy = _randn(ctx, rows, C)
    if not fused:
        return [x, w, b], [dy]
    return [_randn(ctx, rows, C), x, w, b], [_randn(ctx, rows, C), dy]  # residual first; dh, dy


def _layernorm_fn(backend, fused):
    import torch.nn.functional as F

    from pyllmc import ops

    if backend == "float64":  # the torch backend's math, in float64
        if fused:
            def truth(r, x, w, b):
                h = r + x
                return h, F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)
            return truth
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    if fused:
        return lambda r, x, w, b: ops.fused_residual_layernorm(r, x, w, b, backend=backend)
    return lambda x, w, b: ops.layernorm(x, w, b, backend=backend)


def layernorm_case(rows: int, C: int, fused: bool):
    def run(ctx):
        inputs, douts = _layernorm_inputs(ctx, rows, C, fused)
        got, got_g = run_autograd(_layernorm_fn(ctx.backend, fused), inputs, douts)
        truth, truth_g = run_autograd(_layernorm_fn("float64", fused), inputs, douts, dtype=_f64())
        same, same_g = run_autograd(_layernorm_fn("torch", fused), inputs, douts)
        out_names = ["h", "y"] if fused else ["y"]
        grad_names = (["dresidual"] if fused else []) + ["dx", "dweight", "dbias"]
        results = []
        for name, g, t, s in zip(out_names + grad_names, got + got_g, truth + truth_g, same + same_g):
            if name == "h":  # one rounding of residual + x
                results.append(elementwise(ctx.tol, name, g, t, ctx.dtype))
            else:
                results.append(flash(ctx.tol, name, g, t, s, ctx.dtype))
        return results
    return run


def layernorm_determinism(rows: int, C: int, fused: bool):
    def run(ctx):
        inputs, douts = _layernorm_inputs(ctx, rows, C, fused)
        first = run_autograd(_layernorm_fn(ctx.backend, fused), inputs, douts)
        second = run_autograd(_layernorm_fn(ctx.backend, fused), inputs, douts)
        names = (["h", "y", "dresidual"] if fused else ["y"]) + ["dx", "dweight", "dbias"]
        return [exact(n, a, b) for n, a, b in zip(names, first[0] + first[1], second[0] + second[1])]
    return run


def _cross_entropy_inputs(ctx, N, V, Vp):
    """A (N, Vp) leaf, random targets (every 7th ignored) and a random upstream gradient."""
    import torch

    leaf = _randn(ctx, N, Vp, scale=2.0)
    targets = torch.randint(0, V, (N,), device=ctx.device)
    targets[::7] = -1
    dloss = torch.randn((), device=ctx.device)
    return leaf, targets, dloss


def _takes_num_classes() -> bool:
    """Whether ops.cross_entropy takes the whole padded logits with num_classes=V (the model's call)."""
    import inspect

    from pyllmc import ops

    return "num_classes" in inspect.signature(ops.cross_entropy).parameters


def _cross_entropy_kernel(ctx, leaf, targets, dloss, V, fused, whole=False):
    """The op on an (N, Vp) intermediate: its (N, V) view (row stride Vp), or with whole=True the
    padded buffer itself with num_classes=V. Returns (loss, dlogits (N, V), the padding columns'
    gradient (N, Vp - V))."""
    from pyllmc import ops

    weight = leaf.detach().requires_grad_(True)
    padded = weight * 2.0  # an intermediate, as the lm_head matmul's output (exact: a power of 2)
    if whole:
        loss = ops.cross_entropy(padded, targets, num_classes=V, inplace_backward=fused, backend=ctx.backend)
    else:
        loss = ops.cross_entropy(padded[:, :V], targets, inplace_backward=fused, backend=ctx.backend)
    loss.backward(dloss)
    # new tensors, so that the (N, Vp) buffers are freed before the reference runs
    return loss.detach(), weight.grad[:, :V] / 2.0, weight.grad[:, V:].clone()


def _cross_entropy_checks(ctx, logits, targets, dloss, loss, dlogits) -> list:
    """The tests' criteria (flash-attention's; the gradient divided by its largest reference
    entry first), with the references computed a block of rows at a time: at GPT-2's size a
    float64 reference of the whole (8192, 50257) would need ~10 GB per process. Rows are
    independent and share only the 1 / n_valid factor, so blocks give the same numbers."""
    import torch
    import torch.nn.functional as F

    N, V = logits.shape
    dtype, tol = ctx.dtype, ctx.tol
    n_valid = (targets != -1).sum().clamp(min=1)
    step = max(1, _CHUNK // max(V, 1))
    blocks = [(a, min(a + step, N)) for a in range(0, N, step)] or [(0, 0)]

    def reference(a, b, in_dtype):  # loss part and gradient of rows [a, b) by autograd in `in_dtype`
        x = logits[a:b].detach().to(in_dtype).requires_grad_(True)
        part = F.cross_entropy(x, targets[a:b], ignore_index=-1, reduction="sum") / n_valid
        part.backward(dloss.to(in_dtype))
        return part.detach(), x.grad

    truth_loss, scale = torch.zeros((), dtype=torch.float64, device=logits.device), 0.0
    for a, b in blocks:  # pass 1: the float64 loss and the gradient's largest entry
        part, grad = reference(a, b, torch.float64)
        truth_loss += part
        scale = max(scale, float(grad.abs().max()) if grad.numel() else 0.0)
    with torch.no_grad():  # PyTorch's own loss in the kernel's dtype, whole, as the tests compute it
        same_loss = F.cross_entropy(logits.to(dtype), targets, ignore_index=-1, reduction="sum") / n_valid
    results = [flash(tol, "loss", loss, truth_loss, same_loss, torch.float32)]

    s = max(scale, 1e-30)
    err = torch_err = 0.0
    finite = True
    for a, b in blocks:  # pass 2: errors of the scaled gradients
        if b <= a:
            continue
        _, truth = reference(a, b, torch.float64)
        _, same = reference(a, b, dtype)
        got = dlogits[a:b]
        finite = finite and bool(got.isfinite().all())
        truth = truth / s
        err = max(err, float(((got.double() / s).to(dtype).double() - truth).abs().max()))
        torch_err = max(torch_err, float(((same.double() / s).to(dtype).double() - truth).abs().max()))
    if tuple(dlogits.shape) != (N, V) or dlogits.dtype != dtype:
        results.append(Out("dlogits", "shape", False, math.inf, math.inf, math.inf,
                           f"got {tuple(dlogits.shape)} {dlogits.dtype}, want {(N, V)} {dtype}"))
    else:
        bound = 2 * torch_err + tol.FLASH_EPS[dtype]
        ratio = err / bound if finite else math.inf
        results.append(Out("dlogits", "flash", finite and err <= bound, err * s, err, ratio,
                           f"scaled by 1/{scale:.3g}; 2 x torch's {torch_err:.2e} + {tol.FLASH_EPS[dtype]:g}"
                           + ("" if finite else "; non-finite values")))
    return results


def cross_entropy_case(N: int, V: int, Vp: int, fused: bool, whole: bool = False):
    def run(ctx):
        leaf, targets, dloss = _cross_entropy_inputs(ctx, N, V, Vp)
        loss, dlogits, dpad = _cross_entropy_kernel(ctx, leaf, targets, dloss, V, fused, whole)
        logits = (leaf * 2.0)[:, :V]  # the values the kernel saw
        del leaf
        results = _cross_entropy_checks(ctx, logits, targets, dloss, loss, dlogits)
        if Vp > V:
            results.append(all_zero("dlogits padding", dpad))
        return results
    return run


def cross_entropy_determinism(N: int, V: int, Vp: int, fused: bool):
    def run(ctx):
        leaf, targets, dloss = _cross_entropy_inputs(ctx, N, V, Vp)
        first = _cross_entropy_kernel(ctx, leaf, targets, dloss, V, fused)
        second = _cross_entropy_kernel(ctx, leaf, targets, dloss, V, fused)
        return [exact(n, a, b) for n, a, b in zip(("loss", "dlogits", "dlogits padding"), first, second)]
    return run


def _attention_fn(backend, compute_dtype=None):
    from pyllmc import ops
    from pyllmc.ops.attention import attention_reference

    if backend == "torch":  # the torch backend's plain math, computed in compute_dtype
        return lambda q, k, v: attention_reference(q, k, v, compute_dtype=compute_dtype)
    return lambda q, k, v: ops.attention(q, k, v, backend=backend)


def _attention_check(ctx, D):
    from pyllmc.ops.attention import supports_head_dim

    import torch

    if ctx.interpreted and ctx.dtype == torch.bfloat16:
        raise Skip("the Triton interpreter computes tl.dot wrong on bfloat16 (DESIGN.md): bf16 attention runs "
                   "on the GPU only")
    if not supports_head_dim(ctx.backend, D, ctx.dtype):
        raise Skip(f"backend {ctx.backend!r} does not take D={D} in {ctx.dtype}")


def attention_case(B: int, H: int, T: int, D: int):
    def run(ctx):
        _attention_check(ctx, D)
        q, k, v, dout = (_randn(ctx, B, H, T, D) for _ in range(4))
        got, got_g = run_autograd(_attention_fn(ctx.backend), [q, k, v], [dout])
        truth, truth_g = run_autograd(_attention_fn("torch", _f64()), [q, k, v], [dout], dtype=_f64())
        same, same_g = run_autograd(_attention_fn("torch", ctx.dtype), [q, k, v], [dout])
        return [flash(ctx.tol, n, g, t, s, ctx.dtype)
                for n, g, t, s in zip(("out", "dq", "dk", "dv"), got + got_g, truth + truth_g, same + same_g)]
    return run


def attention_determinism(B: int, H: int, T: int, D: int):
    def run(ctx):
        _attention_check(ctx, D)
        q, k, v, dout = (_randn(ctx, B, H, T, D) for _ in range(4))
        first = run_autograd(_attention_fn(ctx.backend), [q, k, v], [dout])
        second = run_autograd(_attention_fn(ctx.backend), [q, k, v], [dout])
        return [exact(n, a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), first[0] + first[1],
                                                  second[0] + second[1])]
    return run


def gpt2_parameter_shapes() -> list:
    """The 148 parameter shapes of pyllmc's GPT-2 124M (built on the meta device: no memory)."""
    import torch

    from pyllmc.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig())
    return [tuple(p.shape) for p in model.parameters()]


def _adamw_run(ctx, shapes, stochastic, backend, seed_data):
    """Two AdamW steps of `backend` from data drawn with seed `seed_data`; returns the params and state."""
    import torch

    import pyllmc

    torch.manual_seed(seed_data)
    params = [_randn(ctx, *s).requires_grad_(True) for s in shapes]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = pyllmc.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, stochastic_rounding=stochastic,
                             seed=7, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, device=ctx.device).to(p.dtype)
        opt.step()
    out = {"params": torch.cat([p.detach().reshape(-1) for p in params])}
    for key in ("exp_avg", "exp_avg_sq", "master"):
        tensors = [opt.state[p][key].reshape(-1) for p in params if key in opt.state[p]]
        if tensors:
            out[key] = torch.cat(tensors)
    return out


def adamw_case(shapes_fn, stochastic: bool):
    def run(ctx):
        import torch

        if stochastic and ctx.dtype != torch.bfloat16:
            raise Skip("stochastic rounding is a bf16 mode")
        shapes = shapes_fn()
        seed = int(torch.initial_seed()) % 2**31
        got = _adamw_run(ctx, shapes, stochastic, ctx.backend, seed)
        want = _adamw_run(ctx, shapes, stochastic, "torch", seed)  # the torch backend: torch.optim.AdamW's math
        if set(got) != set(want):
            return [Out("state", "shape", False, math.inf, math.inf, math.inf,
                        f"state keys {sorted(got)} != the torch backend's {sorted(want)}")]
        return [elementwise(ctx.tol, k, got[k], want[k]) for k in want]
    return run


def adamw_determinism(shapes_fn, stochastic: bool):
    def run(ctx):
        import torch

        shapes = shapes_fn()
        seed = int(torch.initial_seed()) % 2**31
        first = _adamw_run(ctx, shapes, stochastic, ctx.backend, seed)
        second = _adamw_run(ctx, shapes, stochastic, ctx.backend, seed)
        return [exact(k, first[k], second[k]) for k in first]
    return run


def _shape_label(dims, gpt2=False) -> str:
    return "x".join(str(d) for d in dims) + (" (GPT-2)" if gpt2 else "")


def build_cases(op: str, backend: str, small: bool) -> list[Case]:
    """The cases of one (op, backend), in a fixed order (a restarted process skips by index)."""
    dtypes = ("float32", "bfloat16")
    numerics: list = []  # (shape label, run factory per dtype)
    determinism: list = []  # (shape label, dtype name, run)
    if op == "gelu":
        shapes = [((37, 37), False), ((1, 1), False)] if small else \
            [((8192, 3072), True), ((1, 1), False), ((37, 37), False), ((1023, 1600), False)]
        numerics = [(_shape_label(s, g), gelu_case(*s)) for s, g in shapes]
    elif op in ("layernorm", "fused_residual_layernorm"):
        fused = op == "fused_residual_layernorm"
        shapes = [((37, 37), False), ((1, 1), False)] if small else \
            [((8192, 768), True), ((1, 1), False), ((37, 37), False), ((1023, 1600), False)]
        numerics = [(_shape_label(s, g), layernorm_case(*s, fused)) for s, g in shapes]
        det = ((37, 37), False) if small else ((8192, 768), True)
        determinism = [(_shape_label(*det), "float32" if small else "bfloat16", layernorm_determinism(*det[0], fused))]
    elif op in ("cross_entropy", "cross_entropy_fused"):
        fused = op == "cross_entropy_fused"
        # (N, V, Vp): GPT-2's (N, 50257) view of (N, 50304); V = 1; V = 50257 unpadded
        shapes = [((5, 37, 40), False), ((1, 1, 1), False)] if small else \
            [((8192, 50257, 50304), True), ((1, 1, 1), False), ((1023, 1, 1), False), ((37, 50257, 50257), False)]
        def label(N, V, Vp, gpt2):
            return f"{N}x{V}" + (f" of {N}x{Vp}" if Vp != V else "") + (" (GPT-2)" if gpt2 else "")
        numerics = [(label(N, V, Vp, g), cross_entropy_case(N, V, Vp, fused)) for (N, V, Vp), g in shapes]
        (N, V, Vp), g = shapes[0]
        if _takes_num_classes():  # and the whole padded buffer with num_classes=V, as the model calls it
            numerics.insert(1, (label(N, V, Vp, g) + " num_classes", cross_entropy_case(N, V, Vp, fused, whole=True)))
        determinism = [(label(N, V, Vp, g), "float32" if small else "bfloat16",
                        cross_entropy_determinism(N, V, Vp, fused))]
    elif op == "attention":
        shapes = [((1, 2, 37, 64), False), ((1, 1, 1, 64), False)] if small else \
            [((8, 12, 1024, 64), True), ((1, 12, 1, 64), False), ((2, 12, 37, 64), False), ((1, 12, 1023, 64), False)]
        numerics = [(_shape_label(s, g), attention_case(*s)) for s, g in shapes]
        det = shapes[0]
        determinism = [(_shape_label(*det), "float32" if small else "bfloat16", attention_determinism(*det[0]))]
    elif op == "adamw":
        if small:
            def shapes_fn():
                return [(37, 29), (1,), (1029,)]
            label = "3 tensors, 2143 elements"
        else:
            shapes_fn = gpt2_parameter_shapes
            label = "GPT-2 124M (148 tensors)"

        def odd_shapes():
            return [(1,), (37,), (1023, 1600), (1600, 37)]
        numerics = [(label, adamw_case(shapes_fn, False)),
                    (label + " stochastic rounding", adamw_case(shapes_fn, True))]
        if not small:
            numerics.append(("1, 37, 1023x1600, 1600x37", adamw_case(odd_shapes, False)))
        determinism = [(label + " stochastic rounding", "bfloat16", adamw_determinism(shapes_fn, True))]
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    cases = [Case(op, backend, dt, "numerics", label, run) for label, run in numerics for dt in dtypes]
    cases = [c for c in cases if not (c.op == "adamw" and "stochastic" in c.shape and c.dtype_name != "bfloat16")]
    cases += [Case(op, backend, dt, "determinism", label, run) for label, dt, run in determinism]
    return cases


# ---- rows ----------------------------------------------------------------------------------------

def short(text: str, limit: int = 300) -> str:
    """The first line of a (compiler's, say) message, at most `limit` characters."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _num(x):
    """JSON has no inf / nan: those become strings."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def case_row(case: Case, index: int, status: str, *, outs=(), seconds=0.0, message="", seed=None) -> dict:
    worst = max(outs, key=lambda o: (not o.ok, o.ratio), default=None)
    return {
        "kind": "case", "op": case.op, "backend": case.backend, "dtype": case.dtype_name, "check": case.check,
        "shape": case.shape, "case": case.name, "index": index, "status": status,
        "max_abs_err": _num(max((o.max_abs_err for o in outs), default=None)) if outs else None,
        "max_rel_err": _num(max((o.max_rel_err for o in outs), default=None)) if outs else None,
        "worst_ratio": _num(worst.ratio) if worst else None,
        "worst_output": worst.name if worst else None,
        "outputs": [{"name": o.name, "criterion": o.criterion, "ok": o.ok, "max_abs_err": _num(o.max_abs_err),
                     "max_rel_err": _num(o.max_rel_err), "ratio": _num(o.ratio), "note": o.note} for o in outs],
        "seconds": round(seconds, 3), "message": message, "seed": seed,
    }


def append_row(path: Path, row: dict) -> None:
    """One line, one write(): rows of parallel processes never interleave (O_APPEND)."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---- the child: one (op, backend), cases [start:] ----------------------------------------------

def _inject_fault(case: Case) -> None:
    """GPU_SMOKE_INJECT="<crash|hang|raise>:<text>;...": the cases whose "<backend> <name>" contains
    <text> die, hang or raise, as a broken kernel would. For the tests of the smoke's isolation."""
    for spec in filter(None, os.environ.get("GPU_SMOKE_INJECT", "").split(";")):
        kind, _, text = spec.partition(":")
        if text and text in f"{case.backend} {case.name}":
            if kind == "crash":
                os._exit(139)
            if kind == "hang":
                time.sleep(3600)
            if kind == "raise":
                raise RuntimeError("injected by GPU_SMOKE_INJECT")


def _progress_detail(case: Case, row: dict) -> str:
    if row["status"] in ("skip", "error"):
        return row["message"]
    if case.check == "determinism":
        bad = [o["name"] for o in row["outputs"] if not o["ok"]]
        return "bitwise equal" if not bad else f"differ between two identical calls: {', '.join(bad)}"
    ratio = row["worst_ratio"]
    return f"worst {row['worst_output']} at {ratio if isinstance(ratio, str) else f'{ratio:.2f}'} of its bound"


def _context_alive(device) -> bool:
    import torch

    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).item()
        return True
    except Exception:  # noqa: BLE001 - a sticky CUDA error: this process can launch nothing more
        return False


def group_cases(group: str, backend: str, small: bool) -> list[Case]:
    """The cases of a comma-separated group of ops on one backend, in order (what one process runs)."""
    return [case for op in group.split(",") for case in build_cases(op, backend, small)]


def child_main(group: str, backend: str, start: int, small: bool, jsonl: Path, seed: int) -> int:
    _cpu_defaults()
    import torch

    import pyllmc

    torch.set_float32_matmul_precision("highest")  # float32 references in float32, not TF32
    tol = _load_tolerances()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    cases = group_cases(group, backend, small)
    for index in range(start, len(cases)):
        case = cases[index]
        print(f"@@start {index}", flush=True)
        started = time.perf_counter()
        case_seed = (seed + zlib.crc32(f"{backend} {case.name}".encode())) % 2**31  # the same in any grouping
        tag = f"[{case.op}/{backend}]"
        ctx = Context(backend, getattr(torch, case.dtype_name), device, tol,
                      interpreted=backend == "triton" and device.type == "cpu")
        torch.manual_seed(case_seed)
        try:
            _inject_fault(case)
            outs = case.run(ctx)
            if on_gpu:
                torch.cuda.synchronize()
            row = case_row(case, index, "pass" if all(o.ok for o in outs) else "fail", outs=outs,
                           seconds=time.perf_counter() - started, seed=case_seed)
        except Skip as why:
            row = case_row(case, index, "skip", message=str(why), seed=case_seed)
        except Exception as err:  # noqa: BLE001 - recorded; the next case runs
            where = " / ".join(traceback.format_exc().strip().splitlines()[-5:-1])
            row = case_row(case, index, "error", seconds=time.perf_counter() - started, seed=case_seed,
                           message=f"{type(err).__name__}: {short(err, 400)} | at {short(where, 400)}")
        append_row(jsonl, row)
        print(f"{tag} {row['status'].upper():5s} {case.name}: {_progress_detail(case, row)} "
              f"({row['seconds']:.1f} s)", flush=True)
        print(f"@@end {index}", flush=True)
        if row["status"] == "error" and not _context_alive(device):
            print(f"[{group}/{backend}] the CUDA context is broken after that error: restarting at the next case",
                  flush=True)
            return CONTEXT_LOST
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


# ---- the parent: schedule the children, record what they could not ---------------------------

@dataclass
class Job:
    op: str             # the group of ops this process runs, comma-separated
    backend: str
    start: int
    cases: list
    restarts: int = 0
    proc: Optional[subprocess.Popen] = None
    current: Optional[int] = None       # index of the case in flight
    current_since: float = 0.0
    done: set = field(default_factory=set)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=25))
    reader: Optional[threading.Thread] = None


def _reader(job: Job, lock: threading.Lock) -> None:
    """Forwards a child's output to ours, and follows its @@start / @@end lines."""
    for line in job.proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("@@start "):
            job.current, job.current_since = int(line.split()[1]), time.monotonic()
        elif line.startswith("@@end "):
            job.done.add(int(line.split()[1]))
            job.current = None
        else:
            job.tail.append(line)
            with lock:
                print(line if line.startswith("[") else f"[{job.op}/{job.backend}] {line}", flush=True)


def _spawn(job: Job, args, lock) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job.op, job.backend, "--start",
           str(job.start), "--jsonl", str(args.jsonl), "--seed", str(args.seed)] + (["--small"] if args.small else [])
    job.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    job.current = None
    job.reader = threading.Thread(target=_reader, args=(job, lock), daemon=True)
    job.reader.start()


def _record(args, job: Job, index: int, status: str, message: str) -> None:
    append_row(args.jsonl, case_row(job.cases[index], index, status, message=message))


def _unavailable(backend: str, on_gpu: bool):
    """None when `backend` can run here, else (status of its cases, why). On a GPU both kernel
    backends must run: an unavailable one fails. On the CPU a missing toolchain (no compiler
    or CUDA headers for the simulator, no Triton) skips, as in the tests; kernels that do not
    compile for the simulator fail."""
    import pyllmc
    from pyllmc import cuda_sim

    status = pyllmc.available_backends()[backend]
    if status.available:
        return None
    why = f"backend {backend!r} unavailable: {short(status.reason)}"
    if on_gpu:
        return "fail", why
    if backend == "cuda" and cuda_sim.enabled():
        try:
            cuda_sim.toolchain()
        except cuda_sim.BuildError:
            return "skip", why
        return "fail", why  # the toolchain is here: the kernels did not build
    return "skip", why


def run_all(args) -> int:
    _cpu_defaults()
    import torch

    import pyllmc

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.small:
        print("gpu_smoke: no GPU here (torch.cuda.is_available() is False); --small runs the CPU version",
              file=sys.stderr)
        return 2
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    args.jsonl.write_text("")
    # Probed here, once: the children of an unavailable backend are not started (on the CPU each
    # would retry the simulator's build), and the probe's build is cached for the others.
    unavailable = {name: why for name in BACKENDS if (why := _unavailable(name, on_gpu)) is not None}
    # One process per (op, backend) on a GPU; on a CPU (two cores, ~3 s of start-up per process)
    # one per backend, which still isolates the two backends' kernels from each other.
    groups = [",".join(args.ops)] if args.small else list(args.ops)
    jobs = [Job(g, backend, 0, group_cases(g, backend, args.small)) for g in groups for backend in BACKENDS]
    # the longest first, so they do not start last
    jobs.sort(key=lambda j: (j.op not in ("attention", "cross_entropy", "cross_entropy_fused", "adamw"), j.op,
                             j.backend))
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    statuses = pyllmc.available_backends()
    backends = {name: ("simulated on the CPU" if s.simulated else "available") if s.available else short(s.reason)
                for name, s in statuses.items() if name in BACKENDS}
    total = sum(len(j.cases) for j in jobs)
    append_row(args.jsonl, {"kind": "plan", "device": device, "small": args.small, "cases": total,
                            "groups": {f"{j.op}/{j.backend}": len(j.cases) for j in jobs}, "backends": backends,
                            "seed": args.seed, "time_limit_s": args.time_limit})
    print(f"gpu_smoke: {total} cases on {device} ({'small shapes' if args.small else 'GPT-2 shapes and odd ones'}); "
          f"backends: {backends}; {len(jobs)} processes, {args.jobs} at a time, {args.time_limit:.0f} s in all",
          flush=True)
    for job in [j for j in jobs if j.backend in unavailable]:
        status, why = unavailable[job.backend]
        for index, case in enumerate(job.cases):
            append_row(args.jsonl, case_row(case, index, status, message=why))
        print(f"[{job.op}/{job.backend}] {status.upper()} all {len(job.cases)} cases: {why}", flush=True)
        jobs.remove(job)

    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + args.time_limit
    waiting, running = list(jobs), []
    while waiting or running:
        if time.monotonic() > deadline:  # what has not started will not
            for job in waiting:
                for i in range(job.start, len(job.cases)):
                    _record(args, job, i, "not run", f"the smoke's {args.time_limit:.0f} s limit was reached")
            waiting = []
        while waiting and len(running) < args.jobs:
            job = waiting.pop(0)
            _spawn(job, args, lock)
            running.append(job)
        time.sleep(0.05)
        now = time.monotonic()
        for job in list(running):
            over_case = job.current is not None and now - job.current_since > args.case_timeout
            if now > deadline or over_case:
                job.proc.kill()
            code = job.proc.poll()
            if code is None:
                continue
            job.reader.join(timeout=5)
            running.remove(job)
            remaining = [i for i in range(job.start, len(job.cases)) if i not in job.done]
            if code == 0 and not remaining:
                continue
            tail = " / ".join(list(job.tail)[-8:])
            in_flight = job.current
            if in_flight is not None and in_flight in remaining:
                if now > deadline:
                    status, why = "timeout", f"stopped at the smoke's {args.time_limit:.0f} s limit"
                elif over_case:
                    status, why = "timeout", f"ran past the {args.case_timeout:.0f} s limit of one case"
                else:
                    status, why = "crash", f"the process died (exit code {code})"
                _record(args, job, in_flight, status, f"{why}; last output: {tail}")
                remaining.remove(in_flight)
            if not remaining:
                continue
            if now > deadline:
                for i in remaining:
                    _record(args, job, i, "not run", f"the smoke's {args.time_limit:.0f} s limit was reached")
            elif in_flight is None and code != CONTEXT_LOST:
                # died between cases (at import, say): it would again
                for i in remaining:
                    _record(args, job, i, "error", f"the process failed before this case (exit code {code}): {tail}")
            elif job.restarts >= args.max_restarts:
                for i in remaining:
                    _record(args, job, i, "not run", f"not run: the process failed {job.restarts + 1} times")
            else:
                waiting.insert(0, Job(job.op, job.backend, remaining[0], job.cases, job.restarts + 1))
                with lock:
                    print(f"[{job.op}/{job.backend}] restarting at case {remaining[0]} "
                          f"({job.cases[remaining[0]].name})", flush=True)

    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    from gpu_check_report import smoke_summary, smoke_table

    verdict, numbers = smoke_summary(rows, gpu=on_gpu)
    print(f"\ngpu_smoke: {verdict}: {numbers} ({time.monotonic() - started:.0f} s)\n")
    print(smoke_table(rows))
    return 0 if verdict == "ok" else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for smoke.jsonl (default: the current one)")
    parser.add_argument("--jsonl", type=Path, default=None, help="the rows file (default: OUT/smoke.jsonl)")
    parser.add_argument("--small", action="store_true", help="small shapes on CPU tensors (no GPU needed)")
    parser.add_argument("--jobs", type=int, default=0, help="processes at a time (default: all on a GPU, 2 on a CPU)")
    parser.add_argument("--time-limit", type=float, default=85.0, help="seconds for the whole smoke (default 85)")
    parser.add_argument("--case-timeout", type=float, default=0.0,
                        help="seconds one case may take (default 45 on a GPU, 60 on a CPU)")
    parser.add_argument("--max-restarts", type=int, default=4, help="restarts of one (op, backend) after crashes")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="a subset of the ops (default: all)")
    parser.add_argument("--child", nargs=2, metavar=("OPS", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jsonl is None:
        args.jsonl = (args.out or Path(".")) / "smoke.jsonl"
    if args.child:
        return child_main(args.child[0], args.child[1], args.start, args.small, args.jsonl, args.seed)
    if not args.jobs:
        args.jobs = 2 if args.small else len(OPS) * len(BACKENDS)  # all at once on a GPU
    if not args.case_timeout:
        args.case_timeout = 60.0 if args.small else 45.0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
