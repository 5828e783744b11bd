// Rung 6: today's tensor-core path, csrc/attention.cu's attention_forward_tc_kernel in bf16, through
// the real launcher (pyllmc::attention_forward with dtype bf16). FlashAttention-2's forward: a block of
// 4 warps owns 64 query rows (16 per warp, its Q fragments kept in registers), streams K and V in
// tiles of 64 keys through shared memory with cp.async (16 bytes per lane, double-buffered: tile j + 1
// is in flight while tile j is used), computes S = Q K^T and P V with mma.sync.m16n8k16 (bf16 inputs,
// fp32 accumulators) from operands read by ldmatrix, and keeps rung 2's online softmax in the
// accumulators' registers. Shared-memory rows are padded by 16 bytes so an ldmatrix is conflict-free.
// Inputs and output are bf16 (the call converts; lse stays float32): half the bytes of the float32 rungs.
#include "lab.cuh"

#include <cuda_bf16.h>

namespace pyllmc {  // csrc/attention.cu (linked into the lab's library as it is)
void attention_forward(void* out, float* lse, const void* q, const void* k, const void* v, const long long* strides,
                       int B, int H, int H_kv, int T, int D, int dtype, cudaStream_t stream);
}

// out, q, k, v: (B, H, T, D) bf16, contiguous; lse: (B, H, T) float32.
LAB_EXPORT int lab_attention_6_today(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                     const __nv_bfloat16* v, int B, int H, int T, int D, char* err, int err_len) {
    const long long head = static_cast<long long>(T) * D;
    long long strides[12];
    for (int operand = 0; operand < 4; ++operand) {
        strides[3 * operand] = H * head;
        strides[3 * operand + 1] = head;
        strides[3 * operand + 2] = D;
    }
    return lab_run(err, err_len, [&] {
        pyllmc::attention_forward(out, lse, q, k, v, strides, B, H, /*H_kv*/ H, T, D, /*dtype: bfloat16*/ 1,
                                  /*stream*/ 0);
    });
}
