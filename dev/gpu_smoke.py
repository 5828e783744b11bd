"""Smoke test of every pyllmc op on both kernel backends against PyTorch, at GPT-2's shapes.

    python dev/gpu_smoke.py --out DIR          # DIR/smoke.jsonl, progress and a table on stdout

What runs. Every op (gelu, layernorm, fused_residual_layernorm, cross_entropy plain and fused
(inplace_backward=True), attention, AdamW, rmsnorm, fused_residual_rmsnorm, swiglu (two tensors, the
views of one packed tensor, swiglu_packed), relu2, rope) x backend {cuda, triton} x dtype {float32,
bfloat16}, forward and every gradient (AdamW: parameters and every state tensor after two
steps), at GPT-2 124M's shapes (B*T = 8192, C = 768, 4C = 3072, V = 50257 viewed in 50304,
B = 8, H = 12, T = 1024, D = 64; AdamW over the model's 148 tensors) and at odd ones (T = 1,
37, 1023; C = 1, 37, 1600; V = 1 and 50257 unpadded); plus determinism where the design
promises it (layernorm, rmsnorm and attention backward, cross_entropy, AdamW, rope): two identical calls
must give the same bits. Without a GPU (dev/gpu_check.sh --dry-run) the same cases run at
small shapes on CPU tensors: triton under its interpreter, cuda on the CPU simulator
(PYLLMC_CUDA_SIM=1) when it builds here.

Cases and criteria: pyllmc.testing's, the test suite's own (its inputs, references, table of
tolerances and comparisons). The truth is the torch backend's math in float64; "PyTorch's own
error" is the same math run in the kernel's dtype (AdamW: the torch backend in the same dtype).
  elementwise (gelu, swiglu, relu2, rope, the residual sum h, AdamW's tensors): |kernel - truth| <= atol + rtol |truth|
  flash-attention's (layernorm, rmsnorm, cross_entropy, attention): max |kernel - truth|
      <= 2 x max |torch in the same dtype - truth| + eps; cross-entropy gradients are
      compared after dividing by their largest reference entry (at V = 50257 they are ~1e-5,
      which an absolute eps alone could not catch), and their references are computed a block
      of rows at a time (a whole float64 one would need ~10 GB per process).
The comparisons run on the device, in float64, a bounded number of elements at a time.

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

Cost on an H200 (the GPU check gives this stage 90 s): 258 cases; the heaviest are the
cross-entropy references at (8192, 50257) (float64 logits: 3.3 GB, a few passes over them)
and attention at (8, 12, 1024, 64) (float64 plain math: 6 matmuls of 13 GFLOP, 0.8 GB of
scores); everything else is milliseconds of GPU time. The wall time is process start-up
(~5 s each, in parallel) and Triton's first compilation of each kernel specialization
(~1 s each, a few dozen, spread over the processes).
"""

from __future__ import annotations

import argparse
import collections
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
from functools import partial
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

OPS = ("gelu", "layernorm", "fused_residual_layernorm", "cross_entropy", "cross_entropy_fused", "attention",
       "adamw", "rmsnorm", "fused_residual_rmsnorm", "swiglu", "relu2", "rope")
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


# ---- the cases: pyllmc.testing's, at the smoke's shapes ------------------------------------------

class Skip(Exception):
    """This case cannot run here (the reason is recorded)."""


@dataclass
class Case:
    op: str
    backend: str
    dtype_name: str
    check: str        # "numerics" | "determinism"
    shape: str        # a label, e.g. "8192x768 (GPT-2)"
    run: Callable     # run(ctx) -> list of pyllmc.testing.Comparison; raises Skip

    @property
    def name(self) -> str:
        return f"{self.op} {self.check} {self.shape} {self.dtype_name}"


@dataclass
class Context:
    backend: str
    dtype: object
    device: object
    interpreted: bool  # triton under its CPU interpreter


