"""What every benchmark module shares: timing, the two ceilings, and one result row.

Timing: triton.testing.do_bench (CUDA events, warm-up, median). The inputs of the
memory-bound ops at GPT-2 124M sizes are 100s of MB, well past the L2 (50-60 MB), so
repeated runs measure HBM, not the cache. Bytes and FLOPs are counted explicitly by each
benchmark: the fewest bytes the op must move (each input read once, each output
written once).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Row:
    op: str                 # e.g. "gelu_forward": the DESIGN.md name of the op and direction
    impl: str               # "cuda" | "triton" | "torch eager" | "torch.compile" | ...
    ms: float               # median time
    bytes: Optional[int] = None
    flops: Optional[int] = None
    shape: str = ""
    note: str = ""

    @property
    def gbps(self) -> Optional[float]:
        return None if self.bytes is None else self.bytes / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> Optional[float]:
        return None if self.flops is None else self.flops / (self.ms * 1e-3) / 1e12


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbps(device="cuda", nbytes: int = 2 * 1024**3) -> float:
    """A large device-to-device copy: (bytes read + bytes written) / time."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device="cuda", n: int = 8192) -> float:
    """A large bf16 matrix product on random data: 2 n^3 / time."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def available_impls() -> list[str]:
    import pyllmc

    return [name for name in ("cuda", "triton") if pyllmc.available_backends()[name].available]
