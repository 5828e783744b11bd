"""Which implementation runs an op: "cuda" (pyllmc._C), "triton" (pyllmc.kernels) or "torch".

Resolution order for one op call:
  1. the op's ``backend=`` keyword,
  2. the innermost ``with pyllmc.backend(name):`` block (process-wide, like torch.set_default_dtype),
  3. the ``PYLLMC_BACKEND`` environment variable, read once when pyllmc is imported,
  4. "auto": the fastest backend that works for the input's device: "cuda" for CUDA
     tensors when the extension is built, else "triton" for CUDA tensors, else "torch".

Asking for a backend that cannot run here raises ``BackendUnavailableError`` saying why.

torch.compile traces all of this: the `with` block's choice is a module global, which Dynamo
reads and guards on (entering another block recompiles the model, never runs the old choice),
and which backends work here is probed once per process, outside any trace.

With ``PYLLMC_CUDA_SIM=1`` the "cuda" backend runs the same CUDA kernels compiled for the
CPU simulator (pyllmc.cuda_sim) on CPU tensors: how the tests run them without a GPU. It is
reported as ``simulated`` and "auto" never picks it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, NamedTuple, Optional

import torch

from . import cuda_sim

BACKENDS = ("cuda", "triton", "torch")
_AUTO = "auto"

# The innermost `with backend(...)` block's choice (None: no block). A plain module global, not a
# ContextVar: Dynamo cannot trace ContextVar.get, and every op reads this.
_context_backend: Optional[str] = None
# The program-wide default. Read once: Dynamo cannot guard on the environment, so a value read per
# call could change under a compiled model without a recompile.
_ENV_BACKEND = os.environ.get("PYLLMC_BACKEND", "").strip()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run on this machine."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why not, when not available; "" otherwise
    simulated: bool = False  # "cuda" on the CPU simulator (PYLLMC_CUDA_SIM=1): CPU tensors, test speed


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS and name != _AUTO:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKENDS + (_AUTO,)}")
    return name


# Probed once per process. Plain dicts rather than functools.lru_cache, which
# torch.compile would warn about when it traces an op's backend resolution.
_probe_cache: dict = {}


def _extension():
    """(pyllmc._C, or pyllmc._C_sim under PYLLMC_CUDA_SIM=1, or None; why it is missing)."""
    if "cuda" in _probe_cache:
        return _probe_cache["cuda"]
    if cuda_sim.enabled():
        try:
            _probe_cache["cuda"] = (cuda_sim.load(), "")
        except (cuda_sim.BuildError, cuda_sim.RewriteError) as err:
            _probe_cache["cuda"] = (None, f"PYLLMC_CUDA_SIM=1 asks for the CUDA simulator, which cannot be built "
                                          f"here: {err}")
        return _probe_cache["cuda"]
    try:
        from pyllmc import _C  # noqa: F401
    except ImportError as err:
        why = (
            f"the CUDA extension pyllmc._C is not built ({err}); it is built at install time when "
            "nvcc is found (CUDA_HOME, /usr/local/cuda or PATH): reinstall pyllmc on a machine with nvcc"
        )
        _probe_cache["cuda"] = (None, why)
    else:
        _probe_cache["cuda"] = (_C, "")
    return _probe_cache["cuda"]


def _triton():
    if "triton" not in _probe_cache:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            _probe_cache["triton"] = (False, f"Triton is not installed ({err}); pip install triton (Linux only)")
        else:
            _probe_cache["triton"] = (True, "")
    return _probe_cache["triton"]


def triton_interpreter_on() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@torch._dynamo.assume_constant_result
def _status(name: str) -> tuple:
    """(available, reason, simulated, triton interpreter on) of backend `name`, probed once per
    process. Under torch.compile it runs at trace time and its answer is a constant of the graph
    (what works here does not change while a program runs)."""
    key = f"status:{name}"
    if key not in _probe_cache:
        status = _probe_status(name)
        _probe_cache[key] = (status.available, status.reason, status.simulated, triton_interpreter_on())
    return _probe_cache[key]


def _no_gpu_reason() -> str:
    return "no CUDA GPU is visible (torch.cuda.is_available() is False)"


def backend_status(name: str) -> BackendStatus:
    """Whether backend `name` can run here, and if not, why."""
    _check_name(name, "backend_status")
    available, reason, simulated, _ = _status(name)
    return BackendStatus(available, reason, simulated)


def _probe_status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(True, "")
    if name == "triton":
        ok, why = _triton()
        if not ok:
            return BackendStatus(False, why)
        if not torch.cuda.is_available() and not triton_interpreter_on():
            return BackendStatus(False, _no_gpu_reason() + "; Triton kernels run on CPU tensors only "
                                 "under its interpreter (set TRITON_INTERPRET=1 before importing pyllmc)")
        return BackendStatus(True, "")
    # cuda
    ext, why = _extension()
    if ext is None:
        return BackendStatus(False, why)
    if cuda_sim.enabled():
        return BackendStatus(True, "", simulated=True)
    if ext.device_count() == 0:
        status = BackendStatus(False, _no_device_reason(ext))
    elif not torch.cuda.is_available():
        return BackendStatus(False, "the CUDA runtime sees a GPU but this torch has no CUDA support "
                             "(install a CUDA build of torch)")
    else:
        image_error = ext.kernel_image_error()
        if not image_error:
            return BackendStatus(True, "")
        status = BackendStatus(False, _no_image_reason(ext, image_error))
    if torch.cuda.is_available():  # torch uses the GPU, our extension cannot: say so once, not just fall back
        warnings.warn(f"pyllmc: the cuda backend cannot run here ({status.reason}); 'auto' uses triton instead",
                      RuntimeWarning, stacklevel=2)
    return status


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _no_device_reason(ext) -> str:
    """Why the extension's CUDA runtime sees no GPU, in words a user can act on."""
    runtime = ext.device_error() or "no device"
    driver, built = ext.cuda_driver_version(), ext.cuda_runtime_version()
    # with no driver at all the runtime says "insufficient driver" too: only a driver that is there and
    # older than the runtime is the driver's fault
    if ext.device_error_name() == "cudaErrorInsufficientDriver" and 0 < driver < built:
        supports = f"supports CUDA {_cuda_version(driver)}"
        return (f"the NVIDIA driver ({supports}) is older than the CUDA {_cuda_version(built)} runtime pyllmc._C was "
                f"built with: update the driver, or reinstall pyllmc with a CUDA toolkit no newer than the driver "
                f"supports (CUDA_HOME=... pip install .)")
    seen_by_torch = " (torch sees one: the extension's CUDA runtime does not)" if torch.cuda.is_available() else ""
    return f"{_no_gpu_reason()}{seen_by_torch}; the CUDA runtime says: {runtime}"


