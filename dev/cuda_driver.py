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

The cases are pyllmc.testing's (the tests' own inputs and references), with inputs drawn from
the seed. --check also judges every output by pyllmc.testing's criteria, the tests' own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

import pyllmc
from pyllmc import cuda_sim, testing

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# AdamW's tensors: three of odd sizes, one a single element, in two parameter groups (the first two
# with weight decay, the last without); two steps
ADAMW_SHAPES = ((4099,), (1,), (37 * 3,))
ADAMW_DECAYED = (True, True, False)


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    make: Callable  # make(dtype, device, generator=...) -> a pyllmc.testing case, its inputs drawn from the generator

    def op_case(self, device: torch.device, seed: int):
        """The pyllmc.testing case with inputs drawn on the CPU from `seed`: the same on every device."""
        return self.make(self.dtype, device, generator=torch.Generator().manual_seed(seed))


@dataclass
class Result:
    name: str
    digest: str
    seconds: float
    worst_ratio: Optional[float] = None  # with --check: the worst output's error / its allowed error
    ok: bool = True
    problems: list = field(default_factory=list)  # with --check: the outputs out of tolerance


def all_cases() -> list[Case]:
    cases = []
    for dtype in DTYPES:
        tag = str(dtype).replace("torch.", "")
        for n in (1, 37, 1029):
            cases.append(Case(f"gelu n={n} {tag}", dtype, partial(testing.gelu_case, (n,))))
        # swiglu: contiguous (one folded row: vectors, a short slot), the halves of a packed tensor read in place
        # (H = 64: vectors row by row; H = 37: unaligned, an element per slot), and the packed op
        for shape, layout in (((37,), "two"), ((3, 1029), "two"), ((5, 64), "views"), ((5, 37), "views"),
                              ((5, 64), "packed"), ((3, 37), "packed")):
            cases.append(Case(f"swiglu {layout} {'x'.join(map(str, shape))} {tag}", dtype,
                              partial(testing.swiglu_case, shape, layout=layout)))
        for n in (1, 37, 1029):
            cases.append(Case(f"relu2 n={n} {tag}", dtype, partial(testing.relu2_case, (n,))))
        # rope (B, T, H, D): half = 3 (a pair per slot), 32 (vectors; the k heads of a packed qkv read in
        # place, positions from start = 5) and 64 (Llama 2 7B's head dim)
        for shape, layout, start in (((2, 37, 3, 6), "contiguous", 0), ((2, 9, 3, 64), "packed", 5),
                                     ((1, 5, 2, 128), "contiguous", 0)):
            cases.append(Case(f"rope {layout} {'x'.join(map(str, shape))} start={start} {tag}", dtype,
                              partial(testing.rope_case, shape, layout=layout, start=start)))
        # C = 1 and 37: scalar chunks; 768: GPT-2 124M (vector chunks, row kept in registers); 1600:
        # GPT-2 XL (the backward reads the row twice); 8200: past the register kernels
        for rows, C in ((3, 1), (5, 37), (7, 768), (3, 1600), (2, 8200)):
            for fused in (False, True):
                name = "fused_residual_layernorm" if fused else "layernorm"
                cases.append(Case(f"{name} rows={rows} C={C} {tag}", dtype,
                                  partial(testing.layernorm_case, (rows, C), fused=fused)))
        # C = 1 and 37: scalar chunks (1: one lane per row); 64: QK-norm's head dim (groups of lanes,
        # several rows per warp); 768: whole warps, row in registers; 8200: past the register kernels
        for rows, C in ((3, 1), (5, 37), (9, 64), (7, 768), (2, 8200)):
            for fused in (False, True):
                name = "fused_residual_rmsnorm" if fused else "rmsnorm"
                cases.append(Case(f"{name} rows={rows} C={C} {tag}", dtype,
                                  partial(testing.rmsnorm_case, (rows, C), fused=fused)))
        for rows, C, fused in ((9, 64, False), (7, 768, True)):  # without a weight: no dweight, no partial sums
            name = "fused_residual_rmsnorm" if fused else "rmsnorm"
            cases.append(Case(f"{name} no-weight rows={rows} C={C} {tag}", dtype,
                              partial(testing.rmsnorm_case, (rows, C), fused=fused, weight=False)))
        # logits (N, V) as a view of (N, Vp); every third target ignored; upstream gradient dloss
        for N, V, Vp in ((1, 1, 1), (5, 37, 40), (4, 1000, 1000), (3, 50257, 50304)):
            for inplace, dloss in ((False, 1.0), (True, 1.0), (True, -0.5)):
                name = "cross_entropy fused" if inplace else "cross_entropy"
                cases.append(Case(f"{name} N={N} V={V}/{Vp} dloss={dloss} {tag}", dtype,
                                  partial(testing.cross_entropy_case, (N, V), padded_vocab=Vp,
                                          inplace_backward=inplace, ignore_every=3, dloss=dloss)))
        shapes = ((1, 1, 1, 64), (1, 2, 37, 64), (1, 1, 130, 128)) if dtype != torch.float32 else \
            ((1, 1, 1, 32), (1, 2, 37, 64), (1, 1, 9, 128))
        for B, H, T, D in shapes:
            cases.append(Case(f"attention B={B} H={H} T={T} D={D} {tag}", dtype,
                              partial(testing.attention_case, (B, H, T, D))))
        # grouped-query attention: 4 query heads on 2 kv heads (the dK/dV kernel's prefetch crosses query heads)
        B, H, H_kv, T, D = (1, 4, 2, 70, 64) if dtype != torch.float32 else (1, 4, 2, 37, 64)
        cases.append(Case(f"attention GQA B={B} H={H} H_kv={H_kv} T={T} D={D} {tag}", dtype,
                          partial(testing.attention_case, (B, H, T, D), num_kv_heads=H_kv)))
        for stochastic in ((False, True) if dtype == torch.bfloat16 else (False,)):
            cases.append(Case(f"adamw{' stochastic' if stochastic else ''} {tag}", dtype,
                              partial(testing.adamw_case, ADAMW_SHAPES, decayed=ADAMW_DECAYED,
                                      stochastic_rounding=stochastic)))
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


def run_cases(check: bool = False, only: Optional[str] = None, seed: int = 1234) -> list[Result]:
    device = cuda_device()
    results = []
    for index, case in enumerate(all_cases()):
        if only and only not in case.name:
            continue
        started = time.perf_counter()
        op_case = case.op_case(device, seed + index)
        outputs = op_case.run("cuda")
        if device.type == "cuda":
            torch.cuda.synchronize()
        result = Result(case.name, digest(outputs.values()), time.perf_counter() - started)
        if check:
            comparisons = op_case.compare(outputs)
            result.worst_ratio = max(c.ratio for c in comparisons)
            result.problems = [str(c) for c in comparisons if not c.ok]
            result.ok = not result.problems
        results.append(result)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="judge every output against PyTorch by pyllmc.testing's criteria (the tests')")
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
        verdict = "" if r.worst_ratio is None else \
            f"  worst {r.worst_ratio:.2f} of its bound" + ("" if r.ok else "  FAILED: " + " | ".join(r.problems))
        print(f"{r.name:58s} {r.digest}  {r.seconds * 1e3:8.1f} ms{verdict}", flush=True)
    failed = [r for r in results if not r.ok]
    print(f"cuda_driver: {len(results)} cases in {time.perf_counter() - started:.1f} s"
          + (f", {len(failed)} outside the check's tolerance" if args.check else ""))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
