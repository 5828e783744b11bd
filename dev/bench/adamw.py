"""One AdamW step over GPT-2 124M's parameters (124.5M, 148 tensors).

pyllmc.optim.AdamW on bf16 params with fp32 master weights (the training setup), each
kernel backend, round-to-nearest and stochastic rounding; against torch.optim.AdamW on
fp32 params, fused=True (one CUDA kernel per dtype/device group) and foreach=True.
The times are whole opt.step() calls, Python overhead (table lookup, hyperparameters)
included.

Bytes per parameter, counted as the fewest the step must move:
  pyllmc, bf16 param + fp32 master: read grad (bf16) 2 + read/write master 8 + read/write
  m 8 + read/write v 8 + write param (bf16) 2 = 28 B.
  torch fused, fp32 params: read grad 4 + read/write param 8 + m 8 + v 8 = 28 B.
The 22 B/param figure quoted elsewhere for this step (a different accounting) gives
GB/s x 22/28 of the numbers here; the ratios between rows do not change.
"""

import torch

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms

CHANNELS, LAYERS, VOCAB_PADDED, MAX_SEQ = 768, 12, 50304, 1024
BYTES_PER_PARAM = 28


def gpt2_124m_shapes() -> list:
    c = CHANNELS
    shapes = [(VOCAB_PADDED, c), (MAX_SEQ, c)]  # wte, wpe
    for _ in range(LAYERS):
        shapes += [(c,), (c,)]                   # ln_1 weight, bias
        shapes += [(3 * c, c), (3 * c,)]         # attn qkv
        shapes += [(c, c), (c,)]                 # attn proj
        shapes += [(c,), (c,)]                   # ln_2 weight, bias
        shapes += [(4 * c, c), (4 * c,)]         # mlp fc
        shapes += [(c, 4 * c), (c,)]             # mlp proj
    shapes += [(c,), (c,)]                       # ln_f weight, bias
    return shapes


def make_params(dtype, device):
    params = [torch.randn(s, device=device, dtype=torch.float32).mul_(0.02).to(dtype).requires_grad_(True)
              for s in gpt2_124m_shapes()]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    return params


def decay_groups(params, weight_decay=0.1):
    """GPT-2's split: 2-D weights decay, biases and LayerNorm params do not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def run(device="cuda", dtype=torch.bfloat16) -> list:
    from pyllmc.optim import AdamW

    shapes = gpt2_124m_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    nbytes = BYTES_PER_PARAM * n
    rows = []

    fp32_params = make_params(torch.float32, device)
    for impl, kwargs in (("torch fused (fp32 params)", dict(fused=True)),
                         ("torch foreach (fp32 params)", dict(foreach=True))):
        opt = torch.optim.AdamW(decay_groups(fp32_params), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **kwargs)
        rows.append(Row("adamw_step", impl, bench_ms(opt.step), nbytes,
                        shape=f"GPT-2 124M, {n / 1e6:.1f}M params fp32", note="28 B/param"))
        del opt
    del fp32_params
    torch.cuda.empty_cache()

    params = make_params(torch.bfloat16, device)
    shape = f"GPT-2 124M, {n / 1e6:.1f}M params bf16 + fp32 master"
    for impl in available_impls():
        for stochastic in (False, True):
            opt = AdamW(decay_groups(params), lr=6e-4, stochastic_rounding=stochastic, backend=impl)
            opt.step()  # state, tables and (Triton) compilation outside the timing
            name = impl + (" stochastic rounding" if stochastic else "")
            rows.append(Row("adamw_step", name, bench_ms(opt.step), nbytes, shape=shape,
                            note="28 B/param (22 B/param accounting: x22/28)"))
            del opt
    return rows
