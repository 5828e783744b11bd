"""Rotary position embedding (RoPE), forward and backward, at a Llama 2 110M-like size: x the q heads
(B, T, H, D) = (32, 1024, 12, 64) bf16 of a packed (B, T, 3 H, D) qkv projection, read in place.

Bytes are what the op must move (x read once, the output written once): forward x -> y and backward
dout -> dx: 2 B T H D s each. The cos / sin tables ((T, D/2) float32, 256 KiB) are read by every (b, h)
but stay in L2; they are not counted. The PyTorch baselines are pyllmc.ops.rope.rope_reference (what
the torch backend runs: float32 math, a cat of the halves) and its autograd backward, eager and under
torch.compile.
"""

import torch

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

B, T, H, D = 32, 1024, 12, 64


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc.ops.rope import _rotate_into, rope_reference, rope_tables

    qkv = torch.randn(B, T, 3 * H, D, device=device, dtype=dtype)  # (B, T, 3H, D): the packed projection
    x = qkv[:, :, :H]                                               # (B, T, H, D): q, position stride 3 H D
    dout = torch.randn(B, T, H, D, device=device, dtype=dtype)
    cos, sin = rope_tables(T, D, device=device)                     # (T, D/2) float32 each
    shape = f"({B}, {T}, {H}, {D}) {str(dtype).replace('torch.', '')}"
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y (backward: read dout, write dx)
    rows = []

    def torch_forward(t):
        return rope_reference(t, cos, sin)

    def torch_backward(g):
        # what autograd runs for rope_reference: the halves of g rotated back, in float32
        g1, g2 = g.float().split(D // 2, dim=-1)
        c, s = cos.view(1, T, 1, D // 2), sin.view(1, T, 1, D // 2)
        return torch.cat([g1 * c + g2 * s, g2 * c - g1 * s], dim=-1).to(g.dtype)

    baselines = [("torch eager", torch_forward, torch_backward)]
    if not quick():  # --quick: eager only (compiling costs more than measuring)
        baselines.append(("torch.compile", torch.compile(torch_forward), torch.compile(torch_backward)))
    for impl, fwd, bwd in baselines:
        rows.append(Row("rope_forward", impl, bench_ms(lambda: fwd(x)), nbytes, shape=shape))
        rows.append(Row("rope_backward", impl, bench_ms(lambda: bwd(dout)), nbytes, shape=shape))

    for impl in available_impls():
        out = torch.empty(B, T, H, D, device=device, dtype=dtype)
        rows.append(Row("rope_forward", impl, bench_ms(lambda: _rotate_into(out, x, cos, sin, 0, impl, inverse=False)),
                        nbytes, shape=shape))
        rows.append(Row("rope_backward", impl,
                        bench_ms(lambda: _rotate_into(out, dout, cos, sin, 0, impl, inverse=True)), nbytes,
                        shape=shape))
    return rows