def numerics(make: Callable, precondition: Optional[Callable] = None) -> Callable:
    """A case's run: make(dtype, device) -> a pyllmc.testing case; its results on the backend, each
    judged by the case's own criterion (the tests')."""
    def run(ctx):
        if precondition:
            precondition(ctx)
        case = make(ctx.dtype, ctx.device)
        return case.compare(case.run(ctx.backend))
    return run


def determinism(make: Callable, precondition: Optional[Callable] = None) -> Callable:
    """A case's run: two identical calls on the backend give the same bits, every result."""
    def run(ctx):
        from pyllmc import testing

        if precondition:
            precondition(ctx)
        case = make(ctx.dtype, ctx.device)
        first, second = case.run(ctx.backend), case.run(ctx.backend)
        return [testing.compare_exact(name, first[name], second[name]) for name in first]
    return run


def _takes_num_classes() -> bool:
    """Whether ops.cross_entropy takes the whole padded logits with num_classes=V (the model's call)."""
    import inspect

    from pyllmc import ops

    return "num_classes" in inspect.signature(ops.cross_entropy).parameters


def _takes_options() -> bool:
    """Whether ops.cross_entropy takes Liger-Kernel's options (reduction, label_smoothing, z-loss, softcap)."""
    import inspect

    from pyllmc import ops

    return "softcap" in inspect.signature(ops.cross_entropy).parameters


def _attention_check(ctx, D):
    from pyllmc.ops.attention import supports_head_dim

    import torch

    if ctx.interpreted and ctx.dtype == torch.bfloat16:
        raise Skip("the Triton interpreter computes tl.dot wrong on bfloat16 (DESIGN.md): bf16 attention runs "
                   "on the GPU only")
    if not supports_head_dim(ctx.backend, D, ctx.dtype):
        raise Skip(f"backend {ctx.backend!r} does not take D={D} in {ctx.dtype}")


def gpt2_parameter_shapes() -> list:
    """The 148 parameter shapes of pyllmc's GPT-2 124M (built on the meta device: no memory)."""
    import torch

    from pyllmc.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig())
    return [tuple(p.shape) for p in model.parameters()]


def _adamw(shapes_fn: Callable, stochastic: bool) -> Callable:
    """make(dtype, device) for AdamW over the tensors shapes_fn() gives (their shapes are computed
    in the child that runs the case)."""
    def make(dtype, device):
        from pyllmc import testing

        return testing.adamw_case(shapes_fn(), dtype, device, stochastic_rounding=stochastic)
    return make


def _shape_label(dims, gpt2=False) -> str:
    return "x".join(str(d) for d in dims) + (" (GPT-2)" if gpt2 else "")


