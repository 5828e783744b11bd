// Rung 3: online softmax (Milakov & Gimelshein 2018), one read of the row. Each thread keeps a
// running max m and the sum d of exp(x - m) over what it has seen; when a new x exceeds m, the sum
// so far was taken against the old max and is rescaled: d = d * exp(m_old - x) + 1. Two such
// (m, d) pairs merge the same way, (max(m1, m2), d1 exp(m1 - m) + d2 exp(m2 - m)), so the
// threads' pairs are merged by warp shuffles (5 steps, registers only), then the 8 warps' pairs
// through 8 slots of shared memory. The max and the sum come out of one pass: rung 2's second read
// of the row is gone.
#include "lab.cuh"

#include <cmath>

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
// Start of every running max: finite, so a merge of two empty pairs computes exp(0), never
// exp(-inf - (-inf)) = NaN (a lane may see no column when V < kBlock).
constexpr float kLowest = -1.0e38f;

struct SoftmaxStats {
    float max;  // the largest x seen
    float sum;  // sum of exp(x - max) over the x seen
};

__device__ __forceinline__ SoftmaxStats merge(SoftmaxStats a, SoftmaxStats b) {
    const float m = fmaxf(a.max, b.max);
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// The block's (max, sum); every thread gets them. `slots`: kWarps pairs.
__device__ __forceinline__ SoftmaxStats block_merge(SoftmaxStats st, SoftmaxStats* slots) {
    for (int offset = 16; offset > 0; offset /= 2) {
        const SoftmaxStats other = {__shfl_xor_sync(0xffffffffu, st.max, offset),
                                    __shfl_xor_sync(0xffffffffu, st.sum, offset)};
        st = merge(st, other);
    }
    if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = st;
    __syncthreads();
    SoftmaxStats total = slots[0];  // every lane reads the same slot: a broadcast, no conflict
    for (int w = 1; w < kWarps; ++w) total = merge(total, slots[w]);
    return total;
}

// losses: (N,); stats: (N, 2) (max, sum of exp(x - max)); logits: (N, V); targets: (N,)
__global__ void cross_entropy_online_softmax_kernel(float* losses, float* stats, const float* logits,
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
    SoftmaxStats st = {kLowest, 0.0f};
    for (int j = threadIdx.x; j < V; j += kBlock) {
        const float v = x[j];
        if (v > st.max) {  // a new max: the sum so far was against the old one
            st.sum = st.sum * expf(st.max - v) + 1.0f;
            st.max = v;
        } else {
            st.sum += expf(v - st.max);
        }
    }
    st = block_merge(st, slots);
    if (threadIdx.x == 0) {
        losses[row] = (st.max - x[target]) + logf(st.sum);
        stats[2 * row] = st.max;
        stats[2 * row + 1] = st.sum;
    }
}

LAB_EXPORT int lab_cross_entropy_forward_3_online_softmax(float* losses, float* stats, const float* logits,
                                                          const long long* targets, long long N, int V,
                                                          long long ignore_index, char* err, int err_len) {
    if (N == 0) return 0;
    return lab_run(err, err_len, [&] {
        cross_entropy_online_softmax_kernel<<<N, kBlock>>>(losses, stats, logits, targets, V, ignore_index);
    });
}
