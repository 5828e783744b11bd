"""LayerNorm and fused residual + LayerNorm at GPT-2 124M's size: (B*T, C) = (32768, 768).

Rows: layernorm_forward / _backward and fused_residual_layernorm_forward / _backward, each
for pyllmc's kernels and for PyTorch eager and torch.compile of the same computation:
  layernorm forward:  F.layer_norm(x)
  layernorm backward: aten.native_layer_norm_backward (what autograd runs for F.layer_norm)
  fused forward:      h = residual + x; F.layer_norm(h)
  fused backward:     dh = dh_out + native_layer_norm_backward(dy, h)

Bytes are the fewest each op must move (each (rows, C) tensor read or written once; the
per-row float32 mean and rstd written by the forward and read by the backward; weight,
bias, dweight, dbias once). The backward's float32 partial-sum scratch is pyllmc's own
overhead and is not counted.
"""

import torch
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

ROWS, C = 32768, 768
EPS = 1e-5


def byte_counts(rows: int, C: int, esize: int) -> dict:
    """Fewest bytes per op: activations (rows, C), row stats (rows,) float32, params (C,)."""
    act = rows * C * esize
    stats = 2 * rows * 4   # mean and rstd
    param = C * esize
    return {
        "layernorm_forward": 2 * act + stats + 2 * param,                    # x -> y; weight, bias
        "layernorm_backward": 3 * act + stats + 3 * param,                   # dy, x -> dx; weight -> dweight, dbias
        "fused_residual_layernorm_forward": 4 * act + stats + 2 * param,     # residual, x -> h, y
        "fused_residual_layernorm_backward": 4 * act + stats + 3 * param,    # dh_out, dy, h -> dh
    }


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc.ops.layernorm import _backward, _forward, _fused_backward, _fused_forward

    x = torch.randn(ROWS, C, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    bias = (0.1 * torch.randn(C, device=device)).to(dtype)
    dy = torch.randn_like(x)
    dh_out = torch.randn_like(x)
    h = residual + x
    nbytes = byte_counts(ROWS, C, x.element_size())
    shape = f"({ROWS}, {C}) {str(dtype).replace('torch.', '')}"
    rows = []

    # ---- PyTorch baselines
    def torch_forward(t, w, b):
        return F.layer_norm(t, (C,), w, b, EPS)

    def torch_backward(g, t, w, b, mean, rstd):
        return torch.ops.aten.native_layer_norm_backward(g, t, [C], mean, rstd, w, b, [True, True, True])

    def torch_fused_forward(r, t, w, b):
        hh = r + t
        return hh, F.layer_norm(hh, (C,), w, b, EPS)

    def torch_fused_backward(g_h, g, hh, w, b, mean, rstd):
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(g, hh, [C], mean, rstd, w, b, [True, True, True])
        return g_h + dx, dw, db

    _, x_mean, x_rstd = torch.ops.aten.native_layer_norm(x, [C], weight, bias, EPS)  # (rows, 1) float32
    _, h_mean, h_rstd = torch.ops.aten.native_layer_norm(h, [C], weight, bias, EPS)
    eager = (torch_forward, torch_backward, torch_fused_forward, torch_fused_backward)
    baselines = [("torch eager", eager)]
    if not quick():  # --quick: eager only (compiling costs more than measuring)
        try:
            compiled = tuple(torch.compile(f) for f in eager)
            # compile now: a baseline that can't build is reported, not fatal
            compiled[0](x, weight, bias)
            compiled[1](dy, x, weight, bias, x_mean, x_rstd)
            compiled[2](residual, x, weight, bias)
            compiled[3](dh_out, dy, h, weight, bias, h_mean, h_rstd)
            baselines.append(("torch.compile", compiled))
        except Exception as err:  # noqa: BLE001
            print(f"layernorm: torch.compile baseline skipped: {type(err).__name__}: {err}")
    for impl, (fwd, bwd, fused_fwd, fused_bwd) in baselines:
        rows.append(Row("layernorm_forward", impl, bench_ms(lambda: fwd(x, weight, bias)),
                        nbytes["layernorm_forward"], shape=shape))
        rows.append(Row("layernorm_backward", impl,
                        bench_ms(lambda: bwd(dy, x, weight, bias, x_mean, x_rstd)),
                        nbytes["layernorm_backward"], shape=shape))
        rows.append(Row("fused_residual_layernorm_forward", impl,
                        bench_ms(lambda: fused_fwd(residual, x, weight, bias)),
                        nbytes["fused_residual_layernorm_forward"], shape=shape, note="residual + x, F.layer_norm"))
        rows.append(Row("fused_residual_layernorm_backward", impl,
                        bench_ms(lambda: fused_bwd(dh_out, dy, h, weight, bias, h_mean, h_rstd)),
                        nbytes["fused_residual_layernorm_backward"], shape=shape))

    # ---- pyllmc kernels (the raw calls, without the op's input checks)
    for impl in available_impls():
        _, mean, rstd = _forward(x, weight, bias, EPS, impl)
        _, _, fused_mean, fused_rstd = _fused_forward(residual, x, weight, bias, EPS, impl)
        rows.append(Row("layernorm_forward", impl, bench_ms(lambda: _forward(x, weight, bias, EPS, impl)),
                        nbytes["layernorm_forward"], shape=shape))
        rows.append(Row("layernorm_backward", impl,
                        bench_ms(lambda: _backward(dy, x, weight, mean, rstd, impl)),
                        nbytes["layernorm_backward"], shape=shape))
        rows.append(Row("fused_residual_layernorm_forward", impl,
                        bench_ms(lambda: _fused_forward(residual, x, weight, bias, EPS, impl)),
                        nbytes["fused_residual_layernorm_forward"], shape=shape))
        rows.append(Row("fused_residual_layernorm_backward", impl,
                        bench_ms(lambda: _fused_backward(dh_out, dy, h, weight, fused_mean, fused_rstd, impl)),
                        nbytes["fused_residual_layernorm_backward"], shape=shape))
    return rows
