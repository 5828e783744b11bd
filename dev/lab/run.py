"""The kernel lab: each op from naive to fast, every rung checked and explained by its counters.

    python dev/lab/run.py gelu_forward                 # one ladder: build, check, count, print its table
    python dev/lab/run.py --all                        # every ladder
    python dev/lab/run.py gelu_forward --sites         # + every launch's per-site counters
    python dev/lab/run.py gelu_forward --mutant chunked_loop   # the tutorial's exercise: a planted bug
    python dev/lab/run.py --list                       # the ladders, their rungs and mutants
    python dev/lab/run.py --all --write-docs           # refresh the tables of the tutorials (dev/lab/*.md)
    python dev/lab/run.py --all --gpu                  # on a GPU machine: + nvcc builds, checked and timed there

Each rung is built for the CPU simulator's "counters" build (pyllmc.cuda_sim, pyllmc.sim_counters),
checked against torch in float64 at small odd shapes, then run once more at the ladder's counter
shape with the memory counters on. Columns: global requests (warp-level load/store instructions),
sectors per request against the least the same bytes need, shared-memory ways (wavefronts per
phase: 1.0 is conflict-free), and the bytes the sectors carry against the op's least traffic (no
L1 reuse assumed: a second pass over the row shows up here). The first build takes about a
minute on 2 cores (today's layernorm.cu is the largest file) and is cached with the simulator's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab  # noqa: E402  (dev/lab/lab.py)
import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ladders", nargs="*", help=f"ladders to run: {', '.join(lab.LADDERS)}")
    parser.add_argument("--all", action="store_true", help="run every ladder")
    parser.add_argument("--sites", action="store_true", help="also print every launch's per-site table")
    parser.add_argument("--mutant", help="plant this mutant of the ladder (see --list) before building")
    parser.add_argument("--list", action="store_true", help="list the ladders, rungs and mutants")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the tables in dev/lab/<ladder>.md")
    parser.add_argument("--gpu", action="store_true",
                        help="also build every rung with nvcc for this machine's GPU, check it there and time it "
                             "at the ladder's GPU shape (GB/s and %% of dev/bench's copy ceiling)")
    args = parser.parse_args(argv)
    if args.gpu and args.write_docs:
        parser.error("--write-docs writes the simulator's tables; run it without --gpu")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no GPU here")

    if args.list:
        for name, ladder in lab.LADDERS.items():
            print(name)
            for rung in ladder.rungs:
                print(f"  {rung.stem:<20} {rung.changed}")
            for m in ladder.mutants.values():
                print(f"  --mutant {m.name}: {m.hint}")
        return 0
    names = list(lab.LADDERS) if args.all else args.ladders
    unknown = [n for n in names if n not in lab.LADDERS]
    if not names or unknown:
        parser.error(f"name a ladder ({', '.join(lab.LADDERS)}) or pass --all" +
                     (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if args.mutant and len(names) != 1:
        parser.error("--mutant goes with one ladder")
    if args.mutant and args.mutant not in lab.LADDERS[names[0]].mutants:
        parser.error(f"{names[0]} has no mutant {args.mutant!r}; it has: "
                     f"{', '.join(lab.LADDERS[names[0]].mutants) or 'none'}")

    failed = False
    tables = {}
    for name in names:
        rows = lab.run_ladder(name, args.mutant, verbose=True, gpu=args.gpu)
        table = lab.format_table(name, rows, args.mutant or "")
        tables[(name, args.mutant or "")] = table
        print(f"$ {lab.command(name)}{' --mutant ' + args.mutant if args.mutant else ''}")
        print(table)
        for r in rows:
            if not r.correct:
                failed = True
                print(f"  {r.rung}: WRONG: {r.error}")
            if r.gpu is not None and not r.gpu.correct:
                failed = True
                print(f"  {r.rung}: WRONG on the GPU: {r.gpu.error}")
        if args.sites:
            print()
            print(lab.format_sites(rows))
        print()
    if not args.gpu:
        print(lab.GPU_TIME_NOTE)
    if args.write_docs:
        for name in names:
            path = lab.doc_path(name)
            text = path.read_text()
            new = lab.write_doc_tables(text, tables)
            if new != text:
                path.write_text(new)
                print(f"wrote the tables of {path.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
