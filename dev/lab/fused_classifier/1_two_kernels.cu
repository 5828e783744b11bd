// Rung 1: the classifier's loss and gradient as two kernels, the way an autograd framework runs
// them: a forward that reads the logits and writes each row's loss and its softmax statistics
// (max m, sum d of exp(x - m): 8 bytes a row, not the (N, V) probabilities), then a backward
// that reads the logits again with the statistics and writes dlogits to a buffer of its own:
//   dlogits[r, j] = (exp(x[r, j] - m_r) / d_r - [j == target_r]) * dloss / n_valid
// Each kernel is good on its own (one block per row, online softmax, float4). The cost is between
// them: the backward starts after the forward has streamed all N rows, so its read of the logits
// comes from DRAM again, and the gradient needs a second (N, V) buffer.
#include "lab.cuh"
#include "softmax_row.cuh"

// losses: (N,); stats: (N, 2) (max, sum of exp(x - max)); logits: (N, V); targets: (N,)
__global__ void classifier_forward_kernel(float* losses, float* stats, const float* logits, const long long* targets,
                                          int V, long long ignore_index) {
    __shared__ SoftmaxStats slots[kWarps];
    const long long row = blockIdx.x;
    const long long target = targets[row];
    if (target == ignore_index) {
        if (threadIdx.x == 0) {
            losses[row] = 0.0f;
            stats[2 * row] = 0.0f;  // (0, 1): lse 0, never read
            stats[2 * row + 1] = 1.0f;
        }
        return;
    }
    const float* x = logits + row * V;
    const SoftmaxStats st = row_stats(x, V, split_row(x, V), slots);
    if (threadIdx.x == 0) {
        losses[row] = (st.max - x[target]) + logf(st.sum);
        stats[2 * row] = st.max;
        stats[2 * row + 1] = st.sum;
    }
}

// dlogits, logits: (N, V), equally aligned (then every row splits alike); targets: (N,);
// stats: (N, 2) from the forward; grad_scale: dloss / n_valid
__global__ void classifier_backward_kernel(float* dlogits, const float* logits, const long long* targets,
                                           const float* stats, int V, long long ignore_index, float grad_scale) {
    const long long row = blockIdx.x;
    const long long target = targets[row];
    float* out = dlogits + row * V;
    if (target == ignore_index) {
        zero_row(out, V);
        return;
    }
    const float* x = logits + row * V;
    const float m = stats[2 * row], inv_sum = 1.0f / stats[2 * row + 1];
    write_row_grad(out, x, V, split_row(x, V), m, inv_sum, target, grad_scale);
}

LAB_EXPORT int lab_fused_classifier_1_two_kernels(float* losses, float* stats, float* dlogits, const float* logits,
                                                  const long long* targets, long long N, int V,
                                                  long long ignore_index, float grad_scale, char* err, int err_len) {
    if (N == 0) return 0;
    // the backward splits each row of the logits and of dlogits at the same 16-byte boundaries
    if (reinterpret_cast<unsigned long long>(dlogits) % 16 != reinterpret_cast<unsigned long long>(logits) % 16)
        return lab_fail(err, err_len, "rung 1 needs dlogits and logits aligned alike (mod 16 bytes)");
    return lab_run(err, err_len, [&] {
        classifier_forward_kernel<<<N, kBlock>>>(losses, stats, logits, targets, V, ignore_index);
        classifier_backward_kernel<<<N, kBlock>>>(dlogits, logits, targets, stats, V, ignore_index, grad_scale);
    });
}
