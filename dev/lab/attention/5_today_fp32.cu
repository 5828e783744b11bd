// Rung 5: today's float32 path, csrc/attention.cu's attention_forward_fp32_kernel, through the real
// launcher (pyllmc::attention_forward, the one the cuda backend calls), not a copy. It is rung 2: one
// warp per query row, keys one at a time from global memory, online softmax in registers. The
// package keeps it simple on purpose: float32 attention is there so float32 models and tests run;
// the fast path is the tensor-core kernel of rung 6, which does rung 3's tiling (and more) in bf16.
// What it adds to rung 2: any (batch, head, position) strides, so q, k and v can be views of the
// c_attn output with no copy, grouped-query heads, and the longest rows scheduled first.
#include "lab.cuh"

namespace pyllmc {  // csrc/attention.cu (linked into the lab's library as it is)
void attention_forward(void* out, float* lse, const void* q, const void* k, const void* v, const long long* strides,
                       int B, int H, int H_kv, int T, int D, int dtype, cudaStream_t stream);
}

LAB_EXPORT int lab_attention_5_today_fp32(float* out, float* lse, const float* q, const float* k, const float* v,
                                          int B, int H, int T, int D, char* err, int err_len) {
    // (batch, head, position) element strides of out, q, k, v: all contiguous (B, H, T, D) here
    const long long head = static_cast<long long>(T) * D;
    long long strides[12];
    for (int operand = 0; operand < 4; ++operand) {
        strides[3 * operand] = H * head;
        strides[3 * operand + 1] = head;
        strides[3 * operand + 2] = D;
    }
    return lab_run(err, err_len, [&] {
        pyllmc::attention_forward(out, lse, q, k, v, strides, B, H, /*H_kv*/ H, T, D, /*dtype: float32*/ 0,
                                  /*stream*/ 0);
    });
}
