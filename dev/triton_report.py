"""What the GPU compiler makes of every Triton kernel at a real GPT-2 124M launch, without a GPU.

The Triton interpreter (how CI runs the kernels) says nothing about the code a GPU runs: tile
sizes, vector widths, register spills, approximate math. This report builds that code ahead of
time, as the JIT would on an H200, and reads the compiler's own output:

1. Launches: the launchers in pyllmc.kernels run on meta tensors of GPT-2 124M's training
   shapes (B*T = 65536 rows, C = 768, V = 50257 classes in rows of Vp = 50304, T = 1024,
   H = 12, D = 64; the model's own views: q/k/v split from one (B, T, 3C) buffer, the (N, V)
   view of the padded logits), with the device description of kernels/_common.py replaced by
   an H200's (sm_90, 132 SMs). So the constexprs, num_warps and grids come from the launchers'
   own configuration code. Each kernel launch is intercepted and specialized by the JIT's own
   binder: a pointer whose address is 16-byte aligned and an int divisible by 16 get the
   `tt.divisibility = 16` attribute, an int equal to 1 becomes the constant 1, exactly as on
   the GPU (a meta tensor's data_ptr() is its byte offset from an aligned base, as a view of a
   fresh CUDA allocation is).
2. Compilation: triton.compile for sm_90 (no GPU needed), then from its output:
   - ptxas -v (the log of Triton's own ptxas run): registers, spill stores and loads;
   - the PTX: the global loads and stores in each loop (a label and the backward branch to it)
     and in the whole kernel, by width (128-bit: ld.global.v4.b32 and the like), and the
     approximate / IEEE instructions used (ex2.approx, lg2.approx, rcp.approx, div.full,
     div.rn, sqrt.approx, sqrt.rn, rsqrt.approx, tanh.approx).

    python dev/triton_report.py                 # the table (both dtypes), sm_90
    python dev/triton_report.py --json out.json --dtypes bf16
    python dev/triton_report.py --check         # exit 1 if any kernel spills

Run it with TRITON_INTERPRET unset (or 0). It takes the Triton that imports: put another one
first on PYTHONPATH (pip install --no-deps --target DIR triton==3.6.0) to build with that.
tests/test_triton_gpu_compile.py runs it and asserts on the result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
    `dtypes`, specialized for `arch` by the JIT's own binder. Nothing runs."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit

    from pyllmc.kernels import _common, adamw, attention, cross_entropy, gelu, layernorm
    from pyllmc.ops.attention import heads_of, split_heads

    if not isinstance(cross_entropy.cross_entropy_forward_kernel, jit.JITFunction):
        raise RuntimeError("the kernels are interpreted here: run with TRITON_INTERPRET unset or 0")
    # An H200: the only device facts the launch configuration reads (kernels/_common.py).
    original_gpu_of = _common.gpu_of
    _common.gpu_of = lambda device: _common.GPU(capability=(arch // 10, arch % 10), sm_count=132)
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
            seen[key] = dict(
                module=self.fn.__module__, kernel=self.fn.__name__, fn=self, signature=signature,
                constexprs=constexprs, attrs=attrs, options=options.__dict__, dtype=context["dtype"],
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

            def meta(*shape, dt=dtype):
                return torch.empty(shape, device="meta", dtype=dt)

            x = meta(N, 4 * C)  # (B*T, 4C) the MLP's hidden activations
            gelu.gelu_forward(x)
            gelu.gelu_backward(x, meta(N, 4 * C))

            x, w, b, dy = meta(N, C), meta(C), meta(C), meta(N, C)
            _, mean, rstd = layernorm.layernorm_forward(x, w, b, 1e-5)
            layernorm.layernorm_backward(dy, x, w, mean, rstd)
            h, _, mean, rstd = layernorm.fused_residual_layernorm_forward(meta(N, C), x, w, b, 1e-5)
            layernorm.fused_residual_layernorm_backward(meta(N, C), dy, h, w, mean, rstd)

            logits = meta(N, Vp)[:, :V]  # (N, V) view of the padded (N, Vp) logits
            targets = meta(N, dt=torch.int64)
            dloss = meta(dt=torch.float32)
            _, lse, n_valid = cross_entropy.cross_entropy_forward(logits, targets, -1)
            dlogits = cross_entropy.cross_entropy_backward(logits, targets, lse, n_valid, dloss, -1)
            cross_entropy.cross_entropy_fused_forward_backward(logits, targets, -1, Vp, 1.0 / 8)
            cross_entropy.cross_entropy_scale_grad(dlogits, dloss)

            qkv, dqkv = meta(B, T, 3 * C), meta(B, T, 3 * C)  # (B, T, 3C): c_attn's output and its gradient
            y, dy = meta(B, T, C), meta(B, T, C)              # (B, T, C): attention's output and its gradient
            q, k, v = split_heads(qkv, H)
            out, lse = attention.attention_forward(q, k, v, out=heads_of(y, H))
            attention.attention_backward(heads_of(dy, H), q, k, v, out, lse, *split_heads(dqkv, H))

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


def _plain(value):
    """A constexpr as JSON: tl.dtype by name."""
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


# ---- 2. compile and read ---------------------------------------------------------------------

def _ptxas_parse():
    spec = importlib.util.spec_from_file_location("ptxas_report", ROOT / "dev" / "ptxas_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse


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


def report(dtypes=DTYPES, arch: int = 90) -> dict:
    import triton

    # a fresh cache: every kernel really compiles, so ptxas runs and prints its log
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        from triton import knobs

        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        launches = record_launches(dtypes, arch)
        results = [compile_launch(launch, arch) for launch in launches]
    return {"triton": triton.__version__, "arch": arch, "seconds": round(time.perf_counter() - start, 1),
            "gpt2": GPT2, "launches": results}


def _loads(acc: dict) -> str:
    return " ".join(f"{bits}b x{n}" for bits, n in sorted(acc.items(), key=lambda kv: -int(kv[0]))) or "-"


def table(rep: dict) -> str:
    head = ("| kernel | dtype | constexprs | warps | regs | spills (st/ld B) | loads in loops | stores in loops "
            "| approx / IEEE math |")
    rows = [f"Triton {rep['triton']}, sm_{rep['arch']}, GPT-2 124M launches; built in {rep['seconds']} s", "",
            head, "|" + " --- |" * 9]
    for r in rep["launches"]:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexpr_args"].items())
        loop_ld = "; ".join(_loads(loop["ld"]) for loop in r["loops"]) or "(no loop) " + _loads(r["whole"]["ld"])
        loop_st = "; ".join(_loads(loop["st"]) for loop in r["loops"]) or "(no loop) " + _loads(r["whole"]["st"])
        approx = ", ".join(f"{op} x{n}" for op, n in r["approx"].items()) or "-"
        rows.append(f"| {r['kernel']} | {r['dtype']} | {consts} | {r['num_warps']} | {r['registers']} | "
                    f"{r['spill_stores']}/{r['spill_loads']} | {loop_ld} | {loop_st} | {approx} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--json", help="write the full report (PTX included) here")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel spills registers")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is on: the kernels would be interpreted, not compiled")
    sys.path.insert(0, str(ROOT))  # a source checkout imports pyllmc like the installed package
    rep = report(tuple(args.dtypes.split(",")), args.arch)
    if args.json:
        Path(args.json).write_text(json.dumps(rep))
    print(table(rep))
    spilling = [r for r in rep["launches"] if r["spill_stores"] or r["spill_loads"]]
    for r in spilling:
        print(f"SPILLS {r['kernel']} ({r['dtype']}): {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
    return 1 if args.check and spilling else 0


if __name__ == "__main__":
    sys.exit(main())
