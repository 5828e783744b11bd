"""Run pyllmc's kernel benchmarks on the GPU and write the results.

    python dev/bench/run.py                    # every op and the whole training step
    python dev/bench/run.py --quick            # the same rows in ~2 minutes (the GPU check's bench stage)
    python dev/bench/run.py --only gelu step   # some modules (names below)
    python dev/bench/run.py --out DIR          # also copy the JSON / Markdown there
    python dev/bench/run.py --dry-run --json F # on a CPU: only the step row, tiny model (tests the code path)
    python dev/bench/run.py --markdown-from F  # print the report of a results JSON

Each module in this folder has run(device, dtype) -> list[Row]: the pyllmc kernels (every
backend that works here) and the PyTorch baselines, same inputs, same run. Ceilings (a large
device-to-device copy, a large bf16 matmul) are measured first, and every row reports its
fraction of them. Results go to dev/bench/results/<gpu>-<date>.json and .md, with the GPU
name, versions and date: generated, never edited by hand. They are rewritten after every
module (and so is --json), so a run stopped part way keeps what it measured.

--quick: shorter repetitions, GPT-2 shapes only (attention at D = 64), eager PyTorch
baselines per op (no per-op torch.compile); the step row keeps its torch.compile baseline.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import re
import sys
from pathlib import Path
from typing import Optional

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import BenchFailure, Row, copy_bandwidth_gbps, matmul_tflops, set_quick
else:  # run as a script, python dev/bench/run.py: this folder is on sys.path
    from common import BenchFailure, Row, copy_bandwidth_gbps, matmul_tflops, set_quick

HERE = Path(__file__).resolve().parent

# Modules, in the order of the report. Each is dev/bench/<name>.py.
MODULES = ["gelu", "swiglu", "rope", "cross_entropy", "linear_cross_entropy", "layernorm", "rmsnorm", "attention",
           "adamw", "step"]
CPU_MODULES = ["step"]  # what --dry-run runs: the only module with a CPU path
STEP_OP = "train_step"


def environment(dry_run: bool = False) -> dict:
    import torch
    import triton

    import pyllmc

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": "CPU (dry run)" if dry_run else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda (torch)": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "pyllmc": pyllmc.__version__,
    }
    try:
        from pyllmc import _C

        version = _C.cuda_runtime_version()  # e.g. 13000
        env["cuda runtime (pyllmc._C)"] = f"{version // 1000}.{version % 1000 // 10}"
    except ImportError:
        env["cuda runtime (pyllmc._C)"] = "not built"
    return env


def benchmark_module(name: str):
    """dev/bench/<name>.py, imported as this file was: bench.<name> in the package, <name> beside the script."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def _percent(value, ceiling):
    return None if value is None or not ceiling else 100 * value / ceiling


def _is_baseline(row: Row) -> bool:
    return row.impl.startswith("torch") or "sdpa" in row.impl.lower()


def _speedups(row: Row, baselines: list) -> str:
    return "" if row in baselines else ", ".join(f"x{b.ms / row.ms:.2f} {b.impl}" for b in baselines)


