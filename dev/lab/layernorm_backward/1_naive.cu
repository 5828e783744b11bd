// Rung 1: the backward as two naive kernels, the CPU loops moved to the GPU as they are.
// - dinp: one thread per row. Each thread walks its row twice (the two row sums, then dinp). The
//   lanes of a warp are 32 rows, C floats apart: 32 sectors per request where 4 would do.
// - dweight, dbias: one thread per column, summing its column over every row. Lanes are now
//   consecutive columns, so each load is coalesced; but each thread runs a serial loop of `rows`
//   steps (GPT-2: 32768), and the kernel reads dout and inp a second time (plus mean and rstd per
//   row, one broadcast word each).
#include "lab.cuh"

// dinp, dout, inp: (rows, C); weight: (C,); mean, rstd: (rows,)
__global__ void layernorm_backward_dinp_thread_per_row_kernel(float* dinp, const float* dout, const float* inp,
                                                              const float* weight, const float* mean,
                                                              const float* rstd, long long rows, int C) {
    const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* dy = dout + row * C;
    const float* x = inp + row * C;
    const float m = mean[row], s = rstd[row];
    // g = dy * weight: the gradient reaching xhat
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float g = dy[c] * weight[c];
        sum_g += g;
        sum_g_xhat += g * (x[c] - m) * s;
    }
    const float mean_g = sum_g / C, mean_g_xhat = sum_g_xhat / C;
    float* dx = dinp + row * C;
    for (int c = 0; c < C; ++c) dx[c] = s * (dy[c] * weight[c] - mean_g - (x[c] - m) * s * mean_g_xhat);
}

// dweight, dbias: (C,); dout, inp: (rows, C); mean, rstd: (rows,). Thread c owns column c.
__global__ void layernorm_backward_params_thread_per_column_kernel(float* dweight, float* dbias, const float* dout,
                                                                   const float* inp, const float* mean,
                                                                   const float* rstd, long long rows, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dw = 0.0f, db = 0.0f;
    for (long long row = 0; row < rows; ++row) {
        const float dy = dout[row * C + c];
        dw += dy * (inp[row * C + c] - mean[row]) * rstd[row];
        db += dy;
    }
    dweight[c] = dw;
    dbias[c] = db;
}

// scratch, num_partials: unused here (rungs 3 to 5 keep partial sums in it)
LAB_EXPORT int lab_layernorm_backward_1_naive(float* dinp, float* dweight, float* dbias, float* scratch,
                                              const float* dout, const float* inp, const float* weight,
                                              const float* mean, const float* rstd, long long rows, int C,
                                              int num_partials, char* err, int err_len) {
    const int block = 128;
    return lab_run(err, err_len, [&] {
        if (rows > 0)
            layernorm_backward_dinp_thread_per_row_kernel<<<(rows + block - 1) / block, block>>>(
                dinp, dout, inp, weight, mean, rstd, rows, C);
        layernorm_backward_params_thread_per_column_kernel<<<(C + block - 1) / block, block>>>(
            dweight, dbias, dout, inp, mean, rstd, rows, C);
    });
}
