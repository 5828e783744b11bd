// row_chunks.cuh: what the residual_layernorm rungs share: a warp's lane owns the chunks of W floats
// at columns (i * 32 + lane) * W of its row, i < kChunks. W = 4 (one float4, a 128-bit access) where
// C % 4 == 0 and the pointers are 16-byte aligned, else W = 1 (scalar: any C). kChunks is a template
// constant so a lane's part of the row lives in registers (layernorm_forward's rung 4).
#pragma once

#include <type_traits>

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// W floats moved as one access: a float4 (128 bits) or a float. The rungs dereference as_vec<W>(p)
// themselves, so each load and store is on the kernel's own line (what --sites names); pack and
// unpack only move registers.
template <int W>
using vec_t = std::conditional_t<W == 4, float4, float>;

template <int W>
__device__ __forceinline__ const vec_t<W>* as_vec(const float* p) { return reinterpret_cast<const vec_t<W>*>(p); }
template <int W>
__device__ __forceinline__ vec_t<W>* as_vec(float* p) { return reinterpret_cast<vec_t<W>*>(p); }

__device__ __forceinline__ void unpack(float (&dst)[4], float4 v) { dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w; }
__device__ __forceinline__ void unpack(float (&dst)[1], float v) { dst[0] = v; }

template <int W>
__device__ __forceinline__ vec_t<W> pack(const float (&src)[W]) {
    if constexpr (W == 4) return make_float4(src[0], src[1], src[2], src[3]);
    else return src[0];
}

inline bool aligned16(const void* p) { return reinterpret_cast<unsigned long long>(p) % 16 == 0; }

// Calls launch(std::integral_constant<int, W>, std::integral_constant<int, kChunks>) with the
// smallest kChunks in 1, 2, 4, ..., 32 that covers a row of C; false when C is longer (C > 1024
// scalar, C > 4096 in float4).
template <typename F>
bool launch_row_chunks(int C, bool vectorize, F&& launch) {
    const auto pick = [&](auto width) {
        constexpr int W = decltype(width)::value;
        const int chunks = (C + 32 * W - 1) / (32 * W);
        if (chunks <= 1) launch(width, std::integral_constant<int, 1>{});
        else if (chunks <= 2) launch(width, std::integral_constant<int, 2>{});
        else if (chunks <= 4) launch(width, std::integral_constant<int, 4>{});
        else if (chunks <= 8) launch(width, std::integral_constant<int, 8>{});
        else if (chunks <= 16) launch(width, std::integral_constant<int, 16>{});
        else if (chunks <= 32) launch(width, std::integral_constant<int, 32>{});
        else return false;
        return true;
    };
    return vectorize ? pick(std::integral_constant<int, 4>{}) : pick(std::integral_constant<int, 1>{});
}
