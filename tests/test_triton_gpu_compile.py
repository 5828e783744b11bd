"""Every Triton kernel, compiled for the H200 (sm_90) at the launches of a real GPT-2 step, and the
attention kernels for every other architecture users have (sm_75 to sm_120), without a GPU.

The interpreter (how CI runs the Triton kernels) accepts code the GPU compiler rejects (a plain
Python global read inside @triton.jit, a dot below the 16 x 16 minimum) and says nothing about
the code a GPU runs: tile sizes, vector widths, register spills, approximate math. So
dev/triton_report.py (see its docstring) runs the launchers on meta tensors of GPT-2 124M's
training shapes (B*T = 65536, C = 768, V = 50257 in rows of 50304, T = 1024, H = 12, D = 64,
fp32 and bf16) with an H200's device description, specializes every launch with the JIT's own
binder (tt.divisibility = 16 on 16-byte-aligned pointers and on ints divisible by 16, ints equal
to 1 as constants) and compiles it with triton.compile; the tests below assert on what the
compiler produced:

- every @triton.jit kernel of pyllmc.kernels is built, with the launchers' own constexprs and
  num_warps (a wrong device substitution would show as the interpreter's tiles);
- no kernel spills registers (ptxas -v);
- the memory-bound kernels move 128-bit vectors (ld/st.global.v4.b32 in the PTX) in their main
  loops: cross-entropy's forward, backward, fused and scale kernels (a loop whose every global
  load is 128-bit: the masked tail is a loop of its own), the LayerNorm backward's row loop,
  and the loop-free LayerNorm forward, GELU, SwiGLU, relu^2, RoPE and AdamW (aligned kinds);
- every launch passes enable_fp_fusion (on; off for AdamW, which is bitwise equal to CUDA);
- the approximate instructions in each kernel's PTX are exactly those of APPROX below;
- on every architecture (sm_75, 80, 86, 89, 90, 100, 120) the attention launches use the tiles
  kernels/attention.py chooses for that architecture's shared memory per block, spill nothing,
  fit in that shared memory (metadata.shared), and the chooser's estimate is never below what the
  compiler allocated.

Which builds, and why: all seven architectures with both Triton versions took 330 s per version
on two busy cores (sm_90 alone: 30 s), too much for CI. The launches of the other kernels do not
depend on the architecture (only the LayerNorm backward's grid does, on the SM count), and the
GPU machine's Triton 3.6 only ever builds for its own sm_90. So: the installed Triton builds every
kernel for sm_90 and the attention kernels for the six other architectures; Triton 3.6 builds
every kernel for sm_90. (A run of every kernel on every architecture with Triton 3.9 found no
spill and at most 8 KB of shared memory outside attention: `python dev/triton_report.py --check`.)

What the GPU's fast math is, per kernel (PTX at these launches; Triton 3.6 and 3.9 agree):

| kernel                         | approximate                                 | IEEE (round to nearest) |
| ---                            | ---                                         | ---                     |
| gelu forward / backward        | ex2.approx (tl.exp), div.full (1 / (1 + e)) | -                       |
| layernorm forward              | div.full (/ C, 1 / sqrt), sqrt.approx       | -                       |
| layernorm backward             | div.full (/ C)                              | -                       |
| rmsnorm forward                | div.full (/ C, 1 / sqrt), sqrt.approx       | -                       |
| rmsnorm backward               | div.full (/ C)                              | -                       |
| swiglu forward / backward      | ex2.approx (tl.exp), div.full (1 / (1 + e)) | -                       |
| rope forward / backward        | - (cos, sin from float32 tables)            | -                       |
| cross_entropy forward          | ex2.approx (tl.exp2; tl.log is libdevice's) | -                       |
| cross_entropy backward / fused | ex2.approx                                  | div.rn (scale / n_valid) |
| cross_entropy mean             | -                                           | div.rn (sum / n_valid)  |
| attention forward              | ex2.approx, div.full (acc / l)              | -                       |
| attention dkdv / dq            | ex2.approx                                  | -                       |
| adamw                          | -                                           | div.rn, sqrt.rn         |
| count, scale_grad, delta, reduce_partials | -                                | -                       |

ex2.approx.ftz.f32 and div.full.f32 are off by at most 2 ulp (ftz: subnormal inputs and results
are flushed to zero); sqrt.approx.f32 is approximate too (LayerNorm's rstd only, held to the
composite FLASH_EPS tolerance). What the 2-ulp instructions do to the fp32 1e-6 tolerance is worked
out in pyllmc/testing.py (GELU holds it); results promised bitwise (AdamW, against the CUDA
kernel) or compared with a correctly rounded quotient (the cross-entropy scale dloss / n_valid,
whose two paths must agree to 2 ulp, and the mean loss) use div.rn / sqrt.rn.

Two Triton versions: the installed one always (CI's 3.9, whose interpreter runs the other
tests; on the GPU machine, its own), and the GPU machine's (3.6) when PYLLMC_GPU_TRITON_PATH
names a directory holding it (`pip install --no-deps --target DIR triton==3.6.0`; it is put
first on PYTHONPATH). They ship different ptxas (12.8 and 13.x), which allocate registers
differently: 3.6's spilled AdamW's stochastic-rounding kernel (until its RNG index stopped being
int64 vector math, kernels/adamw.py) while 3.9's did not. Both reports
are built at once, in two processes (3.6: sm_90, about 30 s; the installed one: sm_90 and the
attention kernels for six more architectures, about 2 minutes on an idle core, 4 on a busy one).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "dev" / "triton_report.py"
GPU_TRITON = "3.6"  # the GPU machine's Triton (major.minor)
GPU_TRITON_ENV = "PYLLMC_GPU_TRITON_PATH"
KERNEL_MODULES = ("gelu", "layernorm", "rmsnorm", "cross_entropy", "attention", "adamw", "swiglu", "rope")
EXTRA_ARCHS = (75, 80, 86, 89, 100, 120)  # attention only, installed Triton only (see above)
ATTENTION_KERNELS = {"attention_forward_kernel": "fwd", "attention_dkdv_kernel": "dkdv", "attention_dq_kernel": "dq"}

# kernel -> the approximate / IEEE instructions its PTX uses (see the table above)
APPROX = {
    "gelu_forward_kernel": {"ex2.approx", "div.full"},
    "gelu_backward_kernel": {"ex2.approx", "div.full"},
    "swiglu_forward_kernel": {"ex2.approx", "div.full"},
    "swiglu_backward_kernel": {"ex2.approx", "div.full"},
    "relu2_forward_kernel": set(),
    "relu2_backward_kernel": set(),
    "rope_forward_kernel": set(),  # cos and sin come from tables: no transcendental in the kernel
    "rope_backward_kernel": set(),
    "layernorm_forward_kernel": {"div.full", "sqrt.approx"},
    "layernorm_backward_kernel": {"div.full"},
    "layernorm_reduce_partials_kernel": set(),
    "rmsnorm_forward_kernel": {"div.full", "sqrt.approx"},
    "rmsnorm_backward_kernel": {"div.full"},
    "rmsnorm_reduce_partials_kernel": set(),
    "cross_entropy_forward_kernel": {"ex2.approx"},
    "cross_entropy_backward_kernel": {"ex2.approx", "div.rn"},
    "cross_entropy_fused_kernel": {"ex2.approx", "div.rn"},
    "cross_entropy_scale_grad_kernel": set(),
    "cross_entropy_count_kernel": set(),
    "cross_entropy_mean_kernel": {"div.rn"},
    "attention_forward_kernel": {"ex2.approx", "div.full"},
    "attention_delta_kernel": set(),
    "attention_dkdv_kernel": {"ex2.approx"},
    "attention_dq_kernel": {"ex2.approx"},
    "adamw_step_kernel": {"div.rn", "sqrt.rn"},
}

# Cross-entropy streams each row in chunks: (loops whose global loads are all 128-bit, how many
# of those also store 128-bit vectors). The fused kernel reads the row twice (two such loops) and
# writes once; the masked partial chunk is a loop of its own, with narrower accesses.
ROW_LOOPS = {
    "cross_entropy_forward_kernel": (1, 0),
    "cross_entropy_backward_kernel": (1, 1),
    "cross_entropy_fused_kernel": (2, 1),
    "cross_entropy_scale_grad_kernel": (1, 1),
}
# a loop with 128-bit loads (the per-row mean, rstd are scalars)
LOOP_LOADS = {"layernorm_backward_kernel", "rmsnorm_backward_kernel"}
NO_LOOP = {"layernorm_forward_kernel", "rmsnorm_forward_kernel", "gelu_forward_kernel", "gelu_backward_kernel",
           "adamw_step_kernel", "swiglu_forward_kernel", "swiglu_backward_kernel", "relu2_forward_kernel",
           "relu2_backward_kernel", "rope_forward_kernel", "rope_backward_kernel"}


def _start(json_path: Path, pythonpath: str = "", attention_archs=()):
    env = dict(os.environ, TRITON_INTERPRET="0")  # real JIT functions, not interpreted ones
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, str(REPORT), "--json", str(json_path), "--archs", "90",
               "--attention-archs", ",".join(str(a) for a in attention_archs)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{"installed": ..., "gpu": ...}: (returncode, stdout, stderr, json path) of each report, built at once."""
    pytest.importorskip("triton.backends.nvidia")
    tmp = tmp_path_factory.mktemp("triton_report")
    jobs = {"installed": (_start(tmp / "installed.json", attention_archs=EXTRA_ARCHS), tmp / "installed.json")}
    gpu_path = os.environ.get(GPU_TRITON_ENV, "")
    if gpu_path and Path(gpu_path, "triton").is_dir():
        jobs["gpu"] = (_start(tmp / "gpu.json", gpu_path), tmp / "gpu.json")
    done = {}
    for name, (proc, path) in jobs.items():
        try:
            out, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = (proc.returncode, out, err, path)
    return done


