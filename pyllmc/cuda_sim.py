"""pyllmc.cuda_sim: the cuda backend's own kernels (csrc/*.cu), run on the CPU.

A GPU is not always at hand, so the CUDA kernels also build for the CPU: the host C++
compiler compiles every csrc/*.cu file, after a small source rewrite, against the simulator
in csrc/sim/ (see cuda_sim.h there for the model), together with the same pybind11 bindings
(csrc/bindings.cpp) as the module ``pyllmc._C_sim``. The ops layer then drives it exactly as
it drives ``pyllmc._C``, with CPU tensors' pointers instead of device pointers:

    PYLLMC_CUDA_SIM=1 python -c "import torch, pyllmc; print(pyllmc.ops.gelu(torch.randn(5), backend='cuda'))"

The tests switch it on when no GPU is visible (tests/conftest.py), so every ``[cuda]`` test
runs in CI. It is for testing kernels, not for speed (a GELU over 1M floats takes ~20 ms), and
auto backend selection never picks it.

The rewrite keeps line numbers and changes only what no macro can express:
  kernel<<<grid, block, smem, stream>>>(args)  ->  ::cuda_sim::launch("kernel", kernel, ::cuda_sim::config(...), args)
  extern __shared__ T name[];                  ->  T* name = <this block's dynamic shared memory>
  __shared__ T name[N];                        ->  auto& name = <this block's copy of a T[N]>
  asm volatile("ptx" : outs : ins : ...);      ->  ::cuda_sim::asm_exec("ptx", {operands}, __FILE__, __LINE__);
An instruction the simulator does not implement fails the build (RewriteError).

Environment:
  PYLLMC_CUDA_SIM=1          the cuda backend runs on this simulator (CPU tensors)
  PYLLMC_CUDA_SIM_VARIANT    "default", or "sanitize" (AddressSanitizer + UBSan; the process needs
                             LD_PRELOAD=sanitizer_preload(), see tests/test_cuda_sim.py), or "counters"
                             (memory counters: pyllmc/sim_counters.py)
  PYLLMC_CUDA_SIM_DEVICE     the GPU the simulator answers for (DEVICES; default sm_90): its compute
                             capability and shared-memory limits are what cudaDeviceGetAttribute reports
                             and what launches may use. device_profile("sm_86") switches it in-process.
  PYLLMC_CSRC                the csrc/ folder to build (default: the installed package's pyllmc/csrc,
                             else the source checkout's)
  PYLLMC_CACHE_DIR           where builds are kept (default $XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc)
  CXX                        the compiler (default g++)
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ._toolchain import find_cuda_home, user_cache_dir

VARIANTS = ("default", "sanitize", "counters")
# The "counters" variant (pyllmc/sim_counters.py): kernel units get GCC's ThreadSanitizer
# instrumentation, whose __tsan_* calls csrc/sim/counters.cpp answers (no TSan runtime is linked).
# The -fno-* flags keep the accesses shaped like the source: without them GCC splits a 16-byte
# Packed128 copy into 4-byte pieces (SRA), merges or vectorizes stores, and folds identical
# template instances or tails into one body (an access credited to the wrong instance).
COUNTERS_KERNEL_FLAGS = ["-fsanitize=thread", "-fno-tree-sra", "-fno-tree-vectorize", "-fno-tree-slp-vectorize",
                         "-fno-store-merging", "-fno-ipa-icf", "-fno-crossjumping", "-fno-tree-tail-merge"]
MODULE_NAME = "_C_sim"

# The simulated GPUs (csrc/sim/runtime.cpp's kProfiles: NVIDIA's "Technical Specifications per
# Compute Capability"): name -> (compute capability, opt-in shared memory per block in bytes, parts).
DEVICES = {
    "sm_75": ((7, 5), 65536, "T4"),
    "sm_80": ((8, 0), 166912, "A100"),
    "sm_86": ((8, 6), 101376, "RTX 3090, A10"),
    "sm_89": ((8, 9), 101376, "RTX 4090, L4"),
    "sm_90": ((9, 0), 232448, "H100, H200"),
    "sm_100": ((10, 0), 232448, "B200"),
    "sm_120": ((12, 0), 101376, "RTX 5090"),
}
DEFAULT_DEVICE = "sm_90"

# The inline PTX that csrc/sim/ptx.cpp executes; anything else fails the rewrite.
SUPPORTED_PTX = re.compile(
    r"cp\.async\.(ca|cg)\.shared\.global"
    r"|cp\.async\.commit_group|cp\.async\.wait_group|cp\.async\.wait_all"
    r"|ldmatrix\.sync\.aligned\.m8n8\.x[124](\.trans)?\.shared(::cta)?\.b16"
    r"|mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16\.bf16|f16\.f16)\.f32")
_CONSTRAINT = re.compile(r"[=+]?[rlfhdn]")


class RewriteError(ValueError):
    """A construct of a .cu file that the simulator cannot run (named with file:line)."""


class BuildError(RuntimeError):
    """The simulator could not be built here; the message says why."""


def enabled() -> bool:
    """True when PYLLMC_CUDA_SIM asks for the cuda backend to run on the simulator."""
    return os.environ.get("PYLLMC_CUDA_SIM", "0").strip().lower() in ("1", "true", "yes", "on")


def check_device_name(name: str) -> str:
    """`name` if it is a simulated device (DEVICES), else ValueError listing the known ones."""
    if name not in DEVICES:
        raise ValueError(f"unknown simulated device {name!r}: expected one of {', '.join(DEVICES)}")
    return name


def device_name_from_env() -> str:
    """The device PYLLMC_CUDA_SIM_DEVICE asks for (sm_90 when unset); ValueError for an unknown one."""
    raw = os.environ.get("PYLLMC_CUDA_SIM_DEVICE", "").strip() or DEFAULT_DEVICE
    try:
        return check_device_name(raw)
    except ValueError as err:
        raise ValueError(f"PYLLMC_CUDA_SIM_DEVICE: {err}") from None


def variant() -> str:
    name = os.environ.get("PYLLMC_CUDA_SIM_VARIANT", "default").strip() or "default"
    if name not in VARIANTS:
        raise BuildError(f"PYLLMC_CUDA_SIM_VARIANT={name!r}: expected one of {VARIANTS}")
    return name


# ---------------------------------------------------------------------------------------------
# the source rewrite


def _mask(source: str) -> str:
    """`source` with comments blanked and string / char literal contents blanked (quotes kept),
    newlines kept: the same positions, but only code left to search."""
    out = list(source)
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if source.startswith("//", i):
            j = source.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif source.startswith("/*", i):
            j = source.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if source[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and source[j] != c:
                j += 2 if source[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if source[k] != "\n":
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _line_of(source: str, pos: int) -> int:
    return source.count("\n", 0, pos) + 1


def _matching(masked: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(masked)):
        if masked[i] == open_ch:
            depth += 1
        elif masked[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise RewriteError(f"unbalanced {open_ch}{close_ch}")


def _split_top(masked: str, text: str, sep: str) -> list[str]:
    """`text` split at the `sep` characters of `masked` (same positions) outside any brackets."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(masked):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return parts


