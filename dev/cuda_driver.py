"""Every CUDA launcher of pyllmc, once each, at small odd shapes, forward and every gradient.

The driver for the tools that watch kernels run rather than test their answers:

    python dev/cuda_driver.py                                   # on a GPU
    compute-sanitizer --tool memcheck python dev/cuda_driver.py # memcheck / racecheck / initcheck / synccheck
    PYLLMC_CUDA_SIM=1 python dev/cuda_driver.py --schedule reverse   # on the CPU simulator

Each case runs one op through pyllmc.ops on the cuda backend with inputs drawn from a fixed
seed, and prints `case  digest`, the sha256 of every output (forward results and gradients).
The kernels are deterministic, so two runs must print the same digests: two schedules of the
simulator (forward, reversed, random warp order), its two cp.async models, or its default and
sanitizer builds. A race or an uninitialized read shows as a digest that moves.

--check also compares every output with the torch backend on the same inputs, with loose
per-dtype tolerances: a smoke check (tests/ holds the exact criteria).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import pyllmc
from pyllmc import cuda_sim, ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest |kernel - torch| allowed, relative to the largest |torch| of the output (smoke check).
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 8e-3}


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    run: Callable  # run(backend, dtype, device, generator) -> list of output tensors
    checked: bool = True  # False: no meaningful comparison (the torch result is rounding noise)


@dataclass
class Result:
    name: str
    digest: str
    seconds: float
    max_error: Optional[float] = None  # relative to the reference's scale, with --check
    ok: bool = True


def _randn(gen, *shape, dtype, device, scale=1.0, grad=True):
    t = (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)
    return t.requires_grad_(grad)


# ---- the cases ------------------------------------------------------------------------------

def gelu_case(n):
    def run(backend, dtype, device, gen):
        x = _randn(gen, n, dtype=dtype, device=device, scale=3.0)
        dy = _randn(gen, n, dtype=dtype, device=device, grad=False)
        y = ops.gelu(x, backend=backend)
        y.backward(dy)
        return [y, x.grad]
    return run


def layernorm_case(rows, C, fused):
    def run(backend, dtype, device, gen):
        x = _randn(gen, rows, C, dtype=dtype, device=device)
        w = _randn(gen, C, dtype=dtype, device=device)
        b = _randn(gen, C, dtype=dtype, device=device)
        dy = _randn(gen, rows, C, dtype=dtype, device=device, grad=False)
        if not fused:
            y = ops.layernorm(x, w, b, backend=backend)
            y.backward(dy)
            return [y, x.grad, w.grad, b.grad]
        r = _randn(gen, rows, C, dtype=dtype, device=device)
        dh = _randn(gen, rows, C, dtype=dtype, device=device, grad=False)
        h, y = ops.fused_residual_layernorm(r, x, w, b, backend=backend)
        torch.autograd.backward([h, y], [dh, dy])
        return [h, y, r.grad, x.grad, w.grad, b.grad]
    return run


def cross_entropy_case(N, V, Vp, inplace, dloss):
    """Logits (N, V) as a view of (N, Vp); every third target ignored; upstream gradient dloss."""
    def run(backend, dtype, device, gen):
        leaf = _randn(gen, N, Vp, dtype=dtype, device=device, scale=2.0)
        targets = torch.randint(0, V, (N,), generator=gen).to(device)
        targets[::3] = -1
        logits = (leaf * 1.0)[:, :V]  # an intermediate, as the fused classifier needs
        loss = ops.cross_entropy(logits, targets, inplace_backward=inplace, backend=backend)
        loss.backward(torch.tensor(dloss, device=device))
        return [loss, leaf.grad]
    return run


def attention_case(B, H, T, D):
    def run(backend, dtype, device, gen):
        q, k, v = (_randn(gen, B, H, T, D, dtype=dtype, device=device) for _ in range(3))
        dout = _randn(gen, B, H, T, D, dtype=dtype, device=device, grad=False)
        out = ops.attention(q, k, v, backend=backend)
        out.backward(dout)
        return [out, q.grad, k.grad, v.grad]
    return run


def adamw_case(stochastic):
    """Three tensors of odd sizes in two groups, two steps; params and the whole state out."""
    def run(backend, dtype, device, gen):
        sizes = (4099, 1, 37 * 3)
        params = [_randn(gen, n, dtype=dtype, device=device) for n in sizes]
        opt = pyllmc.optim.AdamW([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}], lr=1e-2,
                                 stochastic_rounding=stochastic, seed=3, backend=backend)
        for _ in range(2):
            for p in params:
                p.grad = _randn(gen, p.numel(), dtype=dtype, device=device, grad=False)
            opt.step()
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        return [p.detach() for p in params] + state
    return run


def all_cases() -> list[Case]:
    cases = []
    for dtype in DTYPES:
        tag = str(dtype).replace("torch.", "")
        for n in (1, 37, 1029):
            cases.append(Case(f"gelu n={n} {tag}", dtype, gelu_case(n)))
        # C = 1 and 37: scalar chunks; 768: GPT-2 124M (vector chunks, row kept in registers); 1600:
        # GPT-2 XL (the backward reads the row twice); 8200: past the register kernels
        for rows, C in ((3, 1), (5, 37), (7, 768), (3, 1600), (2, 8200)):
            for fused in (False, True):
                name = "fused_residual_layernorm" if fused else "layernorm"
                # C = 1: x - mean = 0 exactly, so dx and dweight are 0 and torch's are rounding noise
                cases.append(Case(f"{name} rows={rows} C={C} {tag}", dtype, layernorm_case(rows, C, fused),
                                  checked=C > 1))
        for N, V, Vp in ((1, 1, 1), (5, 37, 40), (4, 1000, 1000), (3, 50257, 50304)):
            for inplace, dloss in ((False, 1.0), (True, 1.0), (True, -0.5)):
                name = "cross_entropy fused" if inplace else "cross_entropy"
                cases.append(Case(f"{name} N={N} V={V}/{Vp} dloss={dloss} {tag}", dtype,
                                  cross_entropy_case(N, V, Vp, inplace, dloss)))
        shapes = ((1, 1, 1, 64), (1, 2, 37, 64), (1, 1, 130, 128)) if dtype != torch.float32 else \
            ((1, 1, 1, 32), (1, 2, 37, 64), (1, 1, 9, 128))
        for B, H, T, D in shapes:
            cases.append(Case(f"attention B={B} H={H} T={T} D={D} {tag}", dtype, attention_case(B, H, T, D)))
        for stochastic in ((False, True) if dtype == torch.bfloat16 else (False,)):
            cases.append(Case(f"adamw{' stochastic' if stochastic else ''} {tag}", dtype, adamw_case(stochastic)))
    return cases


# ---- running -------------------------------------------------------------------------------

def cuda_device() -> torch.device:
    """Where the cuda backend runs: the GPU, or the CPU under the simulator."""
    status = pyllmc.available_backends()["cuda"]
    if not status.available:
        raise SystemExit(f"cuda_driver: the cuda backend cannot run here: {status.reason}")
    return torch.device("cpu") if status.simulated else torch.device("cuda")


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def max_relative_error(got, want) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        if w.numel() == 0:
            continue
        scale = max(w.abs().max().item(), 1e-30)
        worst = max(worst, ((g - w).abs().max().item()) / scale)
    return worst


def run_cases(check: bool = False, only: Optional[str] = None, seed: int = 1234) -> list[Result]:
    device = cuda_device()
    results = []
    for index, case in enumerate(all_cases()):
        if only and only not in case.name:
            continue
        started = time.perf_counter()
        outputs = case.run("cuda", case.dtype, device, torch.Generator().manual_seed(seed + index))
        if device.type == "cuda":
            torch.cuda.synchronize()
        result = Result(case.name, digest(outputs), time.perf_counter() - started)
        if check and case.checked:
            want = case.run("torch", case.dtype, device, torch.Generator().manual_seed(seed + index))
            result.max_error = max_relative_error(outputs, want)
            result.ok = result.max_error <= CHECK_TOLERANCE[case.dtype]
        results.append(result)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare every output with the torch backend")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--schedule", choices=cuda_sim.SCHEDULES, default="forward",
                        help="simulator only: the order warps (and lanes, blocks) take turns")
    parser.add_argument("--seed", type=int, default=0, help="simulator only: seed of the random schedule")
    parser.add_argument("--greedy", action="store_true",
                        help="simulator only: each warp runs as far as it can before the next (else in step)")
    parser.add_argument("--cp-async", choices=cuda_sim.CP_ASYNC_MODES, default="at_wait",
                        help="simulator only: when cp.async copies land")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    device = cuda_device()
    if device.type == "cpu":
        cuda_sim.set_schedule(args.schedule, args.seed, args.greedy)
        cuda_sim.set_cp_async(args.cp_async)
        where = (f"the CPU simulator (schedule {args.schedule}{' greedy' if args.greedy else ''}, seed {args.seed}, "
                 f"cp.async {args.cp_async})")
    else:
        where = torch.cuda.get_device_name()
    print(f"cuda_driver: every CUDA launcher on {where}", flush=True)
    started = time.perf_counter()
    results = run_cases(check=args.check, only=args.only)
    for r in results:
        err = "" if r.max_error is None else f"  max rel err {r.max_error:.2e}{'' if r.ok else '  FAILED'}"
        print(f"{r.name:58s} {r.digest}  {r.seconds * 1e3:8.1f} ms{err}", flush=True)
    failed = [r for r in results if not r.ok]
    print(f"cuda_driver: {len(results)} cases in {time.perf_counter() - started:.1f} s"
          + (f", {len(failed)} outside the check's tolerance" if args.check else ""))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