def build_cases(op: str, backend: str, small: bool) -> list[Case]:
    """The cases of one (op, backend), in a fixed order (a restarted process skips by index)."""
    from pyllmc import testing

    dtypes = ("float32", "bfloat16")
    numeric: list = []  # (shape label, run), run at every dtype
    deterministic: list = []  # (shape label, dtype name, run)
    if op == "gelu":
        shapes = [((37, 37), False), ((1, 1), False)] if small else \
            [((8192, 3072), True), ((1, 1), False), ((37, 37), False), ((1023, 1600), False)]
        numeric = [(_shape_label(s, g), numerics(partial(testing.gelu_case, s))) for s, g in shapes]
    elif op in ("layernorm", "fused_residual_layernorm"):
        fused = op == "fused_residual_layernorm"
        shapes = [((37, 37), False), ((1, 1), False)] if small else \
            [((8192, 768), True), ((1, 1), False), ((37, 37), False), ((1023, 1600), False)]
        numeric = [(_shape_label(s, g), numerics(partial(testing.layernorm_case, s, fused=fused))) for s, g in shapes]
        det = ((37, 37), False) if small else ((8192, 768), True)
        deterministic = [(_shape_label(*det), "float32" if small else "bfloat16",
                          determinism(partial(testing.layernorm_case, det[0], fused=fused)))]
    elif op in ("rmsnorm", "fused_residual_rmsnorm"):
        fused = op == "fused_residual_rmsnorm"
        # (rows, C, weight): a Llama-sized row, QK-norm's head dim without a weight (B*T*H rows), odd ones
        shapes = [((37, 37), False, True), ((37, 64), False, False), ((1, 1), False, True)] if small else \
            [((8192, 768), True, True), ((8192 * 12, 64), False, False), ((1, 1), False, True),
             ((37, 37), False, True), ((1023, 1600), False, True)]

        def label(s, g, w):
            return _shape_label(s, g) + ("" if w else " no weight")
        numeric = [(label(s, g, w), numerics(partial(testing.rmsnorm_case, s, fused=fused, weight=w)))
                   for s, g, w in shapes]
        det = shapes[0]
        deterministic = [(label(*det), "float32" if small else "bfloat16",
                          determinism(partial(testing.rmsnorm_case, det[0], fused=fused)))]
    elif op in ("cross_entropy", "cross_entropy_fused"):
        fused = op == "cross_entropy_fused"
        # (N, V, Vp): GPT-2's (N, 50257) view of (N, 50304); V = 1; V = 50257 unpadded
        shapes = [((5, 37, 40), False), ((1, 1, 1), False)] if small else \
            [((8192, 50257, 50304), True), ((1, 1, 1), False), ((1023, 1, 1), False), ((37, 50257, 50257), False)]

        def label(N, V, Vp, gpt2):
            return f"{N}x{V}" + (f" of {N}x{Vp}" if Vp != V else "") + (" (GPT-2)" if gpt2 else "")

        def make(N, V, Vp, whole=False):  # the (N, V) view of (N, Vp), or whole with num_classes=V
            # logits 4 N(0, 1): a wider spread than the tests' 2 N(0, 1), the softmax further from uniform
            return partial(testing.cross_entropy_case, (N, V), padded_vocab=Vp, inplace_backward=fused,
                           whole_buffer=whole, logit_scale=4.0)
        numeric = [(label(N, V, Vp, g), numerics(make(N, V, Vp))) for (N, V, Vp), g in shapes]
        (N, V, Vp), g = shapes[0]
        if _takes_num_classes():  # and the whole padded buffer with num_classes=V, as the model calls it
            numeric.insert(1, (label(N, V, Vp, g) + " num_classes", numerics(make(N, V, Vp, whole=True))))
        if _takes_options():  # Liger's options all at once (per-row losses, smoothing, z-loss, soft-cap)
            oN, oV, oVp = (5, 37, 40) if small else (512, 50257, 50304)
            numeric.append((label(oN, oV, oVp, False) + " options", numerics(partial(
                testing.cross_entropy_case, (oN, oV), padded_vocab=oVp, inplace_backward=fused, logit_scale=4.0,
                reduction="none", label_smoothing=0.1, lse_square_scale=1e-4, softcap=15.0))))
        deterministic = [(label(N, V, Vp, g), "float32" if small else "bfloat16", determinism(make(N, V, Vp)))]
    elif op in ("swiglu", "relu2"):
        # (B*T, 4C): GPT-2's MLP width (swiglu: the output's shape; its packed input is (B*T, 8C))
        shapes = [((37, 37), False), ((1, 1), False)] if small else \
            [((8192, 3072), True), ((1, 1), False), ((37, 37), False), ((1023, 1600), False)]
        if op == "relu2":
            numeric = [(_shape_label(s, g), numerics(partial(testing.relu2_case, s))) for s, g in shapes]
        else:
            numeric = [(f"{_shape_label(s, g)} {layout}", numerics(partial(testing.swiglu_case, s, layout=layout)))
                       for s, g in shapes for layout in ("two", "views", "packed")]
    elif op == "rope":
        # (B, T, H, D, layout, start): Llama 2 110M's q or k (B = 8, T = 1024, H = 12, D = 64) as heads of a
        # packed qkv buffer read in place; a decoding step (T = 1 at position 1023); Llama 2 7B's head dim;
        # odd sizes (a pair per slot)
        shapes = [((2, 37, 3, 64), "packed", 0), ((1, 1, 2, 6), "contiguous", 36)] if small else \
            [((8, 1024, 12, 64), "packed", 0), ((8, 1, 12, 64), "packed", 1023), ((2, 37, 32, 128), "contiguous", 5),
             ((3, 37, 3, 6), "contiguous", 0)]

        def label(s, layout, start):
            return f"{_shape_label(s)} {layout} start={start}" + (" (Llama 2 110M)" if s[1:] == (1024, 12, 64) else "")
        numeric = [(label(*c), numerics(partial(testing.rope_case, c[0], layout=c[1], start=c[2]))) for c in shapes]
        det = shapes[0]
        deterministic = [(label(*det), "float32" if small else "bfloat16",
                          determinism(partial(testing.rope_case, det[0], layout=det[1], start=det[2])))]
    elif op == "attention":
        shapes = [((1, 2, 37, 64), False), ((1, 1, 1, 64), False)] if small else \
            [((8, 12, 1024, 64), True), ((1, 12, 1, 64), False), ((2, 12, 37, 64), False), ((1, 12, 1023, 64), False)]
        numeric = [(_shape_label(s, g), numerics(partial(testing.attention_case, s), partial(_attention_check, D=s[3])))
                   for s, g in shapes]
        det, _ = shapes[0]
        deterministic = [(_shape_label(*shapes[0]), "float32" if small else "bfloat16",
                          determinism(partial(testing.attention_case, det), partial(_attention_check, D=det[3])))]
        # grouped-query attention: k, v with H_kv heads (dK, dV summed over each group's query heads)
        gqa, kv_heads = ((1, 4, 37, 64), 2) if small else ((4, 12, 1024, 64), 4)
        gqa_make = partial(testing.attention_case, gqa, num_kv_heads=kv_heads)
        numeric.append((f"{_shape_label(gqa)} GQA H_kv={kv_heads}",
                        numerics(gqa_make, partial(_attention_check, D=gqa[3]))))
        deterministic.append((f"{_shape_label(gqa)} GQA H_kv={kv_heads}", "float32" if small else "bfloat16",
                              determinism(gqa_make, partial(_attention_check, D=gqa[3]))))
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
        numeric = [(label, numerics(_adamw(shapes_fn, False))),
                   (label + " stochastic rounding", numerics(_adamw(shapes_fn, True)))]
        if not small:
            numeric.append(("1, 37, 1023x1600, 1600x37", numerics(_adamw(odd_shapes, False))))
        deterministic = [(label + " stochastic rounding", "bfloat16", determinism(_adamw(shapes_fn, True)))]
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    cases = [Case(op, backend, dt, "numerics", label, run) for label, run in numeric for dt in dtypes]
    # stochastic rounding is a bf16 mode
    cases = [c for c in cases if not (c.op == "adamw" and "stochastic" in c.shape and c.dtype_name != "bfloat16")]
    cases += [Case(op, backend, dt, "determinism", label, run) for label, dt, run in deterministic]
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

    import pyllmc  # noqa: F401 - registers the ops (and their custom ops) before the first case

    torch.set_float32_matmul_precision("highest")  # float32 references in float32, not TF32
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    cases = group_cases(group, backend, small)
    for index in range(start, len(cases)):
        case = cases[index]
        print(f"@@start {index}", flush=True)
        started = time.perf_counter()
        case_seed = (seed + zlib.crc32(f"{backend} {case.name}".encode())) % 2**31  # the same in any grouping
        tag = f"[{case.op}/{backend}]"
        ctx = Context(backend, getattr(torch, case.dtype_name), device,
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