@pytest.fixture(params=["installed", "gpu"], ids=["installed-triton", f"gpu-triton-{GPU_TRITON}"])
def report(request, reports):
    if request.param not in reports:
        pytest.skip(f"{GPU_TRITON_ENV} does not name an install of the GPU machine's Triton {GPU_TRITON} "
                    f"(pip install --no-deps --target DIR triton=={GPU_TRITON}.0; see .ci/run)")
    rc, out, err, path = reports[request.param]
    assert rc == 0, f"dev/triton_report.py failed with the {request.param} Triton:\n{out[-2000:]}\n{err[-4000:]}"
    rep = json.loads(Path(path).read_text())
    rep["launches"] = next(e for e in rep["archs"] if e["arch"] == 90 and not e["only_attention"])["launches"]
    rep["which"] = request.param
    if request.param == "gpu":
        assert rep["triton"].startswith(GPU_TRITON + "."), \
            f"{GPU_TRITON_ENV} holds Triton {rep['triton']}, not the GPU machine's {GPU_TRITON}"
    return rep


def _name(r: dict, rep: dict) -> str:
    consts = ", ".join(f"{k}={v}" for k, v in r["constexpr_args"].items())
    return f"{r['kernel']} ({r['dtype']}; {consts}; {r['num_warps']} warps; Triton {rep['triton']})"


