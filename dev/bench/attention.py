"""Causal attention forward and forward+backward at GPT-2 124M's size (B=16, T=1024, C=768),
with D=64 (H=12, GPT-2's heads) and D=128 (H=6, same C), against PyTorch's plain math
(eager and torch.compile) and F.scaled_dot_product_attention under each SDPA backend.

FLOPs, counted explicitly: the forward does two (T x T x D) matmuls per head, 4 B H T^2 D,
halved for the causal mask; the backward does five, so forward+backward = 3.5 x forward.
Every implementation runs through autograd (torch.autograd.grad: no .grad accumulation),
so the forward+backward rows time the same work for all of them.

One grouped-query row (attention_gqa_forward_backward): D=64, H=12 query heads sharing H_kv=4
kv heads (groups of GQA_GROUP = 3), forward+backward, against plain math (K/V repeated per query head) and
SDPA's own GQA (enable_gqa=True). Same FLOPs as multi-head attention at H=12.
"""

import torch

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

B, T, C = 16, 1024, 768
HEAD_DIMS = (64, 128)
GQA_GROUP = 3  # query heads per kv head in the grouped-query row (D = 64, H = C / 64)
SDPA_BACKENDS = (("sdpa flash", "FLASH_ATTENTION"), ("sdpa cudnn", "CUDNN_ATTENTION"))


def attention_flops(b: int, h: int, t: int, d: int, backward: bool) -> int:
    forward = 4 * b * h * t * t * d // 2  # causal: half the score matrix
    return forward * 7 // 2 if backward else forward


def _sdpa_fn(backend_name: str):
    """F.scaled_dot_product_attention restricted to one SDPA backend, or None if this torch lacks it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pyllmc.ops.attention import sdpa_attention

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return sdpa_attention(q, k, v)

    return fn


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc import ops
    from pyllmc.ops.attention import attention_reference, supports_head_dim

    rows = []
    for d in (64,) if quick() else HEAD_DIMS:  # --quick: GPT-2's head dim only
        h = C // d
        shape = f"({B}, {h}, {T}, {d}) {str(dtype).replace('torch.', '')} causal"
        q, k, v = (torch.randn(B, h, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, h, T, d, device=device, dtype=dtype)

        def plain(a, b_, c):
            return attention_reference(a, b_, c).to(a.dtype)

        # torch.compile compiles at the first call: a failure there skips the row below
        impls = [("torch eager", plain)]
        if not quick():  # --quick: eager only (compiling costs more than measuring)
            impls.append(("torch.compile", torch.compile(plain)))
        impls += [(label, _sdpa_fn(name)) for label, name in SDPA_BACKENDS]
        for impl in available_impls():
            if supports_head_dim(impl, d, dtype):
                impls.append((impl, lambda a, b_, c, impl=impl: ops.attention(a, b_, c, backend=impl)))

        for impl, fn in impls:
            try:
                if fn is None:
                    raise RuntimeError("not available in this torch")
                fwd_bwd = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)  # noqa: E731
                with torch.no_grad():
                    fn(q, k, v)  # compile / select kernels outside the timing; unsupported fails here
                fwd_bwd()
                with torch.no_grad():
                    fwd_ms = bench_ms(lambda: fn(q, k, v))
                fwd_bwd_ms = bench_ms(fwd_bwd)
            except Exception as err:  # noqa: BLE001 - an unavailable baseline is skipped, not fatal
                print(f"attention D={d}: {impl} skipped: {type(err).__name__}: {str(err).strip()[:200]}")
                continue
            rows.append(Row("attention_forward", impl, fwd_ms, flops=attention_flops(B, h, T, d, False),
                            shape=shape, note="inference forward (no_grad)"))
            rows.append(Row("attention_forward_backward", impl, fwd_bwd_ms, flops=attention_flops(B, h, T, d, True),
                            shape=shape, note="forward + autograd backward"))
        del q, k, v, dout
        torch.cuda.empty_cache()
    return rows + _gqa_rows(device, dtype)


def _gqa_rows(device, dtype) -> list[Row]:
    """attention_gqa_forward_backward: q (B, H, T, D), k, v (B, H_kv, T, D), D = 64, H = C / D, H_kv = H / GQA_GROUP."""
    import torch.nn.functional as F

    from pyllmc import ops
    from pyllmc.ops.attention import attention_reference, supports_head_dim

    d = 64
    h = C // d
    h_kv = h // GQA_GROUP if h % GQA_GROUP == 0 else 1
    shape = f"q ({B}, {h}, {T}, {d}), k, v ({B}, {h_kv}, {T}, {d}) {str(dtype).replace('torch.', '')} causal"
    q = torch.randn(B, h, T, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, h_kv, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, h, T, d, device=device, dtype=dtype)
    impls = [("torch eager", lambda a, b_, c: attention_reference(a, b_, c).to(a.dtype)),
             ("sdpa enable_gqa", lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=True,
                                                                                 enable_gqa=True))]
    impls += [(impl, lambda a, b_, c, impl=impl: ops.attention(a, b_, c, backend=impl))
              for impl in available_impls() if supports_head_dim(impl, d, dtype)]
    rows = []
    for impl, fn in impls:
        try:
            fwd_bwd = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)  # noqa: E731
            fwd_bwd()  # unsupported (an older torch without enable_gqa) fails here
            ms = bench_ms(fwd_bwd)
        except Exception as err:  # noqa: BLE001 - an unavailable baseline is skipped, not fatal
            print(f"attention GQA: {impl} skipped: {type(err).__name__}: {str(err).strip()[:200]}")
            continue
        rows.append(Row("attention_gqa_forward_backward", impl, ms, flops=attention_flops(B, h, T, d, True),
                        shape=shape, note=f"grouped-query: {h} query heads, {h_kv} kv heads"))
    del q, k, v, dout
    torch.cuda.empty_cache()
    return rows
