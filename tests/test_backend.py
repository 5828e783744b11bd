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


# ---- choosing honestly on GPUs the build does not fit (the device API patched: no GPU here) ----------

class FakeExtension:
    """What pyllmc._C answers on a machine with a GPU, as the patched cases need."""

    def __init__(self, devices=1, image_error="", error_name="", error="", driver=13000, built="80;90+PTX"):
        self.devices, self.image_error, self.error_name, self.error = devices, image_error, error_name, error
        self.driver, self.built = driver, built

    def device_count(self):
        return self.devices

    def device_error(self):
        return self.error

    def device_error_name(self):
        return self.error_name

    def cuda_driver_version(self):
        return self.driver

    def cuda_runtime_version(self):
        return 13000

    def built_archs(self):
        return self.built

    def kernel_image_error(self):
        return self.image_error


@pytest.fixture
def gpu_machine(monkeypatch):
    """Patch the probes as a machine whose torch sees a GPU of compute capability `capability` would."""
    def install(ext, capability=(9, 0)):
        monkeypatch.setattr(backend_mod.cuda_sim, "enabled", lambda: False)
        monkeypatch.setattr(backend_mod, "_extension", lambda: (ext, ""))
        monkeypatch.setattr(backend_mod, "_triton", lambda: (True, ""))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(backend_mod, "_probe_cache", {})

    return install


def test_a_gpu_the_build_has_no_kernel_for_falls_back_with_the_rebuild_command(gpu_machine):
    """B200 / RTX 5090 with a build that has neither their SASS nor PTX: the first op would raise
    "no kernel image is available"; the backend chooser says so up front, and auto uses triton."""
    gpu_machine(FakeExtension(image_error="cudaErrorNoKernelImageForDevice: no kernel image is available for "
                                          "execution on the device", built="80;90"), capability=(12, 0))
    with pytest.warns(RuntimeWarning, match="cuda backend cannot run here .*'auto' uses triton") as warned:
        status = backend_mod.backend_status("cuda")
    assert len(warned) == 1 and "\n" not in str(warned[0].message)
    assert not status.available
    assert "compute capability 12.0" in status.reason and "built for 80;90" in status.reason
    assert "PYLLMC_CUDA_ARCH=120 pip install" in status.reason and "NoKernelImage" in status.reason
    assert pyllmc.default_backend("cuda") == "triton"
    with pytest.raises(pyllmc.BackendUnavailableError, match="PYLLMC_CUDA_ARCH=120"):
        backend_mod.require_backend("cuda")


def test_a_driver_older_than_the_runtime_is_named(gpu_machine):
    """The runtime is linked statically: a CUDA 13 build on a driver for CUDA 12.8 sees no device while
    torch (with its own, older runtime) does. The reason names the driver, not 'no GPU'."""
    gpu_machine(FakeExtension(devices=0, error_name="cudaErrorInsufficientDriver", driver=12080,
                              error="CUDA driver version is insufficient for CUDA runtime version"))
    with pytest.warns(RuntimeWarning, match="older than the CUDA 13.0 runtime"):
        status = backend_mod.backend_status("cuda")
    assert not status.available
    assert "NVIDIA driver (supports CUDA 12.8) is older than the CUDA 13.0 runtime" in status.reason
    assert "update the driver" in status.reason and "no CUDA GPU is visible" not in status.reason
    assert pyllmc.default_backend("cuda") == "triton"


def test_a_gpu_the_build_fits_is_chosen_without_a_word(gpu_machine, recwarn):
    gpu_machine(FakeExtension())
    assert backend_mod.backend_status("cuda") == (True, "", False)
    assert pyllmc.default_backend("cuda") == "cuda"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_the_extension_probes_its_own_kernel_image():
    """The probe runs a real launch (on the simulator here): '' where the kernels can run."""
    status = pyllmc.available_backends()["cuda"]
    if not status.available:
        pytest.skip(f"the cuda backend is unavailable here: {status.reason}")
    ext = backend_mod.cuda_extension()
    assert ext.kernel_image_error() == ""
    assert ext.cuda_driver_version() >= 11000 and ext.device_error_name() == ""
