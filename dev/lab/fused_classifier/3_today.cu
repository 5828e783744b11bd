// Rung 3: today's kernel, csrc/cross_entropy.cu's fused classifier, through its real launcher
// (pyllmc::cross_entropy_fused_forward_backward, the one ops.cross_entropy's fused path and the
// trainer call), not a copy. Its row kernel is rung 2 made general: bf16 / fp16, as many threads
// as the row has 128-bit vectors (up to 1024), rows further apart than V with their padding
// columns zeroed, the loss options. It counts n_valid itself, in a one-block launch before the
// row kernel (which scales the gradient by it), and a one-block launch after sums the mean loss
// in a fixed order; a loss scale (llm.c's 1 / grad_accum) is baked into both.
#include "lab.cuh"

namespace pyllmc {  // csrc/cross_entropy.cu (linked into the lab's library as it is)
void cross_entropy_fused_forward_backward(float* loss, float* n_valid, float* row_losses, void* logits,
                                          const long long* targets, long long N, long long V, long long row_stride,
                                          long long pad_end, long long ignore_index, float loss_scale, int dtype,
                                          cudaStream_t stream, int reduction, float label_smoothing,
                                          float lse_square_scale, float softcap, float* stats);
}

// losses: (N,); logits: (N, V), overwritten with dlogits; loss_n_valid: (2,) the launcher's mean
// loss () and n_valid (), which the other rungs do not compute (tests/test_lab_cross_entropy.py
// checks them). grad_scale is not used: the launcher divides by the n_valid it counts.
LAB_EXPORT int lab_fused_classifier_3_today(float* losses, float* logits, const long long* targets, long long N,
                                            int V, long long ignore_index, float grad_scale, float* loss_n_valid,
                                            char* err, int err_len) {
    (void)grad_scale;
    return lab_run(err, err_len, [&] {
        pyllmc::cross_entropy_fused_forward_backward(loss_n_valid, loss_n_valid + 1, losses, logits, targets, N, V,
                                                     /*row_stride*/ V, /*pad_end*/ V, ignore_index,
                                                     /*loss_scale*/ 1.0f, /*dtype: float32*/ 0, /*stream*/ 0,
                                                     /*reduction: mean*/ 0, /*label_smoothing*/ 0.0f,
                                                     /*lse_square_scale*/ 0.0f, /*softcap*/ 0.0f,
                                                     /*stats: not wanted*/ nullptr);
    });
}
