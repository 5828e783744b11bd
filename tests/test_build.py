"""The install built what it should: pyllmc._C wherever nvcc was available, and the
extension answers sensibly on a machine without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyllmc

ROOT = Path(__file__).resolve().parents[1]


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


def run_from_repository_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c code` with the repository root as the working directory, as a user runs the trainer
    (`python -c` puts the working directory first on sys.path; PYTHONPATH entries come after it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_checkout_kernels_never_shadow_a_top_level_kernels(tmp_path):
    """The checkout's kernels/ loses to any regular top-level `kernels` later on sys.path (Hugging Face's
    `kernels`, which transformers imports, is one), and pyllmc.kernels is still ours."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    code = ("import json, sys, kernels, pyllmc.kernels.gelu as ours\n"
            f"print(json.dumps(dict(root_first=sys.path.index('') < sys.path.index({str(site)!r}), "
            "kernels=kernels.__file__, stand_in=getattr(kernels, 'STAND_IN', False), ours=ours.__file__, "
            "ours_callable=callable(ours.gelu_forward))))")
    result = run_from_repository_root(code, extra_path=site)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["root_first"], "the repository root must come first on sys.path for this test to mean anything"
    assert seen["stand_in"] and Path(seen["kernels"]) == site / "kernels" / "__init__.py", seen
    assert Path(seen["ours"]).name == "gelu.py" and Path(seen["ours"]).parent.name == "kernels", seen
    assert Path(seen["ours"]).parent != site / "kernels" and seen["ours_callable"], seen


def test_transformers_builds_a_gpt2_from_the_repository_root():
    """From the repository root, where the README runs the trainer, transformers' own `import kernels`
    (Hugging Face's package, when installed) must not find the checkout's kernels/."""
    pytest.importorskip("transformers")
    code = ("from transformers import GPT2Config, GPT2LMHeadModel\n"
            "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))\n"
            "print('parameters', sum(p.numel() for p in model.parameters()))")
    result = run_from_repository_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["parameters", str(1 * (12 * 32 * 32 + 13 * 32) + 2 * 32 + 50257 * 32
                                                             + 1024 * 32)]


# ---- which GPUs the build covers ----------------------------------------------------------------------

def _toolchain():
    from pyllmc import _toolchain

    return _toolchain


def test_arch_lists_take_ptx_and_refuse_what_cannot_build():
    t = _toolchain()
    assert t.parse_archs("80;90+PTX") == ["80", "90+PTX"]
    assert t.parse_archs("8.0, 12.0+ptx") == ["80", "120+PTX"]
    assert t.gencode_flags(["80", "90+PTX"]) == ["-gencode", "arch=compute_80,code=sm_80",
                                                 "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
    for bad, message in (("70", "below 7.5"), ("sm90", "cannot read"), ("90+SASS", "cannot read")):
        with pytest.raises(ValueError, match=message):
            t.parse_archs(bad)


def _fake_nvidia_smi(tmp_path, output: str, rc: int = 0) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {rc}\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_the_build_targets_the_visible_gpu_else_a_list_that_runs_everywhere(tmp_path, monkeypatch):
    """A GPU visible at build time gets its own SASS (+ PTX for newer GPUs); without one, the default list
    has sm_80 and sm_90 SASS and sm_90 PTX, which sm_100 and sm_120 JIT-compile (no "no kernel image")."""
    t = _toolchain()
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "12.0\\n12.0\\n")["PATH"])
    assert t.build_archs({}) == (["120+PTX"], "the GPU(s) visible at build time (nvidia-smi)")
    assert t.build_archs({"PYLLMC_CUDA_ARCH": "86"}) == (["86"], "PYLLMC_CUDA_ARCH")
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path / "none", "", rc=9)["PATH"])
    archs, why = t.build_archs({})
    assert archs == ["80", "90+PTX"] and "no GPU visible" in why
    assert any(a.endswith("+PTX") for a in archs), "a build for no particular GPU must carry PTX for newer ones"


@pytest.mark.skipif(os.environ.get("PYLLMC_NO_CUDA") == "1", reason="PYLLMC_NO_CUDA=1: a pure-Python install was asked for")
def test_the_installed_extension_carries_the_ptx_it_says():
    """`cuobjdump --list-ptx` of the installed pyllmc._C lists PTX for every arch its build list marks +PTX."""
    if not nvcc_available():
        pytest.skip("no nvcc on this machine: the pure-Python install is expected")
    from pyllmc import _C, _toolchain

    built = _C.built_archs()
    assert built, "setup.py must record the architectures it built for"
    cuobjdump = _toolchain.find_cuda_home() / "bin" / "cuobjdump"
    if not cuobjdump.exists():  # a minimal toolkit without it: Triton ships NVIDIA's cuobjdump
        triton = pytest.importorskip("triton")
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("no cuobjdump here (neither in the CUDA toolkit nor in Triton's NVIDIA backend)")
    listed = subprocess.run([str(cuobjdump), "--list-ptx", _C.__file__], capture_output=True, text=True, timeout=120)
    for arch in _toolchain.parse_archs(built):
        if arch.endswith("+PTX"):
            assert f"sm_{arch[:-4]}" in listed.stdout, (built, listed.stdout[-2000:], listed.stderr[-2000:])
    if "+PTX" not in built:
        assert "No PTX" in listed.stdout + listed.stderr or not listed.stdout.strip()
