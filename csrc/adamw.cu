// adamw.cu: one fused, multi-tensor AdamW step (decoupled weight decay, bias correction,
// optional fp32 master weights, round-to-nearest-even or stochastic rounding to bf16).
//
// Per element, with the hyperparameters of the element's row (see AdamWHyper):
//   p  = p * (1 - lr * wd)                     (decay == 1 exactly when wd == 0)
//   m  = m + (1 - beta1) * (g - m)             (torch's lerp)
//   v  = beta2 * v + (1 - beta2) * g * g
//   p  = p - step_size * m / (sqrt(v) / sqrt(1 - beta2^step) + eps),  step_size = lr / (1 - beta1^step)
// p is the fp32 master copy when there is one (then the bf16/fp16 param is written back from
// it), else the param itself, read and written in its own dtype.
//
// Design: multi-tensor through a device table, one launch for every tensor of the step.
// - The optimizer (pyllmc/optim.py) keeps m, v and the master copy as separate per-param
//   fp32 tensors (torch.optim's state_dict format). A device table has one AdamWTensor row
//   per tensor: the five pointers, the size, the tensor's first chunk, its RNG offset, its
//   hyperparameter row and dtype flags. It is rebuilt only when a pointer changes.
// - Work is cut into chunks of kChunk elements that never straddle two tensors (each tensor
//   starts a fresh chunk); one block per chunk. A device map chunk -> tensor (int32, built
//   once per layout) gives a block its tensor with one load, no search. The padding this
//   costs is less than one chunk per tensor.
// - Hyperparameters change every step (lr from the scheduler, the bias corrections), so
//   they travel by value in the kernel's parameter space (AdamWHyperTable, __grid_constant__):
//   no host-to-device copy and no recompilation when lr changes. A row is one (param group,
//   step) pair; the optimizer launches once more per kMaxRows rows (never in practice).
// - Capturable mode (AdamW(capturable=True), for CUDA graphs): values passed by value would
//   be frozen into the graph at capture, so the rows are read from device memory instead
//   (adamw_step_device_hyper), where the optimizer computes them on the device from the
//   device-side step counts and lr each step; one row per tensor, no kMaxRows limit.
// - Each thread updates 8 elements as two groups of 4, 1024 elements apart (group j of thread t:
//   elements j * 1024 + 4t + [0, 4) of the block's chunk), each group one vector access per
//   stream: 16 bytes of fp32, 8 of bf16/fp16. A warp's lanes so touch one contiguous span per
//   access (512 / 256 bytes: the least sectors). Tensors whose pointers are not 16-byte aligned,
//   and the last partial group of a tensor, take a scalar path. Streaming cache hints: each byte is
//   touched once per step.
// - Stochastic rounding: a counter-based hash of (seed, step, element index), so a run is
//   reproducible bit for bit and the Triton kernel and the torch reference draw the same bits.
// No atomics, no reductions: deterministic.
// Memory access, measured by the simulator's counters (python dev/sim_counters.py): every stream's
// requests are at the ideal. (With 8 consecutive elements per thread, the fp32 streams took 30.9
// sectors per request where 15.5 would do: a thread's two 16-byte packets made the lanes 32 bytes apart.)
#include "common.cuh"

#include <type_traits>

