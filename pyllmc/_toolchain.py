"""Where the CUDA toolkit is and how csrc/ is compiled: shared by setup.py (which loads this
file by path, without importing pyllmc or torch), the CUDA simulator's build (pyllmc.cuda_sim)
and the ptxas report (dev/ptxas_report.py), so the report reads the very code the build ships;
and where pyllmc keeps what it builds and downloads (user_cache_dir)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple


def user_cache_dir() -> Path:
    """pyllmc's user cache (downloads, the simulator's builds): $PYLLMC_CACHE_DIR, else
    $XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc. Here, without imports, for setup-time tools too."""
    if os.environ.get("PYLLMC_CACHE_DIR"):
        return Path(os.environ["PYLLMC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pyllmc"


def find_cuda_home() -> Optional[Path]:
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    return None


# Built when no GPU is visible at build time (CI, a container): SASS for sm_80 (which also runs on
# sm_86, sm_87 and sm_89: same major version) and sm_90, plus sm_90's PTX, which the driver JIT-compiles
# on any newer GPU (sm_100, sm_120) at the first launch and caches (~20 s of CPU once, measured by
# ptxas on the PTX). Each SASS target costs ~60 s of CPU (layernorm.cu alone ~40 s); the PTX ~2 s.
# Build for a new GPU natively with PYLLMC_CUDA_ARCH (or build on the machine that has it).
DEFAULT_ARCHS = "80;90+PTX"
MIN_ARCH = 75  # the tensor-core attention (mma.sync bf16, cp.async, ldmatrix) needs 80 and says so


def parse_archs(raw: str) -> List[str]:
    """Compute capabilities from e.g. "80;90", "8.0,9.0", "90a" or "80;90+PTX" (the last also embeds
    that arch's PTX) -> ["80", "90"] / ["90a"] / ["80", "90+PTX"]."""
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        base = a[:-4] if a.upper().endswith("+PTX") else a
        if not base.rstrip("af").isdigit():
            raise ValueError(f"cannot read {a!r} as a compute capability (expected e.g. '80;90', '90a' or '90+PTX')")
        if int(base.rstrip("af")) < MIN_ARCH:
            raise ValueError(f"compute capability {a!r} is below {MIN_ARCH // 10}.{MIN_ARCH % 10}, the oldest pyllmc "
                             f"builds for")
    return [a[:-4] + "+PTX" if a.upper().endswith("+PTX") else a for a in archs]


def visible_gpu_archs() -> List[str]:
    """Compute capabilities of the GPUs the driver sees now (["90"] on an H100), via nvidia-smi; []
    when there is none or nvidia-smi cannot tell (no driver, a driver older than 510)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    found = {line.strip().replace(".", "") for line in out.stdout.splitlines() if line.strip()}
    return sorted((a for a in found if a.isdigit()), key=int)


def build_archs(environ=None) -> Tuple[List[str], str]:
    """(the architectures to build for, where that choice came from): PYLLMC_CUDA_ARCH when set; else
    the GPUs visible now (with the newest one's PTX, so a newer GPU can still JIT); else DEFAULT_ARCHS."""
    environ = os.environ if environ is None else environ
    raw = environ.get("PYLLMC_CUDA_ARCH", "").strip()
    if raw:
        return parse_archs(raw), "PYLLMC_CUDA_ARCH"
    visible = [a for a in visible_gpu_archs() if int(a) >= MIN_ARCH]
    if visible:
        return visible[:-1] + [visible[-1] + "+PTX"], "the GPU(s) visible at build time (nvidia-smi)"
    return parse_archs(DEFAULT_ARCHS), "no GPU visible at build time: the default list"


def gencode_flags(archs: List[str]) -> List[str]:
    """nvcc's -gencode pairs: SASS for each arch, plus its PTX where the arch says +PTX."""
    flags = []
    for arch in archs:
        base = arch[:-4] if arch.endswith("+PTX") else arch
        code = f"[sm_{base},compute_{base}]" if arch.endswith("+PTX") else f"sm_{base}"
        flags += ["-gencode", f"arch=compute_{base},code={code}"]
    return flags


def nvcc_flags(csrc: Path, archs: List[str]) -> List[str]:
    """nvcc's flags for every csrc/*.cu (before -c / -cubin, the source and -o), for the given
    compute capabilities; PYLLMC_NVCC_FLAGS is appended."""
    return [
        "-O3", "-std=c++17", "-lineinfo",  # no --use_fast_math: it turns tanhf into tanh.approx (2^-11)
        "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        "--expt-relaxed-constexpr", "-I", str(csrc),
        *gencode_flags(archs),
        *shlex.split(os.environ.get("PYLLMC_NVCC_FLAGS", "")),
    ]
