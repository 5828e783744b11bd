// Rung 2: one warp per row with shuffle reductions for dinp (layernorm_forward's rung 3), and
// dweight, dbias accumulated straight into global memory with atomicAdd as each row is done: no
// second kernel walking the columns. Coalesced, but every row's warp adds 2 C floats into the same
// 2 C words: two atomic requests per 32 columns of every row, each a read-modify-write (the
// simulator counts a load and a store; a GPU performs it in L2), and L2 applies the adds of all rows
// to one word one after another. And the order in which rows land is the order the warps happen to
// run: float addition is not associative, so dweight and dbias change in their last bits from run
// to run. Not reproducible.
// The outputs must start at zero: a small kernel clears them first.
#include "lab.cuh"

constexpr int kRowsPerBlock = 4;  // warps per block

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// dweight, dbias: (C,)
__global__ void zero_params_kernel(float* dweight, float* dbias, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) dweight[c] = dbias[c] = 0.0f;
}

// dinp, dout, inp: (rows, C); dweight, dbias, weight: (C,); mean, rstd: (rows,)
__global__ void layernorm_backward_warp_atomic_kernel(float* dinp, float* dweight, float* dbias, const float* dout,
                                                      const float* inp, const float* weight, const float* mean,
                                                      const float* rstd, long long rows, int C) {
    const int lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (row >= rows) return;  // the whole warp leaves together
    const float* dy = dout + row * C;
    const float* x = inp + row * C;
    const float m = mean[row], s = rstd[row];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float g = dy[c] * weight[c];
        sum_g += g;
        sum_g_xhat += g * (x[c] - m) * s;
    }
    const float mean_g = warp_sum(sum_g) / C, mean_g_xhat = warp_sum(sum_g_xhat) / C;
    float* dx = dinp + row * C;
    for (int c = lane; c < C; c += 32) {
        const float d = dy[c], xhat = (x[c] - m) * s;
        dx[c] = s * (d * weight[c] - mean_g - xhat * mean_g_xhat);
        atomicAdd(&dweight[c], d * xhat);  // a load and a store of dweight[c], serialized per word
        atomicAdd(&dbias[c], d);
    }
}

LAB_EXPORT int lab_layernorm_backward_2_warp_atomic(float* dinp, float* dweight, float* dbias, float* scratch,
                                                    const float* dout, const float* inp, const float* weight,
                                                    const float* mean, const float* rstd, long long rows, int C,
                                                    int num_partials, char* err, int err_len) {
    return lab_run(err, err_len, [&] {
        zero_params_kernel<<<(C + 255) / 256, 256>>>(dweight, dbias, C);
        if (rows > 0)
            layernorm_backward_warp_atomic_kernel<<<(rows + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock * 32>>>(
                dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, C);
    });
}
