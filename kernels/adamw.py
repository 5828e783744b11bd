"""One fused, multi-tensor AdamW step in Triton: the same math, table and RNG as csrc/adamw.cu.

Per element, with the hyperparameters of the element's row:
    p = p * (1 - lr * wd)                       (decay == 1 exactly when wd == 0)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - step_size * m / (sqrt(v) / sqrt(1 - beta2^step) + eps),  step_size = lr / (1 - beta1^step)
p is the fp32 master copy when there is one (the bf16/fp16 param is then written back from it).

Design: like the CUDA kernel, a device table with one row of int64 columns per tensor
(pointers, size, first chunk, RNG offset, hyperparameter row, flags; see pyllmc/optim.py)
and a chunk -> tensor map, so one launch updates every tensor. Triton has no pointer
table type, but an int64 loaded from the table casts to a typed pointer
(`.to(tl.pointer_type(...))`); the element types must be compile-time constants, so the
optimizer launches once per *kind* of tensor (param dtype, grad dtype, master copy or not,
stochastic rounding or not, 16-byte aligned or not): one launch per step in practice.
`tl.multiple_of` tells the compiler the aligned kind's pointers are 16-byte aligned, and
full chunks run without a mask, so their loads and stores are 128-bit vectors (checked in
the PTX: ld/st.global.v4); only a tensor's last chunk is masked.

Hyperparameters come from a small float32 tensor (num_rows, 8) on the device, written by
the optimizer each step (one tiny host-to-device copy; with AdamW(capturable=True) computed on
the device instead, one row per tensor, so that a CUDA graph replays it with current values):
lr and the bias corrections change every step without recompiling. The RNG key (column 7) is
stored as the bits of a uint32.

Bitwise agreement with the CUDA kernel: both use explicit fma, IEEE sqrt and division, and
this kernel is compiled with fp fusion off, so nothing else is contracted. Under the Triton
interpreter (CPU) the same operations run in numpy float32 with a true fma. fp32 -> bf16
rounding (nearest even or stochastic) is done on the bits, because the interpreter's own
fp32 -> bf16 cast truncates.
"""

import torch
import triton
import triton.language as tl

from . import _common

TABLE_COLUMNS = tl.constexpr(10)  # must match AdamWTensor in csrc/adamw.cu and pyllmc/optim.py
HYPER_COLUMNS = tl.constexpr(8)  # must match AdamWHyper
BLOCK_SIZE_GPU = 2048  # 8 elements per thread at 8 warps, as the CUDA kernel
BLOCK_SIZE_CPU = 1 << 16  # under the interpreter every program is one Python loop iteration: few, big ones

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def block_size(device: torch.device) -> int:
    """Elements per program (the chunk size of the table) for tensors on `device`."""
    return BLOCK_SIZE_GPU if _common.gpu_of(device) is not None else BLOCK_SIZE_CPU


def launch_options(device: torch.device) -> dict:
    """num_warps (8 on a GPU: 8 elements per thread of a 2048-element chunk) and fp contraction
    off: the bits must equal the CUDA kernel's, so every fma is written out (tl.fma) and the
    compiler may contract nothing else."""
    options = {"enable_fp_fusion": False}
    if _common.gpu_of(device) is not None:
        options["num_warps"] = 8
    return options


@triton.jit
def _hash32(x):
    # "lowbias32": a 32-bit integer hash with full avalanche; the same in csrc/adamw.cu and pyllmc/optim.py
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _to_bf16(x, first_index, lanes, key, STOCHASTIC: tl.constexpr):
    # fp32 -> bf16 on the bits, so that the interpreter (whose own fp32 -> bf16 cast truncates)
    # and the GPU round the same way. Both add a 16-bit amount below bf16's mantissa and drop
    # the low 16 bits; the carry rounds up:
    #   nearest even: 0x7fff + (the last kept bit): exactly IEEE round-to-nearest-even;
    #   stochastic: 16 random bits from (key = hash of seed and step, element index), so the
    #   carry happens with probability (dropped bits) / 2^16 and E[result] = x.
    # The element index is first_index + lane (first_index >= 0 for every element stored): its
    # 32-bit halves come from the scalar's halves and the carry of the low word, which keeps
    # int64 arithmetic off the vector (registers: ptxas 12.8 spilled the int64 version).
    bits = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        first_lo = (first_index & 0xFFFFFFFF).to(tl.uint32)
        lo = first_lo + lanes.to(tl.uint32)                      # wraps modulo 2^32
        hi = (first_index >> 32).to(tl.uint32) + (lo < first_lo).to(tl.uint32)
        increment = _hash32(lo ^ _hash32(hi ^ key)) & 0xFFFF
    else:
        increment = 0x7FFF + ((bits >> 16) & 1)
    bits = (bits + increment) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low 16 bits are zero
    return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN


