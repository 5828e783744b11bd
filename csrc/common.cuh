// common.cuh: what every pyllmc kernel file shares.
//
// - Error checks that throw std::runtime_error (pybind11 turns it into a Python
//   RuntimeError), never exit(): the kernels live inside a Python process.
// - DType: the element type code the bindings pass (the Python side maps torch dtypes).
// - Packed128<T>: 16 bytes of T, loaded and stored with one 128-bit instruction.
// - Conversions between float and the storage types, so kernels compute in float.
// - Row chunks: the per-lane W-wide pieces of a row that the row-wise kernels (layernorm.cu,
//   rmsnorm.cu) keep in registers, and the launch-time choice of their count and width.
//
// Pure CUDA C++: no torch, no Python.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace pyllmc {

// ----------------------------------------------------------------------------
// errors

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("pyllmc CUDA error in ") + what + " (" + file + ":" +
                                 std::to_string(line) + "): " + cudaGetErrorString(err));
    }
}
#define PYLLMC_CUDA_CHECK(call) ::pyllmc::cuda_check((call), #call, __FILE__, __LINE__)
// After a <<<...>>> launch: catches bad configurations (grid too large, too much smem).
#define PYLLMC_LAUNCH_CHECK(name) ::pyllmc::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)

inline void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument("pyllmc: " + msg);
}

// ----------------------------------------------------------------------------
// element types

// Must match pyllmc/ops/_common.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline DType to_dtype(int code) {
    require(code >= 0 && code <= 2, "unknown dtype code " + std::to_string(code));
    return static_cast<DType>(code);
}

// Calls f(T{}) with T the C++ type of `dtype`: one switch instead of one per launcher.
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
    switch (dtype) {
        case DType::kFloat32: f(float{}); break;
        case DType::kBFloat16: f(__nv_bfloat16{}); break;
        case DType::kFloat16: f(__half{}); break;
    }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ----------------------------------------------------------------------------
// 128-bit vectors

// 16 bytes of T: 4 floats or 8 bf16/fp16. Loads and stores compile to one LDG.128 /
// STG.128 when the address is 16-byte aligned (torch allocations are 256-byte aligned,
// and the launchers only vectorize offsets that are multiples of the vector width).
template <typename T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T payload[size];

    __device__ __forceinline__ T& operator[](int i) { return payload[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return payload[i]; }
};

template <typename T>
__device__ __forceinline__ Packed128<T> load128(const T* address) {
    return *reinterpret_cast<const Packed128<T>*>(address);
}
// Streaming load: bypass L1 and mark the line evict-first (data read once).
template <typename T>
__device__ __forceinline__ Packed128<T> load128cs(const T* address) {
    Packed128<T> out;
    *reinterpret_cast<int4*>(&out) = __ldcs(reinterpret_cast<const int4*>(address));
    return out;
}
template <typename T>
__device__ __forceinline__ void store128(T* address, const Packed128<T>& value) {
    *reinterpret_cast<Packed128<T>*>(address) = value;
}
// Streaming store: the output is not read again by this kernel.
template <typename T>
__device__ __forceinline__ void store128cs(T* address, const Packed128<T>& value) {
    __stcs(reinterpret_cast<int4*>(address), *reinterpret_cast<const int4*>(&value));
}

// True when p is 16-byte aligned: the vector path needs it.
inline bool is_aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// ----------------------------------------------------------------------------
// reductions

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Block-wide sum in a fixed order (deterministic). All threads get the result.
// `shared` holds at least 32 floats. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_reduce_sum(float v, float* shared) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
    v = warp_reduce_sum(v);
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (lane < num_warps) ? shared[lane] : 0.0f;
    return warp_reduce_sum(v);
}
__device__ __forceinline__ float block_reduce_max(float v, float* shared) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (lane < num_warps) ? shared[lane] : -INFINITY;
    return warp_reduce_max(v);
}

// ----------------------------------------------------------------------------
// row chunks: a lane's part of a row, W elements at a time (one 128-bit vector, or one scalar)

constexpr int kMaxChunks = 16;  // most W-wide chunks per lane kept in registers

template <typename T>
struct Scalar {
    T payload[1];
    __device__ __forceinline__ const T& operator[](int i) const { return payload[i]; }
};
// A chunk as stored in memory: kept in registers in the storage type (half the registers
// of float for bf16 / fp16) and converted to float where it is used.
template <typename T, int W>
using Chunk = std::conditional_t<W == 1, Scalar<T>, Packed128<T>>;

template <int W, typename T>
__device__ __forceinline__ Chunk<T, W> load_raw(const T* src) {
    static_assert(W == 1 || W == Packed128<T>::size, "a chunk is one scalar or one 128-bit vector");
    if constexpr (W == 1) {
        return Scalar<T>{{*src}};
    } else {
        return load128(src);
    }
}

template <int W, typename T>
__device__ __forceinline__ void load_chunk(float (&dst)[W], const T* src) {
    const Chunk<T, W> raw = load_raw<W>(src);
#pragma unroll
    for (int k = 0; k < W; ++k) dst[k] = to_float(raw[k]);
}

template <int W, typename T>
__device__ __forceinline__ void store_chunk(T* dst, const float (&src)[W]) {
    if constexpr (W == 1) {
        dst[0] = from_float<T>(src[0]);
    } else {
        Packed128<T> v;
#pragma unroll
        for (int k = 0; k < W; ++k) v[k] = from_float<T>(src[k]);
        store128(dst, v);
    }
}

// The smallest n >= chunks in {1, 2, 3, 4, 6, 8, 12, 16}: registers for at most 1.5x the chunks
// needed (GPT-2's C = 768 is exactly 3 bf16 or 6 fp32 chunks).
inline int rounded_chunks(int chunks) {
    for (int n : {1, 2, 3, 4, 6, 8, 12}) {
        if (chunks <= n) return n;
    }
    return kMaxChunks;
}

// Calls f(std::integral_constant<int, rounded_chunks(chunks)>).
template <typename F>
void dispatch_chunks(int chunks, F&& f) {
    switch (rounded_chunks(chunks)) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 8: f(std::integral_constant<int, 8>{}); break;
        case 12: f(std::integral_constant<int, 12>{}); break;
        default: f(std::integral_constant<int, kMaxChunks>{}); break;
    }
}

// The vector path needs whole vectors per row and 16-byte aligned rows.
template <typename T>
bool can_vectorize(int C, std::initializer_list<const void*> pointers) {
    if (C % Packed128<T>::size != 0) return false;
    for (const void* p : pointers) {
        if (p != nullptr && !is_aligned16(p)) return false;
    }
    return true;
}

}  // namespace pyllmc
