"""SwiGLU (two tensors and packed) and relu^2, forward and backward, at GPT-2 124M's MLP size:
(B*T, H) = (32768, 3072) bf16 (the packed input: (32768, 6144)).

Bytes are what the op must move (each input read once, each output written once):
  swiglu forward: a, b -> y: 3 N H s;  backward: dout, a, b -> da, db: 5 N H s (packed: dx is [da | db])
  relu2 forward: x -> y: 2 N H s;      backward: x, dout -> dx: 3 N H s
The PyTorch baselines are what eager autograd runs for silu(a) * b (and for the packed form, chunk's
backward: a cat of da and db) and for relu(x)^2; eager moves more than these bytes (its intermediates),
which is the point of the comparison.
"""

import torch
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

ROWS, COLS = 32768, 3072


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    x = torch.randn(ROWS, 2 * COLS, device=device, dtype=dtype)  # (N, 2H): the packed w1|w3 output
    a, b = x[:, :COLS].contiguous(), x[:, COLS:].contiguous()     # (N, H) each: two separate matmuls' outputs
    dout = torch.randn(ROWS, COLS, device=device, dtype=dtype)
    n = a.numel()
    esize = a.element_size()
    shape = f"({ROWS}, {COLS}) {str(dtype).replace('torch.', '')}"
    fwd_bytes, bwd_bytes = 3 * n * esize, 5 * n * esize
    relu2_fwd_bytes, relu2_bwd_bytes = 2 * n * esize, 3 * n * esize
    rows = []

    def torch_forward(a, b):
        return F.silu(a) * b

    def torch_backward(g, a, b):
        # what autograd runs for silu(a) * b: db = g * silu(a), da = silu_backward(g * b, a)
        return torch.ops.aten.silu_backward(g * b, a), g * F.silu(a)

    def torch_packed_forward(t):
        return torch_forward(*t.chunk(2, dim=-1))

    def torch_packed_backward(g, t):
        return torch.cat(torch_backward(g, *t.chunk(2, dim=-1)), dim=-1)  # chunk's backward: a cat

    def torch_relu2_forward(t):
        return F.relu(t).square()

    def torch_relu2_backward(t, g):
        return g * (2.0 * F.relu(t))

    baselines = [("torch eager", torch_forward, torch_backward, torch_packed_forward, torch_packed_backward,
                  torch_relu2_forward, torch_relu2_backward)]
    if not quick():  # --quick: eager only (compiling costs more than measuring)
        baselines.append(("torch.compile",) + tuple(torch.compile(f) for f in baselines[0][1:]))
    for impl, fwd, bwd, pfwd, pbwd, rfwd, rbwd in baselines:
        rows.append(Row("swiglu_forward", impl, bench_ms(lambda: fwd(a, b)), fwd_bytes, shape=shape))
        rows.append(Row("swiglu_backward", impl, bench_ms(lambda: bwd(dout, a, b)), bwd_bytes, shape=shape))
        rows.append(Row("swiglu_packed_forward", impl, bench_ms(lambda: pfwd(x)), fwd_bytes, shape=shape))
        rows.append(Row("swiglu_packed_backward", impl, bench_ms(lambda: pbwd(dout, x)), bwd_bytes, shape=shape))
        rows.append(Row("relu2_forward", impl, bench_ms(lambda: rfwd(a)), relu2_fwd_bytes, shape=shape))
        rows.append(Row("relu2_backward", impl, bench_ms(lambda: rbwd(a, dout)), relu2_bwd_bytes, shape=shape))

    for impl in available_impls():
        from pyllmc.ops.swiglu import _backward_into, _forward_into, _relu2_backward, _relu2_forward

        def forward(a, b):
            out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
            _forward_into(out, a, b, impl)
            return out

        def backward(g, a, b, dx=None):
            da, db = (dx[:, :COLS], dx[:, COLS:]) if dx is not None else (torch.empty_like(g), torch.empty_like(g))
            _backward_into(da, db, g, a, b, impl)

        xa, xb = x[:, :COLS], x[:, COLS:]  # the halves of the packed tensor, read in place
        rows.append(Row("swiglu_forward", impl, bench_ms(lambda: forward(a, b)), fwd_bytes, shape=shape))
        rows.append(Row("swiglu_backward", impl, bench_ms(lambda: backward(dout, a, b)), bwd_bytes, shape=shape))
        rows.append(Row("swiglu_packed_forward", impl, bench_ms(lambda: forward(xa, xb)), fwd_bytes, shape=shape))
        rows.append(Row("swiglu_packed_backward", impl, bench_ms(lambda: backward(dout, xa, xb, torch.empty_like(x))),
                        bwd_bytes, shape=shape))
        rows.append(Row("relu2_forward", impl, bench_ms(lambda: _relu2_forward(a, impl)), relu2_fwd_bytes,
                        shape=shape))
        rows.append(Row("relu2_backward", impl, bench_ms(lambda: _relu2_backward(a, dout, impl)), relu2_bwd_bytes,
                        shape=shape))
    return rows
