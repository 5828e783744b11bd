"""The kernel lab's machinery: build a ladder's rungs for the CUDA simulator, check each against
torch, count its memory traffic, and format the table the tutorials quote.

A ladder is a folder of small CUDA files (dev/lab/<ladder>/<k>_<name>.cu), one rung each; each
exports `lab_<ladder>_<k>_<name>(...)` (extern "C", see lab.cuh), which runs the rung's kernel
on the pointers it is given. The last rung calls today's launcher in csrc/, compiled into the same
library as it is. All rungs of a ladder are built into one shared library for the simulator's
"counters" build (pyllmc.cuda_sim's source rewrite, GCC's access instrumentation, the runtime of
csrc/sim/), loaded with ctypes: no bindings, no pyllmc._C_sim build needed.

    import lab
    for row in lab.run_ladder("gelu_forward"):
        print(row.rung, row.correct, row.sectors_per_request)

dev/lab/run.py is the command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent.parent
LAB = Path(__file__).resolve().parent
if importlib.util.find_spec("pyllmc") is None:  # a source checkout runs the lab without installing pyllmc
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pyllmc import cuda_sim, sim_counters  # noqa: E402

GPU_TIME_NOTE = ("GPU time: not run. Without --gpu the rungs are built only for the CPU simulator, which counts "
                 "accesses but does not time them; on a GPU machine, python dev/lab/run.py --all --gpu also "
                 "builds them with nvcc, checks them there and times them.")


# ---------------------------------------------------------------------------------------------
# the ladders


@dataclass
class Rung:
    file: str        # dev/lab/<ladder>/<file>; its stem names the entry point
    changed: str     # what this rung changes, in the table's words
    # shape -> the bytes this rung reads and writes at least once, where that is not the op's least
    # traffic (a rung that keeps an intermediate in global memory; tests/test_lab.py checks it)
    unique_bytes: Optional[Callable] = None
    # shape -> the op's least bytes in this rung's element type, where that is not float32 (a bf16
    # rung moves 2-byte elements: its table row and GB/s are against its own least). None: the ladder's.
    least_bytes: Optional[Callable] = None
    dtype: str = "float32"  # the element type the rung computes in (the table's caption names the others)
    # a rung whose entry takes other arguments than the ladder's `call` passes (a workspace, another
    # dtype): its own call (entry, inputs, err) -> error code, converting what it must; and its own
    # (atol, rtol) where its arithmetic is coarser (bf16). None: the ladder's.
    call: Optional[Callable] = None
    tolerance: Optional[tuple] = None
    # inputs -> None, after a checked call: brings the rung's outputs into the ladder's float32
    # outputs (a bf16 `out` widened). Kept out of `call` so a GPU timing loop times the kernel alone.
    finish: Optional[Callable] = None

    @property
    def stem(self) -> str:
        return Path(self.file).stem


@dataclass
class Mutant:
    """A planted bug for the tutorial's exercise: `old` -> `new` in one rung's file."""
    name: str
    file: str
    old: str
    new: str
    hint: str  # the exercise's question (--list prints it; the tutorial holds the answer)


@dataclass
class Ladder:
    name: str
    rungs: list
    today: list            # csrc/ kernel files (stems: "layernorm") linked in for the last rung
    headers: list          # dev/lab/ headers the rungs include (besides lab.cuh)
    call: Callable         # (entry, inputs, err buffer) -> error code; runs one rung on prepared inputs
    make_inputs: Callable  # (shape, generator) -> dict of tensors
    reference: Callable    # inputs -> dict of expected outputs (float64)
    outputs: tuple         # names of the outputs the rung writes
    tolerance: tuple       # (atol, rtol) against the float64 reference
    check_shapes: list     # small odd shapes every rung must get right
    counter_shape: tuple   # the shape the counters are counted at
    ideal_bytes: Callable  # shape -> the bytes the op must read and write at least
    # shape -> the op's floating-point operations, for an op bound by arithmetic, not memory
    # (attention): run.py --gpu then reports TFLOP/s beside GB/s
    flops: Optional[Callable] = None
    gpu_shape: Optional[tuple] = None  # run.py --gpu times each rung here: large enough to be bandwidth-bound
    mutants: dict = field(default_factory=dict)

    def call_of(self, rung: Rung) -> Callable:
        """The call that runs `rung`: its own (Rung.call) or the ladder's."""
        return rung.call or self.call

    def least_bytes_of(self, rung: Rung, shape: tuple) -> int:
        """The op's least bytes at `shape` in `rung`'s element type."""
        return (rung.least_bytes or self.ideal_bytes)(shape)


