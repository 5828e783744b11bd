// Rung 4: 128-bit loads and stores. Each thread moves one float4 (16 bytes) per instruction, so a
// warp's request covers 512 bytes: 16 sectors, again the least, but with a quarter of the
// requests of rung 2 (fewer instructions in flight for the same bytes: what lets a GPU reach its
// bandwidth with fewer threads). The float4 cast needs 16-byte aligned addresses, so the vector
// part covers n / 4 whole vectors and the last n % 4 elements take a scalar tail.
#include "lab.cuh"
#include "gelu_math.cuh"

// out, inp: (n,), 16-byte aligned
__global__ void gelu_packed128_kernel(float* out, const float* inp, long long n) {
    const long long num_vectors = n / 4;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < num_vectors) {
        float4 x = reinterpret_cast<const float4*>(inp)[i];
        float4 y;
        y.x = gelu_tanh(x.x);
        y.y = gelu_tanh(x.y);
        y.z = gelu_tanh(x.z);
        y.w = gelu_tanh(x.w);
        reinterpret_cast<float4*>(out)[i] = y;
    }
    // the tail: fewer than 4 elements, taken by the first threads of the grid
    const long long tail = num_vectors * 4 + i;
    if (i < 4 && tail < n) out[tail] = gelu_tanh(inp[tail]);
}

LAB_EXPORT int lab_gelu_forward_4_packed128(float* out, const float* inp, long long n, char* err, int err_len) {
    if ((reinterpret_cast<unsigned long long>(out) | reinterpret_cast<unsigned long long>(inp)) % 16 != 0)
        return lab_fail(err, err_len, "gelu_forward_4_packed128: pointers must be 16-byte aligned");
    const int block = 256;
    const long long threads = n / 4 > 4 ? n / 4 : 4;  // at least the tail's threads
    return lab_run(err, err_len, [&] {
        gelu_packed128_kernel<<<(threads + block - 1) / block, block>>>(out, inp, n);
    });
}