def _no_image_reason(ext, image_error: str) -> str:
    """Why the extension's kernels cannot launch on this GPU: usually built for other architectures."""
    major, minor = torch.cuda.get_device_capability()
    built = ext.built_archs() or "unknown architectures"
    return (f"pyllmc._C holds no kernel this GPU (compute capability {major}.{minor}) can run: it was built for "
            f"{built} ({image_error}); rebuild for this GPU: PYLLMC_CUDA_ARCH={major}{minor} pip install "
            f"--force-reinstall --no-deps .")


def cuda_extension():
    """The module with the CUDA launchers: pyllmc._C, or pyllmc._C_sim when simulated
    (the caller has checked that the cuda backend is available)."""
    return _extension()[0]


def cuda_simulated() -> bool:
    """True when the cuda backend runs on the CPU simulator."""
    return backend_status("cuda").simulated


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it works here and, if not, why.

    >>> pyllmc.available_backends()
    {'cuda': BackendStatus(available=False, reason='... no CUDA GPU is visible ...'),
     'triton': BackendStatus(available=True, reason=''), 'torch': BackendStatus(available=True, reason='')}
    """
    return {name: backend_status(name) for name in BACKENDS}


def get_backend() -> str:
    """The backend asked for by the innermost `with backend(...)` or PYLLMC_BACKEND, else "auto"."""
    if _context_backend is not None:
        return _context_backend
    if _ENV_BACKEND:
        return _check_name(_ENV_BACKEND, "PYLLMC_BACKEND")
    return _AUTO


def default_backend(device: torch.device | str = "cuda") -> str:
    """What "auto" picks for tensors on `device`: the fastest backend that works there."""
    device = torch.device(device)
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            status = backend_status(name)
            if status.available and not status.simulated:
                return name
    return "torch"


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the ops inside the block on backend `name` ("cuda" | "triton" | "torch" | "auto").

    Raises BackendUnavailableError at once when `name` cannot run here.
    """
    global _context_backend
    _check_name(name, "pyllmc.backend")
    if name != _AUTO:
        require_backend(name)
    previous, _context_backend = _context_backend, name
    try:
        yield name
    finally:
        _context_backend = previous


def require_backend(name: str) -> None:
    status = backend_status(name)
    if not status.available:
        raise BackendUnavailableError(f"pyllmc backend {name!r} cannot run here: {status.reason}")


def resolve(requested: Optional[str], device: torch.device) -> str:
    """The backend one op call runs on, for inputs on `device` (see the module docstring)."""
    name = _check_name(requested, "backend=") if requested is not None else get_backend()
    if name == _AUTO:
        return default_backend(device)
    require_backend(name)
    if name == "cuda" and cuda_simulated():
        if device.type != "cpu":
            raise ValueError(f"backend 'cuda' is simulated on the CPU here (PYLLMC_CUDA_SIM=1): it runs on CPU "
                             f"tensors; the inputs are on {device}")
    elif name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors; the inputs are on {device}")
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _status("triton")[3]):
        raise ValueError(f"backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                         f"the inputs are on {device}")
    return name
