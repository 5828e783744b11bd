"""Backend selection: keyword > `with pyllmc.backend()` > PYLLMC_BACKEND > auto."""

import os
import subprocess
import sys

import pytest
import torch

import pyllmc
from pyllmc import backends as backend_mod


def test_available_backends_reports_every_backend():
    status = pyllmc.available_backends()
    assert list(status) == ["cuda", "triton", "torch"]
    assert status["torch"] == (True, "", False)
    for name, (available, reason, simulated) in status.items():
        assert isinstance(available, bool)
        assert available == (reason == ""), f"{name}: an unavailable backend must say why"
        assert not simulated or (name == "cuda" and available), "only the cuda backend is ever simulated"


def test_auto_picks_torch_for_cpu_tensors():
    assert pyllmc.default_backend("cpu") == "torch"
    assert backend_mod.resolve(None, torch.device("cpu")) == "torch"


def test_auto_on_cuda_prefers_cuda_then_triton():
    status = pyllmc.available_backends()
    real_cuda = status["cuda"].available and not status["cuda"].simulated
    expected = "cuda" if real_cuda else "triton" if status["triton"].available else "torch"
    assert pyllmc.default_backend("cuda") == expected


def test_auto_never_picks_the_simulator():
    """The simulated cuda backend runs only when asked for by name."""
    if not pyllmc.available_backends()["cuda"].simulated:
        pytest.skip("the cuda backend is not simulated here")
    assert pyllmc.default_backend("cpu") == "torch"
    assert backend_mod.resolve(None, torch.device("cpu")) == "torch"
    assert backend_mod.resolve("cuda", torch.device("cpu")) == "cuda"


def test_context_manager_nests_and_restores():
    assert pyllmc.get_backend() in ("auto", "cuda", "triton", "torch")
    before = pyllmc.get_backend()
    with pyllmc.backend("torch"):
        assert pyllmc.get_backend() == "torch"
        with pyllmc.backend("auto"):
            assert pyllmc.get_backend() == "auto"
        assert pyllmc.get_backend() == "torch"
    assert pyllmc.get_backend() == before


def _run_with_env(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh Python: PYLLMC_BACKEND is read when pyllmc is imported."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_keyword_beats_context_beats_env():
    code = ("import torch, pyllmc\n"
            "from pyllmc import backends\n"
            "print(pyllmc.get_backend())\n"
            "with pyllmc.backend('auto'):\n"
            "    print(pyllmc.get_backend())\n"
            "print(backends.resolve(None, torch.device('cpu')), backends.resolve('torch', torch.device('cpu')))\n")
    out = _run_with_env(code, PYLLMC_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "auto", "torch", "torch"]


def test_env_var_is_read_once_at_import(monkeypatch):
    """Changing PYLLMC_BACKEND after import changes nothing (a compiled model could not see it)."""
    before = pyllmc.get_backend()
    monkeypatch.setenv("PYLLMC_BACKEND", "cudnn")
    assert pyllmc.get_backend() == before


def test_env_var_rejects_unknown_name():
    out = _run_with_env("import torch, pyllmc\npyllmc.ops.gelu(torch.randn(3))", PYLLMC_BACKEND="cudnn")
    assert out.returncode != 0
    assert "ValueError: PYLLMC_BACKEND: unknown backend 'cudnn'" in out.stderr


def test_context_is_process_wide_and_nests():
    """`with pyllmc.backend()` sets a process-wide choice (torch.compile can guard on it) and
    restores the outer one on exit, also when the block raises."""
    import threading

    seen = []
    with pyllmc.backend("torch"):
        worker = threading.Thread(target=lambda: seen.append(pyllmc.get_backend()))
        worker.start()
        worker.join()
        with pytest.raises(RuntimeError):
            with pyllmc.backend("auto"):
                raise RuntimeError("inside")
        assert pyllmc.get_backend() == "torch"
    assert seen == ["torch"]


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with pyllmc.backend("tpu"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'CUDA'"):
        pyllmc.ops.gelu(torch.randn(3), backend="CUDA")


def test_unavailable_backend_says_why():
    for name, (available, reason, _) in pyllmc.available_backends().items():
        if available:
            continue
        with pytest.raises(pyllmc.BackendUnavailableError, match=f"pyllmc backend '{name}' cannot run here"):
            with pyllmc.backend(name):
                pass
        with pytest.raises(pyllmc.BackendUnavailableError) as info:
            pyllmc.ops.gelu(torch.randn(3), backend=name)
        assert reason in str(info.value)


def test_context_backend_drives_ops():
    x = torch.randn(5, requires_grad=True)
    with pyllmc.backend("torch"):
        y = pyllmc.ops.gelu(x)
    assert y.grad_fn is not None and "Gelu" in type(y.grad_fn).__name__  # torch's own autograd node
