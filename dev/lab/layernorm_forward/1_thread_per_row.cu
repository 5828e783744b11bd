// Rung 1: one thread per row, the CPU loop moved to the GPU as it is. Each thread walks its row
// three times (mean, then the sum of squared deviations, then normalize and write). Every pass is
// right, but the lanes of a warp are 32 different rows, C floats apart: each warp request touches
// 32 sectors for 128 useful bytes (the least is 4), and a launch of rows = 64 keeps only 64
// threads busy (2 warps on a GPU of thousands of lanes).
#include "lab.cuh"

// out, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,)
__global__ void layernorm_thread_per_row_kernel(float* out, float* mean, float* rstd, const float* inp,
                                                const float* weight, const float* bias, long long rows, int C,
                                                float eps) {
    const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* x = inp + row * C;
    float sum = 0.0f;
    for (int c = 0; c < C; ++c) sum += x[c];
    const float m = sum / C;
    float sq = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float d = x[c] - m;
        sq += d * d;
    }
    const float s = rsqrtf(sq / C + eps);
    float* y = out + row * C;
    for (int c = 0; c < C; ++c) y[c] = (x[c] - m) * s * weight[c] + bias[c];
    mean[row] = m;
    rstd[row] = s;
}

LAB_EXPORT int lab_layernorm_forward_1_thread_per_row(float* out, float* mean, float* rstd, const float* inp,
                                                      const float* weight, const float* bias, long long rows, int C,
                                                      float eps, char* err, int err_len) {
    const int block = 128;
    return lab_run(err, err_len, [&] { layernorm_thread_per_row_kernel<<<(rows + block - 1) / block, block>>>(
        out, mean, rstd, inp, weight, bias, rows, C, eps); });
}
