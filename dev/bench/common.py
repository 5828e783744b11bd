"""What every benchmark module shares: timing, the two ceilings, quick mode and one result row.

Timing: triton.testing.do_bench (CUDA events, warm-up, median). The inputs of the
memory-bound ops at GPT-2 124M sizes are 100s of MB, well past the L2 (50-60 MB), so
repeated runs measure HBM, not the cache. Bytes and FLOPs are counted explicitly by each
benchmark: the fewest bytes the op must move (each input read once, each output
written once).

Quick mode (run.py --quick, the GPU check's bench stage): shorter repetitions, GPT-2
shapes only, and eager PyTorch baselines instead of per-op torch.compile ones (compiling
a dozen small graphs costs more than the whole measurement). The whole-step benchmark
keeps its torch.compile baseline in both modes.

torch is imported inside the functions that need it, so that the report code (run.py's
markdown, read by dev/gpu_check_report.py) works without torch.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Callable, Optional

# do_bench's budgets in milliseconds: (warm-up, measured repetitions)
FULL_BUDGET_MS = (25.0, 200.0)
QUICK_BUDGET_MS = (5.0, 30.0)
_quick = False


def set_quick(on: bool) -> None:
    global _quick
    _quick = bool(on)


def quick() -> bool:
    """True under run.py --quick: fewer repetitions, GPT-2 shapes only, eager baselines."""
    return _quick


@dataclasses.dataclass
class Row:
    op: str                 # e.g. "gelu_forward": the DESIGN.md name of the op and direction
    impl: str               # "cuda" | "triton" | "torch eager" | "torch.compile" | ...
    ms: float               # median time
    bytes: Optional[int] = None
    flops: Optional[int] = None
    shape: str = ""
    note: str = ""
    # whole training step rows only (dev/bench/step.py)
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None             # of the GPU's dense bf16 peak (pyllmc.model.PEAK_BF16_FLOPS)
    peak_memory_bytes: Optional[int] = None  # torch.cuda.max_memory_allocated over the run

    @property
    def gbps(self) -> Optional[float]:
        return None if self.bytes is None else self.bytes / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> Optional[float]:
        return None if self.flops is None else self.flops / (self.ms * 1e-3) / 1e12

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), gbps=self.gbps, tflops=self.tflops)

    @classmethod
    def from_json(cls, data: dict) -> "Row":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class BenchFailure(Exception):
    """Some implementations of a benchmark failed: `rows` holds what was measured anyway."""

    def __init__(self, rows: list, failures: list):
        super().__init__("; ".join(failures))
        self.rows = rows
        self.failures = failures


def bench_ms(fn: Callable[[], object], warmup_ms: Optional[float] = None, rep_ms: Optional[float] = None) -> float:
    import triton.testing

    default_warmup, default_rep = QUICK_BUDGET_MS if _quick else FULL_BUDGET_MS
    warmup = default_warmup if warmup_ms is None else warmup_ms
    rep = default_rep if rep_ms is None else rep_ms
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth_gbps(device="cuda", nbytes: int = 2 * 1024**3) -> float:
    """A large device-to-device copy: (bytes read + bytes written) / time."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device="cuda", n: int = 8192) -> float:
    """A large bf16 matrix product on random data: 2 n^3 / time."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def available_impls() -> list[str]:
    import pyllmc

    return [name for name in ("cuda", "triton") if pyllmc.available_backends()[name].available]


def cpu_name() -> str:
    """The CPU's model name, for the machine line of a benchmark's results."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
