// Rung 2: llm.c's fused classifier. One block per row computes the row's (max, sum) by online
// softmax, then reads the row a second time and writes dlogits over the logits, in place. The
// second read follows the first within the same block, microseconds later: on a GPU the row
// (200 KB at GPT-2's vocabulary) is still in L2, so the logits come from DRAM once. No second
// (N, V) buffer exists, and nothing travels between launches: the statistics stay in registers.
// In place has one trap: the loss needs the target's logit, which pass 2 overwrites; it is read
// before pass 1.
#include "lab.cuh"
#include "softmax_row.cuh"

// losses: (N,); logits: (N, V), overwritten with dlogits; targets: (N,); grad_scale: dloss / n_valid
__global__ void fused_classifier_kernel(float* losses, float* logits, const long long* targets, int V,
                                        long long ignore_index, float grad_scale) {
    __shared__ SoftmaxStats slots[kWarps];
    const long long row = blockIdx.x;
    const long long target = targets[row];
    float* x = logits + row * V;
    if (target == ignore_index) {
        zero_row(x, V);
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    float x_target = 0.0f;
    if (threadIdx.x == 0) x_target = x[target];  // now: pass 2 writes over the row
    const RowSplit split = split_row(x, V);
    const SoftmaxStats st = row_stats(x, V, split, slots);  // pass 1: read the row
    write_row_grad(x, x, V, split, st.max, 1.0f / st.sum, target, grad_scale);  // pass 2: read it, write dlogits
    if (threadIdx.x == 0) losses[row] = (st.max - x_target) + logf(st.sum);
}

LAB_EXPORT int lab_fused_classifier_2_fused(float* losses, float* logits, const long long* targets, long long N,
                                            int V, long long ignore_index, float grad_scale, char* err, int err_len) {
    if (N == 0) return 0;
    return lab_run(err, err_len, [&] {
        fused_classifier_kernel<<<N, kBlock>>>(losses, logits, targets, V, ignore_index, grad_scale);
    });
}