def _launches(rep: dict, kernel: str, dtype: str) -> list:
    found = [r for r in rep["launches"] if r["kernel"] == kernel and r["dtype"] == dtype]
    assert found, f"no launch of {kernel} in {dtype} was recorded"
    return found


def _widths(acc: dict) -> str:
    return ", ".join(f"{n} x {bits}-bit" for bits, n in sorted(acc.items(), key=lambda kv: -int(kv[0]))) or "none"


def _all_128(acc: dict) -> bool:
    return bool(acc) and set(acc) == {"128"}


def test_every_kernel_is_built(report):
    """Every @triton.jit kernel of pyllmc.kernels, in both dtypes where it takes a tensor dtype."""
    import importlib
    import inspect

    built = {r["kernel"] for r in report["launches"]}
    defined = set()
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"pyllmc.kernels.{module}")
        defined |= {name for name, obj in inspect.getmembers(mod)
                    if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    assert defined - built == set(), f"kernels never built at GPT-2's launches: {sorted(defined - built)}"
    assert set(APPROX) == defined, f"APPROX lists {sorted(set(APPROX) ^ defined)} wrongly"
    for r in report["launches"]:
        assert r["grid"] and all(g >= 1 for g in r["grid"]), f"{_name(r, report)}: grid {r['grid']}"


def test_launches_are_gpt2_on_an_h200(report):
    """The device substitution took (GPU tiles, not the interpreter's) and the JIT's
    specialization is the real one: aligned pointers and strides divisible by 16, V = 50257 not."""
    for dtype in ("fp32", "bf16"):
        fused = _launches(report, "cross_entropy_fused_kernel", dtype)[0]
        assert fused["constexpr_args"]["BLOCK"] == 4096 and fused["num_warps"] == 16, _name(fused, report)
        assert {"logits_ptr", "targets_ptr", "row_stride", "pad_end"} <= set(fused["divisible"]), fused["divisible"]
        assert "V" not in fused["divisible"], "V = 50257 was marked divisible by 16"
        for ln in _launches(report, "layernorm_forward_kernel", dtype):
            assert ln["constexpr_args"]["BLOCK_C"] == 1024 and ln["num_warps"] == 8, _name(ln, report)
            assert {"x_ptr", "y_ptr", "C", "rows"} <= set(ln["divisible"]), ln["divisible"]
        att = _launches(report, "attention_forward_kernel", dtype)[0]
        assert att["constexpr_args"]["stride_qd"] == 1, "the unit stride of q did not become a constant"
        assert "stride_qt" in att["divisible"], att["divisible"]  # 3C = 2304
        assert att["grid"] == [1024 // att["constexpr_args"]["BLOCK_M"], 12, 64], att["grid"]


def test_no_register_spills(report):
    spilling = [f"{_name(r, report)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads, "
                f"{r['registers']} registers" for r in report["launches"] if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_memory_bound_kernels_move_128_bit_vectors(report):
    problems = []
    for r in report["launches"]:
        kernel, loops = r["kernel"], r["loops"]
        found = (f"loops: " + "; ".join(f"[loads {_widths(lp['ld'])} | stores {_widths(lp['st'])}]" for lp in loops)
                 if loops else f"no loop; loads {_widths(r['whole']['ld'])}, stores {_widths(r['whole']['st'])}")
        if kernel in ROW_LOOPS:
            want_loads, want_stores = ROW_LOOPS[kernel]
            main = [lp for lp in loops if _all_128(lp["ld"])]
            stores = [lp for lp in main if "128" in lp["st"]]
            if len(main) < want_loads or len(stores) < want_stores:
                problems.append(f"{_name(r, report)}: wanted {want_loads} loop(s) of only 128-bit loads, "
                                f"{want_stores} of them storing 128-bit; found {found}")
        elif kernel in LOOP_LOADS:
            if not any("128" in lp["ld"] for lp in loops):
                problems.append(f"{_name(r, report)}: no 128-bit load in any loop; found {found}")
        elif kernel in NO_LOOP:
            if kernel == "adamw_step_kernel" and not r["constexpr_args"]["ALIGNED"]:
                continue  # the unaligned kind is scalar by design
            if loops or "128" not in r["whole"]["ld"] or "128" not in r["whole"]["st"]:
                problems.append(f"{_name(r, report)}: wanted 128-bit loads and stores and no loop; found {found}")
    assert not problems, "\n".join(problems)


def test_every_launch_sets_fp_fusion(report):
    for r in report["launches"]:
        assert r["fp_fusion_explicit"], f"{_name(r, report)}: launched without enable_fp_fusion (the default " \
                                        f"depends on the Triton version and TRITON_DEFAULT_FP_FUSION)"
        want = r["kernel"] != "adamw_step_kernel"
        assert r["enable_fp_fusion"] == want, f"{_name(r, report)}: enable_fp_fusion={r['enable_fp_fusion']}"


def test_approximate_math_is_the_documented_one(report):
    wrong = [f"{_name(r, report)}: the PTX uses {sorted(r['approx'])}, APPROX says {sorted(APPROX[r['kernel']])}"
             for r in report["launches"] if set(r["approx"]) != APPROX[r["kernel"]]]
    assert not wrong, ("update APPROX and the table in this file's docstring, and check pyllmc/testing.py:\n"
                       + "\n".join(wrong))


def test_attention_fits_every_architecture(report):
    """Per architecture: the chooser's tiles for its shared memory, no spill, within the shared
    memory (the compiler's metadata.shared), and the chooser's estimate never below it."""
    import torch

    from pyllmc.kernels import attention

    archs = {e["arch"]: e for e in report["archs"]}
    wanted = {90} | (set(EXTRA_ARCHS) if report["which"] == "installed" else set())
    assert set(archs) == wanted, f"built for {sorted(archs)}, wanted {sorted(wanted)}"
    problems = []
    for arch, entry in sorted(archs.items()):
        if entry.get("skipped"):
            assert arch == 75, entry["skipped"]  # only Turing may be past a Triton's support
            continue
        limit, capability = entry["shared_memory_per_block"], (arch // 10, arch % 10)
        found = [r for r in entry["launches"] if r["kernel"] in ATTENTION_KERNELS]
        gqa = [r for r in found if r["gqa"]]  # grouped-query launches (GROUP = 3, not specialized): main archs only
        assert len(found) - len(gqa) == 6, \
            f"sm_{arch}: {len(found) - len(gqa)} GPT-2 attention launches, wanted 3 kernels x 2 dtypes"
        assert len(gqa) == (0 if entry["only_attention"] else 6), f"sm_{arch}: {len(gqa)} grouped-query launches"
        for r in found:
            c = r["constexpr_args"]
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[r["dtype"]]
            chosen = attention.gpu_block_config(ATTENTION_KERNELS[r["kernel"]], c["HEAD_DIM"], dtype, capability, limit)
            name = f"sm_{arch} {_name(r, report)}"
            if (c["BLOCK_M"], c["BLOCK_N"], r["num_warps"], r["num_stages"]) != chosen:
                problems.append(f"{name}: built with {r['num_stages']} stages, not the chooser's {chosen}")
            if r["spill_stores"] or r["spill_loads"]:
                problems.append(f"{name}: spills {r['spill_stores']} / {r['spill_loads']} B")
            if r["shared"] > limit:
                problems.append(f"{name}: {r['shared']} B of shared memory; sm_{arch} has {limit}")
            if r["shared_estimate"] < r["shared"]:
                problems.append(f"{name}: estimated {r['shared_estimate']} B, the compiler allocated {r['shared']}")
    assert not problems, "\n".join(problems)
