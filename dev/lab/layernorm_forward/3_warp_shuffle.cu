// Rung 3: one warp per row, reduced with shuffles. A row of GPT-2 (C = 768) is 24 floats per lane:
// a warp is enough, and a warp needs no shared memory and no __syncthreads to reduce: each
// __shfl_xor_sync step adds a value from another lane's registers, and after 5 steps (16, 8, 4,
// 2, 1) every lane holds the sum. The loads stay coalesced (lane l reads columns l, l + 32, ...);
// the shared-memory traffic of rung 2 is gone, and a block now carries 4 rows.
#include "lab.cuh"

constexpr int kRowsPerBlock = 4;  // warps per block

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// out, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,)
__global__ void layernorm_warp_shuffle_kernel(float* out, float* mean, float* rstd, const float* inp,
                                              const float* weight, const float* bias, long long rows, int C,
                                              float eps) {
    const int lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (row >= rows) return;  // the whole warp leaves together: no shuffle waits on a missing lane
    const float* x = inp + row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += x[c];
    const float m = warp_sum(sum) / C;
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float d = x[c] - m;
        sq += d * d;
    }
    const float s = rsqrtf(warp_sum(sq) / C + eps);
    float* y = out + row * C;
    for (int c = lane; c < C; c += 32) y[c] = (x[c] - m) * s * weight[c] + bias[c];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

LAB_EXPORT int lab_layernorm_forward_3_warp_shuffle(float* out, float* mean, float* rstd, const float* inp,
                                                    const float* weight, const float* bias, long long rows, int C,
                                                    float eps, char* err, int err_len) {
    if (rows == 0) return 0;
    const long long grid = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    return lab_run(err, err_len, [&] { layernorm_warp_shuffle_kernel<<<grid, kRowsPerBlock * 32>>>(
        out, mean, rstd, inp, weight, bias, rows, C, eps); });
}