namespace pyllmc {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;                              // elements per thread
constexpr long long kChunk = kThreads * kPerThread;        // elements per block: 2048
// A thread's 8 elements are two groups of 4, kGroupStride apart (its group j: elements
// j * kGroupStride + 4 * threadIdx.x + [0, 4) of the chunk), so the lanes of a warp touch one
// contiguous span per access: 512 bytes of fp32 (16 sectors) or 256 of bf16 (8), never more.
constexpr int kGroup = 4;
constexpr int kGroups = kPerThread / kGroup;
constexpr long long kGroupStride = kThreads * kGroup;      // 1024 elements
constexpr int kMaxRows = 32;                               // hyperparameter rows per launch

// One row of the tensor table (int64 columns); must match pyllmc/optim.py (_TABLE_COLUMNS).
struct AdamWTensor {
    long long param;        // (numel,) ParamT: the parameter, updated in place
    long long grad;         // (numel,) GradT: its gradient (ParamT or float)
    long long master;       // (numel,) float: the fp32 master copy, or 0 when there is none
    long long exp_avg;      // (numel,) float: m
    long long exp_avg_sq;   // (numel,) float: v
    long long numel;
    long long first_chunk;  // the tensor's first chunk in this launch
    long long rng_offset;   // the tensor's first element in the optimizer's RNG index space
    long long hyper_row;    // its row of AdamWHyperTable
    long long flags;        // bits 0-3 param dtype, 4-7 grad dtype, 8 vector path ok, 9 stochastic rounding
};
static_assert(sizeof(AdamWTensor) == 10 * sizeof(long long), "table row layout");

// Hyperparameters of one (param group, step), as float32; must match pyllmc/optim.py.
struct AdamWHyper {
    float decay;                  // 1 - lr * weight_decay
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
    float eps;
    float step_size;              // lr / (1 - beta1^step)
    unsigned int rng_key;         // hash of (seed, step)
};
static_assert(sizeof(AdamWHyper) == 8 * sizeof(float), "hyperparameter row layout");

struct AdamWHyperTable {
    AdamWHyper rows[kMaxRows];
};

constexpr long long kFlagVector = 1 << 8;
constexpr long long kFlagStochastic = 1 << 9;

// ----------------------------------------------------------------------------
// stochastic rounding

// A 32-bit integer hash with full avalanche (the "lowbias32" constants); the same in
// kernels/adamw.py and the torch reference.
__device__ __forceinline__ unsigned int hash32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// Uniform 32 random bits for element `index` of the step keyed by `key`.
__device__ __forceinline__ unsigned int element_random(long long index, unsigned int key) {
    const unsigned long long u = static_cast<unsigned long long>(index);
    return hash32(static_cast<unsigned int>(u) ^ hash32(static_cast<unsigned int>(u >> 32) ^ key));
}

// Rounds x to bf16 up (in magnitude) with probability (dropped bits) / 2^16: adding 16
// random bits below the kept mantissa carries into it exactly that often. Unbiased:
// E[result] = x. NaN stays NaN (truncating its payload could make it inf).
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float x, unsigned int random) {
    if (x != x) return __float2bfloat16_rn(x);
    const unsigned int bits = (__float_as_uint(x) + (random & 0xffffu)) & 0xffff0000u;
    return __float2bfloat16_rn(__uint_as_float(bits));  // exact: the low 16 bits are zero
}

template <typename T>
__device__ __forceinline__ T round_param(float x, bool stochastic, long long index, unsigned int key) {
    return from_float<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 round_param<__nv_bfloat16>(float x, bool stochastic, long long index,
                                                                  unsigned int key) {
    return stochastic ? bf16_stochastic(x, element_random(index, key)) : __float2bfloat16_rn(x);
}

// ----------------------------------------------------------------------------
// 4 elements at a time

// One access of 4 elements: 16 bytes of float, 8 of bf16 / fp16.
template <typename T>
using Vector4 = std::conditional_t<sizeof(T) == 4, int4, int2>;

// out[k] = src[k] as float for k < count (0 past it); one vector load (streaming) when `vector`.
template <typename T>
__device__ __forceinline__ void load4(float (&out)[kGroup], const T* src, int count, bool vector) {
    if (vector) {
        const Vector4<T> raw = __ldcs(reinterpret_cast<const Vector4<T>*>(src));
        const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) out[k] = to_float(values[k]);
    } else {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) out[k] = k < count ? to_float(src[k]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store4(T* dst, const T (&values)[kGroup], int count, bool vector) {
    if (vector) {
        Vector4<T> raw;
        T* packed = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) packed[k] = values[k];
        __stcs(reinterpret_cast<Vector4<T>*>(dst), raw);
    } else {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
            if (k < count) dst[k] = values[k];
        }
    }
}

