// Rung 5: today's kernel, csrc/cross_entropy.cu's forward, through its real launcher
// (pyllmc::cross_entropy_forward, the one ops.cross_entropy's cuda backend calls), not a copy.
// Its row kernel is rung 4 made general: Packed128<T> for bf16 / fp16 too, as many threads as the
// row has float4s (a power of two up to 1024), exp2f((x - m) log2 e), streaming loads (the row is
// not read again soon), rows further apart than V (GPT-2's padded vocabulary) and the loss options
// (label smoothing, z-loss, soft-capping) in a separate instance. Two one-block launches follow:
// n_valid (the rows not ignored) and the mean loss, both summed in a fixed order (no atomics, so
// the loss is the same bits on every run).
#include "lab.cuh"

namespace pyllmc {  // csrc/cross_entropy.cu (linked into the lab's library as it is)
void cross_entropy_forward(float* loss, float* stats, float* n_valid, float* row_losses, const void* logits,
                           const long long* targets, long long N, long long V, long long row_stride,
                           long long ignore_index, int dtype, cudaStream_t stream, int reduction,
                           float label_smoothing, float lse_square_scale, float softcap);
}

// loss_n_valid: (2,) the launcher's other outputs, the mean loss () and n_valid () (the rows not
// ignored), which the other rungs do not compute; tests/test_lab_cross_entropy.py checks them.
LAB_EXPORT int lab_cross_entropy_forward_5_today(float* losses, float* stats, const float* logits,
                                                 const long long* targets, long long N, int V,
                                                 long long ignore_index, float* loss_n_valid, char* err,
                                                 int err_len) {
    return lab_run(err, err_len, [&] {
        pyllmc::cross_entropy_forward(loss_n_valid, stats, loss_n_valid + 1, losses, logits, targets, N, V,
                                      /*row_stride*/ V, ignore_index, /*dtype: float32*/ 0, /*stream*/ 0,
                                      /*reduction: mean*/ 0, /*label_smoothing*/ 0.0f, /*lse_square_scale*/ 0.0f,
                                      /*softcap*/ 0.0f);
    });
}
