// Rung 2: one fused kernel, online softmax. One warp per query row i (lanes split the head dim: lane
// l holds d = l, l + 32, ...) walks the keys j = 0 .. i once, keeping three things in registers: m, the
// largest score seen so far; l, the sum of exp(s_j - m) so far; acc, the sum of exp(s_j - m) v_j. When
// a new score raises m, everything summed so far was relative to the old m: l and acc are multiplied by
// exp(m_old - m_new) before the new term is added. At the end out = acc / l and lse = m + log(l).
// The (T, T) score matrix of rung 1 is never written: no launch but one, no byte of S in memory, and
// the masked half above the diagonal is never visited. What it still pays: every query row reads
// its keys and values from global memory itself, so row i re-reads k_0 .. k_i and v_0 .. v_i, and a
// head reads K and V about T / 2 times over. (Today's float32 path is this kernel.)
#include "lab.cuh"

#include <cmath>

constexpr int kRowsPerBlock = 4;  // warps per block, one query row each

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// out, q, k, v: (B*H, T, D); lse: (B*H, T). grid (B*H, ceil(T / kRowsPerBlock)), block kRowsPerBlock * 32.
template <int D>
__global__ void attention_online_softmax_kernel(float* out, float* lse, const float* q, const float* k,
                                                const float* v, int T, float scale) {
    constexpr int kPerLane = D / 32;
    const int i = blockIdx.y * kRowsPerBlock + threadIdx.x / 32;  // this warp's query row
    const int lane = threadIdx.x % 32;
    if (i >= T) return;  // the whole warp leaves together
    const long long head = static_cast<long long>(blockIdx.x) * T * D;
    q += head;
    k += head;
    v += head;
    out += head;
    float q_reg[kPerLane], acc[kPerLane];  // (D,) split over the lanes
    for (int c = 0; c < kPerLane; ++c) {
        q_reg[c] = q[i * D + lane + 32 * c] * scale;
        acc[c] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= i; ++j) {  // causal: keys 0 .. i
        float dot = 0.0f;
        for (int c = 0; c < kPerLane; ++c) dot += q_reg[c] * k[j * D + lane + 32 * c];
        const float s = warp_sum(dot);                // every lane holds s_ij
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);     // rescales what was summed against the old max (0 at j = 0)
        const float p = expf(s - m_new);
        l = l * correction + p;
        for (int c = 0; c < kPerLane; ++c) acc[c] = acc[c] * correction + p * v[j * D + lane + 32 * c];
        m = m_new;
    }
    for (int c = 0; c < kPerLane; ++c) out[i * D + lane + 32 * c] = acc[c] / l;
    if (lane == 0) lse[static_cast<long long>(blockIdx.x) * T + i] = m + logf(l);
}

LAB_EXPORT int lab_attention_2_online_softmax(float* out, float* lse, const float* q, const float* k, const float* v,
                                              int B, int H, int T, int D, char* err, int err_len) {
    if (D != 64 && D != 128) return lab_fail(err, err_len, "rung 2 takes D in {64, 128}, as rungs 4 and 6");
    if (B * H * T == 0) return 0;
    const dim3 grid(B * H, (T + kRowsPerBlock - 1) / kRowsPerBlock);
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    return lab_run(err, err_len, [&] {
        if (D == 64) attention_online_softmax_kernel<64><<<grid, kRowsPerBlock * 32>>>(out, lse, q, k, v, T, scale);
        if (D == 128) attention_online_softmax_kernel<128><<<grid, kRowsPerBlock * 32>>>(out, lse, q, k, v, T, scale);
    });
}
