// Rung 3: the fused kernel with 128-bit accesses: a thread updates 4 consecutive elements with one
// float4 load or store per stream, a quarter of rung 2's requests for the same bytes. The last
// n % 4 elements take a scalar tail (float4 needs 16-byte aligned addresses).
#include "lab.cuh"
#include "adamw_math.cuh"

// p, g, m, v: (n,), 16-byte aligned
__global__ void adamw_packed128_kernel(float* p, const float* g, float* m, float* v, long long n, AdamWStep h) {
    const long long num_vectors = n / 4;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < num_vectors) {
        float4 p4 = reinterpret_cast<const float4*>(p)[i];
        const float4 g4 = reinterpret_cast<const float4*>(g)[i];
        float4 m4 = reinterpret_cast<const float4*>(m)[i];
        float4 v4 = reinterpret_cast<const float4*>(v)[i];
        p4.x = adamw_update(p4.x, g4.x, m4.x, v4.x, h);
        p4.y = adamw_update(p4.y, g4.y, m4.y, v4.y, h);
        p4.z = adamw_update(p4.z, g4.z, m4.z, v4.z, h);
        p4.w = adamw_update(p4.w, g4.w, m4.w, v4.w, h);
        reinterpret_cast<float4*>(p)[i] = p4;
        reinterpret_cast<float4*>(m)[i] = m4;
        reinterpret_cast<float4*>(v)[i] = v4;
    }
    const long long tail = num_vectors * 4 + i;  // fewer than 4 elements, the first threads
    if (i < 4 && tail < n) {
        float mi = m[tail], vi = v[tail];
        p[tail] = adamw_update(p[tail], g[tail], mi, vi, h);
        m[tail] = mi;
        v[tail] = vi;
    }
}

LAB_EXPORT int lab_adamw_3_packed128(float* p, const float* g, float* m, float* v, long long n, float lr,
                                     float beta1, float beta2, float eps, float wd, int step, char* err, int err_len) {
    for (const void* q : {static_cast<const void*>(p), static_cast<const void*>(g), static_cast<const void*>(m),
                          static_cast<const void*>(v)})
        if (reinterpret_cast<unsigned long long>(q) % 16 != 0)
            return lab_fail(err, err_len, "adamw_3_packed128: pointers must be 16-byte aligned");
    const AdamWStep h = adamw_fold(lr, beta1, beta2, eps, wd, step);
    const int block = 256;
    const long long threads = n / 4 > 4 ? n / 4 : 4;
    return lab_run(err, err_len, [&] {
        adamw_packed128_kernel<<<(threads + block - 1) / block, block>>>(p, g, m, v, n, h);
    });
}
