"""Every Triton kernel the ops launch must also compile for the GPU, checked without one.

The interpreter (how CI runs the Triton kernels) accepts code that the GPU compiler
rejects: a plain Python global read inside @triton.jit, a dot below the 16 x 16 minimum,
mismatched dtypes. So this test records every kernel launch the ops make under the
interpreter (kernel, argument types, constexpr values, num_warps / num_stages), then, in a
process without the interpreter, compiles each distinct launch ahead of time for sm_90
(the H100/H200) with triton.compile, which needs no GPU.

Attention has its own such test with its GPU tile sizes (tests/test_attention.py).
On a GPU machine every other test compiles the kernels for real, so this one skips there.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

# Runs under TRITON_INTERPRET=1: launches every op's kernels on small CPU tensors and
# prints one JSON line per distinct launch.
_RECORD = r"""
import inspect, json, sys
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
POINTER = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1", torch.float64: "fp64"}
seen = {}
original_run = InterpretedFunction.run

def is_constexpr(fn, name):
    ann = inspect.signature(fn).parameters[name].annotation
    return ann is triton.language.constexpr or (isinstance(ann, str) and ann.endswith("constexpr"))

def recording_run(self, *args, grid, warmup, **kwargs):
    fn = self.fn
    names = list(inspect.signature(fn).parameters)
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    for name in names:
        value = values.get(name, inspect.signature(fn).parameters[name].default)
        if is_constexpr(fn, name):
            signature[name] = "constexpr"
            # a tl.dtype constexpr (e.g. the output element type) travels by name
            constexprs[name] = {"tl_dtype": value.name} if isinstance(value, triton.language.dtype) else value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    record = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
              "constexprs": constexprs, "options": options}
    seen[json.dumps(record, sort_keys=True)] = record
    return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

InterpretedFunction.run = recording_run

import pyllmc
from pyllmc import ops
import pyllmc.kernels.adamw as adamw_kernels
import pyllmc.kernels.cross_entropy as cross_entropy_kernels

# Launch with the GPU's block sizes (the launchers pick larger ones for the interpreter):
# those are what must compile, and a 65536-element AdamW block takes minutes to compile.
adamw_kernels.BLOCK_SIZE_CPU = adamw_kernels.BLOCK_SIZE_GPU
cross_entropy_kernels.INTERPRETER_MAX_BLOCK = cross_entropy_kernels.MAX_BLOCK

def fwd_bwd(fn, *tensors):
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])

with pyllmc.backend("triton"):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 48, dtype=dtype, requires_grad=True)
        fwd_bwd(ops.gelu, x)
        w = torch.randn(48, dtype=dtype, requires_grad=True)
        b = torch.randn(48, dtype=dtype, requires_grad=True)
        fwd_bwd(lambda t: ops.layernorm(t, w, b), x)
        r = torch.randn(5, 48, dtype=dtype, requires_grad=True)
        fwd_bwd(lambda a, c: ops.fused_residual_layernorm(a, c, w, b), r, x)
        logits = torch.randn(6, 40, dtype=dtype, requires_grad=True)
        targets = torch.tensor([0, 3, -1, 39, 7, 1])
        ops.cross_entropy(logits, targets).backward()
        z = torch.randn(6, 40, dtype=dtype, requires_grad=True)
        (z * 1.0).float().to(dtype)  # keep z a leaf; the fused path needs an intermediate
        ops.cross_entropy(z * 2.0, targets, inplace_backward=True).backward()
        for sr in ((False, True) if dtype == torch.bfloat16 else (False,)):
            p = torch.nn.Parameter(torch.randn(300, dtype=dtype))
            p.grad = torch.randn_like(p)
            q = torch.nn.Parameter(torch.randn(7, 3, dtype=dtype))
            q.grad = torch.randn_like(q)
            opt = pyllmc.optim.AdamW([{"params": [p], "weight_decay": 0.1}, {"params": [q]}], lr=1e-3,
                                     stochastic_rounding=sr)
            opt.step()

for record in seen.values():
    print(json.dumps(record))
"""

# Runs without the interpreter: compiles each recorded launch for sm_90.
_COMPILE = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
records = [json.loads(line) for line in sys.stdin if line.strip()]
for r in records:
    kernel = getattr(importlib.import_module(r["module"]), r["kernel"])
    constexprs = {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in r["constexprs"].items()}
    src = ASTSource(fn=kernel, signature=r["signature"], constexprs=constexprs)
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=r["options"])
    except Exception as err:
        failures.append(f"{r['module']}.{r['kernel']} {r['constexprs']}: {type(err).__name__}: {err}")
print(f"compiled {len(records) - len(failures)} of {len(records)} launches")
for f in failures:
    print("FAILED", f)
sys.exit(1 if failures else 0)
"""


def test_every_launched_triton_kernel_compiles_for_sm90():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: every other test compiles the kernels for it")
    pytest.importorskip("triton.backends.nvidia")
    recorded = subprocess.run([sys.executable, "-c", _RECORD], env=dict(os.environ, TRITON_INTERPRET="1"),
                              capture_output=True, text=True, timeout=600)
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    records = [json.loads(line) for line in recorded.stdout.splitlines() if line.startswith("{")]
    kernels = {(r["module"], r["kernel"]) for r in records}
    for module in ("gelu", "layernorm", "cross_entropy", "adamw"):
        assert any(m == f"pyllmc.kernels.{module}" for m, _ in kernels), f"no {module} kernel was launched"
    compiled = subprocess.run([sys.executable, "-c", _COMPILE], input=recorded.stdout,
                              env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True,
                              timeout=900)
    assert compiled.returncode == 0, (compiled.stdout[-4000:] + compiled.stderr[-3000:])
    assert f"compiled {len(records)} of {len(records)}" in compiled.stdout
