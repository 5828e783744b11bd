// Rung 5: today's kernel, csrc/layernorm.cu's backward, through its real launcher
// (pyllmc::layernorm_backward, the one the cuda backend calls), not a copy. It is rung 4 made
// general: Packed128<T> for bf16 / fp16 (8 halves per 128 bits, the row kept in the storage type),
// the chunk count picked at launch, a scalar instance of the same template for odd C, rows too long
// to keep in registers read twice, a generic kernel past that, and a reduce kernel whose blocks
// split the partial rows over 32 lanes per column (then add the 32 in a fixed order).
#include "lab.cuh"

namespace pyllmc {  // csrc/layernorm.cu (linked into the lab's library as it is)
void layernorm_backward(void* dinp, void* dweight, void* dbias, void* scratch, const void* dout, const void* inp,
                        const void* weight, const void* mean, const void* rstd, long long rows, int C,
                        int num_partials, int dtype, cudaStream_t stream);
}

// scratch: (2, num_partials, C) float32
LAB_EXPORT int lab_layernorm_backward_5_today(float* dinp, float* dweight, float* dbias, float* scratch,
                                              const float* dout, const float* inp, const float* weight,
                                              const float* mean, const float* rstd, long long rows, int C,
                                              int num_partials, char* err, int err_len) {
    return lab_run(err, err_len, [&] {
        pyllmc::layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd, rows, C,
                                   num_partials, /*dtype: float32*/ 0, /*stream*/ 0);
    });
}
