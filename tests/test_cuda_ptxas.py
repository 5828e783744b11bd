"""What ptxas says about the CUDA kernels, read without a GPU.

dev/ptxas_report.py compiles csrc/*.cu for sm_90 (the H100/H200) with the flags of the real
build and parses `ptxas -v`: registers, spills, stack and static shared memory of every kernel
instance. A register spill compiles and runs correctly, only slower, so no other test sees
it; this one does. The first cold run compiles for about a minute on 2 cores (the logs are
cached, see the report's docstring); the parser itself is tested on captured output.

Every other GPU pyllmc runs on (sm_75, 80, 86, 89, 100, 120) gets the same checks, plus static +
launch-time shared memory against that GPU's limit, for the files whose code differs per
architecture (ptxas_report.PER_ARCH_FILES: attention.cu, with its sm_80 guards and its
per-GPU dQ tiles); the other files' code is the same everywhere, and all of them are checked
for sm_90 (the whole set for every arch: `python dev/ptxas_report.py --arch all --check`).
"""

import pytest

import ptxas_report  # dev/ptxas_report.py (pytest puts dev/ on sys.path)
from pyllmc._toolchain import find_cuda_home

# Every kernel csrc/ launches, by file; the kernels templated on the storage type must
# appear for each dtype they take.
KERNELS = {
    "gelu.cu": ["gelu_forward_kernel", "gelu_backward_kernel"],
    "swiglu.cu": ["swiglu_forward_kernel", "swiglu_backward_kernel", "relu2_forward_kernel", "relu2_backward_kernel"],
    "rope.cu": ["rope_forward_kernel", "rope_backward_kernel"],
    "layernorm.cu": ["layernorm_forward_kernel", "layernorm_backward_kernel", "layernorm_forward_generic_kernel",
                     "layernorm_backward_generic_kernel", "layernorm_reduce_partials_kernel"],
    "rmsnorm.cu": ["rmsnorm_forward_kernel", "rmsnorm_backward_kernel", "rmsnorm_forward_generic_kernel",
                   "rmsnorm_backward_generic_kernel", "rmsnorm_reduce_partials_kernel"],
    "cross_entropy.cu": ["cross_entropy_forward_kernel", "cross_entropy_backward_kernel",
                         "cross_entropy_fused_kernel", "cross_entropy_scale_grad_kernel",
                         "cross_entropy_count_kernel", "cross_entropy_mean_kernel"],
    "attention.cu": ["attention_forward_tc_kernel", "attention_backward_dq_tc_kernel",
                     "attention_backward_dkdv_tc_kernel", "attention_backward_delta_kernel",
                     "attention_forward_fp32_kernel", "attention_backward_dq_fp32_kernel",
                     "attention_backward_dkdv_fp32_kernel"],
    "adamw.cu": ["adamw_kernel"],
}
DTYPES = {
    "gelu_forward_kernel": ("fp32", "bf16", "fp16"),
    "gelu_backward_kernel": ("fp32", "bf16", "fp16"),
    "swiglu_forward_kernel": ("fp32", "bf16", "fp16"),
    "swiglu_backward_kernel": ("fp32", "bf16", "fp16"),
    "relu2_forward_kernel": ("fp32", "bf16", "fp16"),
    "relu2_backward_kernel": ("fp32", "bf16", "fp16"),
    "rope_forward_kernel": ("fp32", "bf16", "fp16"),
    "rope_backward_kernel": ("fp32", "bf16", "fp16"),
    "layernorm_forward_kernel": ("fp32", "bf16", "fp16"),
    "layernorm_backward_kernel": ("fp32", "bf16", "fp16"),
    "rmsnorm_forward_kernel": ("fp32", "bf16", "fp16"),
    "rmsnorm_backward_kernel": ("fp32", "bf16", "fp16"),
    "cross_entropy_fused_kernel": ("fp32", "bf16", "fp16"),
    "attention_forward_tc_kernel": ("bf16", "fp16"),
    "attention_backward_dkdv_tc_kernel": ("bf16", "fp16"),
}