def markdown(env: dict, ceilings: Optional[dict], rows: list, failures: Optional[list] = None) -> str:
    """The report: one table of kernel rows, one of whole-step rows. ceilings None: not measured."""
    ceilings = ceilings or {}
    copy_gbps, matmul = ceilings.get("copy_gbps"), ceilings.get("matmul_tflops")
    lines = [f"# pyllmc kernel benchmarks: {env['gpu']}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu"))
    lines.append("")
    if copy_gbps and matmul:
        lines.append(f"Ceilings measured in this run: device-to-device copy {copy_gbps:.0f} GB/s "
                     f"(read + write), bf16 matmul 8192^3 {matmul:.0f} TFLOP/s.")
    else:
        lines.append("Ceilings not measured (no GPU): the % columns are empty.")
    lines.append("Speedup = baseline time / this time (> 1: faster than the baseline).")
    by_op: dict = {}
    for r in rows:
        by_op.setdefault(r.op, []).append(r)
    kernel_ops = [op for op in by_op if op != STEP_OP]
    if kernel_ops:
        lines.append("")
        lines.append("| op | impl | shape | time (ms) | GB/s | % copy BW | TFLOP/s | % matmul | speedup vs baselines |")
        lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for op in kernel_ops:
            group = by_op[op]
            baselines = [r for r in group if _is_baseline(r)]
            for r in group:
                bw, tf = r.gbps, r.tflops
                lines.append(
                    f"| {op} | {r.impl} | {r.shape} | {r.ms:.4f} | {fmt(bw, '.0f')} | "
                    f"{fmt(_percent(bw, copy_gbps), '.1f')} | {fmt(tf, '.1f')} | "
                    f"{fmt(_percent(tf, matmul), '.1f')} | {_speedups(r, baselines)} |")
    if STEP_OP in by_op:
        group = by_op[STEP_OP]
        baselines = [r for r in group if _is_baseline(r)]
        lines += ["", "Whole training step (forward + backward + AdamW), same model, weights and batch; "
                      "MFU of the dense bf16 peak (pyllmc.model.PEAK_BF16_FLOPS).", "",
                  "| impl | shape | ms / step | tokens/s | model TFLOP/s | % matmul | MFU | peak memory (GiB) "
                  "| speedup vs baselines | note |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in group:
            peak = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**30
            lines.append(
                f"| {r.impl} | {r.shape} | {r.ms:.1f} | {fmt(r.tokens_per_s, ',.0f')} | {fmt(r.tflops, '.1f')} | "
                f"{fmt(_percent(r.tflops, matmul), '.1f')} | {fmt(None if r.mfu is None else 100 * r.mfu, '.1f')} | "
                f"{fmt(peak, '.1f')} | {_speedups(r, baselines)} | {r.note} |")
    if failures:
        lines += ["", "Failed benchmarks:"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def markdown_from_payload(payload: dict) -> str:
    rows = [Row.from_json(r) for r in payload.get("rows", [])]
    md = markdown(payload.get("environment", {"gpu": "?"}), payload.get("ceilings"), rows, payload.get("failures"))
    if not payload.get("complete", True):
        md += (f"\nIncomplete: the run stopped during module {payload.get('running')!r}; "
               f"finished: {', '.join(payload.get('finished', [])) or 'none'}.\n")
    return md


def results_stem(env: dict) -> str:
    """<gpu>-<date>, the name of the results files (date of the run, UTC)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-")
    return f"{gpu}-{env['date'][:10]}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help=f"modules to run (default: all of {MODULES})")
    parser.add_argument("--out", default=None, help="also write the JSON and Markdown into this folder")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results JSON here, rewritten after every module")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true",
                        help="shorter repetitions, GPT-2 shapes only, eager per-op baselines (about 2 minutes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run the step module's CPU path (tiny model, float32); writes only --json/--out")
    parser.add_argument("--markdown-from", type=Path, default=None, metavar="JSON",
                        help="print the report of a results JSON written by this script, and exit")
    args = parser.parse_args()

    if args.markdown_from:
        print(markdown_from_payload(json.loads(args.markdown_from.read_text())), end="")
        return 0

    import torch

    if args.dry_run:
        modules = args.only or CPU_MODULES
        if set(modules) - set(CPU_MODULES):
            parser.error(f"--dry-run runs only {CPU_MODULES} (the other benchmarks need a GPU)")
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            print("dev/bench/run.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                  "--dry-run runs the CPU path", file=sys.stderr)
            return 2
        modules = args.only or MODULES
        device, dtype = "cuda", getattr(torch, args.dtype)
    for name in modules:
        if name not in MODULES:
            parser.error(f"unknown benchmark {name!r}; known: {MODULES}")
    set_quick(args.quick)

    env = environment(args.dry_run)
    env["mode"] = "dry run (CPU)" if args.dry_run else ("quick" if args.quick else "full")
    print(json.dumps(env), flush=True)
    ceilings = None
    if not args.dry_run:
        ceilings = {"copy_gbps": copy_bandwidth_gbps(), "matmul_tflops": matmul_tflops()}
        print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} "
              f"TFLOP/s", flush=True)

    stem = results_stem(env)
    results = None if args.dry_run else HERE / "results"  # a dry run never writes results/
    rows, failures, finished = [], [], []

    def save(running: Optional[str]) -> tuple[str, str]:
        payload = {"environment": env, "ceilings": ceilings, "failures": failures, "finished": finished,
                   "running": running, "complete": running is None, "rows": [r.to_json() for r in rows]}
        text = json.dumps(payload, indent=1) + "\n"
        md = markdown_from_payload(payload)
        if results is not None:
            _write(results / f"{stem}.json", text)
            _write(results / f"{stem}.md", md)
        if args.json:
            _write(args.json, text)
        return text, md

    for name in modules:
        print(f"== {name}", flush=True)
        save(running=name)
        try:
            new = benchmark_module(name).run(device=device, dtype=dtype)
        except BenchFailure as err:  # some rows measured, some implementations failed
            new = err.rows
            failures.extend(err.failures)
            print(f"!! {name}: {err}", flush=True)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
            new = []
            failures.append(f"{name}: {type(err).__name__}: {err}")
            print(f"!! {name} failed: {err}", flush=True)
        for r in new:  # the rows as they come, for a log read while the run goes on
            print("row " + json.dumps(r.to_json()), flush=True)
        rows.extend(new)
        finished.append(name)
        if device == "cuda":
            torch.cuda.empty_cache()

    text, md = save(running=None)
    if args.out:
        _write(Path(args.out) / f"bench-{stem}.json", text)
        _write(Path(args.out) / f"bench-{stem}.md", md)
    print(md)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
