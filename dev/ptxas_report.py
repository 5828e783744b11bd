"""Registers, spills and shared memory of every CUDA kernel instance, from ptxas's own report.

A kernel that spills registers to local memory, or needs more registers than its launch
bounds allow, still compiles and still gives the right answers; only the profiler would show
it. ptxas says so at build time, so CI reads what it says: every csrc/*.cu is compiled for
one GPU architecture with the flags of the real build (pyllmc/_toolchain.py's nvcc_flags),
device code only (-cubin: the same cicc and ptxas passes as `nvcc -c`, without the host
compile), with `-Xptxas -v`, and ptxas's lines are parsed into one row per kernel instance.

    python dev/ptxas_report.py                      # the table for sm_90
    python dev/ptxas_report.py --arch 80 --md results.md --json results.json
    python dev/ptxas_report.py --check              # exit 1, listing them, if any instance spills
    python dev/ptxas_report.py --arch all --check   # every GPU pyllmc runs on (ARCHS), also checking
                                                    # each launch's shared memory against its limit

Shared memory: ptxas knows a kernel's static __shared__ bytes; the dynamic bytes are the
launcher's choice. dynamic_smem() says what the launcher gives each instance (attention.cu's
tile sizes, layernorm.cu's largest row), launched_on() whether the launcher uses the
instance on that GPU at all (the tensor-core attention needs 8.0; the dQ kernel's 32-key
tiles stand in for the 64-key ones where those do not fit), and fits() checks static +
dynamic against the GPU's opt-in limit (SMEM_OPTIN). tests/test_cuda_profiles.py checks
dynamic_smem() against the launches the CPU simulator records.

The logs are cached per source file under $PYLLMC_CACHE_DIR/ptxas (default ~/.cache/pyllmc),
keyed by nvcc's version, the flags and the contents of the file and of csrc/'s headers,
so a second run is instant and an edit recompiles only the file it touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Optional

from pyllmc import _toolchain as toolchain  # the build's own nvcc flags (setup.py compiles with them too)

ROOT = Path(__file__).resolve().parents[1]

# The GPUs pyllmc is built and checked for, and the shared memory a block may opt in to on each
# (bytes; NVIDIA's CUDA C++ Programming Guide, "Technical Specifications per Compute Capability";
# the same numbers as the CPU simulator's profiles, pyllmc/cuda_sim.py DEVICES).
ARCHS = ("75", "80", "86", "89", "90", "100", "120")
SMEM_OPTIN = {"75": 65536, "80": 166912, "86": 101376, "89": 101376, "90": 232448, "100": 232448, "120": 101376}
STATIC_SMEM_LIMIT = 48 * 1024
# Every file is compiled for every arch, except that where the code is the same on each (no
# __CUDA_ARCH__ branches, no arch-dependent tiles) the extra archs need not recompile it for CI:
# PER_ARCH_FILES are compiled for every arch, the rest for sm_90 (and sm_80, the default build).
PER_ARCH_FILES = ("attention.cu",)

# ptxas -v, CUDA 11-13. Per entry function:
#   ptxas info    : Compiling entry function '<mangled>' for 'sm_90'
#   ptxas info    : Function properties for <mangled>
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 97 registers, used 1 barriers, 128 bytes smem, 648 bytes cumulative stack size
# The "Used" line lists only what is nonzero past the registers (older releases also print
# "N bytes cmem[0]" and omit barriers). Non-entry functions (calls ptxas did not inline) have
# "Function properties" of their own; those belong to no row.
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")

# Short names for the table: the kernel and its template arguments, in the project's words.
_SHORT_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def parse(log: str, file: str = "") -> list[dict]:
    """One dict per entry function in ptxas -v output (mangled names; see report())."""
    rows, frames = [], {}
    entry = None  # the row of the entry function being compiled
    pending = None  # the function whose "Function properties" line came last
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = {"file": file, "mangled": m.group(1), "arch": m.group(2)}
            rows.append(entry)
        elif m := _PROPERTIES.search(line):
            pending = m.group(1)
        elif (m := _FRAME.search(line)) and pending is not None:
            frames[pending] = tuple(int(g) for g in m.groups())
            pending = None
        elif (m := _USED.search(line)) and entry is not None:
            entry["registers"] = int(m.group(1))
            entry["barriers"] = int(b.group(1)) if (b := _BARRIERS.search(line)) else 0
            entry["smem_static"] = int(s.group(1)) if (s := _SMEM.search(line)) else 0
    for row in rows:
        if "registers" not in row or row["mangled"] not in frames:
            raise ValueError(f"{file}: ptxas printed no register count or stack frame for {row['mangled']}")
        row["stack_frame"], row["spill_stores"], row["spill_loads"] = frames[row["mangled"]]
    return rows


def short_name(demangled: str) -> str:
    """'void pyllmc::(anonymous namespace)::k<__nv_bfloat16, 8>(__nv_bfloat16*, int)' -> 'k<bf16, 8>'."""
    name = demangled.replace("(anonymous namespace)::", "").replace("pyllmc::", "")
    name = name.removeprefix("void ")
    depth = 0  # drop the parameter list: the first '(' outside the template arguments
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    return re.sub(r"\b(__nv_bfloat16|__half|float)\b", lambda m: _SHORT_TYPES[m.group(1)], name)


def _demangle(names: list[str]) -> list[str]:
    """c++filt (binutils) or the toolkit's cu++filt; the mangled names where neither is found."""
    cuda_home = toolchain.find_cuda_home()
    candidates = [shutil.which("c++filt"), cuda_home and cuda_home / "bin" / "cu++filt"]
    tool = next((str(c) for c in candidates if c and Path(c).exists()), None)
    if tool is None or not names:
        if names:
            print("ptxas_report: no c++filt or cu++filt found, kernels keep their mangled names", file=sys.stderr)
        return names
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    demangled = out.splitlines()
    if len(demangled) != len(names):
        raise RuntimeError(f"{tool} returned {len(demangled)} names for {len(names)}")
    return demangled


