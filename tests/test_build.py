"""The install built what it should: pyllmc._C wherever nvcc was available, and the
extension answers sensibly on a machine without a GPU."""

import os

import pytest
import torch

import pyllmc


def nvcc_available() -> bool:
    """The same search setup.py does."""
    from pyllmc._toolchain import find_cuda_home

    return find_cuda_home() is not None


@pytest.mark.skipif(os.environ.get("PYLLMC_NO_CUDA") == "1", reason="PYLLMC_NO_CUDA=1: a pure-Python install was asked for")
def test_extension_built_when_nvcc_present():
    if not nvcc_available():
        pytest.skip("no nvcc on this machine: the pure-Python install is expected")
    # Fails when the install silently fell back to pure Python although nvcc was there.
    from pyllmc import _C

    launchers = ("gelu_forward", "gelu_backward", "layernorm_forward", "layernorm_backward",
                 "fused_residual_layernorm_forward", "fused_residual_layernorm_backward",
                 "cross_entropy_forward", "cross_entropy_backward", "cross_entropy_fused_forward_backward",
                 "attention_forward", "attention_backward", "adamw_step")
    for name in launchers + ("device_count", "device_error", "cuda_runtime_version"):
        assert hasattr(_C, name), f"pyllmc._C lacks {name}"
    assert _C.cuda_runtime_version() >= 11000


def test_extension_reports_no_gpu(monkeypatch):
    """Without a GPU the extension imports, counts 0 devices, and the cuda backend (the real
    one: the simulator switched off) says why."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    try:
        from pyllmc import _C
    except ImportError:
        pytest.skip("pyllmc._C not built on this machine")
    assert _C.device_count() == 0
    assert _C.device_error() != ""
    from pyllmc import backends

    monkeypatch.setenv("PYLLMC_CUDA_SIM", "0")
    monkeypatch.setattr(backends, "_probe_cache", {})
    status = pyllmc.available_backends()["cuda"]
    assert not status.available
    assert "no CUDA GPU is visible" in status.reason
    with pytest.raises(pyllmc.BackendUnavailableError, match="no CUDA GPU is visible"):
        pyllmc.ops.gelu(torch.randn(8), backend="cuda")


def test_extension_sees_the_gpu(on_gpu_only):
    from pyllmc import _C

    assert _C.device_count() >= 1
    assert pyllmc.available_backends()["cuda"].available


def test_kernels_installed_as_subpackage():
    pytest.importorskip("triton")
    import pyllmc.kernels.gelu as k

    assert callable(k.gelu_forward) and callable(k.gelu_backward)
