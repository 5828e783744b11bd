"""What the GPU compiler makes of every Triton kernel at a real GPT-2 124M launch, without a GPU.

The Triton interpreter (how CI runs the kernels) says nothing about the code a GPU runs: tile
sizes, vector widths, register spills, shared memory, approximate math. This report builds that
code ahead of time, as the JIT would on each GPU architecture (sm_75 to sm_120: the attention
tiles and stages depend on the architecture's shared memory per block), and reads the compiler's
own output:

1. Launches: the launchers in pyllmc.kernels run on meta tensors of GPT-2 124M's training
   shapes (B*T = 65536 rows, C = 768, V = 50257 classes in rows of Vp = 50304, T = 1024,
   H = 12, D = 64; the model's own views: q/k/v split from one (B, T, 3C) buffer, the (N, V)
   view of the padded logits), with the device description of kernels/_common.py replaced by
   the architecture's (its compute capability and opt-in shared memory per block from
   _common.SHARED_MEMORY_PER_BLOCK, 132 SMs). So the constexprs, num_warps, num_stages and
   grids come from the launchers' own configuration code. Each kernel launch is intercepted and
   specialized by the JIT's own binder: a pointer whose address is 16-byte aligned and an int
   divisible by 16 get the `tt.divisibility = 16` attribute, an int equal to 1 becomes the
   constant 1, exactly as on the GPU (a meta tensor's data_ptr() is its byte offset from an aligned base, as a view of a
   fresh CUDA allocation is).
2. Compilation: triton.compile for the architecture (no GPU needed), then from its output:
   - ptxas -v (the log of Triton's own ptxas run): registers, spill stores and loads;
   - metadata.shared: the shared memory the kernel asks for at launch, against the
     architecture's limit and, for attention, against kernels/attention.py's estimate (which
     must never be below it: the tile choice relies on it);
   - the PTX: the global loads and stores in each loop (a label and the backward branch to it)
     and in the whole kernel, by width (128-bit: ld.global.v4.b32 and the like), and the
     approximate / IEEE instructions used (ex2.approx, lg2.approx, rcp.approx, div.full,
     div.rn, sqrt.approx, sqrt.rn, rsqrt.approx, tanh.approx).

    python dev/triton_report.py                 # the tables (both dtypes), every architecture
    python dev/triton_report.py --archs 90 --json out.json --dtypes bf16
    python dev/triton_report.py --check         # exit 1 if a kernel spills or exceeds shared memory

Run it with TRITON_INTERPRET unset (or 0). It takes the Triton that imports: put another one
first on PYTHONPATH (pip install --no-deps --target DIR triton==3.6.0) to build with that.
tests/test_triton_gpu_compile.py runs it and asserts on the result.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# GPT-2 124M training at T = 1024 with 64 sequences per micro-batch: B*T = 65536 rows.
GPT2 = dict(B=64, T=1024, C=768, H=12, V=50257, Vp=50304, n_layer=12)
DTYPES = ("fp32", "bf16")
APPROX_OPS = ("ex2.approx", "lg2.approx", "rcp.approx", "div.full", "div.approx", "div.rn", "sqrt.approx",
              "sqrt.rn", "rsqrt.approx", "tanh.approx", "sin.approx", "cos.approx")

_MEM = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)")
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


# ---- 1. the launches ---------------------------------------------------------------------------

def _gpt2_parameter_sizes() -> list[int]:
    C, Vp, T, L = GPT2["C"], GPT2["Vp"], GPT2["T"], GPT2["n_layer"]
    block = [C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C]
    return [Vp * C, T * C] + block * L + [C, C]


def record_launches(dtypes=DTYPES, arch: int = 90) -> list[dict]:
    """Every distinct kernel launch of GPT-2 124M training (forward, backward, optimizer) in
    `dtypes` on an sm_`arch` GPU, specialized by the JIT's own binder. Nothing runs. Attention
    launches carry their shared-memory estimate (kernels/attention.py)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit

    from pyllmc.kernels import _common, adamw, attention, cross_entropy, gelu, layernorm, rmsnorm, rope, swiglu
    from pyllmc.ops.attention import heads_of, split_heads

    if not isinstance(cross_entropy.cross_entropy_forward_kernel, jit.JITFunction):
        raise RuntimeError("the kernels are interpreted here: run with TRITON_INTERPRET unset or 0")
    # The only device facts the launch configuration reads (kernels/_common.py).
    gpu = _common.gpu_of_arch(arch, sm_count=132)
    original_gpu_of = _common.gpu_of
    _common.gpu_of = lambda device: gpu
    backend = make_backend(GPUTarget("cuda", arch, 32))
    seen: dict = {}
    context = {}

    def recording_run(self, *args, grid, warmup, **kwargs):
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization,
                                                                options)
        divisible = sorted(self.arg_names[path[0]] for path, spec in attrs.items()
                           if ["tt.divisibility", 16] in [list(a) for a in spec])
        key = (self.fn.__module__, self.fn.__name__, repr(signature), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
        if key not in seen:
            estimate = None
            if self.fn.__name__ in ATTENTION_KERNELS:
                c = {self.arg_names[p[0]]: v for p, v in constexprs.items()}
                estimate = attention.shared_memory_estimate(
                    ATTENTION_KERNELS[self.fn.__name__], c["HEAD_DIM"], context["torch_dtype"],
                    (c["BLOCK_M"], c["BLOCK_N"], options.num_warps, options.num_stages), gpu.capability)
            seen[key] = dict(shared_estimate=estimate,
                module=self.fn.__module__, kernel=self.fn.__name__, fn=self, signature=signature,
                constexprs=constexprs, attrs=attrs, options=options.__dict__, dtype=context["dtype"],
                gqa=context.get("gqa", False),
                grid=[int(g) for g in (grid if isinstance(grid, tuple) else grid(bound_args))],
                divisible=divisible, fp_fusion_explicit="enable_fp_fusion" in kwargs,
                constexpr_args={self.arg_names[p[0]]: _plain(v) for p, v in constexprs.items()},
                num_warps=options.num_warps, num_stages=options.num_stages,
                enable_fp_fusion=options.enable_fp_fusion)
        return None

    original_run = jit.JITFunction.run
    jit.JITFunction.run = recording_run
    try:
        B, T, C, H, V, Vp = (GPT2[k] for k in ("B", "T", "C", "H", "V", "Vp"))
        N = B * T
        for name in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            context["dtype"] = name
            context["torch_dtype"] = dtype

            def meta(*shape, dt=dtype):
                return torch.empty(shape, device="meta", dtype=dt)

            x = meta(N, 4 * C)  # (B*T, 4C) the MLP's hidden activations
            gelu.gelu_forward(x)
            gelu.gelu_backward(x, meta(N, 4 * C))

            # SwiGLU at this MLP's width (H = 4C): the halves of one packed (B*T, 2H) w1|w3 output, read
            # and written in place (row stride 2H), and two contiguous tensors (folded into one row); relu^2
            a, b = meta(N, 8 * C).chunk(2, dim=-1)
            da, db = meta(N, 8 * C).chunk(2, dim=-1)
            swiglu.swiglu_forward(a, b, meta(N, 4 * C))
            swiglu.swiglu_backward(meta(N, 4 * C), a, b, da, db)
            a, b = meta(N, 4 * C), meta(N, 4 * C)
            swiglu.swiglu_forward(a, b, meta(N, 4 * C))
            swiglu.swiglu_backward(meta(N, 4 * C), a, b, meta(N, 4 * C), meta(N, 4 * C))
            swiglu.relu2_forward(x)
            swiglu.relu2_backward(x, meta(N, 4 * C))

            x, w, b, dy = meta(N, C), meta(C), meta(C), meta(N, C)
            _, mean, rstd = layernorm.layernorm_forward(x, w, b, 1e-5)
            layernorm.layernorm_backward(dy, x, w, mean, rstd)
            h, _, mean, rstd = layernorm.fused_residual_layernorm_forward(meta(N, C), x, w, b, 1e-5)
            layernorm.fused_residual_layernorm_backward(meta(N, C), dy, h, w, mean, rstd)

            # RMSNorm with a weight at the model's width; QK-norm without one over the head dim (B*T*H, D)
            _, rstd = rmsnorm.rmsnorm_forward(x, w, 1e-6)
            rmsnorm.rmsnorm_backward(dy, x, w, rstd)
            h, _, rstd = rmsnorm.fused_residual_rmsnorm_forward(meta(N, C), x, w, 1e-6)
            rmsnorm.fused_residual_rmsnorm_backward(meta(N, C), dy, h, w, rstd)
            q = meta(N * H, C // H)
            _, rstd = rmsnorm.rmsnorm_forward(q, None, 1e-6)
            rmsnorm.rmsnorm_backward(meta(N * H, C // H), q, None, rstd)

            # RoPE on q of a Llama-style packed qkv viewed as (B, T, 3H, D) heads (read in place, position
            # stride 3 H D), written to a fresh (B, T, H, D); the backward from a contiguous gradient
            D = C // H
            cos, sin = meta(T, D // 2, dt=torch.float32), meta(T, D // 2, dt=torch.float32)
            rope.rope_forward(meta(B, T, 3 * H, D)[:, :, :H], cos, sin, meta(B, T, H, D))
            rope.rope_backward(meta(B, T, H, D), cos, sin, meta(B, T, H, D))

            logits = meta(N, Vp)[:, :V]  # (N, V) view of the padded (N, Vp) logits
            targets = meta(N, dt=torch.int64)
            dloss = meta(dt=torch.float32)
            _, stats, n_valid = cross_entropy.cross_entropy_forward(logits, targets, -1)
            dlogits = cross_entropy.cross_entropy_backward(logits, targets, stats, n_valid, dloss, -1)
            cross_entropy.cross_entropy_fused_forward_backward(logits, targets, -1, Vp, 1.0 / 8)
            cross_entropy.cross_entropy_scale_grad(dlogits, dloss)

            qkv, dqkv = meta(B, T, 3 * C), meta(B, T, 3 * C)  # (B, T, 3C): c_attn's output and its gradient
            y, dy = meta(B, T, C), meta(B, T, C)              # (B, T, C): attention's output and its gradient
            q, k, v = split_heads(qkv, H)
            out, lse = attention.attention_forward(q, k, v, out=heads_of(y, H))
            attention.attention_backward(heads_of(dy, H), q, k, v, out, lse, *split_heads(dqkv, H))
            # grouped-query attention, H query heads on H / 3 kv heads: GROUP = 3 is a runtime loop count
            # where GPT-2's GROUP = 1 is specialized away (its own binaries; the main archs only, see report())
            H_kv = H // 3
            qkv, dqkv = (meta(B, T, (H + 2 * H_kv) * (C // H)) for _ in range(2))  # (B, T, (H + 2 H_kv) D)
            context["gqa"] = True
            q, k, v = split_heads(qkv, H, H_kv)
            out, lse = attention.attention_forward(q, k, v, out=heads_of(y, H))
            attention.attention_backward(heads_of(dy, H), q, k, v, out, lse, *split_heads(dqkv, H, H_kv))
            context["gqa"] = False

            sizes = _gpt2_parameter_sizes()
            chunk = adamw.block_size(torch.device("meta"))
            num_chunks = sum(-(-n // chunk) for n in sizes)
            table, chunk_map = meta(len(sizes), 10, dt=torch.int64), meta(num_chunks, dt=torch.int32)
            hyper = meta(2, 8, dt=torch.float32)
            # the optimizer's kinds (param dtype, master copy, stochastic rounding, 16-byte aligned):
            # fp32 training; bf16 with fp32 masters (the trainer's), rounded to nearest or
            # stochastically; bf16 without masters (stochastic, as pyllmc.optim advises); a tensor
            # that is not 16-byte aligned (the scalar path)
            kinds = ([(torch.float32, False, False, True), (torch.float32, False, False, False)] if name == "fp32"
                     else [(torch.bfloat16, True, False, True), (torch.bfloat16, True, True, True),
                           (torch.bfloat16, False, True, True)])
            for param_dtype, master, stochastic, aligned in kinds:
                adamw.adamw_step(table, chunk_map, hyper, param_dtype=param_dtype, grad_dtype=param_dtype,
                                 has_master=master, stochastic=stochastic, aligned=aligned, block_size=chunk)
    finally:
        jit.JITFunction.run = original_run
        _common.gpu_of = original_gpu_of
    return list(seen.values())


ATTENTION_KERNELS = {"attention_forward_kernel": "fwd", "attention_dkdv_kernel": "dkdv",
                     "attention_dq_kernel": "dq"}


def _plain(value):
    """A constexpr as JSON: tl.dtype by name."""
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


# ---- 2. compile and read ---------------------------------------------------------------------

def _ptxas_parse():
    from ptxas_report import parse  # dev/ptxas_report.py, beside this file

    return parse


def _width(suffixes: str) -> int:
    """Bits moved by one ld/st.global with these suffixes ('.v4.b32' -> 128)."""
    parts = suffixes.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfus]\d+", p)), 0)
    return vec * bits


def _accesses(lines: list[str]) -> dict:
    """{"ld": {bits: count}, "st": {bits: count}} of the global accesses in these PTX lines."""
    out = {"ld": {}, "st": {}}
    for line in lines:
        for kind, suffixes in _MEM.findall(line.split("//")[0]):
            bits = _width(suffixes)
            out[kind][bits] = out[kind].get(bits, 0) + 1
    return out


def analyze_ptx(ptx: str) -> dict:
    """Global accesses by width in the whole kernel ("whole") and in each loop; math counts."""
    lines = ptx.splitlines()
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        if m := _LABEL.match(line.strip()):
            labels[m.group(1)] = i
        for target in _BRANCH.findall(line):
            if target in labels and labels[target] < i:  # a backward branch closes a loop
                loops.append({"label": target, "lines": (labels[target], i),
                              **_accesses(lines[labels[target]:i + 1])})
    approx = {op: n for op in APPROX_OPS if (n := len(re.findall(re.escape(op) + r"\.", ptx)))}
    return {"whole": _accesses(lines), "loops": loops, "approx": approx}


def compile_launch(launch: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for sm_<arch>; the PTX analysis and ptxas's numbers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch["fn"], signature=launch["signature"], constexprs=launch["constexprs"],
                    attrs=launch["attrs"])
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: Triton prints ptxas -v's log
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    seconds = time.perf_counter() - start
    # Triton 3.9 runs its "ptxas-blackwell" for every arch: same report, another prefix
    rows = _ptxas_parse()(re.sub(r"ptxas-\w+ info", "ptxas info", log.getvalue()))
    if len(rows) != 1:
        raise RuntimeError(f"{launch['kernel']}: expected ptxas -v's report of one kernel, got:\n{log.getvalue()}")
    ptx = compiled.asm["ptx"]
    result = {k: v for k, v in launch.items() if k not in ("fn", "signature", "constexprs", "attrs", "options")}
    result.update(analyze_ptx(ptx), registers=rows[0]["registers"], spill_stores=rows[0]["spill_stores"],
                  spill_loads=rows[0]["spill_loads"], stack_frame=rows[0]["stack_frame"],
                  shared=compiled.metadata.shared, compile_s=round(seconds, 2), ptx=ptx)
    return result


def default_archs() -> tuple:
    """Every architecture of _common.SHARED_MEMORY_PER_BLOCK that this Triton's backend builds for."""
    from pyllmc.kernels import _common

    return tuple(sorted(_common.SHARED_MEMORY_PER_BLOCK))


def report(dtypes=DTYPES, archs=(90,), attention_archs=()) -> dict:
    """{"triton", "seconds", "gpt2", "archs": [{"arch", "shared_memory_per_block", "seconds",
    "launches": [...]}]}: every launch compiled for every arch of `archs`, and the attention
    launches (the only ones whose configuration depends on the architecture) for every arch of
    `attention_archs`. An arch this Triton's backend cannot build for (a compile error naming it
    unsupported) is listed with "skipped": why."""
    import triton

    from pyllmc.kernels import _common

    # a fresh cache: every kernel really compiles, so ptxas runs and prints its log
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        from triton import knobs

        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        per_arch = []
        for arch, only_attention in [(a, False) for a in archs] + [(a, True) for a in attention_archs]:
            arch_start = time.perf_counter()
            entry = {"arch": arch, "shared_memory_per_block": _common.SHARED_MEMORY_PER_BLOCK[arch],
                     "only_attention": only_attention}
            try:
                launches = record_launches(dtypes, arch)
                if only_attention:  # GPT-2's attention launches (the GQA ones: the main archs only)
                    launches = [launch for launch in launches
                                if launch["kernel"] in ATTENTION_KERNELS and not launch["gqa"]]
                entry["launches"] = [compile_launch(launch, arch) for launch in launches]
            except Exception as error:  # noqa: BLE001: only "this Triton cannot build for it" is tolerated
                if "support" not in str(error).lower():
                    raise
                entry["skipped"] = f"Triton {triton.__version__} cannot build for sm_{arch}: {str(error)[:200]}"
                entry["launches"] = []
            entry["seconds"] = round(time.perf_counter() - arch_start, 1)
            per_arch.append(entry)
    return {"triton": triton.__version__, "seconds": round(time.perf_counter() - start, 1), "gpt2": GPT2,
            "archs": per_arch}


def problems(entry: dict) -> list[str]:
    """What is wrong with one arch's launches: register spills, shared memory over the
    architecture's limit, an attention estimate below what the compiler allocated."""
    found = []
    limit = entry["shared_memory_per_block"]
    for r in entry["launches"]:
        name = f"sm_{entry['arch']} {r['kernel']} ({r['dtype']})"
        if r["spill_stores"] or r["spill_loads"]:
            found.append(f"{name}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
        if r["shared"] > limit:
            found.append(f"{name}: {r['shared']} B of shared memory, over the limit of {limit} B")
        if r["shared_estimate"] is not None and r["shared_estimate"] < r["shared"]:
            found.append(f"{name}: kernels/attention.py estimates {r['shared_estimate']} B of shared memory, "
                         f"the compiler allocated {r['shared']} B")
    return found


def _loads(acc: dict) -> str:
    return " ".join(f"{bits}b x{n}" for bits, n in sorted(acc.items(), key=lambda kv: -int(kv[0]))) or "-"


def table(rep: dict) -> str:
    head = ("| kernel | dtype | constexprs | warps | stages | regs | spills (st/ld B) | smem B (estimate) "
            "| loads in loops | stores in loops | approx / IEEE math |")
    rows = []
    for entry in rep["archs"]:
        which = "attention launches" if entry["only_attention"] else "launches"
        rows += [f"Triton {rep['triton']}, sm_{entry['arch']} ({entry['shared_memory_per_block']} B of shared memory "
                 f"per block), GPT-2 124M {which}; built in {entry['seconds']} s", ""]
        if entry.get("skipped"):
            rows += [entry["skipped"], ""]
            continue
        rows += [head, "|" + " --- |" * 11]
        for r in entry["launches"]:
            consts = ", ".join(f"{k}={v}" for k, v in r["constexpr_args"].items())
            loop_ld = "; ".join(_loads(loop["ld"]) for loop in r["loops"]) or "(no loop) " + _loads(r["whole"]["ld"])
            loop_st = "; ".join(_loads(loop["st"]) for loop in r["loops"]) or "(no loop) " + _loads(r["whole"]["st"])
            approx = ", ".join(f"{op} x{n}" for op, n in r["approx"].items()) or "-"
            smem = str(r["shared"]) + (f" ({r['shared_estimate']})" if r["shared_estimate"] is not None else "")
            rows.append(f"| {r['kernel']} | {r['dtype']} | {consts} | {r['num_warps']} | {r['num_stages']} | "
                        f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {smem} | {loop_ld} | {loop_st} "
                        f"| {approx} |")
        rows.append("")
    return "\n".join(rows)


def summary(rep: dict) -> str:
    """One line per arch and attention launch: the tiles, shared memory and spills (the part that
    depends on the architecture), plus the worst of the other kernels."""
    rows = [f"Triton {rep['triton']}: shared memory (B) and spills (B) per architecture", "",
            "| arch | limit | kernel | dtype | BLOCK_M x BLOCK_N, warps, stages | smem (estimate) | spills |",
            "|" + " --- |" * 7]
    for entry in rep["archs"]:
        if entry.get("skipped"):
            rows.append(f"| sm_{entry['arch']} | {entry['shared_memory_per_block']} | skipped | | | | |")
            continue
        others = [r for r in entry["launches"] if r["shared_estimate"] is None]
        for r in entry["launches"]:
            if r["shared_estimate"] is None:
                continue
            c = r["constexpr_args"]
            rows.append(f"| sm_{entry['arch']} | {entry['shared_memory_per_block']} | {r['kernel']} | {r['dtype']} | "
                        f"{c['BLOCK_M']} x {c['BLOCK_N']}, {r['num_warps']}, {r['num_stages']} | "
                        f"{r['shared']} ({r['shared_estimate']}) | {r['spill_stores'] + r['spill_loads']} |")
        if others:
            worst = max(others, key=lambda r: r["shared"])
            rows.append(f"| sm_{entry['arch']} | {entry['shared_memory_per_block']} | {len(others)} other launches | | "
                        f"| at most {worst['shared']} ({worst['kernel']}) | "
                        f"{sum(r['spill_stores'] + r['spill_loads'] for r in others)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", help="comma-separated sm numbers, every kernel (default: every known architecture)")
    parser.add_argument("--attention-archs", default="",
                        help="comma-separated sm numbers for which only the attention kernels are built")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--json", help="write the full report (PTX included) here")
    parser.add_argument("--summary", action="store_true", help="print only the per-arch shared memory summary")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a kernel spills registers or exceeds (or is underestimated in) shared memory")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is on: the kernels would be interpreted, not compiled")
    archs = tuple(int(a) for a in args.archs.split(",") if a) if args.archs is not None else default_archs()
    attention_archs = tuple(int(a) for a in args.attention_archs.split(",") if a)
    rep = report(tuple(args.dtypes.split(",")), archs, attention_archs)
    if args.json:
        Path(args.json).write_text(json.dumps(rep))
    print(summary(rep) if args.summary else table(rep))
    found = [p for entry in rep["archs"] for p in problems(entry)]
    for p in found:
        print("PROBLEM", p)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
