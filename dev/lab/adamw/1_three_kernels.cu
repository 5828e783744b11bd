// Rung 1: the optimizer as three small kernels, one per line of the math (the way an eager framework
// runs it op by op): update m, update v, then update the parameter from m and v. Each kernel is
// coalesced and right; but each launch reads its inputs from memory again: g is read twice, m and v
// are written by one kernel and read back by the next. 10 streams of n floats instead of 7.
#include "lab.cuh"
#include "adamw_math.cuh"

// m = m + (1 - beta1) (g - m); m, g: (n,)
__global__ void adamw_m_kernel(float* m, const float* g, long long n, AdamWStep h) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) m[i] += h.one_minus_beta1 * (g[i] - m[i]);
}

// v = beta2 v + (1 - beta2) g^2; v, g: (n,)
__global__ void adamw_v_kernel(float* v, const float* g, long long n, AdamWStep h) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) v[i] = h.beta2 * v[i] + h.one_minus_beta2 * g[i] * g[i];
}

// p = p decay - step_size m / (sqrt(v) / bc2 + eps); p, m, v: (n,)
__global__ void adamw_p_kernel(float* p, const float* m, const float* v, long long n, AdamWStep h) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) p[i] = p[i] * h.decay - h.step_size * m[i] / (sqrtf(v[i]) / h.bias_correction2_sqrt + h.eps);
}

LAB_EXPORT int lab_adamw_1_three_kernels(float* p, const float* g, float* m, float* v, long long n, float lr,
                                         float beta1, float beta2, float eps, float wd, int step, char* err,
                                         int err_len) {
    const AdamWStep h = adamw_fold(lr, beta1, beta2, eps, wd, step);
    const int block = 256;
    const long long grid = (n + block - 1) / block;
    return lab_run(err, err_len, [&] {
        adamw_m_kernel<<<grid, block>>>(m, g, n, h);
        adamw_v_kernel<<<grid, block>>>(v, g, n, h);
        adamw_p_kernel<<<grid, block>>>(p, m, v, n, h);
    });
}