// Updates elements [begin, begin + count) of tensor `t`.
template <typename ParamT, typename GradT>
__device__ __forceinline__ void adamw_update(const AdamWTensor& t, const AdamWHyper& h, long long begin, int count) {
    const bool vector = count == kGroup && (t.flags & kFlagVector);
    const bool stochastic = (t.flags & kFlagStochastic) != 0;
    ParamT* param = reinterpret_cast<ParamT*>(t.param) + begin;            // (count,)
    const GradT* grad = reinterpret_cast<const GradT*>(t.grad) + begin;    // (count,)
    float* master = t.master ? reinterpret_cast<float*>(t.master) + begin : nullptr;  // (count,)
    float* exp_avg = reinterpret_cast<float*>(t.exp_avg) + begin;          // (count,)
    float* exp_avg_sq = reinterpret_cast<float*>(t.exp_avg_sq) + begin;    // (count,)

    float p[kGroup], g[kGroup], m[kGroup], v[kGroup];
    if (master) {
        load4(p, master, count, vector);
    } else {
        load4(p, param, count, vector);
    }
    load4(g, grad, count, vector);
    load4(m, exp_avg, count, vector);
    load4(v, exp_avg_sq, count, vector);

    ParamT out[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
        // Explicit fmaf and IEEE sqrt / division, nothing left for the compiler to contract:
        // the Triton kernel (compiled without fp fusion) computes the same bits.
        m[k] = fmaf(h.one_minus_beta1, __fsub_rn(g[k], m[k]), m[k]);
        v[k] = fmaf(__fmul_rn(h.one_minus_beta2, g[k]), g[k], __fmul_rn(h.beta2, v[k]));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v[k]), h.bias_correction2_sqrt), h.eps);
        p[k] = fmaf(-h.step_size, __fdiv_rn(m[k], denom), __fmul_rn(p[k], h.decay));
        out[k] = round_param<ParamT>(p[k], stochastic, t.rng_offset + begin + k, h.rng_key);
    }
    store4(exp_avg, m, count, vector);
    store4(exp_avg_sq, v, count, vector);
    if (master) store4(master, p, count, vector);
    store4(param, out, count, vector);
}

// Elements [begin, begin + count) of tensor t (count <= 4), in the tensor's dtypes.
__device__ __forceinline__ void adamw_group(const AdamWTensor& t, const AdamWHyper& h, long long begin, int count) {
    // The dtypes are uniform over the block (a chunk lies in one tensor): no divergence.
    const DType param_dtype = static_cast<DType>(t.flags & 0xf);
    const DType grad_dtype = static_cast<DType>((t.flags >> 4) & 0xf);
    const bool fp32_grad = grad_dtype == DType::kFloat32;
    switch (param_dtype) {
        case DType::kFloat32:
            adamw_update<float, float>(t, h, begin, count);
            break;
        case DType::kBFloat16:
            if (fp32_grad) adamw_update<__nv_bfloat16, float>(t, h, begin, count);
            else adamw_update<__nv_bfloat16, __nv_bfloat16>(t, h, begin, count);
            break;
        case DType::kFloat16:
            if (fp32_grad) adamw_update<__half, float>(t, h, begin, count);
            else adamw_update<__half, __half>(t, h, begin, count);
            break;
    }
}

// This thread's 8 elements of chunk `chunk` (this block's) of tensor t, with hyperparameters h:
// two groups of 4, kGroupStride apart.
__device__ __forceinline__ void adamw_chunk(const AdamWTensor& t, const AdamWHyper& h, long long chunk) {
    const long long first = (chunk - t.first_chunk) * kChunk + static_cast<long long>(threadIdx.x) * kGroup;
    for (int j = 0; j < kGroups; ++j) {
        const long long begin = first + j * kGroupStride;
        if (begin >= t.numel) return;
        const long long left = t.numel - begin;
        adamw_group(t, h, begin, left < kGroup ? static_cast<int>(left) : kGroup);
    }
}

// One block per chunk; chunk_to_tensor: (num_chunks,) int32; tensors: (num_tensors,) rows.
__global__ void __launch_bounds__(kThreads)
adamw_kernel(const AdamWTensor* __restrict__ tensors, int num_tensors, const int* __restrict__ chunk_to_tensor,
             const __grid_constant__ AdamWHyperTable hyper, int num_rows) {
    const long long chunk = blockIdx.x;
    const int index = chunk_to_tensor[chunk];
    if (index < 0 || index >= num_tensors) return;  // a table from pyllmc/optim.py never has one
    const AdamWTensor t = tensors[index];
    if (t.hyper_row < 0 || t.hyper_row >= num_rows || chunk < t.first_chunk) return;
    adamw_chunk(t, hyper.rows[t.hyper_row], chunk);
}