class _Edits:
    def __init__(self, source: str, path: str):
        self.source, self.path, self.items = source, path, []

    def add(self, start: int, end: int, text: str) -> None:
        self.items.append((start, end, text))

    def error(self, pos: int, what: str) -> RewriteError:
        return RewriteError(f"{self.path}:{_line_of(self.source, pos)}: {what}")

    def apply(self) -> str:
        out = self.source
        last_start = len(out) + 1
        for start, end, text in sorted(self.items, key=lambda e: e[0], reverse=True):
            if end > last_start:
                raise RewriteError(f"{self.path}: overlapping rewrites near line {_line_of(self.source, start)}")
            out = out[:start] + text + out[end:]
            last_start = start
        return out


def _rewrite_asm(source: str, masked: str, edits: _Edits) -> None:
    for m in re.finditer(r"\b(?:asm|__asm__)\s*(?:volatile|__volatile__)?\s*\(", masked):
        open_paren = m.end() - 1
        close = _matching(masked, open_paren, "(", ")")
        after = masked[close + 1:].lstrip()
        if not after.startswith(";"):
            raise edits.error(m.start(), "an asm statement must end with ';'")
        body, mbody = source[open_paren + 1:close], masked[open_paren + 1:close]
        sections = _split_top(mbody, body, ":")
        msections = _split_top(mbody, mbody, ":")
        if len(sections) > 4:
            raise edits.error(m.start(), "asm with more than 4 sections")
        template = sections[0].strip()
        literals = re.findall(r'"(?:[^"\\]|\\.)*"', template)
        if not literals or re.sub(r'"(?:[^"\\]|\\.)*"', "", template).strip():
            raise edits.error(m.start(), "the asm template must be string literals")
        ptx = "".join(ast.literal_eval(lit) for lit in literals)
        mnemonic = ptx.strip().split()[0].rstrip(";") if ptx.strip() else ""
        if not SUPPORTED_PTX.fullmatch(mnemonic):
            raise edits.error(m.start(), f"inline PTX {mnemonic!r} is not supported by the CUDA simulator "
                                         f"(csrc/sim/ptx.cpp implements: cp.async, ldmatrix, mma.m16n8k16)")
        operands = []
        for section, msection in zip(sections[1:3], msections[1:3]):
            if not section.strip():
                continue
            for op, mop in zip(_split_top(msection, section, ","), _split_top(msection, msection, ",")):
                om = re.fullmatch(r'\s*("(?:[^"\\]|\\.)*")\s*\((.*)\)\s*', op, re.S)
                if not om:
                    raise edits.error(m.start(), f"cannot read the asm operand {op.strip()!r}")
                constraint = ast.literal_eval(om.group(1))
                if not _CONSTRAINT.fullmatch(constraint):
                    raise edits.error(m.start(), f"asm constraint {constraint!r} is not simulated")
                expr = " ".join(om.group(2).split())
                operands.append(f'::cuda_sim::asm_operand("{constraint}", ({expr}))')
        newlines = source.count("\n", m.start(), close + 1)
        call = (f"::cuda_sim::asm_exec({' '.join(literals)}, {{{', '.join(operands)}}}, __FILE__, __LINE__)"
                + "\n" * newlines)
        edits.add(m.start(), close + 1, call)


