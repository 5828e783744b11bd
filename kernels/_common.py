"""What the Triton kernels and launchers share (as csrc/common.cuh does for the CUDA ones): the
description of the GPU a launch targets, the floating-point contraction policy passed at every
launch, and the rounding of float32 results to the storage dtype.

The GPU. Each launcher asks `gpu_of(tensor.device)`: None means the CPU interpreter (large
tiles, few programs: every program and loop step is a Python iteration there), else a `GPU`
whose compute capability picks the attention tiles and whose SM count sizes the LayerNorm
backward's grid. Nothing else about the device enters a launch configuration, so
tests/test_triton_gpu_compile.py substitutes an H200's description here and obtains, without
a GPU, the exact launches (constexprs, num_warps, grids) of a real GPT-2 step.

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

import torch
import triton
import triton.language as tl

FP_FUSION = True


@dataclasses.dataclass(frozen=True)
class GPU:
    capability: tuple[int, int]  # (major, minor): (9, 0) for the H100 / H200
    sm_count: int                # streaming multiprocessors: 132 on an H100 SXM / H200


@functools.lru_cache(maxsize=None)
def _describe(index: int) -> GPU:
    props = torch.cuda.get_device_properties(index)
    return GPU((props.major, props.minor), props.multi_processor_count)


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