# Captured from `nvcc -cubin -Xptxas -v` (CUDA 13.0, sm_90): a plain entry, one with static
# shared memory, and one that spills (its "Used" line then also gives the stack size).
SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN6pyllmc45_GLOBAL__N__a7d8d062_12_attention_cu_85e9624431attention_backward_dq_tc_kernelI6__halfLi128EEEvPT_PKS3_PKfS8_S6_S6_S6_iff' for 'sm_90'
ptxas info    : Function properties for _ZN6pyllmc45_GLOBAL__N__a7d8d062_12_attention_cu_85e9624431attention_backward_dq_tc_kernelI6__halfLi128EEEvPT_PKS3_PKfS8_S6_S6_S6_iff
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 243 registers, used 1 barriers
ptxas info    : Compile time = 161.859 ms
ptxas info    : Compiling entry function '_ZN6pyllmc49_GLOBAL__N__62b9eba3_16_cross_entropy_cu_6756542926cross_entropy_count_kernelEPfPKxxx' for 'sm_90'
ptxas info    : Function properties for _ZN6pyllmc49_GLOBAL__N__62b9eba3_16_cross_entropy_cu_6756542926cross_entropy_count_kernelEPfPKxxx
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compile time = 5.318 ms
ptxas info    : Compiling entry function '_ZN6pyllmc45_GLOBAL__N__a70eca91_12_layernorm_cu_5e48f78825layernorm_backward_kernelI13__nv_bfloat16Li8ELi8ELb1EEEvPT_PfPKS3_S7_S7_S7_PKfS9_xix' for 'sm_90'
ptxas info    : Function properties for _ZN6pyllmc45_GLOBAL__N__a70eca91_12_layernorm_cu_5e48f78825layernorm_backward_kernelI13__nv_bfloat16Li8ELi8ELb1EEEvPT_PfPKS3_S7_S7_S7_PKfS9_xix
    120 bytes stack frame, 64 bytes spill stores, 116 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 120 bytes cumulative stack size
