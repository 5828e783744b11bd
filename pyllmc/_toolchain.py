"""Where the CUDA toolkit is: shared by setup.py (which loads this file by path, without
importing pyllmc or torch) and the CUDA simulator's build (pyllmc.cuda_sim)."""

import os
import shutil
from pathlib import Path
from typing import Optional


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
