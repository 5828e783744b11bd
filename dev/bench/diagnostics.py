"""What train_gpt2.py --diagnostics_every costs: the trainer itself, run in this process with and
without diagnostics, the two variants interleaved.

    python dev/bench/diagnostics.py                  # the CPU demo's model and batch (pyllmc.settings.DEMO_CPU)
    python dev/bench/diagnostics.py --model gpt2 --vocab_size 50257 --batch_size 16 --sequence_length 1024 \\
        --json $OUT/diagnostics_bench.json           # GPT-2 124M on a GPU (bf16, the fastest backend)

Each round runs train_gpt2.main() twice on the same random-token shard (the cost does not depend
on the tokens) with the same seed, once with --diagnostics_every 0 and once with --diagnostics_every
--every, in alternating order (a machine that slows down or speeds up weighs on both alike), each
for --steps steps, nothing else (no validation, samples or checkpoints). From each run's main.jsonl:

  mean step   the mean of the trainer's per-step dt over steps 2 .. --steps (step 1 warms up);
              overhead = mean over rounds of (mean step with diagnostics) / (mean step without).
              --steps is --every * k + 1, so the step after the last diagnostics step is timed too:
              the trainer's dt runs from one host sync to the next, and a diagnostics step's
              update measurement and record fall after its sync, into the next step's dt.
  diagnostics step   dt[k] + dt[k + 1] - (typical step), for each diagnostics step k, against the
              typical step: the median dt of the run's other steps. Measured inside one run, next
              to its neighbours, so it is the least noisy number here.
  in-run overhead   the same cost seen inside each diagnosed run: its mean step against the mean
              of its typical steps (all but step 1, the diagnostics steps and the steps after them).
              On a machine whose speed drifts between runs (a shared CPU) this is the steadier
              estimate of the overall ratio; the between-runs ratio above is the one that would
              also see a slowdown of the normal steps (there is none by construction: no hooks).
  record      the size of one diagnostics record in main.jsonl (bytes), and what a 10K-step run
              with --every writes.

--paired N measures the diagnostics step the other way, robust to a machine whose speed drifts
from one second to the next: N pairs of steps of the same model in this process, each pair a
normal step and a diagnostics step (in alternating order), every step timed whole (fwd + bwd +
AdamW + everything TrainingDiagnostics does, host-synced). The ratio of each pair is taken, and
the median over the pairs reported (and the ratio of the fastest steps of each kind), with the
overall ratio it implies at --every:
(every - 1 + ratio) / every (the other steps cost nothing: no hook is installed on them, which
tests/test_diagnostics.py checks).

Shared CPU machines are noisy: the per-round ratios are printed to show the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import platform
import runpy
import statistics
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

import pyllmc
from common import cpu_name
from pyllmc import settings
from pyllmc.data import write_shard

REPO = Path(__file__).resolve().parents[2]
# the trainer measured here is a script at the repository root, not in the package: run from its path (runpy,
# as `python train_gpt2.py` would), so that the installed pyllmc, not the source tree's, is what it imports
train_gpt2 = types.SimpleNamespace(**runpy.run_path(str(REPO / "train_gpt2.py"), run_name="train_gpt2"))


def run(trainer_args: list, output_dir: Path, quiet: bool) -> list:
    """One train_gpt2.main() run; returns its main.jsonl records."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        code = train_gpt2.main([*trainer_args, "--output_dir", str(output_dir)])
    gc.collect()  # the run's model and optimizer, before the next run builds its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if code != 0:
        raise SystemExit(f"train_gpt2.py failed ({code}):\n{sink.getvalue()[-2000:]}")
    return [json.loads(line) for line in (output_dir / "main.jsonl").read_text().splitlines() if line.strip()]


