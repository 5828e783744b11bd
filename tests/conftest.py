"""Shared test setup.

Triton kernels: on a machine without a GPU they run on CPU tensors in Triton's
interpreter. triton.jit picks the interpreter when a kernel is *defined*, so the switch
must be on before pyllmc.kernels is imported: it is set here, at collection, only when
no GPU is visible. It changes nothing but the Triton kernels (the torch backend, the CUDA
extension and torch.compile's CPU code do not read it). On a GPU machine it stays off
and the same tests run the compiled kernels on the GPU.

Random inputs: every test draws fresh inputs from a seed made of the session seed and the
test's id. The session seed is random unless PYLLMC_TEST_SEED is set, and is printed in
the header, so any failure can be replayed exactly.
"""

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SESSION_SEED = int(os.environ.get("PYLLMC_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"pyllmc: PYLLMC_TEST_SEED={SESSION_SEED}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = (SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def kernel_device(backend_name: str) -> torch.device:
    """The device a kernel backend's tests run on, or skip with the reason it can't run."""
    import pyllmc

    status = pyllmc.available_backends()[backend_name]
    if not status.available:
        pytest.skip(f"backend {backend_name!r} unavailable: {status.reason}")
    if backend_name == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")  # triton under the interpreter


@pytest.fixture(params=["cuda", "triton"])
def kernel_backend(request):
    """(backend name, device) for each kernel implementation; skips a backend that can't run."""
    return request.param, kernel_device(request.param)


@pytest.fixture
def on_gpu_only():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
