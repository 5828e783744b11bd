"""The CUDA kernels on every GPU they are built for, on the CPU simulator.

The simulator answers for one GPU at a time (pyllmc.cuda_sim.DEVICES: sm_75 ... sm_120, the
shared-memory limits and compute capability of NVIDIA's "Technical Specifications per Compute
Capability"); the other [cuda] tests run as sm_90. Here the shared-memory-heavy kernels run
again as the 99 KB GPUs (sm_86: RTX 3090 / A10, also sm_89 and sm_120) and the A100 (sm_80,
163 KB), against PyTorch autograd as tests/test_attention.py and tests/test_layernorm.py
compare them; every launch is checked against every GPU's limit; and sm_75 (T4, no bf16
tensor cores) refuses bf16/fp16 attention with a clear error while everything else runs.
"""

import os
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path

import pytest
import torch

import cuda_driver
import ptxas_report
from pyllmc import cuda_sim, ops, testing
from pyllmc.testing import assert_ok
from test_attention import check_against_reference, random_qkv
from test_cuda_sim import sim

ROOT = Path(__file__).resolve().parent.parent

# cudaDeviceAttr values (driver_types.h)
ATTR = {"max_threads_per_block": 1, "smem_per_block": 8, "regs_per_block": 12, "max_threads_per_sm": 39,
        "cc_major": 75, "cc_minor": 76, "smem_per_sm": 81, "regs_per_sm": 82, "smem_per_block_optin": 97}

# bytes of dynamic shared memory the bf16/fp16 dQ kernel takes at D = 128 (attention.cu's design note)
DQ_SMEM_64_KEYS = (2 * 64 + 4 * 64) * 136 * 2  # 104,448: the fast tiles
DQ_SMEM_32_KEYS = (2 * 64 + 4 * 32) * 136 * 2  # 69,632: on the 99 KB GPUs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def launches_of(name):
    return [launch for launch in cuda_sim.launches() if launch["name"] == name]


# ---- the profiles themselves ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(cuda_sim.DEVICES))
def test_the_runtime_answers_for_the_profile(name):
    m = sim()
    capability, optin, _ = cuda_sim.DEVICES[name]
    with cuda_sim.device_profile(name) as info:
        assert info["name"] == name and info["compute_capability"] == capability
        assert m.sim_device_attribute(ATTR["smem_per_block_optin"]) == optin
        assert m.sim_device_attribute(ATTR["smem_per_block"]) == 48 * 1024
        assert (m.sim_device_attribute(ATTR["cc_major"]), m.sim_device_attribute(ATTR["cc_minor"])) == capability
        assert m.sim_device_attribute(ATTR["max_threads_per_block"]) == 1024
        assert m.sim_device_attribute(ATTR["regs_per_block"]) == m.sim_device_attribute(ATTR["regs_per_sm"]) == 65536
        # opt-in is the SM's shared memory less the 1 KB the driver keeps per block (none on 7.5)
        assert m.sim_device_attribute(ATTR["smem_per_sm"]) - optin == (0 if capability < (8, 0) else 1024)
        assert m.sim_device_attribute(ATTR["max_threads_per_sm"]) in (1024, 1536, 2048)
    assert cuda_sim.device()["name"] == cuda_sim.device_name_from_env(), "the previous device is back"


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown simulated device 'sm_70': expected one of sm_75, sm_80, .*sm_120"):
        cuda_sim.check_device_name("sm_70")
    m = sim()
    with pytest.raises(ValueError, match="unknown simulated device 'sm_70'"):
        with cuda_sim.device_profile("sm_70"):
            pass
    with pytest.raises(ValueError, match=r"unknown simulated device h100; known: sm_75, sm_80, sm_86"):
        m.sim_set_device("h100")  # the C++ side refuses too
    assert cuda_sim.device()["name"] == cuda_sim.device_name_from_env()