ptxas info    : Compile time = 309.414 ms
"""


def test_parser_reads_captured_ptxas_output():
    rows = ptxas_report.parse(SAMPLE, "x.cu")
    numbers = [(r["registers"], r["barriers"], r["smem_static"], r["stack_frame"], r["spill_stores"],
                r["spill_loads"]) for r in rows]
    assert numbers == [(243, 1, 0, 0, 0, 0), (14, 1, 128, 0, 0, 0), (255, 1, 0, 120, 64, 116)]
    assert all(r["file"] == "x.cu" and r["arch"] == "sm_90" for r in rows)
    kernels = ["attention_backward_dq_tc_kernel", "cross_entropy_count_kernel", "layernorm_backward_kernel"]
    assert len(rows) == len(kernels) and all(k in r["mangled"] for k, r in zip(kernels, rows))


def test_parser_refuses_an_entry_without_its_numbers():
    truncated = SAMPLE.split("ptxas info    : Used 14 registers")[0]
    with pytest.raises(ValueError, match="cross_entropy_count_kernel"):
        ptxas_report.parse(truncated, "x.cu")


def test_short_names():
    demangled = ("void pyllmc::(anonymous namespace)::layernorm_backward_kernel<__nv_bfloat16, 8, 8, true>"
                 "(__nv_bfloat16*, float*, __nv_bfloat16 const*, float const*, long long, int, long long)")
    assert ptxas_report.short_name(demangled) == "layernorm_backward_kernel<bf16, 8, 8, true>"
    assert ptxas_report.short_name("pyllmc::(anonymous namespace)::adamw_kernel(pyllmc::(anonymous "
                                   "namespace)::AdamWTensor const*, int)") == "adamw_kernel"


@pytest.fixture(scope="module")
def sm90():
    if find_cuda_home() is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): nothing to ask ptxas")
    return ptxas_report.report("90")


def _describe(rows):
    return "\n".join(f"  {r['file']} {r['kernel']}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill "
                     f"loads, {r['stack_frame']} B stack, {r['registers']} registers" for r in rows)


def test_every_kernel_is_reported(sm90):
    base = {(r["file"], r["kernel"].split("<")[0]) for r in sm90}
    missing = [(f, k) for f, names in KERNELS.items() for k in names if (f, k) not in base]
    assert not missing, f"ptxas reported no instance of {missing}"
    for kernel, dtypes in DTYPES.items():
        missing = [d for d in dtypes if not any(r["kernel"].startswith(f"{kernel}<{d}") for r in sm90)]
        assert not missing, f"{kernel}: no instance for {missing}"
    # ~880 today: rmsnorm's 631 (dtype x vector width x chunks or lanes per row x fused x weight) and
    # layernorm's 203 (dtype x vector width x chunk count x fused) are most of them.
    assert 100 <= len(sm90) <= 1500, f"{len(sm90)} kernel instances: the parse or the instantiations went wrong"


def test_registers_and_static_smem_within_limits(sm90):
    too_many = [r for r in sm90 if r["registers"] > 255]
    assert not too_many, f"more than 255 registers: {[(r['kernel'], r['registers']) for r in too_many]}"
    too_big = [r for r in sm90 if r["smem_static"] > 48 * 1024]
    assert not too_big, f"static shared memory over 48 KiB: {[(r['kernel'], r['smem_static']) for r in too_big]}"


def test_no_kernel_instance_spills(sm90):
    spilling = ptxas_report.spills(sm90)
    assert not spilling, f"{len(spilling)} kernel instances spill registers:\n{_describe(spilling)}"


def test_launch_smem_within_the_sm90_limit(sm90):
    too_big = ptxas_report.over_smem_limit(sm90)
    assert not too_big, [(r["kernel"], r["smem_static"], r["smem_dynamic"]) for r in too_big]
    dq = {r["kernel"]: r["launched"] for r in sm90 if r["kernel"].startswith("attention_backward_dq_tc_kernel")}
    assert dq["attention_backward_dq_tc_kernel<bf16, 128, 64>"] and dq["attention_backward_dq_tc_kernel<bf16, 64, 64>"]
    assert not dq["attention_backward_dq_tc_kernel<bf16, 128, 32>"], "sm_90 keeps the fast dQ tiles"


@pytest.fixture(scope="module", params=[a for a in ptxas_report.ARCHS if a != "90"], ids=lambda a: f"sm_{a}")
def other_arch(request):
    if find_cuda_home() is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): nothing to ask ptxas")
    return request.param, ptxas_report.report(request.param, files=ptxas_report.PER_ARCH_FILES)


def test_every_arch_compiles_without_spills_within_its_smem(other_arch):
    arch, rows = other_arch
    assert rows and all(r["arch"] == f"sm_{arch}" for r in rows)
    kernels = {r["kernel"].split("<")[0] for r in rows}
    assert set(KERNELS["attention.cu"]) <= kernels, set(KERNELS["attention.cu"]) - kernels
    spilling = ptxas_report.spills(rows)
    assert not spilling, f"sm_{arch}: {len(spilling)} kernel instances spill registers:\n{_describe(spilling)}"
    too_big = ptxas_report.over_smem_limit(rows)
    assert not too_big, [(r["kernel"], r["smem_static"], r["smem_dynamic"]) for r in too_big]
    assert all(r["registers"] <= 255 for r in rows)
    launched = [r for r in rows if r["launched"]]
    assert {r["kernel"].split("<")[0] for r in launched} == (
        set(KERNELS["attention.cu"]) if int(arch) >= 80 else
        {k for k in KERNELS["attention.cu"] if "_tc_" not in k}), "which kernels the launchers use on this GPU"


def test_dynamic_smem_of_the_attention_tiles():
    """The design note's numbers (attention.cu), and which dQ tiles each GPU gets."""
    smem = ptxas_report.dynamic_smem
    assert smem("attention_forward_tc_kernel<bf16, 128>") == 87040
    assert smem("attention_backward_dkdv_tc_kernel<fp16, 128>") == 70144
    assert smem("attention_backward_dq_tc_kernel<bf16, 128, 64>") == 104448
    assert smem("attention_backward_dq_tc_kernel<bf16, 128, 32>") == 69632
    assert smem("attention_backward_dq_tc_kernel<bf16, 64, 64>") == 55296
    fast = [a for a in ptxas_report.ARCHS if ptxas_report.launched_on("attention_backward_dq_tc_kernel<bf16, 128, 64>", a)]
    assert fast == ["80", "90", "100"]
