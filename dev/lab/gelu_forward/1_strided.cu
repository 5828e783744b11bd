// Rung 1: one thread per element, mapped the way a CPU programmer splits an array among workers:
// the array is viewed as 32 slices of `slice` elements and lane l of every warp works in slice l.
// Every element is computed exactly once, so the answer is right; but the 32 lanes of a warp,
// which issue their loads together as one request, touch 32 addresses `slice` floats apart:
// 32 different 32-byte sectors for 128 useful bytes (the least is 4).
#include "lab.cuh"
#include "gelu_math.cuh"

// out, inp: (n,)
__global__ void gelu_strided_kernel(float* out, const float* inp, long long n, long long slice) {
    const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long i = (t % 32) * slice + t / 32;  // lane -> slice, warp -> position in the slice
    if (i < n) out[i] = gelu_tanh(inp[i]);
}

LAB_EXPORT int lab_gelu_forward_1_strided(float* out, const float* inp, long long n, char* err, int err_len) {
    const int block = 256;
    const long long slice = (n + 31) / 32;
    const long long threads = 32 * slice;  // covers [0, n): slices past the end are predicated off
    return lab_run(err, err_len, [&] {
        gelu_strided_kernel<<<(threads + block - 1) / block, block>>>(out, inp, n, slice);
    });
}
