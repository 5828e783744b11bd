"""Plant known kinds of CUDA bug in csrc/, one at a time, and check that the CPU tests catch each.

Each mutant is one edit of a copy of csrc/ (old text -> new text, the old text found exactly
once). For each, the CUDA simulator is built from the copy (PYLLMC_CSRC; only the edited file
recompiles), then the [cuda] tests of the family the file belongs to run, with the schedule
test (every launcher bitwise equal under five schedules) and the driver's smoke check; for the
mutants marked `asan`, the driver also runs in the AddressSanitizer build. A mutant is caught
when any of them fails (or hangs past the timeout).

    python dev/sim_mutants.py                 # all mutants (~30 min on 2 cores)
    python dev/sim_mutants.py --only attention --keep
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_OF = {
    "gelu.cu": ["tests/test_gelu.py"],
    "layernorm.cu": ["tests/test_layernorm.py"],
    "rmsnorm.cu": ["tests/test_rmsnorm.py"],
    "swiglu.cu": ["tests/test_swiglu.py"],
    "rope.cu": ["tests/test_rope.py"],
    "cross_entropy.cu": ["tests/test_cross_entropy.py", "tests/test_cross_entropy_options.py"],
    "attention.cu": ["tests/test_attention.py"],
    "adamw.cu": ["tests/test_adamw.py"],
    "common.cuh": ["tests/test_gelu.py", "tests/test_layernorm.py", "tests/test_cross_entropy.py",
                   "tests/test_rmsnorm.py"],
}
SIM_TESTS = ["tests/test_cuda_sim.py::test_every_launcher_gives_the_same_bits_in_every_schedule",
             "tests/test_cuda_sim.py::test_the_driver_matches_the_torch_backend"]


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    asan: bool = False  # a memory error the answers may not show: run the sanitizer build too


MUTANTS = [
    Mutant("gelu: scalar tail off by one", "gelu.cu",
           "if (i < V && tail < n) out[tail]", "if (i < V && tail < n - 1) out[tail]"),
    Mutant("gelu: vector loop <= (one vector past the end)", "gelu.cu",
           "    if (i < num_vectors) {\n        const Packed128<T> x = load128cs(inp + i * V);\n        Packed128<T> y;",
           "    if (i <= num_vectors) {\n        const Packed128<T> x = load128cs(inp + i * V);\n        Packed128<T> y;",
           asan=True),
    Mutant("gelu: backward drops the x * sech^2 term", "gelu.cu",
           "return 0.5f * one_plus_tanh + 0.5f * x * sech2 * du_dx;", "return 0.5f * one_plus_tanh + 0.5f * sech2 * du_dx;"),
    Mutant("common: warp reduce starts at offset 8", "common.cuh",
           "for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync",
           "for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync"),
    Mutant("common: block reduce misses its first barrier (shared reused too early)", "common.cuh",
           "    v = warp_reduce_sum(v);\n    __syncthreads();  // `shared` may still be read by a previous call\n",
           "    v = warp_reduce_sum(v);\n"),
    Mutant("common: block max reads shared before every warp wrote it", "common.cuh",
           "    v = warp_reduce_max(v);\n    __syncthreads();\n    if (lane == 0) shared[warp] = v;\n    __syncthreads();\n",
           "    v = warp_reduce_max(v);\n    __syncthreads();\n    if (lane == 0) shared[warp] = v;\n"),
    Mutant("layernorm: missing __syncthreads in the dweight merge", "layernorm.cu",
           "            }\n        }\n        __syncthreads();\n    }\n    float* dweight_partial",
           "            }\n        }\n    }\n    float* dweight_partial"),
    Mutant("layernorm: half-sized dynamic shared memory in the backward", "layernorm.cu",
           "const size_t smem = 2 * static_cast<size_t>(C) * sizeof(float);",
           "const size_t smem = static_cast<size_t>(C) * sizeof(float);"),
    Mutant("layernorm: partial-warp early return before the shuffles", "layernorm.cu",
           "    if (row >= rows) return;  // the whole warp leaves together: no shuffle loses a lane",
           "    if (row >= rows || lane >= C) return;"),
    Mutant("layernorm: eps outside the rsqrt", "layernorm.cu",
           "const float rstd = rsqrtf(warp_reduce_sum(sq) / C + eps);\n\n#pragma unroll",
           "const float rstd = rsqrtf(warp_reduce_sum(sq) / C) + eps;\n\n#pragma unroll"),
    Mutant("layernorm: partial sums drop the last block", "layernorm.cu",
           "for (int p = threadIdx.y; p < num_partials; p += kReduceLanes)",
           "for (int p = threadIdx.y; p < num_partials - 1; p += kReduceLanes)"),
    Mutant("layernorm: fused forward normalizes the unrounded h", "layernorm.cu",
           "                for (int k = 0; k < W; ++k) x[i][k] = to_float(from_float<T>(x[i][k]));\n", ""),
    Mutant("rmsnorm: group reduce stops one shuffle short", "rmsnorm.cu",
           "for (int offset = kLanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync",
           "for (int offset = kLanes / 2; offset > 1; offset >>= 1) v += __shfl_xor_sync"),
    Mutant("rmsnorm: a warp's groups not folded before the dweight merge", "rmsnorm.cu",
           "for (int offset = kLanes; offset < kWarpSize; offset <<= 1) {",
           "for (int offset = kLanes; offset < kLanes; offset <<= 1) {"),
    Mutant("rmsnorm: a past-the-end row of a warp's group stores its y", "rmsnorm.cu",
           "    if (!valid) return;  // after the last shuffle\n", "", asan=True),
    Mutant("rmsnorm: eps outside the rsqrt", "rmsnorm.cu",
           "const float rstd = rsqrtf(group_reduce_sum<kLanes>(sq) / C + eps);",
           "const float rstd = rsqrtf(group_reduce_sum<kLanes>(sq) / C) + eps;"),
    Mutant("rmsnorm: fused backward drops d(h_out) (register kernel)", "rmsnorm.cu",
           "                    for (int k = 0; k < W; ++k) dx[k] += dh[k];\n", ""),
    Mutant("rmsnorm: the merge's barrier skipped by the warps without a turn", "rmsnorm.cu",
           "            }\n        }\n        __syncthreads();\n    }\n    float* dweight_partial",
           "            }\n        }\n    }\n    float* dweight_partial"),
    Mutant("rmsnorm: generic backward uses the weight where there is none", "rmsnorm.cu",
           "float dx = row_rstd * (dy * (has_weight ? to_float(weight[c]) : 1.0f) - xhat * mean_g_xhat);",
           "float dx = row_rstd * (dy * to_float(weight[c]) - xhat * mean_g_xhat);", asan=True),
    Mutant("swiglu: the short last slot of a row drops its last element", "swiglu.cu",
           "for (int k = 0; k < W && col + k < cols; ++k)\n            o[k]",
           "for (int k = 0; k < W && col + k < cols - 1; ++k)\n            o[k]"),
    Mutant("swiglu: the vector path runs past the row's end", "swiglu.cu",
           "    if (kVector && col + V <= cols) {\n        const Packed128<T> x = load128cs(pa);",
           "    if (kVector && col < cols) {\n        const Packed128<T> x = load128cs(pa);", asan=True),
    Mutant("swiglu: silu' drops the a s (1 - s) term", "swiglu.cu",
           "da = dy * b * (s * (1.0f + a * one_minus_s));", "da = dy * b * s;"),
    Mutant("swiglu: backward reads dout at da's row stride (packed halves)", "swiglu.cu",
           "const T* pdy = dout + row * dout_stride + col;", "const T* pdy = dout + row * da_stride + col;", asan=True),
    Mutant("swiglu: strided operands folded into one row", "swiglu.cu",
           "        if (s != cols) return;", "        if (s < cols) return;"),
    Mutant("swiglu: 128-bit vectors at unaligned addresses", "swiglu.cu",
           "    bool vector = aligned;", "    bool vector = true;"),
    Mutant("relu2: backward drops the factor 2", "swiglu.cu",
           "dx[k] = from_float<T>(to_float(dy[k]) * (2.0f * fmaxf(to_float(x[k]), 0.0f)));",
           "dx[k] = from_float<T>(to_float(dy[k]) * fmaxf(to_float(x[k]), 0.0f));"),
    Mutant("rope: backward turns forward (sin's sign not flipped)", "rope.cu",
           "rope_slot<T, kVector, -1>(dinp, dout,", "rope_slot<T, kVector, 1>(dinp, dout,"),
    Mutant("rope: table rows ignore start (KV-cache positions)", "rope.cu",
           "const long long table_offset = (start + t) * half + j;", "const long long table_offset = t * half + j;"),
    Mutant("rope: input rows at the output's position stride (packed qkv read at the wrong place)", "rope.cu",
           "const T* x1 = inp + b * inp_stride.b + t * inp_stride.t + h * inp_stride.h + j;",
           "const T* x1 = inp + b * inp_stride.b + t * out_stride.t + h * inp_stride.h + j;", asan=True),
    Mutant("rope: one thread past the last slot", "rope.cu",
           "    if (i >= B * seq_len * slots_per_token) return;", "    if (i > B * seq_len * slots_per_token) return;",
           asan=True),
    Mutant("rope: 128-bit vectors at unaligned addresses", "rope.cu",
           "        if (!is_aligned16(p)) return false;\n", ""),
    Mutant("rope: launcher takes positions past the tables", "rope.cu",
           "start >= 0 && table_rows >= 0 && start + T <= table_rows", "start >= 0 && table_rows >= 0"),
    Mutant("cross_entropy: padding columns not zeroed", "cross_entropy.cu",
           "    for (long long j = V + threadIdx.x; j < pad_end; j += blockDim.x) out[j] = from_float<T>(0.0f);\n", ""),
    Mutant("cross_entropy: vector range rounded up past V", "cross_entropy.cu",
           "return {head, head + (V - head) / W * W};", "return {head, head + (V - head + W - 1) / W * W};",
           asan=True),
    Mutant("cross_entropy: ignored rows counted as valid", "cross_entropy.cu",
           "count += targets[i] != ignore_index ? 1.0f : 0.0f;", "count += 1.0f;"),
    Mutant("cross_entropy: fused gradient not scaled by 1 / n_valid", "cross_entropy.cu",
           "loss_scale * (mean ? mean_scale(n_valid) : 1.0f), opt);", "loss_scale, opt);"),
    Mutant("cross_entropy: soft-cap gradient misses the tanh' factor", "cross_entropy.cu",
           "dcap = (1.0f - t) * (1.0f + t);", "dcap = 1.0f + 0.0f * t;"),
    Mutant("cross_entropy: z-loss gradient with the wrong sign", "cross_entropy.cu",
           "return {inv_sum * (1.0f + 2.0f * opt.z_scale * lse),", "return {inv_sum * (1.0f - 2.0f * opt.z_scale * lse),"),
    Mutant("cross_entropy: label smoothing's uniform part over V + 1 classes", "cross_entropy.cu",
           "opt.smoothing / static_cast<float>(V)};", "opt.smoothing / static_cast<float>(V + 1)};"),
    Mutant("cross_entropy: softmax through the log-sum-exp rounded to one float", "cross_entropy.cu",
           "const float p = exp2f((x - row_max) * kLog2e) * inv_sum;",
           "const float p = exp2f((x - (row_max - logf(inv_sum))) * kLog2e);"),
    Mutant("adamw: wrong stochastic-rounding mask (15 random bits)", "adamw.cu",
           "(__float_as_uint(x) + (random & 0xffffu)) & 0xffff0000u", "(__float_as_uint(x) + (random & 0x7fffu)) & 0xffff0000u"),
    Mutant("adamw: update with the wrong sign", "adamw.cu",
           "p[k] = fmaf(-h.step_size, __fdiv_rn(m[k], denom), __fmul_rn(p[k], h.decay));",
           "p[k] = fmaf(h.step_size, __fdiv_rn(m[k], denom), __fmul_rn(p[k], h.decay));"),
    Mutant("adamw: last partial vector of a tensor takes the full width", "adamw.cu",
           "adamw_group(t, h, begin, left < kGroup ? static_cast<int>(left) : kGroup);",
           "adamw_group(t, h, begin, kGroup);", asan=True),
    Mutant("attention: causal mask off by one (diagonal masked)", "attention.cu",
           "                    if (key > row || key >= seq_len) s[nt][e] = -INFINITY;",
           "                    if (key >= row || key >= seq_len) s[nt][e] = -INFINITY;"),
    Mutant("attention: lse saved in log2 units", "attention.cu",
           "if (t == 0) lse[row] = (row_max[r] + log2f(total)) * kLn2;", "if (t == 0) lse[row] = row_max[r] + log2f(total);"),
    Mutant("attention: wrong cp.async wait count in the forward loop", "attention.cu",
           "            cp_async_commit();\n            cp_async_wait<1>();\n        } else {\n            cp_async_wait<0>();\n        }\n        __syncthreads();\n        const Elem* k_tile = k_smem + (j & 1) * kBc * S;  // (kBc, S)\n        const Elem* v_tile = v_smem + (j & 1) * kBc * S;  // (kBc, S)\n\n        // s = Q K^T for",
           "            cp_async_commit();\n            cp_async_wait<2>();\n        } else {\n            cp_async_wait<0>();\n        }\n        __syncthreads();\n        const Elem* k_tile = k_smem + (j & 1) * kBc * S;  // (kBc, S)\n        const Elem* v_tile = v_smem + (j & 1) * kBc * S;  // (kBc, S)\n\n        // s = Q K^T for"),
    Mutant("attention: no barrier after the forward's cp.async wait", "attention.cu",
           "            cp_async_wait<0>();\n        }\n        __syncthreads();\n        const Elem* k_tile = k_smem + (j & 1) * kBc * S;  // (kBc, S)\n        const Elem* v_tile = v_smem + (j & 1) * kBc * S;  // (kBc, S)\n\n        // s = Q K^T for",
           "            cp_async_wait<0>();\n        }\n        const Elem* k_tile = k_smem + (j & 1) * kBc * S;  // (kBc, S)\n        const Elem* v_tile = v_smem + (j & 1) * kBc * S;  // (kBc, S)\n\n        // s = Q K^T for"),
    Mutant("attention: no barrier at the end of the forward loop (stage refilled while read)", "attention.cu",
           "        __syncthreads();  // every warp is done with this stage before iteration j+1 refills it\n", ""),
    Mutant("attention: wrong ldmatrix .trans addressing", "attention.cu",
           "ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * STRIDE + n0 + ((lane >> 4) << 3));",
           "ldmatrix_x4_trans(b, tile + (k0 + (lane & 7)) * STRIDE + n0 + ((lane >> 3) << 3));"),
    Mutant("attention: ldmatrix without .trans where the operand is column-major", "attention.cu",
           '    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\\n"',
           '    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n"'),
    Mutant("attention: missing cudaFuncSetAttribute before > 48 KiB of shared memory", "attention.cu",
           "    PYLLMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,\n"
           "                                           static_cast<int>(smem_bytes)));\n", ""),
    Mutant("attention: row sum misses one quad shuffle", "attention.cu",
           "        total += __shfl_xor_sync(0xffffffffu, total, 1);\n        total += __shfl_xor_sync(0xffffffffu, total, 2);\n",
           "        total += __shfl_xor_sync(0xffffffffu, total, 1);\n"),
    Mutant("attention: dK/dV start one query tile late (diagonal skipped)", "attention.cu",
           "const int first_q_tile = key_start / kBr;  // exact: kBr divides kBc",
           "const int first_q_tile = key_start / kBr + 1;"),
    Mutant("attention: dQ not scaled", "attention.cu",
           "pack2<Elem>(dq_acc[nt][2 * r] * scale, dq_acc[nt][2 * r + 1] * scale);",
           "pack2<Elem>(dq_acc[nt][2 * r], dq_acc[nt][2 * r + 1]);"),
    Mutant("attention: tile loader reads one row past T", "attention.cu",
           "        const bool valid = row < seq_len;\n        const Elem* src",
           "        const bool valid = row <= seq_len;\n        const Elem* src", asan=True),
    Mutant("attention: fp16 inputs fed to the bf16 mma", "attention.cu",
           '        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "',
           '        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "'),
    Mutant("attention: GQA query head h reads kv head h % H_kv (wrong group index)", "attention.cu",
           "static_cast<long long>(bh % num_heads / group) * s.h",
           "static_cast<long long>(bh % num_heads % (num_heads / group)) * s.h"),
    Mutant("attention: GQA dK/dV summed over the group's first query head only", "attention.cu",
           "const int num_steps = group * tiles_per_head;", "const int num_steps = tiles_per_head;"),
    Mutant("attention: GQA float32 dK/dV summed over the group's first query head only", "attention.cu",
           "for (int bh = bh0; bh < bh0 + group; ++bh) {", "for (int bh = bh0; bh < bh0 + 1; ++bh) {"),
    Mutant("attention: GQA dK/dV prefetch misses the next query head at a head boundary", "attention.cu",
           "bh0 + (step + 1) / tiles_per_head, num_heads,", "bh0 + step / tiles_per_head, num_heads,"),
]


def run(cmd, env, timeout):
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", ""
    if done.returncode and "Timeout (" in done.stderr:  # faulthandler's watchdog (PYLLMC_TEST_TIMEOUT)
        return "hang", done.stderr[-3000:]
    return ("fail" if done.returncode else "pass"), done.stdout[-1500:] + done.stderr[-1500:]


def check(mutant: Mutant, work: Path, timeout: int) -> tuple[str, str]:
    csrc = work / "csrc"
    if csrc.exists():
        shutil.rmtree(csrc)
    shutil.copytree(ROOT / "csrc", csrc)
    path = csrc / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return "BAD MUTANT", f"old text found {text.count(mutant.old)} times in {mutant.file}"
    path.write_text(text.replace(mutant.old, mutant.new))
    env = dict(os.environ, PYLLMC_CSRC=str(csrc), PYLLMC_CACHE_DIR=str(work / "cache"), PYLLMC_CUDA_SIM="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    build = [sys.executable, "-c", "from pyllmc import cuda_sim; cuda_sim.build()"]
    status, log = run(build, env, timeout)
    if status != "pass":
        return "caught (build: " + log.strip().splitlines()[-1][:100] + ")", log
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    # a mutant that writes past a tensor can leave the process stuck in C code (malloc's lock):
    # the per-test limit ends such a run in minutes rather than at the whole step's timeout
    env["PYLLMC_TEST_TIMEOUT"] = str(max(60, timeout // 3))
    status, log = run(pytest + ["-k", "cuda"] + TESTS_OF[mutant.file], env, timeout)
    if status != "pass":
        return f"caught ({status}: the [cuda] tests of {', '.join(Path(t).stem for t in TESTS_OF[mutant.file])})", log
    status, log = run(pytest + SIM_TESTS, env, timeout)
    if status != "pass":
        return f"caught ({status}: schedules / driver check)", log
    if mutant.asan:
        from pyllmc import cuda_sim

        senv = dict(env, PYLLMC_CUDA_SIM_VARIANT="sanitize", LD_PRELOAD=":".join(cuda_sim.sanitizer_preload()),
                    ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="halt_on_error=1")
        status, log = run([sys.executable, "-c", "from pyllmc import cuda_sim; cuda_sim.build('sanitize')"], env,
                          timeout)
        if status == "pass":
            status, log = run([sys.executable, "dev/cuda_driver.py"], senv, timeout)
        if status != "pass":
            return f"caught ({status}: AddressSanitizer build)", log
    return "MISSED", ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="the mutants whose name contains this text")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per step before a hang counts as caught")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (and its build cache)")
    parser.add_argument("--verbose", action="store_true", help="print the end of the failing step's output")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or args.only in m.name]
    work = Path(tempfile.mkdtemp(prefix="pyllmc-mutants-"))
    print(f"sim_mutants: {len(mutants)} mutants, work folder {work}", flush=True)
    missed = 0
    for i, mutant in enumerate(mutants, 1):
        started = time.time()
        verdict, log = check(mutant, work, args.timeout)
        missed += verdict == "MISSED" or verdict == "BAD MUTANT"
        print(f"[{i:2d}/{len(mutants)}] {verdict:70s} {time.time() - started:5.0f} s  {mutant.name}", flush=True)
        if verdict == "BAD MUTANT" or (args.verbose and log):
            print("    " + log.replace("\n", "\n    "), flush=True)
    print(f"sim_mutants: {len(mutants) - missed} of {len(mutants)} caught")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