def paired_steps(args, config: dict) -> dict:
    """args.paired (normal step, diagnostics step) pairs of the trainer's model, batch and backend,
    one micro step each, in alternating order; each step timed whole."""
    import time

    from pyllmc.diagnostics import TrainingDiagnostics
    from pyllmc.model import GPT, GPTConfig

    device = torch.device(config["device"])
    padded = (args.vocab_size + 127) // 128 * 128  # as the trainer pads (llm.c)
    model = GPT(GPTConfig.from_preset(args.model, vocab_size=args.vocab_size, padded_vocab_size=padded), seed=1)
    model = model.to(device=device, dtype=getattr(torch, config["dtype"]))
    optimizer = model.configure_optimizers(0.1, 1e-3, backend=config["backend"],
                                           **({"master_weights": True} if config["dtype"] == "bfloat16" else {}))
    health = TrainingDiagnostics(model, optimizer, every=1, log=None, print_fn=lambda line: None)
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, args.vocab_size, (args.batch_size, args.sequence_length), generator=generator)
            .to(device) for _ in range(2))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step(diagnosed: bool) -> float:
        sync()
        start = time.perf_counter()
        if diagnosed:
            health.begin(1)
        _, loss = model(x, y, return_logits=False, inplace_backward=True)
        loss.backward()
        if diagnosed:
            health.before_update()
        optimizer.step()
        for p in model.parameters():
            p.grad = None
        if diagnosed:
            health.end(updated=True)
        loss.item()
        sync()
        return (time.perf_counter() - start) * 1000

    normal, diagnosed = [], []
    with pyllmc.backend(config["backend"]):
        for _ in range(3):  # warm up both paths
            one_step(False), one_step(True)
        for pair in range(args.paired):
            for kind in ((False, True) if pair % 2 == 0 else (True, False)):
                (diagnosed if kind else normal).append(one_step(kind))
    return {"normal_ms": normal, "diagnostics_ms": diagnosed,
            "ratios": [d / n for d, n in zip(diagnosed, normal)]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = settings.DEMO_CPU
    parser.add_argument("--model", default="tiny", help="GPT preset (default tiny: the CPU demo model)")
    parser.add_argument("--vocab_size", type=int, default=settings.DEMO_TRIM_VOCAB,
                        help="token ids (default: the CPU demo's trimmed vocabulary; 50257 for GPT-2's)")
    parser.add_argument("--batch_size", type=int, default=demo["batch_size"],
                        help="micro batch B (default: the demo's)")
    parser.add_argument("--sequence_length", type=int, default=demo["sequence_length"], help="T (default: the demo's)")
    parser.add_argument("--every", type=int, default=100, help="--diagnostics_every of the diagnosed runs")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per run, a multiple of --every plus 1 (default: --every + 1)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (with, without)")
    parser.add_argument("--backend", default="auto", help="train_gpt2.py --backend")
    parser.add_argument("--dtype", default="auto", help="train_gpt2.py --dtype")
    parser.add_argument("--device", default="", help="train_gpt2.py --device (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's output")
    parser.add_argument("--paired", type=int, default=0,
                        help="also time this many (normal, diagnostics) step pairs in this process (see above)")
    args = parser.parse_args(argv)
    steps = args.steps or args.every + 1
    if args.every < 3:  # a diagnostics step and the one after it are not typical: some others must be
        parser.error(f"--every must be >= 3; got {args.every}")
    if steps < args.every + 1 or (steps - 1) % args.every:
        parser.error(f"--steps must be a multiple of --every ({args.every}) plus 1; got {steps}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not 1 <= args.vocab_size <= 2**16:
        parser.error(f"--vocab_size must be in 1 .. 65536 (the shard is uint16); got {args.vocab_size}")

    folder = Path(tempfile.mkdtemp(prefix="pyllmc_diag_bench_"))
    tokens = max(200_000, 2 * args.batch_size * (args.sequence_length + 1) * 64)  # the loader wraps around
    write_shard(folder / "train.bin", np.random.default_rng(0).integers(0, args.vocab_size, tokens, dtype=np.uint16))
    common = ["--model", args.model, "--vocab_size", str(args.vocab_size), "--batch_size", str(args.batch_size),
              "--sequence_length", str(args.sequence_length), "--num_iterations", str(steps),
              "--input_bin", str(folder / "train.bin"), "--val_max_steps", "0", "--sample_every", "-1",
              "--checkpoint_every", "-1", "--backend", args.backend, "--dtype", args.dtype, "--log_every", str(steps), "--seed", "1"]
    if args.device:
        common += ["--device", args.device]

    mean_step = {"off": [], "on": []}
    diag_steps, in_run, record_bytes, config = [], [], [], None
    step_ms = {"off": [], "on": []}  # every run's per-step dt, for a closer look
    for round_index in range(args.rounds):
        order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
        for variant in order:
            every = args.every if variant == "on" else 0
            out = folder / f"run_{round_index}_{variant}"
            records = run([*common, "--diagnostics_every", str(every)], out, quiet=not args.verbose)
            config = config or next(r for r in records if r["type"] == "config")
            dt = {r["step"]: r["dt_ms"] for r in records if r["type"] == "train"}
            timed = [dt[s] for s in range(2, steps + 1)]
            mean_step[variant].append(sum(timed) / len(timed))
            step_ms[variant].append(timed)
            if variant == "on":
                diagnosed = [k for k in range(args.every, steps, args.every)]
                affected = {1, *diagnosed, *(k + 1 for k in diagnosed)}
                typical = statistics.median(dt[s] for s in dt if s not in affected)
                diag_steps += [(dt[k] + dt[k + 1] - typical) / typical for k in diagnosed]
                in_run.append(mean_step[variant][-1] / statistics.mean(dt[s] for s in dt if s not in affected))
                lines = [line for line in (out / "main.jsonl").read_text().splitlines() if '"diagnostics"' in line]
                record_bytes += [len(line) + 1 for line in lines]
            print(f"round {round_index + 1}/{args.rounds}, diagnostics_every {every:3d}: mean step "
                  f"{mean_step[variant][-1]:.2f} ms", file=sys.stderr, flush=True)

    ratios = [on / off for on, off in zip(mean_step["on"], mean_step["off"])]
    device = config["device"]
    device_name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else cpu_name()
    result = {
        "date": datetime.date.today().isoformat(), "device": device_name, "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "pyllmc": pyllmc.__version__,
        "model": args.model, "backend": config["backend"], "dtype": config["dtype"],
        "batch": [args.batch_size, args.sequence_length], "every": args.every, "steps": steps, "rounds": args.rounds,
        "mean_step_ms": mean_step, "ratio_per_round": ratios,
        "overhead_ratio": sum(mean_step["on"]) / sum(mean_step["off"]),
        "diagnostics_step_vs_typical": diag_steps, "in_run_overhead": in_run, "record_bytes": record_bytes,
        "step_ms": step_ms,
    }
    mean_record = sum(record_bytes) / len(record_bytes)
    print(f"# Cost of --diagnostics_every {args.every}: {args.model}, {config['backend']} backend, {config['dtype']}, "
          f"B {args.batch_size} x T {args.sequence_length}\n")
    print(f"{device_name}, {result['cores']} cores, python {result['python']}, torch {result['torch']}, "
          f"{result['date']}; {args.rounds} rounds of {steps}-step runs, interleaved\n")
    print("| | without | with | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| mean step (steps 2-{steps}) | {statistics.mean(mean_step['off']):.2f} ms | "
          f"{statistics.mean(mean_step['on']):.2f} ms | {result['overhead_ratio']:.3f}x "
          f"(per round: {', '.join(f'{r:.3f}' for r in ratios)}) |")
    print(f"| mean step of a diagnosed run, against its typical steps | | | {statistics.mean(in_run):.3f}x "
          f"(per run: {', '.join(f'{r:.3f}' for r in in_run)}) |")
    print(f"| the diagnostics step, against the typical step of its run | | | "
          f"{statistics.mean(diag_steps):.2f}x (each: {', '.join(f'{r:.2f}' for r in diag_steps)}) |")
    print(f"| one diagnostics record in main.jsonl | | {mean_record / 1024:.1f} KB | "
          f"{10_000 // args.every * mean_record / 2**20:.1f} MB per 10K steps |")
    if args.paired > 0:
        result["paired"] = paired_steps(args, config)
        pairs = result["paired"]["ratios"]
        median = statistics.median(pairs)
        quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [median, median, median]
        print(f"| paired steps ({len(pairs)} pairs): the diagnostics step against the normal step next to it | "
              f"{statistics.median(result['paired']['normal_ms']):.1f} ms | "
              f"{statistics.median(result['paired']['diagnostics_ms']):.1f} ms | {median:.2f}x "
              f"(quartiles {quartiles[0]:.2f}, {quartiles[2]:.2f}); implied overall at --every {args.every}: "
              f"{(args.every - 1 + median) / args.every:.4f}x |")
        fastest = min(result["paired"]["diagnostics_ms"]) / min(result["paired"]["normal_ms"])
        print(f"| paired steps: the fastest of each (the least disturbed) | "
              f"{min(result['paired']['normal_ms']):.1f} ms | {min(result['paired']['diagnostics_ms']):.1f} ms | "
              f"{fastest:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for leftover in sorted(folder.rglob("*"), reverse=True):
        leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
