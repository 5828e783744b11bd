"""The GPU's memory counters of every CUDA kernel, counted on the CPU simulator (pyllmc.sim_counters).

Runs each op (forward and backward) at GPT-2's shapes scaled to a CPU, in the simulator's
"counters" build, and prints per launch, per access site: sectors per request against the least
the same bytes need, shared-memory ways, and the launch's unique bytes.

    python dev/sim_counters.py                      # the table
    python dev/sim_counters.py --only attention     # cases whose name contains "attention"
    python dev/sim_counters.py --check              # compare with dev/sim_counters_baseline.json (exit 1 on a regression)
    python dev/sim_counters.py --update             # rewrite the baseline (after an intended change)
    python dev/sim_counters.py --mutants            # plant the regressions of MUTANTS in a copy of csrc/; each must fail --check

A regression is a launch whose excess sectors (global), excess wavefronts (shared) or unique
bytes grow, or a main-loop site (a quarter or more of its launch's busiest site's requests) that
was at the ideal and is no longer. The first build of the counters variant takes ~2 minutes on 2
cores and is cached with the simulator's other builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "dev" / "sim_counters_baseline.json"
MAIN_LOOP_SHARE = 0.25  # a site with at least this share of its launch's busiest site's requests is "main loop"

if __name__ == "__main__":  # (an importer, e.g. a test, only wants the helpers: its process keeps its variant)
    os.environ["PYLLMC_CUDA_SIM"] = "1"
    os.environ["PYLLMC_CUDA_SIM_VARIANT"] = "counters"



@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    only: str  # the cases to run


# Regressions of the access pattern only: the answers stay right, the traffic does not.
MUTANTS = [
    # every other vector (in bounds, wrong answers): 32 sectors per 16-sector request
    Mutant("gelu: forward reads its vectors at a stride of two", "gelu.cu",
           "    if (i < num_vectors) {\n        const Packed128<T> x = load128cs(inp + i * V);\n        Packed128<T> y;",
           "    if (i < num_vectors) {\n        const Packed128<T> x = load128cs(inp + ((2 * i) % num_vectors) * V);\n"
           "        Packed128<T> y;", "gelu"),
    # every other slot of a row (in bounds, wrong answers): twice the sectors per request
    Mutant("swiglu: slots read at a stride of two", "swiglu.cu",
           "    col = (i - row * slots_per_row) * width;",
           "    col = ((2 * (i - row * slots_per_row)) % slots_per_row) * width;", "swiglu"),
    Mutant("attention: shared tiles without their row padding", "attention.cu",
           "constexpr int kPad = 8;", "constexpr int kPad = 0;", "attention"),
]


def cases():
    """dev/cuda_driver.py's kind of case (pyllmc.testing's, inputs from a seed) at GPT-2 124M's row
    width, few rows. cuda_driver and pyllmc are imported here, not at the top: run as a script, this file
    picks the simulator's counters variant (above) before pyllmc is first imported."""
    from functools import partial

    import torch

    from cuda_driver import ADAMW_DECAYED, ADAMW_SHAPES, Case
    from pyllmc import testing

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        out += [
            Case(f"gelu n=16x3072 {tag}", dtype, partial(testing.gelu_case, (16 * 3072,))),
            # swiglu at a Llama MLP's row width: two contiguous tensors (one folded row), then the halves of
            # one packed (16, 2 x 3072) tensor read in place, row by row
            Case(f"swiglu two rows=16 H=3072 {tag}", dtype, partial(testing.swiglu_case, (16, 3072))),
            Case(f"swiglu packed rows=16 H=3072 {tag}", dtype,
                 partial(testing.swiglu_case, (16, 3072), layout="packed")),
            Case(f"relu2 n=16x3072 {tag}", dtype, partial(testing.relu2_case, (16 * 3072,))),
            # rope on Llama 2 110M's q or k (H = 12, D = 64) as heads of a packed qkv buffer (position stride
            # 3 H D), read in place, 16 positions; the cos / sin rows are shared by the heads
            Case(f"rope packed B=1 T=16 H=12 D=64 {tag}", dtype,
                 partial(testing.rope_case, (1, 16, 12, 64), layout="packed")),
            Case(f"layernorm rows=16 C=768 {tag}", dtype, partial(testing.layernorm_case, (16, 768))),
            Case(f"fused_residual_layernorm rows=16 C=768 {tag}", dtype,
                 partial(testing.layernorm_case, (16, 768), fused=True)),
            Case(f"rmsnorm rows=16 C=768 {tag}", dtype, partial(testing.rmsnorm_case, (16, 768))),
            Case(f"fused_residual_rmsnorm rows=16 C=768 {tag}", dtype,
                 partial(testing.rmsnorm_case, (16, 768), fused=True)),
            # QK-norm over the head dim: groups of C / W lanes, several rows per warp
            Case(f"rmsnorm rows=64 C=64 {tag}", dtype, partial(testing.rmsnorm_case, (64, 64))),
            Case(f"cross_entropy fused N=2 V=50257/50304 {tag}", dtype,
                 partial(testing.cross_entropy_case, (2, 50257), padded_vocab=50304, inplace_backward=True,
                         ignore_every=3, dloss=1.0)),
            Case(f"attention B=1 H=1 T=128 D=64 {tag}", dtype, partial(testing.attention_case, (1, 1, 128, 64))),
            Case(f"adamw {tag}", dtype, partial(testing.adamw_case, ADAMW_SHAPES, decayed=ADAMW_DECAYED)),
        ]
    return out


