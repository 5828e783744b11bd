"""What the Triton kernels and launchers share (as csrc/common.cuh does for the CUDA ones): the
description of the GPU a launch targets, the floating-point contraction policy passed at every
launch, and the rounding of float32 results to the storage dtype.

The GPU. Each launcher asks `gpu_of(tensor.device)`: None means the CPU interpreter (large
tiles, few programs: every program and loop step is a Python iteration there), else a `GPU`
whose compute capability and opt-in shared memory per block pick the attention tiles and
pipeline stages (kernels/attention.py estimates each config's shared memory and shrinks it
until it fits), and whose SM count sizes the LayerNorm backward's grid. Nothing else about the
device enters a launch configuration, so dev/triton_report.py substitutes the description of
each architecture of SHARED_MEMORY_PER_BLOCK here and obtains, without a GPU, the exact
launches (constexprs, num_warps, num_stages, grids) of a real GPT-2 step on it. The other
kernels keep on chip only a reduction's scratch (a few KB, the same on every GPU); the
report checks their shared memory against every architecture's limit too.

FP contraction. `enable_fp_fusion` lets the compiler turn a * b + c into one fma (one
rounding instead of two). Every launch passes it explicitly instead of taking Triton's
default, which depends on the version (on through 3.9, announced off from 3.10) and on
TRITON_DEFAULT_FP_FUSION: a kernel's bits on the GPU must not change with the environment.
FP_FUSION (on) is the choice for every kernel whose results are compared with a tolerance:
fewer instructions and never less accurate, as the CUDA kernels get from nvcc's default
--fmad=true. AdamW, promised bitwise equal to the CUDA kernel, turns it off and writes its
fma explicitly (kernels/adamw.py). The interpreter (numpy) never contracts; the tests'
tolerances cover the rounding each contraction saves.
"""

import dataclasses
import functools
from typing import Optional

import math

import torch
import triton
import triton.language as tl

FP_FUSION = True


# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes) of each
# architecture: what a kernel may use at most. At run time the device itself is asked; this
# table describes the GPUs a launch is built for ahead of time (dev/triton_report.py) and in
# the tests.
SHARED_MEMORY_PER_BLOCK = {
    75: 65536,    # T4, RTX 20xx
    80: 166912,   # A100, A30
    86: 101376,   # A10, A40, RTX 30xx
    89: 101376,   # L4, L40S, RTX 40xx
    90: 232448,   # H100, H200
    100: 232448,  # B200, GB200
    120: 101376,  # RTX 50xx, RTX PRO 6000 Blackwell
}


@dataclasses.dataclass(frozen=True)
class GPU:
    capability: tuple[int, int]  # (major, minor): (9, 0) for the H100 / H200
    sm_count: int                # streaming multiprocessors: 132 on an H100 SXM / H200
    shared_memory_per_block: int  # opt-in bytes one block may use: 232448 on an H100 / H200


def gpu_of_arch(arch: int, sm_count: int = 132) -> GPU:
    """The description of an sm_<arch> GPU from SHARED_MEMORY_PER_BLOCK (ahead-of-time builds, tests)."""
    if arch not in SHARED_MEMORY_PER_BLOCK:
        raise ValueError(f"unknown architecture sm_{arch}; known: {sorted(SHARED_MEMORY_PER_BLOCK)}")
    return GPU((arch // 10, arch % 10), sm_count, SHARED_MEMORY_PER_BLOCK[arch])


@functools.lru_cache(maxsize=None)
def _describe(index: int) -> GPU:
    props = torch.cuda.get_device_properties(index)
    return GPU((props.major, props.minor), props.multi_processor_count, props.shared_memory_per_block_optin)


def gpu_of(device: torch.device) -> Optional[GPU]:
    """The GPU that tensors on `device` live on; None off CUDA (the Triton interpreter)."""
    if device.type != "cuda":
        return None
    return _describe(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """float32 -> the storage dtype, rounded to nearest even. bfloat16 is rounded by hand:
    Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds), so the same bits
    come out on both; on the GPU it costs a few integer ops and gives the bits of a plain cast."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low 16 bits are zero
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    else:
        return x.to(dtype)


# ---- row tiles (the row-wise kernels: layernorm.py, rmsnorm.py) -------------------------------------
#
# A program takes a (BLOCK_ROWS, BLOCK_C) tile: BLOCK_ROWS whole rows, BLOCK_C the next power of two
# >= C, so a row is loaded once and reduced in registers.

def row_tile_rows(rows: int, block_c: int, device: torch.device) -> int:
    """Rows per tile. GPU: a few rows when C is small, so a tile holds ~4K elements.
    CPU (interpreter): one program is one Python step, so large tiles keep tests fast."""
    tile = 4096 if gpu_of(device) is not None else 16384
    return max(1, min(tile // block_c, triton.next_power_of_2(max(rows, 1))))


def row_tile_warps(block_rows: int, block_c: int) -> int:
    return max(1, min(16, block_rows * block_c // 512))


def column_sum_tile_rows(rows_per_program: int, block_c: int, device: torch.device) -> int:
    """Rows per tile of a backward that sums columns (dweight, dbias) into a (BLOCK_ROWS, BLOCK_C) float32
    accumulator, one running sum per row slot, summed over the slots once at the end. On a GPU the
    forward's tiles (that last sum is a tree). The interpreter sums a tile's columns one row after another
    (numpy along axis 0), so there a tile has about sqrt(rows_per_program) rows: both float32 chains,
    across the tiles and within one, stay ~sqrt(rows_per_program) adds long instead of rows_per_program.
    Measured at 1,031 x 64 fp32, 30 draws: RMSNorm's dweight went from 1.45 to 0.64 of the flash bound."""
    tile_rows = row_tile_rows(rows_per_program, block_c, device)
    if gpu_of(device) is not None:
        return tile_rows
    return min(tile_rows, triton.next_power_of_2(max(1, math.isqrt(rows_per_program))))


def row_programs(rows: int, block_rows: int, device: torch.device) -> int:
    """Programs (and scratch rows) of a backward that sums per-column partials: enough to fill the
    GPU, each owning a contiguous range of rows; on CPU a handful (the interpreter runs them one by one)."""
    tiles = max(1, triton.cdiv(rows, block_rows))
    gpu = gpu_of(device)
    if gpu is not None:
        return min(tiles, 4 * gpu.sm_count)
    return min(tiles, 4)
