// Rung 1: one thread per row, the CPU loop moved to the GPU as it is. Thread r walks row r twice:
// once for the row max m (so that exp never overflows: logits of 100 would make exp(x) inf in
// float32), once for d = sum of exp(x - m); the loss is then one more load, the target's logit:
// loss = m + log(d) - x[target]. Right answers, but the lanes of a warp are 32 rows V floats
// apart: a warp request touches one sector per lane for 4 useful bytes each, and a batch of 8
// rows keeps 8 threads busy.
#include "lab.cuh"

#include <cmath>

// losses: (N,); stats: (N, 2) each row's (max, sum of exp(x - max)), kept for the backward;
// logits: (N, V); targets: (N,), ignore_index marks a row without a loss (padding)
__global__ void cross_entropy_thread_per_row_kernel(float* losses, float* stats, const float* logits,
                                                    const long long* targets, long long N, int V,
                                                    long long ignore_index) {
    const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= N) return;
    const long long target = targets[row];
    if (target == ignore_index) {  // no loss, and no need to read the row: (0, 1) says lse = 0
        losses[row] = 0.0f;
        stats[2 * row] = 0.0f;
        stats[2 * row + 1] = 1.0f;
        return;
    }
    const float* x = logits + row * V;
    float m = -INFINITY;
    for (int j = 0; j < V; ++j) m = fmaxf(m, x[j]);
    float d = 0.0f;
    for (int j = 0; j < V; ++j) d += expf(x[j] - m);
    // (m - x_t) + log d rather than lse - x_t: no cancellation for a confident row
    losses[row] = (m - x[target]) + logf(d);
    stats[2 * row] = m;
    stats[2 * row + 1] = d;
}

LAB_EXPORT int lab_cross_entropy_forward_1_thread_per_row(float* losses, float* stats, const float* logits,
                                                          const long long* targets, long long N, int V,
                                                          long long ignore_index, char* err, int err_len) {
    const int block = 128;
    if (N == 0) return 0;
    return lab_run(err, err_len, [&] { cross_entropy_thread_per_row_kernel<<<(N + block - 1) / block, block>>>(
        losses, stats, logits, targets, N, V, ignore_index); });
}
