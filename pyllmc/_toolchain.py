"""Where the CUDA toolkit is and how csrc/ is compiled: shared by setup.py (which loads this
file by path, without importing pyllmc or torch), the CUDA simulator's build (pyllmc.cuda_sim)
and the ptxas report (dev/ptxas_report.py), so the report reads the very code the build ships."""

import os
import shlex
import shutil
from pathlib import Path
from typing import List, Optional


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


def parse_archs(raw: str) -> List[str]:
    """Compute capabilities from e.g. "80;90", "8.0,9.0" or "90a" -> ["80", "90"] / ["90a"]."""
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("a").isdigit():
            raise ValueError(f"cannot read {a!r} as a compute capability (expected e.g. '80;90' or '90a')")
    return archs


def nvcc_flags(csrc: Path, archs: List[str]) -> List[str]:
    """nvcc's flags for every csrc/*.cu (before -c / -cubin, the source and -o), for the given
    compute capabilities; PYLLMC_NVCC_FLAGS is appended."""
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return [
        "-O3", "-std=c++17", "-lineinfo",  # no --use_fast_math: it turns tanhf into tanh.approx (2^-11)
        "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        "--expt-relaxed-constexpr", "-I", str(csrc),
        *gencode,
        *shlex.split(os.environ.get("PYLLMC_NVCC_FLAGS", "")),
    ]
