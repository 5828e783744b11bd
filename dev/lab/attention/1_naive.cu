// Rung 1: attention as PyTorch eager runs `softmax(mask(q @ k^T * scale)) @ v`: three kernels, with the
// (T, T) matrix of scores in global memory between them.
//   1. scores: S = scale * q k^T, the whole (T, T) product, then -inf above the diagonal (the mask);
//   2. softmax, in place, row by row: P = exp(S - max) / sum, and lse = max + log(sum);
//   3. out = P v, the whole (T, T) x (T, D) product (the zeros above the diagonal included).
// Each kernel is a warp per query row with its accesses coalesced: the point of this rung is not
// how it reads but what it keeps. S is B*H*T*T floats, written by kernel 1, read and written by
// kernel 2, read by kernel 3: 4 T^2 floats per head against the 4 T D of q, k, v and out, a ratio of
// T / D that grows with the context (T = 1024, D = 64 for GPT-2: 16x the op's own traffic).
#include "lab.cuh"

#include <cmath>

constexpr int kRowsPerBlock = 4;  // warps per block, one query row each

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// scores: (B*H, T, T); q, k: (B*H, T, D). Lane l keeps score j0 + l of each 32 keys, so the row of S
// is stored 32 consecutive floats at a time.
template <int D>
__global__ void scores_kernel(float* scores, const float* q, const float* k, int T, float scale) {
    constexpr int kPerLane = D / 32;
    const int i = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (i >= T) return;
    const long long head = static_cast<long long>(blockIdx.x) * T * D;
    q += head;
    k += head;
    float* s_row = scores + (static_cast<long long>(blockIdx.x) * T + i) * T;
    float q_reg[kPerLane];
    for (int c = 0; c < kPerLane; ++c) q_reg[c] = q[i * D + lane + 32 * c];
    for (int j0 = 0; j0 < T; j0 += 32) {
        float mine = 0.0f;
        for (int j = j0; j < j0 + 32 && j < T; ++j) {
            float dot = 0.0f;
            for (int c = 0; c < kPerLane; ++c) dot += q_reg[c] * k[j * D + lane + 32 * c];
            const float s = warp_sum(dot) * scale;
            if (lane == j - j0) mine = j <= i ? s : -INFINITY;  // the causal mask, applied after the product
        }
        if (j0 + lane < T) s_row[j0 + lane] = mine;
    }
}

// scores: (B*H, T, T) in, probabilities out; lse: (B*H, T). Three passes over the row: max, sum, write.
__global__ void softmax_kernel(float* scores, float* lse, long long rows, int T) {
    const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float* s = scores + row * T;
    float m = -INFINITY;
    for (int j = lane; j < T; j += 32) m = fmaxf(m, s[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < T; j += 32) sum += expf(s[j] - m);
    sum = warp_sum(sum);
    for (int j = lane; j < T; j += 32) s[j] = expf(s[j] - m) / sum;
    if (lane == 0) lse[row] = m + logf(sum);
}

// out, v: (B*H, T, D); probs: (B*H, T, T). out_i = sum_j P_ij v_j over all T keys, as a dense matmul does.
template <int D>
__global__ void probs_times_v_kernel(float* out, const float* probs, const float* v, int T) {
    constexpr int kPerLane = D / 32;
    const int i = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (i >= T) return;
    const long long head = static_cast<long long>(blockIdx.x) * T * D;
    v += head;
    out += head;
    const float* p_row = probs + (static_cast<long long>(blockIdx.x) * T + i) * T;
    float acc[kPerLane] = {};
    for (int j = 0; j < T; ++j) {
        const float p = p_row[j];  // the same word in every lane: one sector
        for (int c = 0; c < kPerLane; ++c) acc[c] += p * v[j * D + lane + 32 * c];
    }
    for (int c = 0; c < kPerLane; ++c) out[i * D + lane + 32 * c] = acc[c];
}

template <int D>
void naive_attention(float* out, float* lse, float* scores, const float* q, const float* k, const float* v, int BH,
                     int T) {
    const dim3 grid(BH, (T + kRowsPerBlock - 1) / kRowsPerBlock);
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    scores_kernel<D><<<grid, kRowsPerBlock * 32>>>(scores, q, k, T, scale);
    const long long rows = static_cast<long long>(BH) * T;
    softmax_kernel<<<(rows + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock * 32>>>(scores, lse, rows, T);
    probs_times_v_kernel<D><<<grid, kRowsPerBlock * 32>>>(out, scores, v, T);
}

// scores: a (B, H, T, T) float32 workspace, as eager allocates for the intermediate.
LAB_EXPORT int lab_attention_1_naive(float* out, float* lse, float* scores, const float* q, const float* k,
                                     const float* v, int B, int H, int T, int D, char* err, int err_len) {
    if (D != 64 && D != 128) return lab_fail(err, err_len, "rung 1 takes D in {64, 128}, as rungs 4 and 6");
    if (B * H * T == 0) return 0;
    return lab_run(err, err_len, [&] {
        if (D == 64) naive_attention<64>(out, lse, scores, q, k, v, B * H, T);
        if (D == 128) naive_attention<128>(out, lse, scores, q, k, v, B * H, T);
    });
}
