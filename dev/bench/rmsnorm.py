"""RMSNorm and fused residual + RMSNorm at GPT-2 124M's size, (B*T, C) = (32768, 768), and QK-norm
over the head dim without a weight, (B*T*H, D) = (32768 * 12, 64).

Rows: rmsnorm_forward / _backward and fused_residual_rmsnorm_forward / _backward (with a weight),
qk_rmsnorm_forward / _backward (no weight, D = 64), each for pyllmc's kernels and for PyTorch eager
and torch.compile of the same computation:
  forward:  F.rms_norm(x)                       (fused: h = residual + x; F.rms_norm(h))
  backward: the gradient's math in PyTorch ops from the saved rstd:
            xhat = x * rstd; dx = rstd * (g - xhat * mean(g * xhat)); dweight = sum(dy * xhat)
            (fused: dh = dh_out + dx). F.rms_norm has no public backward kernel to call alone.

Bytes are the fewest each op must move (each (rows, C) tensor read or written once; the per-row
float32 rstd written by the forward and read by the backward; weight and dweight once). The
backward's float32 partial-sum scratch is pyllmc's own overhead and is not counted.
"""

import torch
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

ROWS, C = 32768, 768
HEADS, HEAD_DIM = 12, 64  # QK-norm: ROWS * HEADS rows of HEAD_DIM
EPS = 1e-6


def byte_counts(rows: int, C: int, esize: int, weight: bool = True) -> dict:
    """Fewest bytes per op: activations (rows, C), rstd (rows,) float32, weight (C,)."""
    act = rows * C * esize
    stats = rows * 4
    param = C * esize if weight else 0
    return {
        "forward": 2 * act + stats + param,          # x -> y; weight
        "backward": 3 * act + stats + 2 * param,     # dy, x -> dx; weight -> dweight
        "fused_forward": 4 * act + stats + param,    # residual, x -> h, y
        "fused_backward": 4 * act + stats + 2 * param,  # dh_out, dy, h -> dh
    }


def _torch_backward(dy, x, w, rstd):
    """(dx, dweight) of y = x * rstd * w (w None: no gain) from the saved rstd (rows,), in float32."""
    xf, g = x.float(), dy.float()
    xhat = xf * rstd[:, None]
    if w is not None:
        g = g * w.float()
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    dw = (dy.float() * xhat).sum(dim=0).to(x.dtype) if w is not None else None
    return dx.to(x.dtype), dw


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc.ops.rmsnorm import _backward, _forward, _fused_backward, _fused_forward

    x = torch.randn(ROWS, C, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    dy = torch.randn_like(x)
    dh_out = torch.randn_like(x)
    h = residual + x
    q = torch.randn(ROWS * HEADS, HEAD_DIM, device=device, dtype=dtype)  # (B*T*H, D)
    dq = torch.randn_like(q)
    tag = str(dtype).replace("torch.", "")
    shape, qk_shape = f"({ROWS}, {C}) {tag}", f"({ROWS * HEADS}, {HEAD_DIM}) {tag}, no weight"
    nbytes = byte_counts(ROWS, C, x.element_size())
    qk_bytes = byte_counts(ROWS * HEADS, HEAD_DIM, q.element_size(), weight=False)
    rows = []

    def rstd_of(t):
        return torch.rsqrt(t.float().square().mean(dim=-1) + EPS)  # (rows,) float32

    x_rstd, h_rstd, q_rstd = rstd_of(x), rstd_of(h), rstd_of(q)

    # ---- PyTorch baselines
    def torch_forward(t, w):
        return F.rms_norm(t, (t.shape[-1],), w, EPS)

    def torch_fused_forward(r, t, w):
        hh = r + t
        return hh, F.rms_norm(hh, (hh.shape[-1],), w, EPS)

    def torch_fused_backward(g_h, g, hh, w, rstd):
        dx, dw = _torch_backward(g, hh, w, rstd)
        return g_h + dx, dw

    eager = (torch_forward, _torch_backward, torch_fused_forward, torch_fused_backward)
    baselines = [("torch eager", eager)]
    if not quick():  # --quick: eager only (compiling costs more than measuring)
        try:
            compiled = tuple(torch.compile(f) for f in eager)
            compiled[0](x, weight)
            compiled[1](dy, x, weight, x_rstd)
            compiled[2](residual, x, weight)
            compiled[3](dh_out, dy, h, weight, h_rstd)
            compiled[0](q, None)
            compiled[1](dq, q, None, q_rstd)
            baselines.append(("torch.compile", compiled))
        except Exception as err:  # noqa: BLE001
            print(f"rmsnorm: torch.compile baseline skipped: {type(err).__name__}: {err}")
    for impl, (fwd, bwd, fused_fwd, fused_bwd) in baselines:
        rows.append(Row("rmsnorm_forward", impl, bench_ms(lambda: fwd(x, weight)), nbytes["forward"], shape=shape))
        rows.append(Row("rmsnorm_backward", impl, bench_ms(lambda: bwd(dy, x, weight, x_rstd)), nbytes["backward"],
                        shape=shape))
        rows.append(Row("fused_residual_rmsnorm_forward", impl, bench_ms(lambda: fused_fwd(residual, x, weight)),
                        nbytes["fused_forward"], shape=shape, note="residual + x, F.rms_norm"))
        rows.append(Row("fused_residual_rmsnorm_backward", impl,
                        bench_ms(lambda: fused_bwd(dh_out, dy, h, weight, h_rstd)), nbytes["fused_backward"],
                        shape=shape))
        rows.append(Row("qk_rmsnorm_forward", impl, bench_ms(lambda: fwd(q, None)), qk_bytes["forward"],
                        shape=qk_shape))
        rows.append(Row("qk_rmsnorm_backward", impl, bench_ms(lambda: bwd(dq, q, None, q_rstd)),
                        qk_bytes["backward"], shape=qk_shape))

    # ---- pyllmc kernels (the raw calls, without the op's input checks)
    for impl in available_impls():
        _, rstd = _forward(x, weight, EPS, impl)
        _, _, fused_rstd = _fused_forward(residual, x, weight, EPS, impl)
        _, qk_rstd = _forward(q, None, EPS, impl)
        rows.append(Row("rmsnorm_forward", impl, bench_ms(lambda: _forward(x, weight, EPS, impl)), nbytes["forward"],
                        shape=shape))
        rows.append(Row("rmsnorm_backward", impl, bench_ms(lambda: _backward(dy, x, weight, rstd, impl)),
                        nbytes["backward"], shape=shape))
        rows.append(Row("fused_residual_rmsnorm_forward", impl,
                        bench_ms(lambda: _fused_forward(residual, x, weight, EPS, impl)), nbytes["fused_forward"],
                        shape=shape))
        rows.append(Row("fused_residual_rmsnorm_backward", impl,
                        bench_ms(lambda: _fused_backward(dh_out, dy, h, weight, fused_rstd, impl)),
                        nbytes["fused_backward"], shape=shape))
        rows.append(Row("qk_rmsnorm_forward", impl, bench_ms(lambda: _forward(q, None, EPS, impl)),
                        qk_bytes["forward"], shape=qk_shape))
        rows.append(Row("qk_rmsnorm_backward", impl, bench_ms(lambda: _backward(dq, q, None, qk_rstd, impl)),
                        qk_bytes["backward"], shape=qk_shape))
    return rows
