"""GELU forward and backward at GPT-2 124M's MLP size: (B*T, 4C) = (32768, 3072), bf16."""

import torch
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

ROWS, COLS = 32768, 3072


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    x = torch.randn(ROWS, COLS, device=device, dtype=dtype)
    dout = torch.randn_like(x)
    n = x.numel()
    esize = x.element_size()
    shape = f"({ROWS}, {COLS}) {str(dtype).replace('torch.', '')}"
    fwd_bytes = 2 * n * esize   # read x, write y
    bwd_bytes = 3 * n * esize   # read x and dout, write dx
    rows = []

    def torch_forward(t):
        return F.gelu(t, approximate="tanh")

    def torch_backward(t, g):
        # what autograd runs for F.gelu's backward
        return torch.ops.aten.gelu_backward(g, t, approximate="tanh")

    baselines = [("torch eager", torch_forward, torch_backward)]
    if not quick():  # --quick: eager only (compiling costs more than measuring)
        baselines.append(("torch.compile", torch.compile(torch_forward), torch.compile(torch_backward)))
    for impl, fwd, bwd in baselines:
        rows.append(Row("gelu_forward", impl, bench_ms(lambda: fwd(x)), fwd_bytes, shape=shape))
        rows.append(Row("gelu_backward", impl, bench_ms(lambda: bwd(x, dout)), bwd_bytes, shape=shape))

    for impl in available_impls():
        from pyllmc.ops.gelu import _backward, _forward

        rows.append(Row("gelu_forward", impl, bench_ms(lambda: _forward(x, impl)), fwd_bytes, shape=shape))
        rows.append(Row("gelu_backward", impl, bench_ms(lambda: _backward(x, dout, impl)), bwd_bytes, shape=shape))
    return rows
