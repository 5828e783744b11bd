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
