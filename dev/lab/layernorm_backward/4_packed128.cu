// Rung 4: rung 3 with 128-bit loads and the row kept in registers. Lane l owns the float4 chunks
// l, l + 32, ... of its row (kChunks of them, a compile-time count so the arrays live in registers):
// dout and inp are read once per row, a quarter of the requests per pass, and the second pass (dinp,
// the dweight / dbias sums) runs on registers. The shared-memory row of partial sums is written as
// float4 too: a lane's 4 columns are contiguous, so scalar accesses would put the lanes of a warp 4
// words apart (a 4-way bank conflict); as 16-byte accesses the 8 lanes of each phase cover 32
// consecutive words, conflict-free.
// Needs C % 4 == 0 and 16-byte aligned rows; other shapes take rung 3 (as today's launcher takes its
// scalar instance).
#include "lab.cuh"

constexpr int kWarps = 8;  // warps per block, sharing one row of partial sums

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// dinp, dout, inp: (rows, C); weight: (C,); mean, rstd: (rows,); partials: (2, gridDim.x, C).
// C <= kChunks * 128, C % 4 == 0.
template <int kChunks>
__global__ void layernorm_backward_packed128_kernel(float* dinp, float* partials, const float* dout, const float* inp,
                                                    const float* weight, const float* mean, const float* rstd,
                                                    long long rows, int C, long long rows_per_block) {
    extern __shared__ float block_sums[];  // (2, C): this block's dweight, dbias
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int vectors = C / 4;
    const long long row_begin = static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    float4 dw[kChunks], db[kChunks];  // this lane's chunks, summed over the warp's rows
    for (int i = 0; i < kChunks; ++i) dw[i] = db[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    for (long long row = row_begin + warp; row < row_end; row += kWarps) {
        const float4* dy4 = reinterpret_cast<const float4*>(dout + row * C);
        const float4* x4 = reinterpret_cast<const float4*>(inp + row * C);
        const float m = mean[row], s = rstd[row];
        float4 dy[kChunks], xhat[kChunks];  // this lane's part of the row, in registers
        float sum_g = 0.0f, sum_g_xhat = 0.0f;
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int j = i * 32 + lane;
            if (j < vectors) {
                const float4 x = x4[j], w = w4[j];
                dy[i] = dy4[j];
                xhat[i] = make_float4((x.x - m) * s, (x.y - m) * s, (x.z - m) * s, (x.w - m) * s);
                const float4 g = make_float4(dy[i].x * w.x, dy[i].y * w.y, dy[i].z * w.z, dy[i].w * w.w);
                sum_g += g.x + g.y + g.z + g.w;
                sum_g_xhat += g.x * xhat[i].x + g.y * xhat[i].y + g.z * xhat[i].z + g.w * xhat[i].w;
            }
        }
        const float mean_g = warp_sum(sum_g) / C, mean_g_xhat = warp_sum(sum_g_xhat) / C;
        float4* dx4 = reinterpret_cast<float4*>(dinp + row * C);
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int j = i * 32 + lane;
            if (j < vectors) {
                const float4 w = w4[j], d = dy[i], h = xhat[i];
                dx4[j] = make_float4(s * (d.x * w.x - mean_g - h.x * mean_g_xhat),
                                     s * (d.y * w.y - mean_g - h.y * mean_g_xhat),
                                     s * (d.z * w.z - mean_g - h.z * mean_g_xhat),
                                     s * (d.w * w.w - mean_g - h.w * mean_g_xhat));
                dw[i] = add4(dw[i], make_float4(d.x * h.x, d.y * h.y, d.z * h.z, d.w * h.w));
                db[i] = add4(db[i], d);
            }
        }
    }

    // Warp 0 writes the shared row, then warps 1, 2, ... add theirs, one per turn (a fixed order).
    // Aligned: C % 4 == 0 here and dynamic shared memory is 16-byte aligned.
    float4* sums4 = reinterpret_cast<float4*>(block_sums);
    for (int turn = 0; turn < kWarps; ++turn) {
        if (warp == turn) {
#pragma unroll
            for (int i = 0; i < kChunks; ++i) {
                const int j = i * 32 + lane;
                if (j < vectors) {
                    sums4[j] = turn == 0 ? dw[i] : add4(sums4[j], dw[i]);
                    sums4[vectors + j] = turn == 0 ? db[i] : add4(sums4[vectors + j], db[i]);
                }
            }
        }
        __syncthreads();
    }
    float4* dweight_partial = reinterpret_cast<float4*>(partials + static_cast<long long>(blockIdx.x) * C);
    float4* dbias_partial = reinterpret_cast<float4*>(partials + (static_cast<long long>(gridDim.x) + blockIdx.x) * C);
    for (int j = threadIdx.x; j < vectors; j += blockDim.x) {
        dweight_partial[j] = sums4[j];
        dbias_partial[j] = sums4[vectors + j];
    }
}