// The same with the hyperparameter rows in device memory: hyper (num_rows,) rows of AdamWHyper.
__global__ void __launch_bounds__(kThreads)
adamw_device_hyper_kernel(const AdamWTensor* __restrict__ tensors, int num_tensors,
                          const int* __restrict__ chunk_to_tensor, const AdamWHyper* __restrict__ hyper,
                          int num_rows) {
    const long long chunk = blockIdx.x;
    const int index = chunk_to_tensor[chunk];
    if (index < 0 || index >= num_tensors) return;  // a table from pyllmc/optim.py never has one
    const AdamWTensor t = tensors[index];
    if (t.hyper_row < 0 || t.hyper_row >= num_rows || chunk < t.first_chunk) return;
    const AdamWHyper h = hyper[t.hyper_row];
    adamw_chunk(t, h, chunk);
}

}  // namespace

// tensors: device (num_tensors, 10) int64, rows of AdamWTensor; chunk_to_tensor: device
// (num_chunks,) int32; hyper: HOST (num_rows, 8) float32 rows of AdamWHyper, copied into the
// launch's parameters (so the caller may free it on return). chunk_size must be kChunk.
void adamw_step(const void* tensors, int num_tensors, const void* chunk_to_tensor, long long num_chunks,
                long long chunk_size, const void* hyper, int num_rows, cudaStream_t stream) {
    require(chunk_size == kChunk, "adamw_step: chunk_size must be " + std::to_string(kChunk) + ", got " +
                                      std::to_string(chunk_size));
    require(num_tensors >= 0 && num_chunks >= 0, "adamw_step: negative sizes");
    require(num_rows >= 1 && num_rows <= kMaxRows,
            "adamw_step: num_rows must be in [1, " + std::to_string(kMaxRows) + "], got " + std::to_string(num_rows));
    require(num_chunks <= 0x7fffffffLL, "adamw_step: too many chunks for one launch");
    if (num_chunks == 0 || num_tensors == 0) return;
    require(tensors != nullptr && chunk_to_tensor != nullptr && hyper != nullptr, "adamw_step: null table");
    AdamWHyperTable table{};
    const AdamWHyper* rows = static_cast<const AdamWHyper*>(hyper);
    for (int r = 0; r < num_rows; ++r) table.rows[r] = rows[r];
    adamw_kernel<<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(
        static_cast<const AdamWTensor*>(tensors), num_tensors, static_cast<const int*>(chunk_to_tensor), table,
        num_rows);
    PYLLMC_LAUNCH_CHECK("adamw_kernel");
}

// The same, but hyper is a DEVICE (num_rows, 8) float32 table of AdamWHyper rows, read by the
// kernel when it runs (capturable mode: a CUDA graph replays the launch with the values the
// device holds then). Any num_rows >= 1.
void adamw_step_device_hyper(const void* tensors, int num_tensors, const void* chunk_to_tensor, long long num_chunks,
                             long long chunk_size, const void* hyper, int num_rows, cudaStream_t stream) {
    require(chunk_size == kChunk, "adamw_step_device_hyper: chunk_size must be " + std::to_string(kChunk) +
                                      ", got " + std::to_string(chunk_size));
    require(num_tensors >= 0 && num_chunks >= 0, "adamw_step_device_hyper: negative sizes");
    require(num_rows >= 1, "adamw_step_device_hyper: num_rows must be >= 1, got " + std::to_string(num_rows));
    require(num_chunks <= 0x7fffffffLL, "adamw_step_device_hyper: too many chunks for one launch");
    if (num_chunks == 0 || num_tensors == 0) return;
    require(tensors != nullptr && chunk_to_tensor != nullptr && hyper != nullptr,
            "adamw_step_device_hyper: null table");
    adamw_device_hyper_kernel<<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(
        static_cast<const AdamWTensor*>(tensors), num_tensors, static_cast<const int*>(chunk_to_tensor),
        static_cast<const AdamWHyper*>(hyper), num_rows);
    PYLLMC_LAUNCH_CHECK("adamw_device_hyper_kernel");
}

int adamw_chunk_size() { return static_cast<int>(kChunk); }
int adamw_max_rows() { return kMaxRows; }

}  // namespace pyllmc