def _kernel_expression_start(masked: str, end: int) -> int:
    """Start of the kernel expression ending at `end` (a name, maybe qualified, maybe with
    template arguments: `ns::kernel<T, 4>`)."""
    j = end - 1
    if masked[j] == ">":
        depth = 0
        while j >= 0:
            ch = masked[j]
            if ch == ">":
                depth += 1
            elif ch == "<":
                depth -= 1
                if depth == 0:
                    j -= 1
                    break
            elif ch == ")":
                # skip a parenthesized group (e.g. decltype(x)) inside the template arguments
                d = 0
                while j >= 0:
                    d += masked[j] == ")"
                    d -= masked[j] == "("
                    if d == 0:
                        break
                    j -= 1
            j -= 1
        while j >= 0 and masked[j].isspace():
            j -= 1
    while j >= 0 and (masked[j].isalnum() or masked[j] in "_:"):
        j -= 1
    return j + 1


def _rewrite_launches(source: str, masked: str, edits: _Edits) -> None:
    for m in re.finditer(r"<<<", masked):
        start = m.start()
        close_cfg = masked.find(">>>", m.end())
        if close_cfg < 0:
            raise edits.error(start, "<<< without >>>")
        j = close_cfg + 3
        while j < len(masked) and masked[j].isspace():
            j += 1
        if j >= len(masked) or masked[j] != "(":
            raise edits.error(start, "expected the kernel's arguments after >>>")
        close_args = _matching(masked, j, "(", ")")
        end = start
        while end > 0 and masked[end - 1].isspace():
            end -= 1
        expr_start = _kernel_expression_start(masked, end)
        expr = source[expr_start:end]
        if not expr or not (expr[0].isalpha() or expr[0] in "_:"):
            raise edits.error(start, "cannot find the kernel name before <<<")
        name = " ".join(expr.split())
        has_args = bool(masked[j + 1:close_args].strip())
        edits.add(expr_start, expr_start, f'::cuda_sim::launch("{name}", ')
        edits.add(start, start + 3, ", ::cuda_sim::config(")
        edits.add(close_cfg, close_cfg + 3, ")")
        edits.add(j, j + 1, ", " if has_args else "")


_ALIGN = re.compile(r"__align__\s*\(\s*(\d+)\s*\)|alignas\s*\(\s*(\d+)\s*\)|"
                    r"__attribute__\s*\(\(\s*aligned\s*\(\s*(\d+)\s*\)\s*\)\)")


