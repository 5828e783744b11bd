"""What every op module shares: input checks, the dtype codes of the CUDA extension,
the current stream, and lazy access to the two kernel layers.

Every check raises ValueError naming the argument and what was expected, so a bad call
fails in Python before any kernel sees it.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterable, Iterator, Optional

import torch

from pyllmc import backends as _backends

# Must match csrc/common.cuh (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLOAT_DTYPES = tuple(DTYPE_CODES)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise ValueError unless `t` is a tensor of an allowed dtype / rank / layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {_dtype_names(dtypes)}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims; got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); "
                         f"call .contiguous() first")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             f"all inputs must be on one device")
    return first.device


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
    return first.dtype


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend for this call; ValueError for a device the backend can't take."""
    return _backends.resolve(backend, device)


def cuda_ext():
    """The module with the CUDA launchers: pyllmc._C, or pyllmc._C_sim when the cuda backend
    is simulated (the caller has checked the cuda backend is available)."""
    return _backends.cuda_extension()


def triton_kernels(module: str):
    """pyllmc.kernels.<module>, imported on first use so that importing pyllmc never needs triton."""
    return importlib.import_module(f"pyllmc.kernels.{module}")


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


@contextlib.contextmanager
def cuda_launch(t: torch.Tensor) -> Iterator[int]:
    """Around a cuda-backend launch for tensors on t's device: makes that device current and
    yields the raw cudaStream_t of torch's current stream there. On the CPU simulator (CPU
    tensors) there is no device to select and every launch is synchronous: stream 0."""
    if t.device.type == "cpu":
        yield 0
        return
    with torch.cuda.device(t.device):
        yield torch.cuda.current_stream(t.device).cuda_stream


@contextlib.contextmanager
def triton_launch(t: torch.Tensor) -> Iterator[None]:
    """Around a triton-backend launch for tensors on t's device: makes that device current.
    Triton launches on the current device and its current stream whatever the tensors' device,
    so without this a model on cuda:1 (no torch.cuda.set_device) would run its kernels on
    cuda:0 over cuda:1's addresses. CPU tensors (the interpreter): nothing to select."""
    if t.device.type != "cuda":
        yield
        return
    with torch.cuda.device(t.device):
        yield


def graph_capture_underway() -> bool:
    """Whether the current CUDA stream is capturing a graph: then nothing may wait for the
    device (.item(), a copy from pageable memory, pin_memory's allocation)."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a torch built without CUDA: nothing can capture
        return False


_sm_counts: dict = {}


def multiprocessor_count(device: torch.device) -> int:
    """SMs of the GPU behind `device` (the simulated GPU's for CPU tensors), cached."""
    if device.type == "cpu":
        return _backends.cuda_sim.multiprocessor_count()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def dense_in_storage(t: torch.Tensor) -> bool:
    """Whether t's elements fill one dense block of memory, in any order: no overlap, no gaps
    (contiguous tensors, and permutations of them, e.g. a transposed matrix). An elementwise
    kernel can then run over the block flat, from t.data_ptr(), for t.numel() elements."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b have one shape and put each element at the same offset from their data
    pointers (strides equal on every dim longer than 1)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


def storage_flat(t: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a dense_in_storage tensor's elements in memory order (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """`t`, or an aligned copy when its data pointer is not 16-byte aligned.

    The CUDA kernels use 128-bit loads; a view with an odd storage offset would fault.
    Fresh torch allocations are always aligned, so this copies only for such views.
    """
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)