// dweight, dbias: (C,); partials: (2, num_partials, C). blockIdx.y: 0 dweight, 1 dbias. Thread j adds
// the float4 j of the partial rows in a fixed order. C % 4 == 0.
__global__ void reduce_partials_packed128_kernel(float* dweight, float* dbias, const float* partials, int num_partials,
                                                 int C) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C / 4) return;
    const float4* src = reinterpret_cast<const float4*>(partials + static_cast<long long>(blockIdx.y) * num_partials * C);
    float4 total = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int p = 0; p < num_partials; ++p) total = add4(total, src[static_cast<long long>(p) * (C / 4) + j]);
    reinterpret_cast<float4*>(blockIdx.y == 0 ? dweight : dbias)[j] = total;
}

// rung 3, for the shapes the vector path cannot take
LAB_EXPORT int lab_layernorm_backward_3_block_partials(float* dinp, float* dweight, float* dbias, float* scratch,
                                                       const float* dout, const float* inp, const float* weight,
                                                       const float* mean, const float* rstd, long long rows, int C,
                                                       int num_partials, char* err, int err_len);

// scratch: (2, num_partials, C) float32
LAB_EXPORT int lab_layernorm_backward_4_packed128(float* dinp, float* dweight, float* dbias, float* scratch,
                                                  const float* dout, const float* inp, const float* weight,
                                                  const float* mean, const float* rstd, long long rows, int C,
                                                  int num_partials, char* err, int err_len) {
    const auto aligned = [](const void* p) { return reinterpret_cast<unsigned long long>(p) % 16 == 0; };
    const int chunks = (C / 4 + 31) / 32;
    if (C % 4 != 0 || chunks > 8 || !aligned(dinp) || !aligned(dweight) || !aligned(dbias) || !aligned(scratch) ||
        !aligned(dout) || !aligned(inp) || !aligned(weight))
        return lab_layernorm_backward_3_block_partials(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd,
                                                       rows, C, num_partials, err, err_len);
    if (num_partials < 1) return lab_fail(err, err_len, "4_packed128: num_partials must be >= 1");
    const long long rows_per_block = rows == 0 ? 1 : (rows + num_partials - 1) / num_partials;
    const size_t smem = 2 * static_cast<size_t>(C) * sizeof(float);
    // one instance per register budget: 1, 2, 4 or 8 float4 chunks per lane (C up to 1024)
    const int k = chunks <= 1 ? 1 : chunks <= 2 ? 2 : chunks <= 4 ? 4 : 8;
    return lab_run(err, err_len, [&] {
        const int threads = kWarps * 32;
        if (k == 1) layernorm_backward_packed128_kernel<1><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 2) layernorm_backward_packed128_kernel<2><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 4) layernorm_backward_packed128_kernel<4><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 8) layernorm_backward_packed128_kernel<8><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        reduce_partials_packed128_kernel<<<dim3((C / 4 + 127) / 128, 2), 128>>>(dweight, dbias, scratch, num_partials,
                                                                                C);
    });
}
