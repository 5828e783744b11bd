"""Run pyllmc's kernel benchmarks on the GPU and write the results.

    python dev/bench/run.py                    # every op
    python dev/bench/run.py --only gelu        # some ops (module names below)
    python dev/bench/run.py --out DIR          # also copy the JSON / Markdown there

Each op module in this folder has run(device, dtype) -> list[Row]: the pyllmc kernels
(every backend that works here) and the PyTorch baselines, same inputs, same run.
Ceilings (a large device-to-device copy, a large bf16 matmul) are measured first, and
every row reports its fraction of them. Results go to dev/bench/results/<gpu>-<date>.json
and .md, with the GPU name, versions and date: generated, never edited by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import copy_bandwidth_gbps, matmul_tflops  # noqa: E402

# Op modules, in the order of the table. Each is dev/bench/<name>.py.
MODULES = ["gelu", "cross_entropy", "layernorm", "attention", "adamw"]


def environment() -> dict:
    import triton

    import pyllmc

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda (torch)": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "pyllmc": pyllmc.__version__,
    }
    try:
        from pyllmc import _C

        env["cuda runtime (pyllmc._C)"] = _C.cuda_runtime_version()
    except ImportError:
        env["cuda runtime (pyllmc._C)"] = "not built"
    return env


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(env: dict, ceilings: dict, rows: list) -> str:
    lines = [f"# pyllmc kernel benchmarks: {env['gpu']}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu"))
    lines.append("")
    lines.append(f"Ceilings measured in this run: device-to-device copy {ceilings['copy_gbps']:.0f} GB/s "
                 f"(read + write), bf16 matmul 8192^3 {ceilings['matmul_tflops']:.0f} TFLOP/s.")
    lines.append("Speedup = baseline time / this time (> 1: faster than the baseline).")
    lines.append("")
    lines.append("| op | impl | shape | time (ms) | GB/s | % copy BW | TFLOP/s | % matmul | speedup vs baselines |")
    lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    by_op: dict = {}
    for r in rows:
        by_op.setdefault(r.op, []).append(r)
    for op, group in by_op.items():
        baselines = [r for r in group if r.impl.startswith("torch") or "sdpa" in r.impl.lower()]
        for r in group:
            speed = "" if r in baselines else ", ".join(f"x{b.ms / r.ms:.2f} {b.impl}" for b in baselines)
            bw = r.gbps
            tf = r.tflops
            lines.append(
                f"| {op} | {r.impl} | {r.shape} | {r.ms:.4f} | {fmt(bw, '.0f')} | "
                f"{fmt(None if bw is None else 100 * bw / ceilings['copy_gbps'], '.1f')} | {fmt(tf, '.1f')} | "
                f"{fmt(None if tf is None else 100 * tf / ceilings['matmul_tflops'], '.1f')} | {speed} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help=f"op modules to run (default: all of {MODULES})")
    parser.add_argument("--out", default=None, help="also write the JSON and Markdown into this folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("dev/bench/run.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    env = environment()
    print(json.dumps(env))
    ceilings = {"copy_gbps": copy_bandwidth_gbps(), "matmul_tflops": matmul_tflops()}
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s",
          flush=True)

    rows = []
    failures = []
    for name in args.only or MODULES:
        if name not in MODULES:
            parser.error(f"unknown benchmark {name!r}; known: {MODULES}")
        print(f"== {name}", flush=True)
        try:
            rows += importlib.import_module(name).run(device="cuda", dtype=dtype)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
            failures.append(f"{name}: {type(err).__name__}: {err}")
            print(f"!! {name} failed: {err}", flush=True)
        torch.cuda.empty_cache()

    md = markdown(env, ceilings, rows)
    if failures:
        md += "\nFailed benchmarks:\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-")
    stem = f"{gpu}-{datetime.date.today().isoformat()}"
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    payload = {"environment": env, "ceilings": ceilings, "failures": failures,
               "rows": [dict(dataclasses.asdict(r), gbps=r.gbps, tflops=r.tflops) for r in rows]}
    (results / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / f"{stem}.md").write_text(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for ext in ("json", "md"):
            shutil.copy(results / f"{stem}.{ext}", Path(args.out) / f"bench-{stem}.{ext}")
    print(md)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
