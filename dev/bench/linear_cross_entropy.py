"""The loss head of one training step at GPT-2 124M's size: the plain path (logits = hidden @ wte.T whole,
then the fused classifier in place, then the two backward matmuls) against ops.linear_cross_entropy
(the same by chunks of rows, never holding the logits). N = B*T = 32768 rows, C = 768, W = 50304
padded classes (V = 50257), bf16.

Rows (GPU): forward + backward time and the peak memory above the inputs (torch.cuda.max_memory_allocated),
for each kernel backend. FLOPs: the three matmuls, 6 N C W.

Memory on the CPU, no GPU needed (python dev/bench/linear_cross_entropy.py --cpu-memory): the same step
in float32 in a fresh process per path, the growth of the peak resident set during the step beside the
formula (pyllmc.ops.linear_cross_entropy.loss_head_bytes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Optional

import torch
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import Row, available_impls, bench_ms
else:  # imported by dev/bench/run.py run as a script, or run itself: this folder is on sys.path
    from common import Row, available_impls, bench_ms

ROWS, EMBD, PADDED_VOCAB, VOCAB = 32768, 768, 50304, 50257


def _step(path: str, hidden, weight, targets, backend: str, num_classes: Optional[int] = None) -> None:
    """Forward and backward of the loss head; the gradients land in hidden.grad and weight.grad."""
    from pyllmc import ops

    num_classes = num_classes or VOCAB
    if path == "plain":
        logits = hidden @ weight.t()  # (N, W)
        loss = ops.cross_entropy(logits, targets, num_classes=num_classes, inplace_backward=True, backend=backend)
    else:
        loss = ops.linear_cross_entropy(hidden, weight, targets, num_classes=num_classes, backend=backend)
    loss.backward()


def _inputs(rows: int, device, dtype, embd: Optional[int] = None, padded_vocab: Optional[int] = None,
            vocab: Optional[int] = None):
    """hidden (rows, embd), weight (padded_vocab, embd), targets (rows,) (default: GPT-2's sizes): made in
    place, so that making them raises the peak memory by their own size only."""
    embd, padded_vocab, vocab = embd or EMBD, padded_vocab or PADDED_VOCAB, vocab or VOCAB
    hidden = torch.randn(rows, embd, device=device, dtype=dtype).requires_grad_(True)
    weight = torch.randn(padded_vocab, embd, device=device, dtype=dtype).mul_(embd ** -0.5).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), device=device)
    return hidden, weight, targets


def _torch_step(hidden, weight, targets) -> None:
    """PyTorch's own loss head, the baseline: F.linear then F.cross_entropy on the class columns."""
    F.cross_entropy(F.linear(hidden, weight)[:, :VOCAB], targets).backward()


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc.ops.linear_cross_entropy import chunk_rows_for

    hidden, weight, targets = _inputs(ROWS, device, dtype)
    flops = 6 * ROWS * EMBD * PADDED_VOCAB
    chunk = chunk_rows_for(ROWS, EMBD, PADDED_VOCAB, hidden.element_size())
    on_gpu = torch.device(device).type == "cuda"
    shape = f"({ROWS}, {EMBD}) x ({PADDED_VOCAB}, {EMBD}) {str(dtype).replace('torch.', '')}"
    contenders = [("loss_head_plain", "torch eager", "F.linear + F.cross_entropy", _torch_step)]
    for impl in available_impls():
        if impl == "torch":
            continue  # the torch backend's cross-entropy is the reference math, not a contender
        contenders += [
            ("loss_head_plain", impl, "logits whole + fused classifier",
             lambda h, w, t, impl=impl: _step("plain", h, w, t, impl)),
            ("loss_head_chunked", impl, f"linear_cross_entropy, {chunk}-row chunks",
             lambda h, w, t, impl=impl: _step("chunked", h, w, t, impl)),
        ]
    rows = []
    for op, impl, note, fn in contenders:
        def step():
            hidden.grad = weight.grad = None
            fn(hidden, weight, targets)

        peak = None
        if on_gpu:  # the step's allocations above the inputs, at their peak
            step()
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        rows.append(Row(op=op, impl=impl, ms=bench_ms(step), flops=flops, shape=shape, note=note,
                        peak_memory_bytes=peak))
    return rows


# ---- the CPU measurement ---------------------------------------------------------------------------

def _child(path: str, rows: int) -> dict:
    """In a fresh process: a warm-up step on tiny sizes (torch's thread pools and kernels in place), the
    inputs made, then the peak resident set's growth over one step. Measured from a fresh process, the
    peak is the step's own: nothing before it came near."""
    torch.manual_seed(0)
    _step(path, *_inputs(8, "cpu", torch.float32, embd=16, padded_vocab=64, vocab=60), "torch", num_classes=60)
    hidden, weight, targets = _inputs(rows, "cpu", torch.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _step(path, hidden, weight, targets, "torch")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": path, "rows": rows, "peak_growth_bytes": after - before}


def cpu_memory(rows: int) -> list[dict]:
    from pyllmc.ops.linear_cross_entropy import loss_head_bytes

    results = []
    for path in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", path, "--rows", str(rows)], check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        result["formula_bytes"] = loss_head_bytes(path, rows, EMBD, PADDED_VOCAB, 4)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-memory", action="store_true", help="measure the peak memory of both paths on the CPU")
    parser.add_argument("--rows", type=int, default=2048, help="N for --cpu-memory (GPT-2's C and W; default 2048)")
    parser.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.rows)))
        return
    if not args.cpu_memory:
        parser.error("on a GPU, run this module through dev/bench/run.py --only linear_cross_entropy; "
                     "here: --cpu-memory")
    mib = 2**20
    print(f"loss head, one step, float32 on the CPU: N = {args.rows}, C = {EMBD}, W = {PADDED_VOCAB} "
          f"(python dev/bench/linear_cross_entropy.py --cpu-memory --rows {args.rows})")
    print(f"{'path':<8} {'measured peak growth':>22} {'formula':>12}")
    for r in cpu_memory(args.rows):
        print(f"{r['path']:<8} {r['peak_growth_bytes'] / mib:>18.1f} MiB {r['formula_bytes'] / mib:>8.1f} MiB")


if __name__ == "__main__":
    main()