def _rewrite_shared(source: str, masked: str, edits: _Edits, file_index: int) -> None:
    site = 0
    for m in re.finditer(r"\b(extern\s+)?__shared__\b", masked):
        semicolon = masked.find(";", m.end())
        if semicolon < 0:
            raise edits.error(m.start(), "a __shared__ declaration without ';'")
        if re.search(r"\bstatic\s*$", masked[:m.start()]):
            raise edits.error(m.start(), "'static __shared__' is not simulated: drop the 'static'")
        decl = masked[m.end():semicolon]
        align = 0
        for a in _ALIGN.finditer(decl):
            align = max(align, int(next(g for g in a.groups() if g)))
        decl = _ALIGN.sub(" ", decl)
        if "," in decl or "=" in decl:
            raise edits.error(m.start(), "one variable, without initializer, per __shared__ declaration")
        d = re.fullmatch(r"\s*(?P<type>.*?\S)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)", decl, re.S)
        if not d:
            raise edits.error(m.start(), f"cannot read the __shared__ declaration {decl.strip()!r}")
        type_, name, dims = " ".join(d["type"].split()), d["name"], "".join(d["dims"].split())
        newlines = source.count("\n", m.start(), semicolon)
        if m.group(1):  # extern: the launch's dynamic shared memory
            if dims != "[]":
                raise edits.error(m.start(), "extern __shared__ must be an unsized array: T name[]")
            text = f"{type_}* {name} = ::cuda_sim::dynamic_shared_ptr<{type_}>({align}, __FILE__, __LINE__)"
        else:
            site += 1
            text = (f"auto& {name} = ::cuda_sim::static_shared_ref<{type_}{dims}>({file_index * 1000 + site}, "
                    f"{align}, __FILE__, __LINE__)")
        edits.add(m.start(), semicolon, text + "\n" * newlines)


def rewrite(source: str, path: str = "<source>", file_index: int = 0) -> str:
    """The simulator's version of one CUDA source file (same line numbers); RewriteError for
    what it cannot run. `file_index` keeps static __shared__ variables of files apart."""
    masked = _mask(source)
    edits = _Edits(source, path)
    _rewrite_asm(source, masked, edits)
    _rewrite_launches(source, masked, edits)
    _rewrite_shared(source, masked, edits, file_index)
    return f'#line 1 "{path}"\n' + edits.apply()


# ---------------------------------------------------------------------------------------------
# the build


def source_dir(package_dir: Optional[Path] = None) -> Path:
    """The csrc/ folder the simulator builds: PYLLMC_CSRC, else the copy installed inside the
    package (pyllmc/csrc, shipped as package data), else the source checkout's (beside pyllmc/).
    `package_dir`: the pyllmc folder to look in (default: this module's)."""
    env = os.environ.get("PYLLMC_CSRC")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "sim" / "cuda_sim.h").is_file():
            raise BuildError(f"PYLLMC_CSRC={env}: no sim/cuda_sim.h there (expected pyllmc's csrc/ folder)")
        return path
    package = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    candidates = (package / "csrc", package.parent / "csrc")
    for candidate in candidates:
        if (candidate / "sim" / "cuda_sim.h").is_file():
            return candidate
    raise BuildError(f"the CUDA kernels' sources were not found (looked in {', '.join(map(str, candidates))}): "
                     f"reinstall pyllmc, or set PYLLMC_CSRC=/path/to/pyllmc/csrc")


def cache_dir() -> Path:
    return user_cache_dir() / "cuda_sim"


