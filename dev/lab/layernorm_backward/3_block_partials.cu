// Rung 3: deterministic dweight, dbias, without global atomics (what csrc/layernorm.cu does).
// Block b owns a fixed, contiguous range of rows; its warps take those rows round-robin (a warp per
// row, rung 2's shuffles for dinp) and add dy * xhat and dy into per-lane registers: lane l owns
// columns l, l + 32, ..., so no two lanes share a sum and the sums cost no memory traffic while the
// block's rows go by. At the end the warps add their sums into one (2, C) shared-memory row, one
// warp after another (a fixed order), and the block writes that row of partial sums to a
// (2, num_partials, C) scratch in global memory. A second, small kernel adds the num_partials
// partial rows of each column in order 0, 1, 2, ...: the same bits on every run.
// The price is the scratch: 2 num_partials C floats written and read back, small while each block
// owns many rows (GPT-2: 32768 rows over 2 blocks per SM).
#include "lab.cuh"

constexpr int kWarps = 8;  // warps per block, sharing one row of partial sums

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// dinp, dout, inp: (rows, C); weight: (C,); mean, rstd: (rows,); partials: (2, gridDim.x, C):
// [0] dweight, [1] dbias, one row per block. C <= kChunks * 32 (the per-lane sums are registers).
template <int kChunks>
__global__ void layernorm_backward_block_partials_kernel(float* dinp, float* partials, const float* dout,
                                                         const float* inp, const float* weight, const float* mean,
                                                         const float* rstd, long long rows, int C,
                                                         long long rows_per_block) {
    extern __shared__ float block_sums[];  // (2, C): this block's dweight, dbias
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long row_begin = static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
    float dw[kChunks], db[kChunks];  // this lane's columns i * 32 + lane, summed over the warp's rows
    for (int i = 0; i < kChunks; ++i) dw[i] = db[i] = 0.0f;

    for (long long row = row_begin + warp; row < row_end; row += kWarps) {
        const float* dy = dout + row * C;
        const float* x = inp + row * C;
        const float m = mean[row], s = rstd[row];
        float sum_g = 0.0f, sum_g_xhat = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float g = dy[c] * weight[c];
            sum_g += g;
            sum_g_xhat += g * (x[c] - m) * s;
        }
        const float mean_g = warp_sum(sum_g) / C, mean_g_xhat = warp_sum(sum_g_xhat) / C;
        float* dx = dinp + row * C;
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int c = i * 32 + lane;
            if (c < C) {
                const float d = dy[c], xhat = (x[c] - m) * s;
                dx[c] = s * (d * weight[c] - mean_g - xhat * mean_g_xhat);
                dw[i] += d * xhat;
                db[i] += d;
            }
        }
    }

    // Warp 0 writes the shared row, then warps 1, 2, ... add theirs, one per turn. Lane l of every
    // warp touches words l, l + 32, ...: 32 consecutive words, 32 banks, no conflict.
    for (int turn = 0; turn < kWarps; ++turn) {
        if (warp == turn) {
#pragma unroll
            for (int i = 0; i < kChunks; ++i) {
                const int c = i * 32 + lane;
                if (c < C) {
                    block_sums[c] = (turn == 0 ? 0.0f : block_sums[c]) + dw[i];
                    block_sums[C + c] = (turn == 0 ? 0.0f : block_sums[C + c]) + db[i];
                }
            }
        }
        __syncthreads();
    }
    float* dweight_partial = partials + static_cast<long long>(blockIdx.x) * C;
    float* dbias_partial = partials + (static_cast<long long>(gridDim.x) + blockIdx.x) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        dweight_partial[c] = block_sums[c];
        dbias_partial[c] = block_sums[C + c];
    }
}

// dweight, dbias: (C,); partials: (2, num_partials, C). blockIdx.y: 0 dweight, 1 dbias. Thread c adds
// column c of the partial rows in a fixed order; lanes are consecutive columns (coalesced).
__global__ void reduce_partials_kernel(float* dweight, float* dbias, const float* partials, int num_partials, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float* src = partials + static_cast<long long>(blockIdx.y) * num_partials * C;
    float total = 0.0f;
    for (int p = 0; p < num_partials; ++p) total += src[static_cast<long long>(p) * C + c];
    (blockIdx.y == 0 ? dweight : dbias)[c] = total;
}

// scratch: (2, num_partials, C) float32
LAB_EXPORT int lab_layernorm_backward_3_block_partials(float* dinp, float* dweight, float* dbias, float* scratch,
                                                       const float* dout, const float* inp, const float* weight,
                                                       const float* mean, const float* rstd, long long rows, int C,
                                                       int num_partials, char* err, int err_len) {
    const int chunks = (C + 31) / 32;
    if (chunks > 32) return lab_fail(err, err_len, "3_block_partials: C > 1024 (the per-lane sums are registers)");
    if (num_partials < 1) return lab_fail(err, err_len, "3_block_partials: num_partials must be >= 1");
    const long long rows_per_block = rows == 0 ? 1 : (rows + num_partials - 1) / num_partials;
    const size_t smem = 2 * static_cast<size_t>(C) * sizeof(float);
    const int k = chunks <= 1 ? 1 : chunks <= 2 ? 2 : chunks <= 4 ? 4 : chunks <= 8 ? 8 : chunks <= 16 ? 16 : 32;
    return lab_run(err, err_len, [&] {
        const int threads = kWarps * 32;
        if (k == 1) layernorm_backward_block_partials_kernel<1><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 2) layernorm_backward_block_partials_kernel<2><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 4) layernorm_backward_block_partials_kernel<4><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 8) layernorm_backward_block_partials_kernel<8><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 16) layernorm_backward_block_partials_kernel<16><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        if (k == 32) layernorm_backward_block_partials_kernel<32><<<num_partials, threads, smem>>>(
            dinp, scratch, dout, inp, weight, mean, rstd, rows, C, rows_per_block);
        reduce_partials_kernel<<<dim3((C + 127) / 128, 2), 128>>>(dweight, dbias, scratch, num_partials, C);
    });
}