def test_the_environment_variable_selects_the_device():
    sim()  # built: the subprocesses only load it
    code = "from pyllmc import cuda_sim; print(cuda_sim.load().sim_device()['name'])"
    env = dict(os.environ, PYLLMC_CUDA_SIM="1", PYLLMC_CUDA_SIM_DEVICE="sm_86")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "sm_86", done.stderr[-2000:]
    env["PYLLMC_CUDA_SIM_DEVICE"] = "sm_99"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "PYLLMC_CUDA_SIM_DEVICE: unknown simulated device 'sm_99': expected one of sm_75" in done.stderr


# ---- the shared-memory-heavy kernels under the 99 KB and 163 KB GPUs ---------------------------------

@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("profile", ["sm_86", "sm_80"])
def test_attention_under_profile(profile, dtype, head_dim):
    sim()
    shape = (1, 2, 130, head_dim)  # two query tiles, a tail, the diagonal crossing key tiles
    with cuda_sim.device_profile(profile) as info:
        q, k, v = random_qkv(shape, "cpu", DTYPES[dtype])
        dout = torch.randn(shape).to(DTYPES[dtype])
        cuda_sim.reset_stats()
        check_against_reference("cuda", q, k, v, dout, f" ({profile})")
        assert all(launch["smem"] <= info["smem_per_block_optin"] for launch in cuda_sim.launches())


