// Rung 4: today's kernel, csrc/adamw.cu, through its real launcher (pyllmc::adamw_step, the one
// pyllmc.optim.AdamW calls), not a copy. It updates every tensor of a model in one launch: a table
// of tensors (one row each: pointers, size, first chunk, flags) and a chunk -> tensor map sit in
// device memory, the per-step hyperparameters travel in the launch's parameters. Here the table has
// one fp32 tensor without master weights. Each thread takes 8 elements as two float4 groups 1024
// elements apart, so a warp still touches one contiguous 512-byte span per access.
#include "lab.cuh"
#include "adamw_math.cuh"

#include <vector>

namespace pyllmc {  // csrc/adamw.cu (linked into the lab's library as it is)
void adamw_step(const void* tensors, int num_tensors, const void* chunk_to_tensor, long long num_chunks,
                long long chunk_size, const void* hyper, int num_rows, cudaStream_t stream);
}

constexpr long long kChunk = 2048;  // csrc/adamw.cu's elements per block (its launcher checks it)

LAB_EXPORT int lab_adamw_4_today(float* p, const float* g, float* m, float* v, long long n, float lr, float beta1,
                                 float beta2, float eps, float wd, int step, char* err, int err_len) {
    const AdamWStep h = adamw_fold(lr, beta1, beta2, eps, wd, step);
    const long long num_chunks = (n + kChunk - 1) / kChunk;
    const bool aligned = (reinterpret_cast<unsigned long long>(p) | reinterpret_cast<unsigned long long>(g) |
                          reinterpret_cast<unsigned long long>(m) | reinterpret_cast<unsigned long long>(v)) % 16 == 0;
    // the table row and hyperparameter row, laid out as csrc/adamw.cu's AdamWTensor and AdamWHyper
    // (pyllmc/optim.py builds the same): "device" memory is host memory on the simulator
    std::vector<long long> table = {
        static_cast<long long>(reinterpret_cast<unsigned long long>(p)),
        static_cast<long long>(reinterpret_cast<unsigned long long>(g)),
        0,  // no fp32 master copy: the parameter is fp32
        static_cast<long long>(reinterpret_cast<unsigned long long>(m)),
        static_cast<long long>(reinterpret_cast<unsigned long long>(v)),
        n,
        0,  // first chunk
        0,  // rng offset (stochastic rounding is off)
        0,  // hyperparameter row
        (aligned ? 1LL << 8 : 0LL),  // param and grad dtype float32 (0), vector path
    };
    std::vector<int> chunk_to_tensor(static_cast<size_t>(num_chunks), 0);
    const float hyper[8] = {h.decay, h.one_minus_beta1, h.beta2, h.one_minus_beta2, h.bias_correction2_sqrt,
                            h.eps, h.step_size, 0.0f};
    return lab_run(err, err_len, [&] {
        pyllmc::adamw_step(table.data(), 1, chunk_to_tensor.data(), num_chunks, kChunk, hyper, 1, /*stream*/ 0);
    });
}
