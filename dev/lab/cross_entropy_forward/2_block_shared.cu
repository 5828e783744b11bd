// Rung 2: one block per row. The block's 256 threads read the row together, thread t taking
// columns t, t + 256, ...: consecutive lanes read consecutive floats (coalesced, 4 sectors per
// request). The per-thread partial results meet in shared memory, in a tree that halves the active
// threads at each step (thread t combines element t + s into element t: consecutive words,
// conflict-free). Two trees per row: the max, then the sum of exp(x - max), which needs the max
// first, so the row is still read twice from global memory.
#include "lab.cuh"

#include <cmath>

constexpr int kBlock = 256;  // threads per row; a power of two for the tree

// The max of v over the block; every thread gets it. `scratch`: kBlock floats.
// Inlined, so that each call is its own access site for the counters (a divergent loop run twice
// through one site would misalign their per-lane grouping into warp requests).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (int s = kBlock / 2; s > 0; s /= 2) {
        if (t < s) scratch[t] = fmaxf(scratch[t], scratch[t + s]);
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();  // scratch is reused by the next tree
    return total;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (int s = kBlock / 2; s > 0; s /= 2) {
        if (t < s) scratch[t] += scratch[t + s];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

// losses: (N,); stats: (N, 2) (max, sum of exp(x - max)); logits: (N, V); targets: (N,)
__global__ void cross_entropy_block_shared_kernel(float* losses, float* stats, const float* logits,
                                                  const long long* targets, int V, long long ignore_index) {
    __shared__ float scratch[kBlock];
    const long long row = blockIdx.x;
    const long long target = targets[row];
    if (target == ignore_index) {  // the whole block leaves together: no tree is left waiting
        if (threadIdx.x == 0) {
            losses[row] = 0.0f;
            stats[2 * row] = 0.0f;
            stats[2 * row + 1] = 1.0f;
        }
        return;
    }
    const float* x = logits + row * V;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += kBlock) m = fmaxf(m, x[j]);
    m = block_max(m, scratch);
    float d = 0.0f;
    for (int j = threadIdx.x; j < V; j += kBlock) d += expf(x[j] - m);
    d = block_sum(d, scratch);
    if (threadIdx.x == 0) {
        losses[row] = (m - x[target]) + logf(d);
        stats[2 * row] = m;
        stats[2 * row + 1] = d;
    }
}

LAB_EXPORT int lab_cross_entropy_forward_2_block_shared(float* losses, float* stats, const float* logits,
                                                        const long long* targets, long long N, int V,
                                                        long long ignore_index, char* err, int err_len) {
    if (N == 0) return 0;
    return lab_run(err, err_len, [&] {
        cross_entropy_block_shared_kernel<<<N, kBlock>>>(losses, stats, logits, targets, V, ignore_index);
    });
}