def _cache_dir() -> Path:
    return Path(os.environ.get("PYLLMC_CACHE_DIR", "~/.cache/pyllmc")).expanduser() / "ptxas"


def _cache_key(nvcc_version: str, flags: list[str], source: Path, headers: list[Path]) -> str:
    digest = hashlib.sha256()
    for part in (nvcc_version, "\0".join(flags), source.name):
        digest.update(part.encode() + b"\0")
    for path in (source, *headers):
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def _compile(nvcc: str, flags: list[str], source: Path) -> str:
    """ptxas -v's output for one source file (stdout and stderr: nvcc prints it to stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *flags, "-cubin", "-Xptxas", "-v", str(source), "-o", str(Path(tmp) / "out.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def _logs(arch: str, csrc: Path, files: Optional[tuple] = None) -> dict[str, str]:
    """{file name: ptxas log} for every csrc/*.cu (or those named in `files`), from the cache or
    compiled in parallel."""
    cuda_home = toolchain.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
    nvcc = str(cuda_home / "bin" / "nvcc")
    flags = toolchain.nvcc_flags(csrc, [arch])
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    headers = sorted([*csrc.glob("*.cuh"), *csrc.glob("*.h")])
    sources = sorted(csrc.glob("*.cu"))
    if not sources:
        raise RuntimeError(f"no .cu files in {csrc}")
    if files is not None:
        sources = [s for s in sources if s.name in files]

    logs, todo = {}, {}
    for src in sources:
        cached = _cache_dir() / f"{src.stem}-sm_{arch}-{_cache_key(version, flags, src, headers)}.log"
        if cached.exists():
            logs[src.name] = cached.read_text()
        else:
            todo[src] = cached
    if not todo:
        return logs

    jobs = os.cpu_count() or 1
    print(f"ptxas_report: compiling {len(todo)} of {len(sources)} files for sm_{arch} with {jobs} jobs "
          f"(cold: about a minute on 2 cores)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # Largest first: the long compiles start at once instead of trailing at the end.
    order = sorted(todo, key=lambda s: s.stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {pool.submit(_compile, nvcc, flags, src): src for src in order}
        while running:
            done, _ = wait(running, timeout=15, return_when=FIRST_COMPLETED)
            elapsed = time.perf_counter() - start
            for future in done:
                src = running.pop(future)
                log = future.result()
                todo[src].parent.mkdir(parents=True, exist_ok=True)
                partial = todo[src].with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(log)
                partial.replace(todo[src])  # atomic: a concurrent run never reads half a log
                logs[src.name] = log
                print(f"  {src.name}: {len(_ENTRY.findall(log))} kernels, done at {elapsed:.0f} s",
                      file=sys.stderr, flush=True)
            if not done:
                names = ", ".join(sorted(s.name for s in running.values()))
                print(f"  still compiling at {elapsed:.0f} s: {names}", file=sys.stderr, flush=True)
    return logs


def report(arch: str = "90", csrc: Optional[Path] = None, files: Optional[tuple] = None) -> list[dict]:
    """One dict per kernel instance in csrc/*.cu (or the files named) compiled for sm_<arch>: file,
    kernel (short name), mangled, arch, registers, spill_stores, spill_loads, stack_frame (bytes),
    smem_static (bytes), smem_dynamic (what the launcher gives it, bytes), launched (whether the
    launcher uses it on this GPU), barriers."""
    archs = toolchain.parse_archs(arch)
    if len(archs) != 1:
        raise ValueError(f"one architecture at a time, not {arch!r}")
    arch = archs[0]
    csrc = Path(csrc) if csrc is not None else ROOT / "csrc"
    rows = []
    for file, log in sorted(_logs(arch, csrc, files).items()):
        rows += parse(log, file)
    for row, demangled in zip(rows, _demangle([r["mangled"] for r in rows])):
        row["kernel"] = short_name(demangled)
        row["smem_dynamic"] = dynamic_smem(row["kernel"])
        row["launched"] = launched_on(row["kernel"], arch)
    return sorted(rows, key=_order)


def _template_args(kernel: str) -> list[str]:
    """'k<bf16, 128, 32>' -> ['bf16', '128', '32']."""
    inside = kernel.partition("<")[2].rpartition(">")[0]
    return [a.strip() for a in inside.split(",")] if inside else []


_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def dynamic_smem(kernel: str) -> int:
    """Bytes of dynamic shared memory the launcher gives kernel instance `kernel` (a short name):
    attention.cu's tile formulas (rows padded to D + 8 elements), layernorm.cu's (2, C) and rmsnorm.cu's (C,) floats at the
    longest row of the instance; 0 for kernels without extern __shared__."""
    base, args = kernel.split("<")[0], _template_args(kernel)
    if base == "attention_forward_tc_kernel":  # q tile + 2 stages of (k, v) tiles, 64 rows each
        elem, d = _ELEM_BYTES[args[0]], int(args[1])
        return (64 + 4 * 64) * (d + 8) * elem
    if base == "attention_backward_dkdv_tc_kernel":  # k, v tiles + 2 stages of (q, dout) + (lse, delta) floats
        elem, d = _ELEM_BYTES[args[0]], int(args[1])
        rows = 64 if d <= 64 else 32
        return (2 * 64 + 4 * rows) * (d + 8) * elem + 4 * rows * 4
    if base == "attention_backward_dq_tc_kernel":  # q, dout tiles + 2 stages of (k, v) tiles of kBc keys
        elem, d, keys = _ELEM_BYTES[args[0]], int(args[1]), int(args[2])
        return (2 * 64 + 4 * keys) * (d + 8) * elem
    if base == "layernorm_backward_kernel":  # (2, C) floats, C <= 32 lanes * kChunks * W
        width, chunks = int(args[1]), int(args[2])
        return 2 * 32 * chunks * width * 4
    if base == "rmsnorm_backward_kernel":  # (C,) floats, C <= kLanes * kChunks * W; none without a weight
        width, chunks, lanes, has_weight = int(args[1]), int(args[2]), int(args[3]), args[5] == "true"
        return lanes * chunks * width * 4 if has_weight else 0
    return 0


def launched_on(kernel: str, arch: str) -> bool:
    """Whether the launchers use this instance on sm_<arch>: the tensor-core attention kernels only
    from 8.0 on, and the dQ kernel's 32-key tiles exactly where its 64-key tiles do not fit."""
    base, args = kernel.split("<")[0], _template_args(kernel)
    capability = int(arch.rstrip("a"))
    if base in ("attention_forward_tc_kernel", "attention_backward_dkdv_tc_kernel",
                "attention_backward_dq_tc_kernel") and capability < 80:
        return False
    if base == "attention_backward_dq_tc_kernel":
        fast = f"{base}<{args[0]}, {args[1]}, 64>"
        fits_fast = dynamic_smem(fast) <= SMEM_OPTIN[arch.rstrip("a")]
        return fits_fast if args[2] == "64" else not fits_fast
    return True


def over_smem_limit(rows: list[dict]) -> list[dict]:
    """The rows whose static shared memory passes 48 KiB, or whose static + dynamic shared memory
    passes their GPU's opt-in limit where the launcher uses them."""
    bad = []
    for r in rows:
        limit = SMEM_OPTIN[r["arch"].removeprefix("sm_").rstrip("a")]
        if r["smem_static"] > STATIC_SMEM_LIMIT or (r["launched"] and r["smem_static"] + r["smem_dynamic"] > limit):
            bad.append(r)
    return bad


def _order(row: dict):
    """File, then kernel with numbers compared as numbers (<bf16, 2> before <bf16, 12>)."""
    return row["file"], [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", row["kernel"])]


def spills(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["spill_stores"] or r["spill_loads"]]


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table, by file then kernel; sizes in bytes."""
    lines = ["| arch | file | kernel | registers | spill stores | spill loads | stack | static smem | dynamic smem "
             "| barriers |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (int(r["arch"].removeprefix("sm_").rstrip("a")), _order(r))):
        dynamic = r.get("smem_dynamic", 0) if r.get("launched", True) else f"({r.get('smem_dynamic', 0)}, unused)"
        lines.append(f"| {r['arch']} | {r['file']} | `{r['kernel']}` | {r['registers']} | {r['spill_stores']} | "
                     f"{r['spill_loads']} | {r['stack_frame']} | {r['smem_static']} | {dynamic} | {r['barriers']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 90, 80 or 90a, or 'all' for "
                        f"{', '.join(ARCHS)} (default 90)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--md", type=Path, help="write the Markdown table here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if any kernel instance spills registers or passes its shared-memory limit")
    args = parser.parse_args(argv)

    archs = ARCHS if args.arch == "all" else (args.arch,)
    rows = [row for arch in archs for row in report(arch)]
    table = markdown(rows)
    print(table, end="")
    if args.json:
        args.json.write_text(json.dumps({"arch": [f"sm_{a}" for a in archs], "kernels": rows}, indent=1) + "\n")
    if args.md:
        args.md.write_text(f"ptxas report, {', '.join(f'sm_{a}' for a in archs)}\n\n" + table)
    spilling, too_big = spills(rows), over_smem_limit(rows)
    print(f"{len(rows)} kernel instances, {len(spilling)} spilling, {len(too_big)} over their shared-memory limit",
          file=sys.stderr)
    if args.check and (spilling or too_big):
        for r in spilling:
            print(f"SPILL {r['arch']} {r['file']} {r['kernel']}: {r['spill_stores']} B spill stores, "
                  f"{r['spill_loads']} B spill loads, {r['registers']} registers", file=sys.stderr)
        for r in too_big:
            print(f"SMEM {r['arch']} {r['file']} {r['kernel']}: {r['smem_static']} B static + {r['smem_dynamic']} B "
                  f"dynamic, the limit is {SMEM_OPTIN[r['arch'].removeprefix('sm_').rstrip('a')]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