@dataclass(frozen=True)
class Toolchain:
    cxx: str
    version: str
    cuda_include: Path
    includes: tuple  # pybind11, Python
    fcontext: bool   # Boost.Context's fcontext (fast fiber switches); else ucontext


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _have_fcontext(cxx: str, version: str) -> bool:
    """Whether Boost.Context (Debian: libboost-context-dev) compiles and links here; the answer
    is kept per compiler and Boost installation, since probing takes a second."""
    header = Path("/usr/include/boost/context/detail/fcontext.hpp")
    key = _digest(cxx, version, header.stat().st_mtime if header.exists() else "none")
    answer = cache_dir() / f"probe-fcontext-{key}"
    if answer.exists():
        return answer.read_text() == "yes"
    program = ("#include <boost/context/detail/fcontext.hpp>\n"
               "int main() { return boost::context::detail::make_fcontext(nullptr, 0, nullptr) != nullptr; }\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(program)
        ok = _run([cxx, "-std=c++17", str(src), "-o", str(Path(tmp) / "probe"), "-lboost_context"]).returncode == 0
    answer.parent.mkdir(parents=True, exist_ok=True)
    answer.write_text("yes" if ok else "no")
    return ok


def toolchain() -> Toolchain:
    """The compiler and headers the simulator needs, or BuildError saying what is missing."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler (g++) found: the CUDA simulator compiles the kernels for the CPU")
    cuda_home = find_cuda_home()
    if cuda_home is None or not (cuda_home / "include" / "cuda_bf16.h").is_file():
        raise BuildError("the CUDA toolkit's headers were not found (CUDA_HOME, /usr/local/cuda or nvcc on PATH): "
                         "the simulator compiles against cuda_runtime.h and cuda_bf16.h")
    try:
        import pybind11
    except ImportError as err:
        raise BuildError(f"pybind11 is not installed ({err}); pip install pybind11") from err
    version = _run([cxx, "--version"]).stdout.splitlines()[0]
    return Toolchain(cxx=cxx, version=version, cuda_include=cuda_home / "include",
                     includes=(pybind11.get_include(), sysconfig.get_paths()["include"]),
                     fcontext=_have_fcontext(cxx, version))


def sanitizer_preload(tools: Optional[Toolchain] = None) -> list[str]:
    """The runtime libraries a process must LD_PRELOAD to load the "sanitize" variant."""
    tools = tools or toolchain()
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        path = _run([tools.cxx, f"-print-file-name={name}"]).stdout.strip()
        if not path or path == name or not Path(path).exists():
            raise BuildError(f"{tools.cxx} has no {name}: the sanitize variant needs it")
        libs.append(str(Path(path).resolve()))
    return libs


def _flags(tools: Toolchain, variant_name: str) -> list[str]:
    flags = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing",
             # no FMA contraction: each float operation rounds once, as the kernels' *_rn intrinsics ask
             "-ffp-contract=off", "-Wno-attributes", f"-DCUDA_SIM_FCONTEXT={int(tools.fcontext)}"]
    if variant_name == "sanitize":
        flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    elif variant_name == "counters":
        flags += ["-O2", "-g"]  # -g: addr2line names each access site's source line
    else:
        flags += ["-O2"]
    return flags


@dataclass
class _Unit:
    name: str
    source: Path       # the file to compile (rewritten copy for kernels)
    extra: list        # unit-specific flags
    digest: str = ""


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class _Plan:
    """What a variant's build compiles: its flags, units (with digests) and folders."""
    tools: Toolchain
    flags: list
    units: list
    root: Path
    obj_dir: Path

    def object(self, u: _Unit) -> Path:
        return self.obj_dir / f"{u.name}-{u.digest}.o"


def _plan(variant_name: str) -> _Plan:
    """Rewrite the kernel sources into the variant's folder and digest every unit (call under its lock)."""
    csrc = source_dir()
    tools = toolchain()
    root = cache_dir() / variant_name
    src_dir, obj_dir = root / "src", root / "obj"
    sim = csrc / "sim"
    # Kernel sources and headers, rewritten (headers beside them, so #include "x.cuh" finds the rewrite).
    kernel_files = sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cuh")) + sorted(sim.glob("*.cu"))
    rewritten = {}
    for index, path in enumerate(kernel_files):
        rewritten[path] = rewrite(path.read_text(), str(path), file_index=index + 1)
        target = src_dir / path.name
        if not target.exists() or target.read_text() != rewritten[path]:
            target.write_text(rewritten[path])
    headers = _digest(*[rewritten[p] for p in kernel_files if p.suffix == ".cuh"],
                      *[p.read_text() for p in sorted(sim.glob("*.h"))])
    flags = _flags(tools, variant_name)
    base = _digest(tools.version, tools.fcontext, flags, headers, sys.version, sysconfig.get_config_var("EXT_SUFFIX"))

    kernel_flags = ["-x", "c++", "-include", str(sim / "cuda_sim.h"), "-I", str(src_dir), "-I", str(sim),
                    "-I", str(tools.cuda_include)]
    if variant_name == "counters":
        kernel_flags += COUNTERS_KERNEL_FLAGS
    py_flags = [f"-I{inc}" for inc in tools.includes]
    units = [_Unit(p.stem + ("_sim" if p.parent == sim else ""), src_dir / p.name, kernel_flags)
             for p in kernel_files if p.suffix == ".cu"]
    units += [_Unit(p.stem, p, ["-I", str(sim), "-I", str(tools.cuda_include)] + py_flags)
              for p in sorted(sim.glob("*.cpp"))]
    units.append(_Unit("bindings", csrc / "bindings.cpp",
                       [f"-DPYLLMC_EXTENSION_NAME={MODULE_NAME}", "-DPYLLMC_CUDA_SIM=1", "-I", str(csrc),
                        "-I", str(sim), "-I", str(tools.cuda_include)] + py_flags))
    for u in units:
        u.digest = _digest(base, u.extra, u.source.read_bytes())
    return _Plan(tools, flags, units, root, obj_dir)


def _compile(plan: _Plan, units: list, variant_name: str, verbose: bool) -> None:
    """Compile the units whose objects are missing (in parallel); BuildError on the first failure."""
    todo = [u for u in units if not plan.object(u).exists()]
    if not todo:
        return
    jobs = max(1, min(len(todo), os.cpu_count() or 1))
    if verbose:
        print(f"cuda_sim: compiling {len(todo)} file(s) of {source_dir()} for the CPU with {plan.tools.cxx} "
              f"({variant_name}, {jobs} jobs; {'fcontext' if plan.tools.fcontext else 'ucontext'} fibers)...",
              file=sys.stderr, flush=True)
    todo.sort(key=lambda u: -u.source.stat().st_size)  # the largest first: the small ones fill the other cores

    def compile_unit(u: _Unit):
        obj = plan.object(u)
        tmp = obj.with_suffix(f".tmp{os.getpid()}")
        result = _run([plan.tools.cxx, *plan.flags, *u.extra, "-c", str(u.source), "-o", str(tmp)])
        if result.returncode != 0:
            return u, result.stderr
        tmp.replace(obj)
        return u, None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failures = [(u, err) for u, err in pool.map(compile_unit, todo) if err is not None]
    if failures:
        u, err = failures[0]
        raise BuildError(f"cuda_sim: compiling {u.source} failed:\n{err[-6000:]}")


@contextlib.contextmanager
def _locked(variant_name: str) -> Iterator[_Plan]:
    if variant_name not in VARIANTS:
        raise BuildError(f"unknown simulator variant {variant_name!r}; expected one of {VARIANTS}")
    root = cache_dir() / variant_name
    for d in (root / "src", root / "obj"):
        d.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (a test may start a second process)
        yield _plan(variant_name)


def build(variant_name: Optional[str] = None, *, verbose: bool = True) -> Path:
    """Build pyllmc._C_sim (if its sources changed) and return the module file's path."""
    variant_name = variant_name or variant()
    with _locked(variant_name) as plan:
        libs = ["-lboost_context"] if plan.tools.fcontext else []
        out = plan.root / f"{MODULE_NAME}-{_digest(*[u.digest for u in plan.units], plan.flags, libs)}.so"
        if out.exists():
            return out
        started = time.time()
        _compile(plan, plan.units, variant_name, verbose)
        objects = [str(plan.object(u)) for u in plan.units]
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        result = _run([plan.tools.cxx, "-shared", *plan.flags, *objects, "-o", str(tmp), *libs])
        if result.returncode != 0:
            raise BuildError(f"cuda_sim: linking {out.name} failed:\n{result.stderr[-6000:]}")
        tmp.replace(out)
        for old in plan.root.glob(f"{MODULE_NAME}-*.so"):  # keep only the newest module
            if old != out:
                old.unlink(missing_ok=True)
        if verbose:
            print(f"cuda_sim: built {out.name} in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        return out


def kernel_objects(names: list, variant_name: str = "counters", *, verbose: bool = False) -> list:
    """The object files of csrc kernel files `names` (stems: "layernorm") as `variant_name`'s build of
    pyllmc._C_sim compiles them, compiled now if missing. The objects are the build's own (same
    cache, same key): a tool that links one csrc file (dev/lab/) and the full build share the work."""
    with _locked(variant_name) as plan:
        kernels = {u.name: u for u in plan.units if u.source.parent == plan.root / "src"}  # rewritten .cu files
        missing = [n for n in names if n not in kernels]
        if missing:
            raise BuildError(f"cuda_sim: no kernel file {', '.join(missing)}.cu in {source_dir()}")
        units = [kernels[n] for n in names]
        _compile(plan, units, variant_name, verbose)
        return [plan.object(u) for u in units]


_loaded: dict = {}


def load(variant_name: Optional[str] = None):
    """pyllmc._C_sim, built if needed and imported (one variant per process)."""
    variant_name = variant_name or variant()
    if "module" in _loaded:
        if _loaded["variant"] != variant_name:
            raise BuildError(f"the {_loaded['variant']!r} simulator is already loaded in this process; "
                             f"{variant_name!r} needs a process of its own")
        return _loaded["module"]
    path = build(variant_name)
    spec = importlib.util.spec_from_file_location(f"pyllmc.{MODULE_NAME}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[f"pyllmc.{MODULE_NAME}"] = module
    module.sim_set_device(device_name_from_env())
    _loaded.update(module=module, variant=variant_name, path=path)
    return module


# ---------------------------------------------------------------------------------------------
# controls of the loaded simulator

SCHEDULES = ("forward", "reverse", "random")
CP_ASYNC_MODES = ("at_wait", "immediate")


def set_schedule(name: str, seed: int = 0, greedy: bool = False) -> None:
    """The order in which warps (and, for "random", lanes and blocks) take turns; greedy: each
    warp runs as far as it can before the next one (else warps move in step)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    load().sim_set_schedule(schedule=SCHEDULES.index(name), seed=int(seed), greedy=bool(greedy))


def set_cp_async(mode: str) -> None:
    """When cp.async copies land: at the wait_group that retires them, or at once."""
    if mode not in CP_ASYNC_MODES:
        raise ValueError(f"cp_async mode must be one of {CP_ASYNC_MODES}, got {mode!r}")
    load().sim_set_cp_async(CP_ASYNC_MODES.index(mode))


@contextlib.contextmanager
def schedule(name: str = "forward", seed: int = 0, cp_async: str = "at_wait", greedy: bool = False) -> Iterator[None]:
    """Run the block with the given schedule and cp.async mode, then restore the previous ones."""
    module = load()
    previous = module.sim_get_options()
    set_schedule(name, seed, greedy)
    set_cp_async(cp_async)
    try:
        yield
    finally:
        module.sim_set_schedule(schedule=previous["schedule"], seed=previous["seed"], greedy=previous["greedy"])
        module.sim_set_cp_async(previous["cp_async"])


def set_device(name: str) -> None:
    """Simulate GPU `name` (one of DEVICES) from now on; it forgets every kernel's opted-in
    shared memory, as a new CUDA context would."""
    load().sim_set_device(check_device_name(name))


def device() -> dict:
    """The simulated GPU: name, parts, compute_capability, smem_per_block(_optin), smem_per_sm,
    regs_per_sm / _block, max_threads_per_block / _sm, multiprocessor_count (what the simulator
    reports: a few SMs, so grid-wide splits stay cheap) and full_multiprocessor_count (the part's)."""
    return dict(load().sim_device())


@contextlib.contextmanager
def device_profile(name: str) -> Iterator[dict]:
    """Run the block as GPU `name` (e.g. "sm_86"), then go back to the previous one; yields device()."""
    check_device_name(name)
    previous = device()["name"]
    set_device(name)
    try:
        yield device()
    finally:
        set_device(previous)


def launches() -> list:
    """The launches since reset_stats() (at most 4096): name (the kernel expression of the source),
    smem (dynamic shared memory, bytes), grid, block."""
    return [dict(d) for d in load().sim_launches()]


def multiprocessor_count() -> int:
    """The SM count the simulated device reports (sizes grid-wide work splits, e.g. LayerNorm's)."""
    return int(load().sim_get_options()["multiprocessor_count"])


def stats() -> dict:
    """Launches, blocks, threads, barriers, warp collectives and fiber switches since reset_stats()."""
    return dict(load().sim_stats())


def reset_stats() -> None:
    load().sim_reset_stats()
