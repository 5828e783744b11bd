// Rung 4: rung 3 with 128-bit loads. Thread t loads float4 number t, t + 256, ... of its row: a
// quarter of the requests, each 16 sectors (512 contiguous bytes per warp). The running (max, sum)
// is rescaled once per float4, not per element: the vector's max first, then its four exps against
// it. A row starts on a 16-byte boundary only when row * V is a multiple of 4, so each row is
// split into a scalar head up to its first aligned address, whole float4s, and a scalar tail
// (today's kernel does the same): any V takes the vector path.
#include "lab.cuh"

#include <cmath>
#include <cstdint>

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr float kLowest = -1.0e38f;  // a finite start for every running max (see rung 3)

struct SoftmaxStats {
    float max;
    float sum;
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

__device__ __forceinline__ SoftmaxStats block_merge(SoftmaxStats st, SoftmaxStats* slots) {
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

// losses: (N,); stats: (N, 2) (max, sum of exp(x - max)); logits: (N, V); targets: (N,)
__global__ void cross_entropy_packed128_kernel(float* losses, float* stats, const float* logits,
                                               const long long* targets, int V, long long ignore_index) {
    __shared__ SoftmaxStats slots[kWarps];
    const long long row = blockIdx.x;
    const long long target = targets[row];
    if (target == ignore_index) {
        if (threadIdx.x == 0) {
            losses[row] = 0.0f;
            stats[2 * row] = 0.0f;
            stats[2 * row + 1] = 1.0f;
        }
        return;
    }
    const float* x = logits + row * V;
    // [0, head) scalar, [head, vec_end) float4, [vec_end, V) scalar
    const int misaligned = static_cast<int>((reinterpret_cast<std::uintptr_t>(x) % 16) / sizeof(float));
    const int head = min(V, (4 - misaligned) % 4);
    const int vec_end = head + (V - head) / 4 * 4;
    SoftmaxStats st = {kLowest, 0.0f};
    if (static_cast<int>(threadIdx.x) < head) {
        const float one[1] = {x[threadIdx.x]};
        stats_add<1>(st, one);
    }
    const float4* x4 = reinterpret_cast<const float4*>(x + head);
    for (int i = threadIdx.x; i < (vec_end - head) / 4; i += kBlock) {
        const float4 v = x4[i];
        const float four[4] = {v.x, v.y, v.z, v.w};
        stats_add<4>(st, four);
    }
    if (vec_end + static_cast<int>(threadIdx.x) < V) {  // the tail: fewer than 4 columns
        const float one[1] = {x[vec_end + threadIdx.x]};
        stats_add<1>(st, one);
    }
    st = block_merge(st, slots);
    if (threadIdx.x == 0) {
        losses[row] = (st.max - x[target]) + logf(st.sum);
        stats[2 * row] = st.max;
        stats[2 * row + 1] = st.sum;
    }
}

LAB_EXPORT int lab_cross_entropy_forward_4_packed128(float* losses, float* stats, const float* logits,
                                                     const long long* targets, long long N, int V,
                                                     long long ignore_index, char* err, int err_len) {
    if (N == 0) return 0;
    return lab_run(err, err_len, [&] {
        cross_entropy_packed128_kernel<<<N, kBlock>>>(losses, stats, logits, targets, V, ignore_index);
    });
}
