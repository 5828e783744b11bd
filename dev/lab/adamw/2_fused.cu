// Rung 2: one fused kernel. Each thread reads its element of p, g, m, v once, updates them on
// registers and writes p, m, v once: the 7 streams the step cannot do without, in one launch.
#include "lab.cuh"
#include "adamw_math.cuh"

// p, g, m, v: (n,)
__global__ void adamw_fused_kernel(float* p, const float* g, float* m, float* v, long long n, AdamWStep h) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) {
        float mi = m[i], vi = v[i];
        p[i] = adamw_update(p[i], g[i], mi, vi, h);
        m[i] = mi;
        v[i] = vi;
    }
}

LAB_EXPORT int lab_adamw_2_fused(float* p, const float* g, float* m, float* v, long long n, float lr, float beta1,
                                 float beta2, float eps, float wd, int step, char* err, int err_len) {
    const AdamWStep h = adamw_fold(lr, beta1, beta2, eps, wd, step);
    const int block = 256;
    return lab_run(err, err_len, [&] { adamw_fused_kernel<<<(n + block - 1) / block, block>>>(p, g, m, v, n, h); });
}