ERR_LEN = 512  # bytes of the message buffer each entry gets


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """A tensor's data pointer as a ctypes argument (the rungs take raw device pointers)."""
    return ctypes.c_void_p(t.data_ptr())


# The tutorials' order: elementwise, then reductions, then fusion, then the optimizer, then attention.
# A folder dev/lab/<name>/ with a ladder.py (defining LADDER) not named here comes after these.
ORDER = ["gelu_forward", "layernorm_forward", "layernorm_backward", "residual_layernorm", "cross_entropy_forward",
         "fused_classifier", "adamw", "attention"]


def _discover() -> dict:
    """name -> Ladder of every dev/lab/<name>/ladder.py, in ORDER, then by name."""
    names = sorted(p.parent.name for p in LAB.glob("*/ladder.py"))
    names.sort(key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    out = {}
    for name in names:
        spec = importlib.util.spec_from_file_location(f"lab_ladder_{name}", LAB / name / "ladder.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ladder = module.LADDER
        if ladder.name != name:
            raise RuntimeError(f"dev/lab/{name}/ladder.py defines ladder {ladder.name!r}, not {name!r}")
        out[name] = ladder
    return out


# ---------------------------------------------------------------------------------------------
# the build


def _sources(ladder: Ladder, mutant: Optional[Mutant]) -> list:
    """(path the compiler and addr2line see, text) of every file of the ladder's library. A mutant's
    file is written beside the build (the tutorial's copy stays as it is) so its sites name it."""
    folder = LAB / ladder.name
    files = [(LAB / "lab.cuh", None), (LAB / "lab.cu", None)] + [(folder / h, None) for h in ladder.headers]
    files += [(folder / r.file, None) for r in ladder.rungs]
    out = []
    for path, _ in files:
        text = path.read_text()
        if mutant is not None and path == folder / mutant.file:
            if text.count(mutant.old) != 1:
                raise RuntimeError(f"mutant {mutant.name}: its text is not in {path.name} exactly once")
            text = text.replace(mutant.old, mutant.new)
            path = cuda_sim.cache_dir() / "lab" / "mutants" / mutant.name / path.name
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        out.append((path, text))
    return out


def _compile_missing(jobs: list, compiler: str, verbose: bool) -> None:
    """Compile each (source, command before -c, object) whose object is not there yet, in parallel,
    largest source first (today's csrc/ file is the longest compile); BuildError on a failure."""
    def compile_unit(source: Path, command: list, obj: Path) -> Optional[str]:
        started = time.time()
        tmp = obj.with_suffix(f".tmp{os.getpid()}")
        result = cuda_sim._run([*command, "-c", str(source), "-o", str(tmp)])
        if result.returncode != 0:
            return f"lab: {compiler} {source.name} failed:\n{result.stderr[-6000:]}"
        tmp.replace(obj)  # whole or not at all: another process may be building the same object
        if verbose:
            print(f"lab: {compiler} {source.name} in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        return None

    todo = sorted((job for job in jobs if not job[2].exists()), key=lambda job: -job[0].stat().st_size)
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        failures = [f for f in pool.map(lambda job: compile_unit(*job), todo) if f]
    if failures:
        raise cuda_sim.BuildError(failures[0])


def build(ladder: Ladder, mutant: Optional[Mutant] = None, verbose: bool = False) -> Path:
    """The ladder's library for the simulator's counters build (cached by content); BuildError
    (pyllmc.cuda_sim) when this machine cannot build the simulator."""
    tools = cuda_sim.toolchain()
    sim = cuda_sim.source_dir() / "sim"
    root = cuda_sim.cache_dir() / "lab"
    key = ladder.name + (f"-{mutant.name}" if mutant else "")
    src_dir, obj_dir = root / "src" / key, root / "obj"
    src_dir.mkdir(parents=True, exist_ok=True)
    obj_dir.mkdir(parents=True, exist_ok=True)
    flags = cuda_sim._flags(tools, "counters")  # the same flags as pyllmc._C_sim's counters build
    digest = cuda_sim._digest

    # The rungs rewritten (launches, __shared__) and flattened into one folder, headers included,
    # so `#include "lab.cuh"` finds the rewritten copy.
    units, header_texts = [], []
    for index, (path, text) in enumerate(_sources(ladder, mutant)):
        rewritten = cuda_sim.rewrite(text, str(path), file_index=100 + index)
        target = src_dir / path.name
        if not target.exists() or target.read_text() != rewritten:
            target.write_text(rewritten)
        if path.suffix == ".cuh":
            header_texts.append(rewritten)
        else:
            units.append(target)
    sim_headers = [p.read_text() for p in sorted(sim.glob("*.h"))]
    base = digest(tools.version, tools.fcontext, flags, *header_texts, *sim_headers)
    kernel_flags = (["-x", "c++", "-include", str(sim / "cuda_sim.h"), "-I", str(src_dir), "-I", str(sim),
                     "-I", str(tools.cuda_include)] + cuda_sim.COUNTERS_KERNEL_FLAGS)
    runtime_flags = ["-I", str(sim), "-I", str(tools.cuda_include)]
    jobs = [(u, kernel_flags) for u in units]
    jobs += [(sim / f"{name}.cpp", runtime_flags) for name in ("runtime", "ptx", "counters")]
    # The key leaves out the folder of the rewritten copies (each ladder and mutant has its own), so
    # an unchanged rung under a mutant reuses its object: what it includes is in `base`.
    objects = [obj_dir / f"{s.stem}-{digest(base, [x.replace(str(src_dir), '<src>') for x in extra], s.read_bytes())}.o"
               for s, extra in jobs]

    _compile_missing([(source, [tools.cxx, *flags, *extra], obj) for (source, extra), obj in zip(jobs, objects)],
                     "g++", verbose)
    # Today's csrc/ files: the very objects of pyllmc._C_sim's counters build (compiled here if that
    # build has not run), so the last rung is the package's kernel and the suite compiles it once.
    objects += cuda_sim.kernel_objects(ladder.today, "counters", verbose=verbose)
    libs = ["-lboost_context"] if tools.fcontext else []
    out = root / f"{key}-{digest(*[o.name for o in objects], flags, libs)}.so"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        result = cuda_sim._run([tools.cxx, "-shared", *flags, *map(str, objects), "-o", str(tmp), *libs])
        if result.returncode != 0:
            raise cuda_sim.BuildError(f"lab: linking {out.name} failed:\n{result.stderr[-6000:]}")
        tmp.replace(out)
        for old in root.glob(f"{key}-*.so"):  # keep the newest library of each ladder
            if old != out:
                old.unlink(missing_ok=True)
    return out


_libraries: dict = {}


def library(ladder: Ladder, mutant: Optional[Mutant] = None, verbose: bool = False) -> tuple:
    """(ctypes handle, path) of the ladder's library, built if needed, loaded once per process."""
    path = build(ladder, mutant, verbose)
    if path not in _libraries:
        handle = ctypes.CDLL(str(path))
        handle.pyllmc_counters_json.restype = ctypes.c_char_p
        _libraries[path] = handle
    return _libraries[path], path


@contextlib.contextmanager
def schedule(handle, name: str, seed: int = 0, greedy: bool = False):
    """Run the simulator's warps in another order inside the block (pyllmc.cuda_sim.SCHEDULES), then
    back to the default (forward, in step): a rung whose answer depends on the order shows it."""
    handle.lab_set_schedule(ctypes.c_int(cuda_sim.SCHEDULES.index(name)), ctypes.c_ulonglong(seed),
                            ctypes.c_int(int(greedy)))
    try:
        yield
    finally:
        handle.lab_set_schedule(ctypes.c_int(0), ctypes.c_ulonglong(0), ctypes.c_int(0))


def entry(handle, ladder: Ladder, rung: Rung):
    fn = getattr(handle, f"lab_{ladder.name}_{rung.stem}")
    fn.restype = ctypes.c_int
    return fn


# ---------------------------------------------------------------------------------------------
# on a GPU: the same files built by nvcc, with the package's own flags, for this machine's GPU


def gpu_arch() -> str:
    """The compute capability to build for: PYLLMC_CUDA_ARCH, else that of torch's current GPU ("90"),
    else the first one nvidia-smi lists."""
    from pyllmc import _toolchain

    raw = os.environ.get("PYLLMC_CUDA_ARCH", "").strip()
    if raw:
        archs = _toolchain.parse_archs(raw)
    elif torch.cuda.is_available():
        archs = ["%d%d" % torch.cuda.get_device_capability()]
    else:
        archs = _toolchain.visible_gpu_archs()
    if not archs:
        raise cuda_sim.BuildError("lab --gpu: no GPU visible (nvidia-smi) and PYLLMC_CUDA_ARCH not set")
    return archs[0].replace("+PTX", "")


def build_gpu(ladder: Ladder, mutant: Optional[Mutant] = None, verbose: bool = False, arch: Optional[str] = None,
              rungs_only: bool = False):
    """The ladder's library built by nvcc for one GPU architecture (cached by content): the rungs,
    lab.cu and today's csrc/ files, with csrc/'s own nvcc flags (pyllmc._toolchain.nvcc_flags).
    rungs_only: compile the lab's own files and return their objects (no csrc/ file, no link)."""
    from pyllmc import _toolchain

    home = _toolchain.find_cuda_home()
    if home is None:
        raise cuda_sim.BuildError("lab --gpu: nvcc not found (set CUDA_HOME)")
    nvcc = str(home / "bin" / "nvcc")
    arch = arch or gpu_arch()
    csrc = cuda_sim.source_dir()
    csrc_flags = _toolchain.nvcc_flags(csrc, [arch])
    lab_flags = csrc_flags + ["-I", str(LAB), "-I", str(LAB / ladder.name)]
    version = cuda_sim._run([nvcc, "--version"]).stdout
    root = cuda_sim.cache_dir() / "lab-gpu"
    obj_dir = root / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    digest = cuda_sim._digest
    sources = _sources(ladder, mutant)
    # The rungs (with lab.cuh and the ladder's headers) and today's csrc/ files (with common.cuh, keyed
    # apart from any ladder: a csrc/ file two ladders link is compiled once).
    rung_base = digest(version, lab_flags, *[text for path, text in sources if path.suffix == ".cuh"])
    csrc_base = digest(version, csrc_flags, (csrc / "common.cuh").read_text())
    jobs = [(path, [nvcc, *lab_flags], obj_dir / f"{path.stem}-{digest(rung_base, text)}.o")
            for path, text in sources if path.suffix == ".cu"]
    if not rungs_only:
        jobs += [(csrc / f"{stem}.cu", [nvcc, *csrc_flags],
                  obj_dir / f"{stem}-{digest(csrc_base, (csrc / f'{stem}.cu').read_bytes())}.o") for stem in ladder.today]
    _compile_missing(jobs, f"nvcc (sm_{arch})", verbose)
    objects = [obj for _, _, obj in jobs]
    if rungs_only:
        return objects
    key = ladder.name + (f"-{mutant.name}" if mutant else "")
    out = root / f"{key}-sm{arch}-{digest(*[o.name for o in objects])}.so"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        result = cuda_sim._run([nvcc, "-shared", *_toolchain.gencode_flags([arch]), *map(str, objects), "-o", str(tmp)])
        if result.returncode != 0:
            raise cuda_sim.BuildError(f"lab --gpu: linking {out.name} failed:\n{result.stderr[-6000:]}")
        tmp.replace(out)
    return out


def gpu_library(ladder: Ladder, mutant: Optional[Mutant] = None, verbose: bool = False) -> tuple:
    """(ctypes handle, path) of the ladder's nvcc library, built if needed, loaded once per process."""
    path = build_gpu(ladder, mutant, verbose)
    if path not in _libraries:
        _libraries[path] = ctypes.CDLL(str(path))
    return _libraries[path], path


@dataclass
class GpuResult:
    correct: bool
    error: str
    ms: float                 # median time of one call at the ladder's gpu_shape (dev/bench's do_bench)
    ideal_bytes: int          # the op's least bytes at gpu_shape
    copy_gbps: float          # the copy ceiling of dev/bench (a large device-to-device copy)
    flops: Optional[int] = None  # the op's FLOPs at gpu_shape, where the ladder counts them

    @property
    def gbps(self) -> float:
        """The op's least bytes over the time: what the rung achieves of the bandwidth it needs."""
        return self.ideal_bytes / (self.ms * 1e-3) / 1e9

    @property
    def of_copy(self) -> float:
        return self.gbps / self.copy_gbps

    @property
    def tflops(self) -> Optional[float]:
        return None if self.flops is None else self.flops / (self.ms * 1e-3) / 1e12


def _bench_common():
    """dev/bench/common.py (the package `bench` with dev/ on the path): the timing and the copy ceiling
    the benchmarks use, so the lab's GPU column is measured as dev/bench's rows are."""
    sys.path.insert(0, str(ROOT / "dev"))
    try:
        from bench import common
    finally:
        sys.path.remove(str(ROOT / "dev"))
    return common


def run_rung_gpu(ladder: Ladder, handle, rung: Rung, copy_gbps: float, seed: int = 1234) -> GpuResult:
    """Check one rung on the GPU at the ladder's check shapes, then time it at its gpu_shape."""
    bench_ms = _bench_common().bench_ms  # dev/bench's timing: CUDA events, warm-up, median
    device = torch.device("cuda")
    for k, shape in enumerate(ladder.check_shapes):
        ok, _, msg = check(ladder, handle, rung, shape, seed + k, device)
        if not ok:
            return GpuResult(False, msg, math.nan, ladder.least_bytes_of(rung, ladder.gpu_shape), copy_gbps)
    shape = ladder.gpu_shape
    inputs = {k: v.to(device) for k, v in ladder.make_inputs(shape, torch.Generator().manual_seed(seed)).items()}
    fn, err, call = entry(handle, ladder, rung), ctypes.create_string_buffer(ERR_LEN), ladder.call_of(rung)
    codes = []
    handle.lab_set_synchronize(0)
    try:
        ms = bench_ms(lambda: codes.append(call(fn, inputs, err)))
        torch.cuda.synchronize()  # a fault inside a timed launch surfaces here
    except RuntimeError as e:
        # the CUDA context is lost after a fault: the rungs after this one fail too
        return GpuResult(False, f"faulted at shape {shape}: {e}", math.nan, ladder.least_bytes_of(rung, shape),
                         copy_gbps)
    finally:
        handle.lab_set_synchronize(1)
    message = "" if not any(codes) else f"launch failed at shape {shape}: {err.value.decode(errors='replace')}"
    if rung.finish is not None and not message:
        rung.finish(inputs)
    # only the check shapes are compared with torch; at this shape every output must at least be
    # written (they start as NaN) and finite: a grid too small or an overflow shows here
    unwritten = [name for name in ladder.outputs if not bool(torch.isfinite(inputs[name]).all())]
    if unwritten and not message:
        message = f"at shape {shape}, {', '.join(unwritten)} not finite after the timed calls"
    flops = ladder.flops(shape) if ladder.flops else None
    return GpuResult(not message, message, ms, ladder.least_bytes_of(rung, shape), copy_gbps, flops)


# ---------------------------------------------------------------------------------------------
# running a ladder


@dataclass
class Row:
    """One rung's line of the table (counts summed over its launches and their global / shared sites)."""
    rung: str
    changed: str
    correct: bool
    max_error: float
    error: str               # a launch error or the first mismatch, "" when correct
    grid: str                # "blocks x threads" of the launch(es)
    requests: int            # global-memory warp requests
    sectors: int
    ideal_sectors: int
    wavefronts: int          # shared memory
    ideal_wavefronts: int
    unique_bytes: int        # global bytes read + written at least once (the least DRAM traffic)
    ideal_bytes: int         # what the op must move
    launches: list = field(default_factory=list)
    gpu: Optional["GpuResult"] = None  # run.py --gpu: checked and timed on a GPU

    @property
    def sectors_per_request(self) -> float:
        return self.sectors / max(self.requests, 1)

    @property
    def ideal_per_request(self) -> float:
        return self.ideal_sectors / max(self.requests, 1)

    @property
    def ways(self) -> Optional[float]:
        return self.wavefronts / self.ideal_wavefronts if self.ideal_wavefronts else None

    @property
    def moved_bytes(self) -> int:
        """Bytes the sectors carry from L2 to the SM: 32 per sector, with no L1 reuse."""
        return self.sectors * sim_counters.SECTOR

    @property
    def moved_over_ideal(self) -> float:
        return self.moved_bytes / max(self.ideal_bytes, 1)

    @property
    def touched_over_ideal(self) -> float:
        """The distinct bytes each launch reads plus those it writes, against the op's least: above 1
        where launches pass data through memory (or a launch reads back what it wrote)."""
        return self.unique_bytes / max(self.ideal_bytes, 1)


def check(ladder: Ladder, handle, rung: Rung, shape: tuple, seed: int, device: torch.device = torch.device("cpu")) -> tuple:
    """(correct, max abs error scaled by the tolerance's denominator, message) of one rung at one shape."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {k: v.to(device) for k, v in ladder.make_inputs(shape, gen).items()}
    before = {k: v.clone() for k, v in inputs.items()}  # what a rung that works in place started from
    err = ctypes.create_string_buffer(ERR_LEN)
    code = ladder.call_of(rung)(entry(handle, ladder, rung), inputs, err)
    if code != 0:
        return False, math.inf, f"launch failed at shape {shape}: {err.value.decode(errors='replace')}"
    if rung.finish is not None:
        rung.finish(inputs)
    # the reference sees the tensors after the call, and under "_before" the ones it was given
    after = {k: v.cpu() for k, v in inputs.items()}
    expected = ladder.reference({**after, "_before": {k: v.cpu() for k, v in before.items()}})
    atol, rtol = rung.tolerance or ladder.tolerance
    worst = 0.0
    for name in ladder.outputs:
        got, want = after[name].double(), expected[name]
        scaled = ((got - want).abs() / (atol + rtol * want.abs())).nan_to_num(nan=math.inf)
        worst = max(worst, float(scaled.max()) if scaled.numel() else 0.0)
        if not worst <= 1.0:
            i = int(scaled.flatten().argmax())
            return False, worst, (f"{name} wrong at shape {shape}, flat index {i}: got {got.flatten()[i].item():.7g}, "
                                  f"want {want.flatten()[i].item():.7g}")
    return True, worst, ""


def run_rung(ladder: Ladder, handle, path: Path, rung: Rung, seed: int = 1234) -> Row:
    correct, worst, message = True, 0.0, ""
    for k, shape in enumerate(ladder.check_shapes):
        ok, w, msg = check(ladder, handle, rung, shape, seed + k)
        worst = max(worst, w)
        if not ok:
            correct, message = False, msg
            break
    shape = ladder.counter_shape
    gen = torch.Generator().manual_seed(seed)
    inputs = ladder.make_inputs(shape, gen)  # drawn outside the recording
    err = ctypes.create_string_buffer(ERR_LEN)
    handle.pyllmc_counters_reset()
    handle.pyllmc_counters_enable(1)
    try:
        code = ladder.call_of(rung)(entry(handle, ladder, rung), inputs, err)
    finally:
        handle.pyllmc_counters_enable(0)
    if code != 0:
        correct, message = False, message or f"launch failed: {err.value.decode(errors='replace')}"
    launches = sim_counters.launches(path)
    g = [s for l in launches for s in l.sites if s.space == "global"]
    sh = [s for l in launches for s in l.sites if s.space == "shared"]
    return Row(rung=rung.stem, changed=rung.changed, correct=correct, max_error=worst, error=message,
               grid=" + ".join(f"{l.blocks} x {l.threads_per_block}" for l in launches),
               requests=sum(s.requests for s in g), sectors=sum(s.sectors for s in g),
               ideal_sectors=sum(s.ideal_sectors for s in g), wavefronts=sum(s.wavefronts for s in sh),
               ideal_wavefronts=sum(s.ideal_wavefronts for s in sh),
               unique_bytes=sum(l.unique_read + l.unique_written for l in launches),
               ideal_bytes=ladder.least_bytes_of(rung, shape), launches=launches)


def run_ladder(name: str, mutant: Optional[str] = None, verbose: bool = False, gpu: bool = False) -> list:
    """Every rung of ladder `name` (with mutant `mutant` planted), checked and counted on the simulator:
    a Row each; with `gpu`, also built by nvcc, checked and timed on this machine's GPU (Row.gpu)."""
    ladder = LADDERS[name]
    m = None
    if mutant is not None:
        if mutant not in ladder.mutants:
            raise KeyError(f"{name} has no mutant {mutant!r}; it has {', '.join(ladder.mutants) or 'none'}")
        m = ladder.mutants[mutant]
    handle, path = library(ladder, m, verbose)
    out = [run_rung(ladder, handle, path, rung) for rung in ladder.rungs]
    if gpu:
        if ladder.gpu_shape is None:
            raise ValueError(f"ladder {name} has no gpu_shape to time at")
        gpu_handle, _ = gpu_library(ladder, m, verbose)
        for row, rung in zip(out, ladder.rungs):
            row.gpu = run_rung_gpu(ladder, gpu_handle, rung, copy_ceiling_gbps())
    return out


_copy_gbps: list = []


def copy_ceiling_gbps() -> float:
    """dev/bench's copy ceiling on this GPU (a 2 GiB device-to-device copy), measured once per process."""
    if not _copy_gbps:
        _copy_gbps.append(_bench_common().copy_bandwidth_gbps())
    return _copy_gbps[0]


_rows: dict = {}


def rows(name: str, mutant: str = "") -> dict:
    """rung stem -> Row of ladder `name` (with `mutant` planted), run once per process (the tests share it)."""
    if (name, mutant) not in _rows:
        _rows[(name, mutant)] = run_ladder(name, mutant or None)
    return {r.rung: r for r in _rows[(name, mutant)]}


# ---------------------------------------------------------------------------------------------
# the table


def command(name: str) -> str:
    return f"python dev/lab/run.py {name}"


def format_table(name: str, rows: list, mutant: str = "") -> str:
    """The ladder's table as Markdown (what run.py prints and the tutorials paste)."""
    ladder = LADDERS[name]
    shape = " x ".join(map(str, ladder.counter_shape))
    head = ["rung", "what changed", "correct", "grid x block", "global requests", "sectors / request (ideal)",
            "shared ways", "moved / ideal bytes", "touched / ideal bytes", "GPU time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        ways = "-" if r.ways is None else f"{r.ways:.1f}"
        correct = "yes" if r.correct else "NO"
        if r.gpu is not None and not r.gpu.correct:
            correct += " (NO on the GPU)"
        cells = [r.rung, r.changed, correct, r.grid, str(r.requests),
                 f"{r.sectors_per_request:.1f} ({r.ideal_per_request:.1f})", ways,
                 f"{r.moved_bytes} / {r.ideal_bytes} = {r.moved_over_ideal:.2f}x",
                 f"{r.unique_bytes} / {r.ideal_bytes} = {r.touched_over_ideal:.2f}x", gpu_cell(r.gpu)]
        lines.append("| " + " | ".join(cells) + " |")
    planted = f", with mutant {mutant} planted" if mutant else ""  # (where is the exercise's question)
    others = [f"{r.stem} in {r.dtype}" for r in ladder.rungs if r.dtype != "float32"]
    dtypes = "float32" + (f" ({', '.join(others)}: each against its own least bytes)" if others else "")
    caption = f"{name}{planted}, {dtypes}, counted at shape {shape} on the simulator"
    timed = next((r.gpu for r in rows if r.gpu is not None and r.gpu.ms == r.gpu.ms), None)
    if timed is not None:
        caption += (f"; timed on {torch.cuda.get_device_name()} at shape {' x '.join(map(str, ladder.gpu_shape))} "
                    f"(GB/s: the op's least {timed.ideal_bytes} bytes over the time; copy ceiling "
                    f"{timed.copy_gbps:.0f} GB/s)")
    return caption + ":\n\n" + "\n".join(lines)


def gpu_cell(result: Optional[GpuResult]) -> str:
    if result is None:
        return "not run"
    if not result.ms == result.ms:  # NaN: it failed its GPU check before timing
        return "wrong on the GPU"
    cell = f"{result.ms * 1e3:.1f} us, {result.gbps:.0f} GB/s, {100 * result.of_copy:.0f}% of copy"
    return cell if result.tflops is None else f"{cell}, {result.tflops:.1f} TFLOP/s"


def format_sites(rows: list) -> str:
    """Every launch's per-site table (pyllmc.sim_counters.format_launch), rung by rung."""
    out = []
    for r in rows:
        for l in r.launches:
            out.append(sim_counters.format_launch(l, r.rung))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------------------------
# the tutorials' tables


def doc_path(name: str) -> Path:
    return LAB / f"{name}.md"


TABLE_BEGIN = "<!-- lab table: {name}{mutant} (written by python dev/lab/run.py --write-docs) -->"
TABLE_END = "<!-- end lab table -->"


# A marked table: the begin marker, the table (no "<!--" inside; empty before its first write), the end.
_TABLE = re.compile(r"<!-- lab table: (\w+)(?: --mutant (\w+))? \(written by [^)]*\) -->\n"
                    r"((?:(?!<!--).)*?)\n?" + re.escape(TABLE_END), re.S)


def doc_tables(text: str) -> dict:
    """(ladder, mutant or "") -> the table text between the markers of a tutorial."""
    return {(m.group(1), m.group(2) or ""): m.group(3) for m in _TABLE.finditer(text)}


def doc_block(name: str, mutant: str, table: str) -> str:
    return (TABLE_BEGIN.format(name=name, mutant=f" --mutant {mutant}" if mutant else "") + "\n" + table + "\n" +
            TABLE_END)


def write_doc_tables(text: str, tables: dict) -> str:
    """`text` with every marked table whose (ladder, mutant) is in `tables` replaced by it."""
    def replace(m):
        key = (m.group(1), m.group(2) or "")
        return doc_block(key[0], key[1], tables[key]) if key in tables else m.group(0)
    return _TABLE.sub(replace, text)


LADDERS = _discover()