@triton.jit
def adamw_step_kernel(
    tensors_ptr,          # (num_tensors, TABLE_COLUMNS) int64
    chunk_to_tensor_ptr,  # (num_chunks,) int32
    hyper_ptr,            # (num_rows, HYPER_COLUMNS) float32
    num_tensors,
    num_rows,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    index = tl.load(chunk_to_tensor_ptr + chunk).to(tl.int64)
    index = tl.minimum(tl.maximum(index, 0), num_tensors - 1)  # a table from pyllmc/optim.py is in range
    row = tensors_ptr + index * TABLE_COLUMNS
    param_addr = tl.load(row + 0)
    grad_addr = tl.load(row + 1)
    master_addr = tl.load(row + 2)
    exp_avg_addr = tl.load(row + 3)
    exp_avg_sq_addr = tl.load(row + 4)
    numel = tl.load(row + 5)
    first_chunk = tl.load(row + 6)
    rng_offset = tl.load(row + 7)
    hyper_row = tl.minimum(tl.maximum(tl.load(row + 8), 0), num_rows - 1)

    param_ptr = param_addr.to(tl.pointer_type(PARAM_DTYPE))          # (numel,)
    grad_ptr = grad_addr.to(tl.pointer_type(GRAD_DTYPE))             # (numel,)
    exp_avg_ptr = exp_avg_addr.to(tl.pointer_type(tl.float32))       # (numel,)
    exp_avg_sq_ptr = exp_avg_sq_addr.to(tl.pointer_type(tl.float32))  # (numel,)
    master_ptr = master_addr.to(tl.pointer_type(tl.float32))         # (numel,), used when HAS_MASTER
    if ALIGNED:
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
        master_ptr = tl.multiple_of(master_ptr, 16)

    h = hyper_ptr + hyper_row * HYPER_COLUMNS
    decay = tl.load(h + 0)
    one_minus_beta1 = tl.load(h + 1)
    beta2 = tl.load(h + 2)
    one_minus_beta2 = tl.load(h + 3)
    bias_correction2_sqrt = tl.load(h + 4)
    eps = tl.load(h + 5)
    step_size = tl.load(h + 6)
    rng_key = tl.load(h + 7).to(tl.uint32, bitcast=True)

    start = (chunk - first_chunk) * BLOCK_SIZE  # < 0 only for a chunk map that is not this table's
    offsets = start + tl.arange(0, BLOCK_SIZE)
    # Full chunks run without a mask: a mask with a bound loaded at run time would keep the
    # compiler from vectorizing the loads and stores.
    if (start >= 0) & (start + BLOCK_SIZE <= numel):
        _update_block(param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, offsets < numel,
                      decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size,
                      rng_offset + start, rng_key, PARAM_DTYPE, HAS_MASTER, STOCHASTIC, BLOCK_SIZE, MASKED=False)
    else:
        _update_block(param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets,
                      (offsets >= 0) & (offsets < numel),
                      decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size,
                      rng_offset + start, rng_key, PARAM_DTYPE, HAS_MASTER, STOCHASTIC, BLOCK_SIZE, MASKED=True)


@triton.jit
def _load(ptr, offsets, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offsets, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offsets)


@triton.jit
def _store(ptr, offsets, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offsets, value, mask=mask)
    else:
        tl.store(ptr + offsets, value)


@triton.jit
def _update_block(param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask,
                  decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size,
                  first_index, rng_key, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  STOCHASTIC: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    # first_index: the RNG index of the block's first element (the tensor's rng_offset + start)
    if HAS_MASTER:
        p = _load(master_ptr, offsets, mask, MASKED)
    else:
        p = _load(param_ptr, offsets, mask, MASKED).to(tl.float32)
    g = _load(grad_ptr, offsets, mask, MASKED).to(tl.float32)
    m = _load(exp_avg_ptr, offsets, mask, MASKED)
    v = _load(exp_avg_sq_ptr, offsets, mask, MASKED)

    m = tl.fma(one_minus_beta1, g - m, m)
    v = tl.fma(one_minus_beta2 * g, g, beta2 * v)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = tl.fma(-step_size, tl.div_rn(m, denom), p * decay)

    _store(exp_avg_ptr, offsets, m, mask, MASKED)
    _store(exp_avg_sq_ptr, offsets, v, mask, MASKED)
    if HAS_MASTER:
        _store(master_ptr, offsets, p, mask, MASKED)
    if PARAM_DTYPE == tl.bfloat16:
        out = _to_bf16(p, first_index, tl.arange(0, BLOCK_SIZE), rng_key, STOCHASTIC)
    else:
        out = p.to(PARAM_DTYPE)
    _store(param_ptr, offsets, out, mask, MASKED)


def adamw_step(tensors: torch.Tensor, chunk_to_tensor: torch.Tensor, hyper: torch.Tensor, *,
               param_dtype: torch.dtype, grad_dtype: torch.dtype, has_master: bool, stochastic: bool,
               aligned: bool, block_size: int) -> None:
    """One AdamW step over every tensor of the table (all of one kind), in place.

    tensors: (num_tensors, 10) int64 table rows; chunk_to_tensor: (num_chunks,) int32, chunks
    of `block_size` elements; hyper: (num_rows, 8) float32. All on the params' device.
    """
    num_chunks = chunk_to_tensor.numel()
    num_tensors = tensors.shape[0]
    if num_chunks == 0 or num_tensors == 0:
        return
    if stochastic and param_dtype != torch.bfloat16:
        raise ValueError("stochastic rounding is implemented for bfloat16 params only")
    adamw_step_kernel[(num_chunks,)](
        tensors, chunk_to_tensor, hyper, num_tensors, hyper.shape[0],
        PARAM_DTYPE=_TL_DTYPES[param_dtype], GRAD_DTYPE=_TL_DTYPES[grad_dtype], HAS_MASTER=has_master,
        STOCHASTIC=stochastic, ALIGNED=aligned, BLOCK_SIZE=block_size, **launch_options(tensors.device))
