// Rung 3: tiles of K and V in shared memory. In rung 2 every query row fetched its keys and values
// from global memory by itself; here a block of kRows query rows (one warp each) fetches a tile of
// kKeys keys and values once, into shared memory, and all kRows rows use it: K and V cross the
// global-memory bus kRows times less often. The tile's 32 keys map onto the warp's 32 lanes: lane j
// computes the score of key j of the tile (q_i from the block's shared Q tile, the same word in every
// lane: a broadcast), the online softmax of rung 2 runs per tile instead of per key (one max and one
// sum over the 32 lanes), and then the lanes switch roles for P v: lane l owns columns l, l + 32, ...
// of acc and takes each p_j from lane j with a shuffle.
// The bank layout matters. Shared memory is 32 banks of 4 bytes; a warp's request is served in one
// pass only if its 32 lanes hit 32 different banks (or the same word). Lane j reads K_tile[j][d]:
// with rows of D = 64 floats, all 32 lanes would read bank d % 32, a 32-way conflict (32 passes). Each
// row is padded by one float (kPad) so that row j starts in bank j: lane j reads bank (j + d) % 32,
// all different. The V reads and the tile stores go along a row: conflict-free either way.
#include "lab.cuh"

#include <cmath>

constexpr int kRows = 16;  // query rows per block, a warp each
constexpr int kKeys = 32;  // keys per tile: one per lane
constexpr int kPad = 1;    // floats added to each K / V row in shared memory: row j starts in bank j

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// out, q, k, v: (B*H, T, D); lse: (B*H, T). grid (B*H, ceil(T / kRows)), block kRows * 32.
template <int D>
__global__ void attention_smem_tiles_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                                            int T, float scale) {
    constexpr int kPerLane = D / 32;
    constexpr int kStride = D + kPad;
    __shared__ float q_tile[kRows][D];          // the block's query rows, pre-scaled
    __shared__ float k_tile[kKeys * kStride];   // (kKeys, D) with padded rows
    __shared__ float v_tile[kKeys * kStride];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = blockIdx.y * kRows;
    const int i = q0 + warp;  // this warp's query row (past T: it computes on zeros, stores nothing)
    const long long head = static_cast<long long>(blockIdx.x) * T * D;
    q += head;
    k += head;
    v += head;
    out += head;

    for (int e = threadIdx.x; e < kRows * D; e += kRows * 32) {
        const int row = q0 + e / D;
        q_tile[e / D][e % D] = row < T ? q[row * D + e % D] * scale : 0.0f;
    }
    float m = -INFINITY, l = 0.0f, acc[kPerLane] = {};
    // causal: the keys up to the block's last row; only the last tile holds keys past some row
    const int num_tiles = (min(q0 + kRows, T) + kKeys - 1) / kKeys;
    for (int tile = 0; tile < num_tiles; ++tile) {
        const int key0 = tile * kKeys;
        __syncthreads();  // the previous tile is used up (and, the first time, q_tile is written)
        for (int e = threadIdx.x; e < kKeys * D; e += kRows * 32) {  // coalesced: consecutive threads, consecutive d
            const int key = key0 + e / D;
            k_tile[(e / D) * kStride + e % D] = key < T ? k[key * D + e % D] : 0.0f;
            v_tile[(e / D) * kStride + e % D] = key < T ? v[key * D + e % D] : 0.0f;
        }
        __syncthreads();

        // lane j: the score of key key0 + j
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += q_tile[warp][d] * k_tile[lane * kStride + d];
        const float s = key0 + lane <= i ? dot : -INFINITY;  // the causal mask (keys past T are past i too)
        const float m_new = fmaxf(m, warp_max(s));            // finite: key 0 is in tile 0 for every row
        const float correction = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * correction + warp_sum(p);
        for (int c = 0; c < kPerLane; ++c) acc[c] *= correction;
        for (int j = 0; j < kKeys; ++j) {
            const float p_j = __shfl_sync(0xffffffffu, p, j);
            for (int c = 0; c < kPerLane; ++c) acc[c] += p_j * v_tile[j * kStride + lane + 32 * c];
        }
        m = m_new;
    }
    if (i < T) {
        for (int c = 0; c < kPerLane; ++c) out[i * D + lane + 32 * c] = acc[c] / l;
        if (lane == 0) lse[static_cast<long long>(blockIdx.x) * T + i] = m + logf(l);
    }
}

LAB_EXPORT int lab_attention_3_smem_tiles(float* out, float* lse, const float* q, const float* k, const float* v,
                                          int B, int H, int T, int D, char* err, int err_len) {
    if (D != 64 && D != 128) return lab_fail(err, err_len, "rung 3 takes D in {64, 128}, as rungs 4 and 6");
    if (B * H * T == 0) return 0;
    const dim3 grid(B * H, (T + kRows - 1) / kRows);
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    return lab_run(err, err_len, [&] {
        if (D == 64) attention_smem_tiles_kernel<64><<<grid, kRows * 32>>>(out, lse, q, k, v, T, scale);
        if (D == 128) attention_smem_tiles_kernel<128><<<grid, kRows * 32>>>(out, lse, q, k, v, T, scale);
    });
}