def run(only: str = "", seed: int = 1234) -> dict:
    """case -> its launches (pyllmc.sim_counters.Launch), in order."""
    import torch

    from pyllmc import sim_counters

    result = {}
    for index, case in enumerate(cases()):
        if only and only not in case.name:
            continue
        op_case = case.op_case(torch.device("cpu"), seed + index)  # inputs drawn outside the recording
        with sim_counters.recording():
            op_case.run("cuda")
        result[case.name] = sim_counters.launches()
    return result


def summary(launches: list) -> list:
    out = []
    for l in launches:
        busiest = max((s.requests for s in l.sites), default=0)
        main = sorted({s.key for s in l.sites if s.requests >= MAIN_LOOP_SHARE * busiest and s.requests > 0})
        at_ideal = [k for k in main if all(s.at_ideal for s in l.sites if s.key == k)]
        out.append({
            "kernel": l.name, "blocks": l.blocks,
            "sectors": l.total("global", "sectors"), "ideal_sectors": l.total("global", "ideal_sectors"),
            "excess_sectors": l.excess_sectors,
            "wavefronts": l.total("shared", "wavefronts"), "ideal_wavefronts": l.total("shared", "ideal_wavefronts"),
            "excess_wavefronts": l.excess_wavefronts,
            "unique_read": l.unique_read, "unique_written": l.unique_written,
            "block_read": l.block_read, "block_written": l.block_written,
            "main_loop_at_ideal": at_ideal,
            "not_at_ideal": sorted({s.key for s in l.sites if not s.at_ideal}),
        })
    return out


def compare(current: dict, baseline: dict) -> list:
    """Regressions of `current` (case -> summary()) against `baseline`'s cases, as messages."""
    problems = []
    for case, now in current.items():
        if case not in baseline:
            problems.append(f"{case}: not in the baseline (run dev/sim_counters.py --update)")
            continue
        then = baseline[case]
        if [l["kernel"] for l in now] != [l["kernel"] for l in then]:
            problems.append(f"{case}: launches {[l['kernel'] for l in now]} != baseline {[l['kernel'] for l in then]}")
            continue
        for i, (a, b) in enumerate(zip(now, then)):
            where = f"{case}: launch {i} {a['kernel']}"
            for key in ("excess_sectors", "excess_wavefronts", "unique_read", "unique_written"):
                if a[key] > b[key]:
                    problems.append(f"{where}: {key} {a[key]} > baseline {b[key]}")
            for key in b["main_loop_at_ideal"]:
                if key in a["not_at_ideal"]:
                    problems.append(f"{where}: main-loop site no longer at the ideal: {key}")
    return problems


def print_table(results: dict) -> None:
    from pyllmc import sim_counters

    for case, launches in results.items():
        for l in launches:
            print(sim_counters.format_launch(l, case))
            print()


def run_mutants(only: str = "") -> int:
    """Each mutant, built from a copy of csrc/ at a fixed place (so unedited files stay cached),
    must make --check fail."""
    from pyllmc import cuda_sim

    copy = cuda_sim.cache_dir() / "counters-mutant" / "csrc"
    caught = 0
    todo = [m for m in MUTANTS if only in m.name]
    for m in todo:
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(ROOT / "csrc", copy)
        path = copy / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            print(f"MUTANT {m.name}: the text to edit is not in {m.file} exactly once ({text.count(m.old)})")
            return 2
        path.write_text(text.replace(m.old, m.new))
        started = time.time()
        env = dict(os.environ, PYLLMC_CSRC=str(copy), PYLLMC_CUDA_SIM="1", PYLLMC_CUDA_SIM_VARIANT="counters")
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--check", "--only", m.only],
                              capture_output=True, text=True, env=env)
        ok = done.returncode == 1 and "REGRESSION" in done.stdout
        caught += ok
        print(f"{'caught' if ok else 'MISSED'}  {m.name}  ({time.time() - started:.0f} s)")
        for line in done.stdout.splitlines():
            if line.startswith("REGRESSION"):
                print("    " + line)
        if not ok:
            print(done.stdout[-3000:], done.stderr[-3000:])
    print(f"{caught} of {len(todo)} mutants caught")
    return 0 if caught == len(todo) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--check", action="store_true", help="compare with the baseline; exit 1 on a regression")
    parser.add_argument("--update", action="store_true", help="write the baseline")
    parser.add_argument("--json", type=Path, help="write the summaries here")
    parser.add_argument("--mutants", action="store_true", help="plant MUTANTS; each must fail --check")
    parser.add_argument("--quiet", action="store_true", help="no table")
    args = parser.parse_args(argv)
    if args.mutants:
        return run_mutants(args.only)

    from pyllmc import sim_counters

    started = time.time()
    results = run(args.only)
    elapsed = time.time() - started
    if not args.quiet:
        print_table(results)
    summaries = {}
    for case, launches in results.items():
        summaries[case] = summary(launches)
    print(f"{len(results)} cases, {sum(len(v) for v in results.values())} launches in {elapsed:.1f} s "
          f"({sim_counters.compiler()})")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1) + "\n")
    if args.update:
        data = json.loads(BASELINE.read_text()) if BASELINE.exists() and args.only else {"cases": {}}
        data["compiler"] = sim_counters.compiler()
        data["cases"].update(summaries)
        BASELINE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BASELINE}")
    if args.check:
        baseline = json.loads(BASELINE.read_text())
        problems = compare(summaries, baseline["cases"])
        for p in problems:
            print("REGRESSION " + p)
        if baseline.get("compiler") != sim_counters.compiler():
            print(f"note: the baseline was made with {baseline.get('compiler')}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
