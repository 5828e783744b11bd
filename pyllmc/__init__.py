"""pyllmc: train GPT-2 from Python with hand-written CUDA and Triton kernels."""

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
