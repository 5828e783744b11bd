"""pyllmc: train GPT-2 from Python with hand-written CUDA and Triton kernels."""

import importlib.machinery as _importlib_machinery
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _link_source_checkout() -> None:
    """Make a source checkout importable as the installed package is.

    Installed, pyllmc/ holds kernels/ (the Triton kernels) and _C (the compiled extension).
    Imported from a checkout instead (the repository root on sys.path, as with
    `python train_gpt2.py` run there), kernels/ sits beside pyllmc/, and _C was built into
    the installed copy by `pip install .`: point pyllmc.kernels at the checkout's kernels/,
    and let `from pyllmc import _C` find an installed build.

    kernels/ has no __init__.py, so pyllmc.kernels is a namespace package in both layouts,
    and the checkout's top-level kernels/ can never shadow another top-level `kernels`
    package (kernels/README.md says why that matters).
    """
    here = _Path(__file__).resolve().parent
    if (here / "kernels").is_dir():
        return  # the installed layout
    source_kernels = here.parent / "kernels"
    if "pyllmc.kernels" not in _sys.modules and (source_kernels / "_common.py").is_file():
        spec = _importlib_machinery.ModuleSpec("pyllmc.kernels", None, is_package=True)
        spec.submodule_search_locations = [str(source_kernels)]
        _sys.modules["pyllmc.kernels"] = _importlib_util.module_from_spec(spec)
    if not any(here.glob("_C.*")):  # not built in place (pip install -e . builds it here)
        for entry in _sys.path:
            candidate = _Path(entry or ".").resolve() / "pyllmc"
            if candidate != here and any(candidate.glob("_C.*")):
                __path__.append(str(candidate))  # noqa: F821 - the package's own search path
                break


_link_source_checkout()

from . import ops
from . import optim
from .backends import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    backend,
    default_backend,
    get_backend,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "backend",
    "default_backend",
    "get_backend",
    "ops",
]
