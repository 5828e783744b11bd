// softmax_row.cuh: what the fused_classifier rungs share, from cross_entropy_forward's rung 4: a
// block per row computes the row's max m and d = sum of exp(x - m) in one read (online softmax,
// float4 loads between a scalar head and tail).
#pragma once

#include <cmath>
#include <cstdint>

constexpr int kBlock = 256;  // threads per row
constexpr int kWarps = kBlock / 32;
constexpr float kLowest = -1.0e38f;  // a finite start for every running max: no inf - inf

struct SoftmaxStats {
    float max;  // the largest x seen
    float sum;  // sum of exp(x - max) over the x seen
};

__device__ __forceinline__ SoftmaxStats merge(SoftmaxStats a, SoftmaxStats b) {
    const float m = fmaxf(a.max, b.max);
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// Adds K values to a running (max, sum): one rescale for the K, against their max.
template <int K>
__device__ __forceinline__ void stats_add(SoftmaxStats& st, const float (&x)[K]) {
    float m = st.max;
#pragma unroll
    for (int k = 0; k < K; ++k) m = fmaxf(m, x[k]);
    float d = st.sum * expf(st.max - m);
#pragma unroll
    for (int k = 0; k < K; ++k) d += expf(x[k] - m);
    st = {m, d};
}

// Where a row switches between scalar and float4 accesses: [0, head) scalar, [head, vec_end)
// whole float4s, [vec_end, V) scalar. Rows are V floats apart, so a row starts 16-byte aligned
// only when row * V is a multiple of 4.
struct RowSplit {
    int head;
    int vec_end;
};

__device__ __forceinline__ RowSplit split_row(const float* row, int V) {
    const int misaligned = static_cast<int>((reinterpret_cast<std::uintptr_t>(row) % 16) / sizeof(float));
    const int head = min(V, (4 - misaligned) % 4);
    return {head, head + (V - head) / 4 * 4};
}

// The row's (max, sum of exp(x - max)); every thread of the block gets them. `slots`: kWarps pairs.
__device__ __forceinline__ SoftmaxStats row_stats(const float* x, int V, RowSplit split, SoftmaxStats* slots) {
    SoftmaxStats st = {kLowest, 0.0f};
    if (static_cast<int>(threadIdx.x) < split.head) {
        const float one[1] = {x[threadIdx.x]};
        stats_add<1>(st, one);
    }
    const float4* x4 = reinterpret_cast<const float4*>(x + split.head);
    for (int i = threadIdx.x; i < (split.vec_end - split.head) / 4; i += kBlock) {
        const float4 v = x4[i];
        const float four[4] = {v.x, v.y, v.z, v.w};
        stats_add<4>(st, four);
    }
    if (split.vec_end + static_cast<int>(threadIdx.x) < V) {
        const float one[1] = {x[split.vec_end + threadIdx.x]};
        stats_add<1>(st, one);
    }
    // the lanes' pairs merged by shuffles, then the warps' through shared memory
    for (int offset = 16; offset > 0; offset /= 2) {
        const SoftmaxStats other = {__shfl_xor_sync(0xffffffffu, st.max, offset),
                                    __shfl_xor_sync(0xffffffffu, st.sum, offset)};
        st = merge(st, other);
    }
    if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = st;
    __syncthreads();
    SoftmaxStats total = slots[0];
    for (int w = 1; w < kWarps; ++w) total = merge(total, slots[w]);
    return total;
}

// out[j] = (exp(x[j] - m) / d - [j == target]) * scale over the row, float4 where the split allows.
// out may be x itself (the fused rung): each element is read, then written, by the same thread.
__device__ __forceinline__ void write_row_grad(float* out, const float* x, int V, RowSplit split, float m,
                                               float inv_sum, long long target, float scale) {
    if (static_cast<int>(threadIdx.x) < split.head) {
        const int j = threadIdx.x;
        out[j] = (expf(x[j] - m) * inv_sum - (j == target ? 1.0f : 0.0f)) * scale;
    }
    const float4* x4 = reinterpret_cast<const float4*>(x + split.head);
    float4* out4 = reinterpret_cast<float4*>(out + split.head);
    for (int i = threadIdx.x; i < (split.vec_end - split.head) / 4; i += kBlock) {
        const float4 v = x4[i];
        const long long j = split.head + 4LL * i;  // the column of v.x
        float4 g;
        g.x = (expf(v.x - m) * inv_sum - (j == target ? 1.0f : 0.0f)) * scale;
        g.y = (expf(v.y - m) * inv_sum - (j + 1 == target ? 1.0f : 0.0f)) * scale;
        g.z = (expf(v.z - m) * inv_sum - (j + 2 == target ? 1.0f : 0.0f)) * scale;
        g.w = (expf(v.w - m) * inv_sum - (j + 3 == target ? 1.0f : 0.0f)) * scale;
        out4[i] = g;
    }
    if (split.vec_end + static_cast<int>(threadIdx.x) < V) {
        const int j = split.vec_end + threadIdx.x;
        out[j] = (expf(x[j] - m) * inv_sum - (j == target ? 1.0f : 0.0f)) * scale;
    }
}

// An ignored row's gradient: zeros, and nothing read.
__device__ __forceinline__ void zero_row(float* out, int V) {
    for (int j = threadIdx.x; j < V; j += kBlock) out[j] = 0.0f;
}
