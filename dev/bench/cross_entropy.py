"""Cross-entropy at GPT-2 124M's classifier size: B*T = 32768 rows, the (N, 50257) view of
padded (N, 50304) logits, as the model passes them (row stride 50304, no copy).

Rows: forward, backward, and forward + backward, where the latter compares PyTorch's
F.cross_entropy forward + autograd backward (eager and torch.compile) with pyllmc's two
kernels and with the fused classifier (one kernel: loss + dlogits over the logits).
The kernels are timed without the op's target-range check (one small reduction and a sync).

Bytes are the fewest each op must move: logits read once, dlogits (with the padding
columns) written once, targets (int64) read, per-row log-sum-exp (float32) written or read.
"""

import torch
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import Row, available_impls, bench_ms, quick

ROWS, VOCAB, PADDED_VOCAB = 32768, 50257, 50304


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc.ops.cross_entropy import _backward, _forward, _fused

    padded = torch.randn(ROWS, PADDED_VOCAB, device=device, dtype=dtype)
    logits = padded[:, :VOCAB]  # (N, V), row stride Vp
    targets = torch.randint(0, VOCAB, (ROWS,), device=device)
    dloss = torch.ones((), device=device)
    esize = padded.element_size()
    shape = f"({ROWS}, {VOCAB}) of ({ROWS}, {PADDED_VOCAB}) {str(dtype).replace('torch.', '')}"

    logits_bytes = ROWS * VOCAB * esize
    dlogits_bytes = ROWS * PADDED_VOCAB * esize  # gradient written with the padded layout
    targets_bytes = ROWS * 8
    stats_bytes = ROWS * 8  # each row's (max, sum), float32, saved for the backward
    fwd_bytes = logits_bytes + targets_bytes + stats_bytes
    bwd_bytes = logits_bytes + targets_bytes + stats_bytes + dlogits_bytes
    fwd_bwd_bytes = logits_bytes + targets_bytes + dlogits_bytes  # the fused minimum
    rows = []

    # ---- PyTorch baselines
    def torch_forward(x, t):
        return F.cross_entropy(x, t)

    def torch_forward_backward(fwd):
        x = logits.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(fwd(x, targets), x)

    baselines = [("torch eager", torch_forward)]
    if not quick():  # --quick: eager only (compiling costs more than measuring)
        try:
            compiled = torch.compile(torch_forward)
            compiled(logits, targets)  # compile now: a baseline that can't build is reported, not fatal
            baselines.append(("torch.compile", compiled))
        except Exception as err:  # noqa: BLE001
            print(f"cross_entropy: torch.compile baseline skipped: {type(err).__name__}: {err}")
    for impl, fwd in baselines:
        rows.append(Row("cross_entropy_forward", impl, bench_ms(lambda: fwd(logits, targets)), fwd_bytes,
                        shape=shape))
        rows.append(Row("cross_entropy_forward_backward", impl, bench_ms(torch_forward_backward(fwd)),
                        fwd_bwd_bytes, shape=shape, note="F.cross_entropy + autograd backward"))

    # ---- pyllmc kernels
    for impl in available_impls():
        # the raw calls take the logits with their row stride and the number of classes V
        _, stats, n_valid = _forward(logits, targets, -1, VOCAB, impl)
        rows.append(Row("cross_entropy_forward", impl, bench_ms(lambda: _forward(logits, targets, -1, VOCAB, impl)),
                        fwd_bytes, shape=shape))
        rows.append(Row("cross_entropy_backward", impl,
                        bench_ms(lambda: _backward(logits, targets, stats, n_valid, dloss, -1, VOCAB, impl)), bwd_bytes,
                        shape=shape))

        def two_kernels():
            _, stats_, n_valid_ = _forward(logits, targets, -1, VOCAB, impl)
            return _backward(logits, targets, stats_, n_valid_, dloss, -1, VOCAB, impl)

        rows.append(Row("cross_entropy_forward_backward", impl, bench_ms(two_kernels), fwd_bwd_bytes, shape=shape,
                        note="forward + backward kernels"))
        # The fused kernel overwrites its input: after the first call it runs on gradients,
        # which costs the same (every value is finite and every row is read in full). It gets
        # the whole padded buffer, as the model passes it, and zeroes the padding columns.
        scratch = padded.clone()
        rows.append(Row("cross_entropy_forward_backward", f"{impl} fused",
                        bench_ms(lambda: _fused(scratch, targets, -1, VOCAB, 1.0, impl)), fwd_bwd_bytes,
                        shape=shape, note="fused classifier: loss + dlogits in place"))
        del scratch, stats, n_valid
    return rows
