"""Build pyllmc, and its CUDA extension pyllmc._C when nvcc is found.

The extension is plain pybind11 + CUDA: the kernels in csrc/*.cu are compiled by nvcc
(in parallel, through a generated ninja file), bindings.cpp by the host C++ compiler,
and the CUDA runtime is linked statically. It never includes a torch header, so it
builds under pip's build isolation and runs beside whatever torch is installed.

Environment variables:
  PYLLMC_CUDA_ARCH   compute capabilities to build for, e.g. "90", "80;90" or "80;90+PTX" (+PTX also
                     embeds that arch's PTX, which newer GPUs JIT-compile). Default: the GPUs visible
                     at build time (nvidia-smi), else "80;90+PTX" (pyllmc/_toolchain.py says why)
  PYLLMC_NO_CUDA=1   skip the extension even when nvcc is found (pure-Python install)
  CUDA_HOME          where the CUDA toolkit lives (else /usr/local/cuda, else nvcc on PATH)
  PYLLMC_NVCC_FLAGS  extra flags appended to every nvcc command
"""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def log(msg):
    # setuptools hides ordinary prints unless pip runs verbose; stderr still shows in
    # pip's output on failure and with -v. Keep the prefix so it is easy to grep.
    print(f"[pyllmc build] {msg}", file=sys.stderr, flush=True)


def _load_toolchain():
    """pyllmc/_toolchain.py, by path: the build must not import pyllmc (nor torch)."""
    spec = importlib.util.spec_from_file_location("_pyllmc_toolchain", ROOT / "pyllmc" / "_toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Shared with the CUDA simulator's build and the ptxas report (one flag list for all).
toolchain = _load_toolchain()
find_cuda_home = toolchain.find_cuda_home


def cuda_archs():
    """(the archs to build for, why), chosen once per build."""
    if not hasattr(cuda_archs, "chosen"):
        try:
            cuda_archs.chosen = toolchain.build_archs()
        except ValueError as err:
            raise SystemExit(f"PYLLMC_CUDA_ARCH: {err}") from None
    return cuda_archs.chosen


def find_ninja():
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:  # the `ninja` PyPI package, a build requirement, ships the binary
        import ninja

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return None


class CudaBuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc, then lets setuptools build and link bindings.cpp."""

    def build_extension(self, ext):
        cuda_home = ext.cuda_home
        nvcc = str(cuda_home / "bin" / "nvcc")
        build_dir = Path(self.build_temp).resolve() / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)

        archs, why = cuda_archs()
        nvcc_flags = toolchain.nvcc_flags(CSRC, archs)
        sources = sorted(CSRC.glob("*.cu"))
        objects = [build_dir / (src.stem + ".o") for src in sources]
        headers = sorted(CSRC.glob("*.cuh"))
        log(f"nvcc {nvcc}, archs {';'.join(archs)} ({why}), {len(sources)} kernel files")
        # the extension reports what it was built for (pyllmc.available_backends() names it)
        ext.define_macros = [*(ext.define_macros or []), ("PYLLMC_CUDA_ARCHS", f'"{";".join(archs)}"')]

        ninja = find_ninja()
        if ninja:
            self._compile_with_ninja(ninja, nvcc, nvcc_flags, sources, objects, headers, build_dir)
        else:
            log("ninja not found: compiling the kernels one after another")
            for src, obj in zip(sources, objects):
                self._run([nvcc, *nvcc_flags, "-c", str(src), "-o", str(obj)])

        ext.extra_objects = [str(o) for o in objects]
        super().build_extension(ext)

    def _compile_with_ninja(self, ninja, nvcc, flags, sources, objects, headers, build_dir):
        q = shlex.quote
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {q(nvcc)}",
            f"flags = {' '.join(q(f) for f in flags)}",
            "rule nvcc",
            "  command = $nvcc $flags -c $in -o $out",
            "  description = nvcc $in",
            "",
        ]
        implicit = " ".join(q(str(h)) for h in headers)
        for src, obj in zip(sources, objects):
            lines.append(f"build {q(str(obj))}: nvcc {q(str(src))} | {implicit}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        self._run([ninja, "-C", str(build_dir), "-j", jobs])

    @staticmethod
    def _run(cmd):
        log(" ".join(cmd[:3]) + (" ..." if len(cmd) > 3 else ""))
        subprocess.run(cmd, check=True)


def extensions():
    if os.environ.get("PYLLMC_NO_CUDA") == "1":
        log("PYLLMC_NO_CUDA=1: building pyllmc without the CUDA extension (triton and torch backends only)")
        return []
    cuda_home = find_cuda_home()
    if cuda_home is None:
        log("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): building pyllmc WITHOUT the CUDA "
            "extension pyllmc._C; the 'triton' and 'torch' backends still work")
        return []
    import pybind11

    lib_dirs = [d for d in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib")
                if (d / "libcudart_static.a").exists()]
    if not lib_dirs:
        raise SystemExit(f"found nvcc under {cuda_home} but no libcudart_static.a beside it")
    ext = Extension(
        "pyllmc._C",
        sources=[str(CSRC.relative_to(ROOT) / "bindings.cpp")],
        include_dirs=[pybind11.get_include(), str(CSRC), str(cuda_home / "include")],
        library_dirs=[str(d) for d in lib_dirs],
        # Static runtime: the .so depends only on the driver (libcuda, loaded at run time).
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
        language="c++",
    )
    ext.cuda_home = cuda_home
    log(f"building the CUDA extension pyllmc._C with {cuda_home}/bin/nvcc")
    return [ext]


setup(ext_modules=extensions(), cmdclass={"build_ext": CudaBuildExt})