@pytest.mark.parametrize("profile", ["sm_86", "sm_80"])
def test_grouped_query_attention_under_profile(profile):
    """GQA (4 query heads on 2 kv heads) at D = 128: the 99 KB GPU's 32-key dQ tiles and the 163 KB one's
    64-key tiles both read the shared kv head; the dK/dV kernel sums each group across query tiles."""
    sim()
    B, H, H_kv, T, D = 1, 4, 2, 130, 128
    with cuda_sim.device_profile(profile) as info:
        q = torch.randn(B, H, T, D).to(torch.bfloat16).requires_grad_(True)
        k, v = (torch.randn(B, H_kv, T, D).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
        cuda_sim.reset_stats()
        check_against_reference("cuda", q, k, v, torch.randn(B, H, T, D).to(torch.bfloat16), f" (GQA, {profile})")
        assert all(launch["smem"] <= info["smem_per_block_optin"] for launch in cuda_sim.launches())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("profile", ["sm_86", "sm_80"])
def test_layernorm_backward_under_profile(profile, dtype):
    sim()
    with cuda_sim.device_profile(profile):
        for shape in ((37, 1600), (5, 3072)):  # the largest rows of the register kernel (24 KiB of partial sums)
            case = testing.layernorm_case(shape, DTYPES[dtype], "cpu")
            case.check(case.run("cuda"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("profile", ["sm_86", "sm_75"])
def test_rmsnorm_backward_under_profile(profile, dtype):
    """RMSNorm's backward (its (C,) floats of partial sums, its groups of lanes) on a 99 KB GPU and
    on the T4, at its largest register row and at QK-norm's head dim."""
    sim()
    with cuda_sim.device_profile(profile):
        for shape, weight in (((5, 3072), True), ((37, 64), True), ((37, 128), False)):
            case = testing.rmsnorm_case(shape, DTYPES[dtype], "cpu", fused=True, weight=weight)
            case.check(case.run("cuda"))


def test_dq_tiles_fit_the_99kb_gpus_and_stay_fast_elsewhere():
    """At D = 128 the fast dQ tiles need 104,448 B: more than sm_86 / sm_89 / sm_120 allow. There the
    launcher takes 32-key tiles; where the fast ones fit, it keeps them."""
    sim()
    shape = (1, 1, 100, 128)
    q, k, v = random_qkv(shape, "cpu", torch.bfloat16)
    chosen, names = {}, {}
    for name, (_, optin, _) in cuda_sim.DEVICES.items():
        if name == "sm_75":
            continue
        with cuda_sim.device_profile(name):
            cuda_sim.reset_stats()
            ops.attention(q, k, v, backend="cuda").backward(torch.randn(shape).to(torch.bfloat16))
            dq = cuda_sim.launches()[-1]  # the backward's last launch
            chosen[name], names[name] = dq["smem"], dq["name"]
            assert dq["smem"] <= optin
        q.grad = k.grad = v.grad = None
    assert chosen == {"sm_80": DQ_SMEM_64_KEYS, "sm_86": DQ_SMEM_32_KEYS, "sm_89": DQ_SMEM_32_KEYS,
                      "sm_90": DQ_SMEM_64_KEYS, "sm_100": DQ_SMEM_64_KEYS, "sm_120": DQ_SMEM_32_KEYS}
    assert set(names.values()) == {"dq_kernel"}


@pytest.mark.parametrize("profile", ["sm_86", "sm_90"])
def test_ptxas_reports_launch_smem_as_the_launchers_give_it(profile):
    """dev/ptxas_ptxas_report.py checks static + launch-time shared memory per architecture from its own
    copy of the tile formulas: they must be what the launchers really ask for."""
    sim()
    arch = profile.removeprefix("sm_")
    assert ptxas_report.SMEM_OPTIN[arch] == cuda_sim.DEVICES[profile][1]
    for dtype, elem in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for d in (64, 128):
            q, k, v = random_qkv((1, 1, 1, d), "cpu", dtype)
            with cuda_sim.device_profile(profile):
                cuda_sim.reset_stats()
                ops.attention(q, k, v, backend="cuda").backward(torch.ones(1, 1, 1, d).to(dtype))
            (fwd,), (dkdv,), (dq,) = (launches_of(n) for n in ("forward_kernel", "dkdv_kernel", "dq_kernel"))
            assert fwd["smem"] == ptxas_report.dynamic_smem(f"attention_forward_tc_kernel<{elem}, {d}>")
            assert dkdv["smem"] == ptxas_report.dynamic_smem(f"attention_backward_dkdv_tc_kernel<{elem}, {d}>")
            used = [f"attention_backward_dq_tc_kernel<{elem}, {d}, {keys}>" for keys in (64, 32)
                    if ptxas_report.launched_on(f"attention_backward_dq_tc_kernel<{elem}, {d}, {keys}>", arch)]
            assert len(used) == 1 and dq["smem"] == ptxas_report.dynamic_smem(used[0])


@pytest.mark.parametrize("name", [n for n in cuda_sim.DEVICES if n != "sm_75"])
def test_every_launch_fits_every_gpu(name):
    """Every launcher (dev/cuda_driver.py's cases at their smallest, where the shared memory is the
    same as at any size) runs on each GPU, and each launch stays within its shared-memory limit."""
    sim()
    small = [c for c in cuda_driver.all_cases()
             if ("attention" in c.name and "T=1 " in c.name) or ("layernorm" in c.name and "C=1600" in c.name)
             or ("rmsnorm" in c.name and "C=768" in c.name) or c.name.startswith("swiglu packed 5x64")
             or c.name.startswith("rope packed")]
    small += [cuda_driver.Case("attention B=1 H=1 T=1 D=128 bf16", torch.bfloat16,
                               partial(testing.attention_case, (1, 1, 1, 128)))]
    assert len(small) >= 8
    with cuda_sim.device_profile(name) as info:
        cuda_sim.reset_stats()
        for case in small:
            case.op_case(torch.device("cpu"), seed=0).run("cuda")
        seen = cuda_sim.launches()
    assert {"forward_kernel", "dkdv_kernel", "dq_kernel"} <= {launch["name"] for launch in seen}
    too_big = [launch for launch in seen if launch["smem"] > info["smem_per_block_optin"]]
    assert not too_big, too_big


# ---- sm_75: no bf16 tensor cores -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_sm75_refuses_16_bit_attention_clearly(dtype):
    sim()
    q, k, v = random_qkv((1, 2, 20, 64), "cpu", DTYPES[dtype], requires_grad=False)
    with cuda_sim.device_profile("sm_75"):
        cuda_sim.reset_stats()
        with pytest.raises(ValueError, match=r"q: attention in (bfloat16|float16) on backend 'cuda' needs compute "
                                             r"capability 8\.0\+ \(mma\.sync, cp\.async, ldmatrix\); this GPU is "
                                             r"7\.5: use float32, or the triton/torch backend"):
            ops.attention(q, k, v, backend="cuda")
        # the launcher itself refuses too (the custom op skips the ops layer's check), before any launch
        with pytest.raises(ValueError, match=r"attention_forward: attention in bfloat16/float16 needs compute "
                                             r"capability 8\.0\+ .*this GPU is 7\.5"):
            torch.ops.pyllmc.attention_forward(q, k, v, "cuda")
        assert cuda_sim.launches() == []


def test_sm75_runs_float32_attention_and_every_other_op():
    sim()
    cases = [c for c in cuda_driver.all_cases() if "50257" not in c.name and "8200" not in c.name
             and c.dtype != torch.float16 and ("attention" not in c.name or c.dtype == torch.float32)]
    assert {c.name.split()[0] for c in cases} == {"gelu", "layernorm", "fused_residual_layernorm", "cross_entropy",
                                                  "attention", "adamw", "rmsnorm", "fused_residual_rmsnorm",
                                                  "swiglu", "relu2", "rope"}
    with cuda_sim.device_profile("sm_75"):
        for index, case in enumerate(cases):
            op_case = case.op_case(torch.device("cpu"), seed=index)
            assert_ok(op_case.compare(op_case.run("cuda")), f"{case.name}: ")
        q, k, v = random_qkv((1, 2, 70, 64), "cpu", torch.float32)
        check_against_reference("cuda", q, k, v, torch.randn(1, 2, 70, 64), " (sm_75)")


# ---- the kernels' sources in an installed package ------------------------------------------------

def test_sources_are_found_inside_an_installed_package(tmp_path, monkeypatch):
    """An installed pyllmc carries csrc/ as package data (pyllmc/csrc); without PYLLMC_CSRC the
    simulator builds from there, and says where it looked when they are missing."""
    monkeypatch.delenv("PYLLMC_CSRC", raising=False)
    package = tmp_path / "site-packages" / "pyllmc"
    (package / "csrc" / "sim").mkdir(parents=True)
    with pytest.raises(cuda_sim.BuildError, match=r"sources were not found \(looked in .*pyllmc/csrc"):
        cuda_sim.source_dir(package)
    (package / "csrc" / "sim" / "cuda_sim.h").write_text("// stand-in\n")
    assert cuda_sim.source_dir(package) == package / "csrc"
    # a source checkout: csrc/ beside the package folder
    assert cuda_sim.source_dir(ROOT / "pyllmc") == ROOT / "csrc"


def test_package_data_ships_every_source_the_simulator_builds():
    """pyproject.toml's package data for pyllmc.csrc matches every file cuda_sim.build reads."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["pyllmc.csrc"] == "csrc"
    assert "pyllmc.csrc" in config["packages"] and "pyllmc.csrc.sim" in config["packages"]
    data = config["package-data"]
    needed = {p.relative_to(ROOT / "csrc") for pattern in ("*.cu", "*.cuh", "*.cpp", "*.h", "sim/*")
              for p in (ROOT / "csrc").glob(pattern) if p.is_file()}
    shipped = {p.relative_to(ROOT / "csrc") for p in (ROOT / "csrc").glob("*") if p.is_file()
               and any(p.match(g) for g in data["pyllmc.csrc"])}
    shipped |= {p.relative_to(ROOT / "csrc") for p in (ROOT / "csrc" / "sim").glob("*")
                if any(p.match(g) for g in data["pyllmc.csrc.sim"])}
    assert needed and needed <= shipped, sorted(map(str, needed - shipped))
