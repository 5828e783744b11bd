// Rung 2: one block per row. The block's threads read the row together, thread t taking columns
// t, t + blockDim, ...: consecutive lanes read consecutive floats (coalesced, 4 sectors per
// request). The partial sums then meet in shared memory: a tree reduction that halves the active
// threads at each step, thread t adding element t + s into element t. Consecutive threads touch
// consecutive words, so 32 lanes hit 32 different banks: no bank conflicts (1 way). The price:
// a __syncthreads per tree level, twice per row (mean, then variance).
#include "lab.cuh"

constexpr int kBlock = 128;  // threads per row; a power of two for the tree

// Sum of v over the block; every thread gets the result. `scratch`: kBlock floats.
// Inlined, so that each call is its own access site for the counters: they group a site's accesses
// into warp requests by each lane's execution count, which a divergent loop (`if (t < s)`) run
// twice through one site would misalign.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (int s = kBlock / 2; s > 0; s /= 2) {
        if (t < s) scratch[t] += scratch[t + s];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();  // scratch is reused by the next call
    return total;
}

// out, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,)
__global__ void layernorm_block_shared_kernel(float* out, float* mean, float* rstd, const float* inp,
                                              const float* weight, const float* bias, int C, float eps) {
    __shared__ float scratch[kBlock];
    const long long row = blockIdx.x;
    const float* x = inp + row * C;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < C; c += kBlock) sum += x[c];
    const float m = block_sum(sum, scratch) / C;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < C; c += kBlock) {
        const float d = x[c] - m;
        sq += d * d;
    }
    const float s = rsqrtf(block_sum(sq, scratch) / C + eps);
    float* y = out + row * C;
    for (int c = threadIdx.x; c < C; c += kBlock) y[c] = (x[c] - m) * s * weight[c] + bias[c];
    if (threadIdx.x == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

LAB_EXPORT int lab_layernorm_forward_2_block_shared(float* out, float* mean, float* rstd, const float* inp,
                                                    const float* weight, const float* bias, long long rows, int C,
                                                    float eps, char* err, int err_len) {
    if (rows == 0) return 0;
    return lab_run(err, err_len, [&] {
        layernorm_block_shared_kernel<<<rows, kBlock>>>(out, mean, rstd, inp, weight, bias, C, eps);
    });
}
