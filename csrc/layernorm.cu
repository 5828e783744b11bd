// layernorm.cu: LayerNorm over the last dim, and the fused residual add + LayerNorm,
// forward and backward.
//
//   forward:  mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
//             xhat = (x - mean) * rstd,  y = xhat * weight + bias
//   backward: g = dy * weight
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over C)
//             dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
//   fused:    h = residual + x (stored, rounded to the storage type), y = layernorm(h);
//             d(residual) = d(x) = dh = d(h_out) + LN-backward(dy)
//
// Design: a memory-bound op (GPT-2: rows = B*T = 32768, C = 768), so the goal is to touch
// each byte once at full bandwidth.
// - One warp per row. Lane `l` owns the chunks [(i*32 + l) * W, +W) of the row, i < kChunks,
//   where W is a 128-bit vector (4 fp32 / 8 bf16 or fp16) when C is a multiple of it and
//   the pointers are 16-byte aligned, else 1 (scalar loads: odd C). The row is kept in
//   registers, so the two-pass variance (sum of squared deviations, no E[x^2] - mean^2
//   cancellation) reads global memory only once. kChunks (1, 2, 3, 4, 6, 8, 12 or 16) is
//   picked at launch; chunks past C are predicated off. The backward keeps the row in the
//   storage type (bf16: half the registers) next to its float dweight/dbias sums.
// - C too large for registers (more than 16 chunks per lane): a generic kernel re-reads the
//   row from global memory (L1/L2 hits) in each pass. Slower, same results.
// - Backward, deterministic dweight/dbias: block b owns a fixed, contiguous range of rows;
//   its warps take those rows round-robin and accumulate dy*xhat and dy in registers; the
//   warps then add their sums into shared memory one after another (fixed order) and the
//   block writes one row of float32 partial sums to a scratch buffer (2, num_partials, C)
//   allocated by the caller. A second kernel sums the partials over b in a fixed order and
//   writes dweight, dbias in the storage type. No atomics: results are bitwise reproducible.
// - mean and rstd are saved in float32, one per row, for the backward.
#include "common.cuh"  // also the row chunks: Chunk, load_chunk, store_chunk, dispatch_chunks

#include <string>
#include <type_traits>

namespace pyllmc {
namespace {

constexpr int kWarpSize = 32;
constexpr int kForwardWarps = 4;   // rows per forward block
constexpr int kBackwardWarps = 8;  // warps sharing one block's partial sums in the backward
// Backward register budget: the float dweight/dbias sums cost 2 registers per element of a
// lane's part of the row. Up to kKeepRowElems elements the row (x, dy) also stays in registers
// between the two passes; longer rows are read again in pass 2 (L1/L2 hits: the warp has just
// read them). Past kBackwardMaxElems the generic kernel runs. (ptxas, sm_90: keeping 64+
// elements, or summing 128, spilled registers.)
constexpr int kKeepRowElems = 48;
constexpr int kBackwardMaxElems = 96;

// ---- forward, row in registers

// kFused: h_out = residual + inp (rounded to T), then the LayerNorm of h_out.
// out, h_out, residual, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,) float32
template <typename T, int W, int kChunks, bool kFused>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize)
layernorm_forward_kernel(T* __restrict__ out, T* __restrict__ h_out, float* __restrict__ mean_out,
                         float* __restrict__ rstd_out, const T* __restrict__ residual, const T* __restrict__ inp,
                         const T* __restrict__ weight, const T* __restrict__ bias, long long rows, int C,
                         float eps) {
    const int lane = threadIdx.x % kWarpSize;
    const long long row = static_cast<long long>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarpSize;
    if (row >= rows) return;  // the whole warp leaves together: no shuffle loses a lane
    const long long base = row * C;

    float x[kChunks][W];  // this lane's part of the row
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * kWarpSize + lane) * W;
        if (c < C) {
            load_chunk<W>(x[i], inp + base + c);
            if constexpr (kFused) {
                float r[W];
                load_chunk<W>(r, residual + base + c);
#pragma unroll
                for (int k = 0; k < W; ++k) x[i][k] += r[k];
                store_chunk<W>(h_out + base + c, x[i]);
                // normalize the stored (rounded) h, the tensor the backward will read
#pragma unroll
                for (int k = 0; k < W; ++k) x[i][k] = to_float(from_float<T>(x[i][k]));
            }
#pragma unroll
            for (int k = 0; k < W; ++k) sum += x[i][k];
        }
    }
    const float mean = warp_reduce_sum(sum) / C;

    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * kWarpSize + lane) * W;
        if (c < C) {
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const float d = x[i][k] - mean;
                sq += d * d;
            }
        }
    }
    const float rstd = rsqrtf(warp_reduce_sum(sq) / C + eps);

#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * kWarpSize + lane) * W;
        if (c < C) {
            float w[W], b[W], y[W];
            load_chunk<W>(w, weight + c);
            load_chunk<W>(b, bias + c);
#pragma unroll
            for (int k = 0; k < W; ++k) y[k] = (x[i][k] - mean) * rstd * w[k] + b[k];
            store_chunk<W>(out + base + c, y);
        }
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// ---- forward, any C: re-reads the row (lane j reads back only what lane j wrote)

template <typename T, bool kFused>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize)
layernorm_forward_generic_kernel(T* __restrict__ out, T* __restrict__ h_out, float* __restrict__ mean_out,
                                 float* __restrict__ rstd_out, const T* __restrict__ residual,
                                 const T* __restrict__ inp, const T* __restrict__ weight,
                                 const T* __restrict__ bias, long long rows, int C, float eps) {
    const int lane = threadIdx.x % kWarpSize;
    const long long row = static_cast<long long>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarpSize;
    if (row >= rows) return;
    const long long base = row * C;
    // the tensor being normalized: h_out once it is written (plain loads: this kernel wrote
    // it, so no read-only cache path), else inp
    auto load = [&](long long i) { return kFused ? to_float(h_out[i]) : to_float(inp[i]); };

    float sum = 0.0f;
    for (int c = lane; c < C; c += kWarpSize) {
        float v = to_float(inp[base + c]);
        if constexpr (kFused) {
            const T h = from_float<T>(v + to_float(residual[base + c]));
            h_out[base + c] = h;
            v = to_float(h);
        }
        sum += v;
    }
    const float mean = warp_reduce_sum(sum) / C;
    float sq = 0.0f;
    for (int c = lane; c < C; c += kWarpSize) {
        const float d = load(base + c) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(warp_reduce_sum(sq) / C + eps);
    for (int c = lane; c < C; c += kWarpSize) {
        const float xhat = (load(base + c) - mean) * rstd;
        out[base + c] = from_float<T>(xhat * to_float(weight[c]) + to_float(bias[c]));
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// ---- backward, row in registers

// kFused: dinp = dh_out + LN-backward(dout) (the gradient of h = residual + x).
// dinp, dout, dh_out, inp: (rows, C); weight: (C,); mean, rstd: (rows,) float32;
// partials: (2, gridDim.x, C) float32: [0] dweight, [1] dbias partial sums of each block.
// Block b owns rows [b * rows_per_block, (b + 1) * rows_per_block).
// Launch bounds: the grid is 2 blocks per SM (cuda_num_partials), so rows of up to 24 elements per
// lane (GPT-2's C = 768) must fit 2 blocks of 256 threads: at most 128 registers. Longer rows get the
// registers they need at 1 block per SM. (Without the minimum, ptxas spilled the smallest instances.)
template <typename T, int W, int kChunks, bool kFused>
__global__ void __launch_bounds__(kBackwardWarps * kWarpSize, kChunks * W <= 24 ? 2 : 1)
layernorm_backward_kernel(T* __restrict__ dinp, float* __restrict__ partials, const T* __restrict__ dout,
                          const T* __restrict__ dh_out, const T* __restrict__ inp, const T* __restrict__ weight,
                          const float* __restrict__ mean, const float* __restrict__ rstd, long long rows, int C,
                          long long rows_per_block) {
    extern __shared__ float block_sums[];  // (2, C): this block's dweight, dbias
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const long long row_begin = static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;

    float dweight[kChunks][W], dbias[kChunks][W];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
#pragma unroll
        for (int k = 0; k < W; ++k) dweight[i][k] = dbias[i][k] = 0.0f;
    }

    constexpr bool kKeepRow = kChunks * W <= kKeepRowElems;
    static_assert(kChunks * W <= kBackwardMaxElems, "the launcher takes the generic kernel for longer rows");
    for (long long row = row_begin + warp; row < row_end; row += kBackwardWarps) {
        const long long base = row * C;
        const float row_mean = mean[row];
        const float row_rstd = rstd[row];
        Chunk<T, W> x_row[kKeepRow ? kChunks : 1], dy_row[kKeepRow ? kChunks : 1];  // this lane's part of the row
        float sum_g = 0.0f, sum_g_xhat = 0.0f;        // g = dy * weight
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int c = (i * kWarpSize + lane) * W;
            if (c < C) {
                const Chunk<T, W> x_raw = load_raw<W>(inp + base + c);
                const Chunk<T, W> dy_raw = load_raw<W>(dout + base + c);
                if constexpr (kKeepRow) {
                    x_row[i] = x_raw;
                    dy_row[i] = dy_raw;
                }
                float w[W];
                load_chunk<W>(w, weight + c);
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float xhat = (to_float(x_raw[k]) - row_mean) * row_rstd;
                    const float dy = to_float(dy_raw[k]);
                    const float g = dy * w[k];
                    sum_g += g;
                    sum_g_xhat += g * xhat;
                    dweight[i][k] += dy * xhat;
                    dbias[i][k] += dy;
                }
            }
        }
        const float mean_g = warp_reduce_sum(sum_g) / C;
        const float mean_g_xhat = warp_reduce_sum(sum_g_xhat) / C;
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int c = (i * kWarpSize + lane) * W;
            if (c < C) {
                Chunk<T, W> x_raw, dy_raw;
                if constexpr (kKeepRow) {
                    x_raw = x_row[i];
                    dy_raw = dy_row[i];
                } else {
                    x_raw = load_raw<W>(inp + base + c);
                    dy_raw = load_raw<W>(dout + base + c);
                }
                float w[W], dx[W];
                load_chunk<W>(w, weight + c);  // an L1 hit: weight is shared by every row
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float xhat = (to_float(x_raw[k]) - row_mean) * row_rstd;
                    dx[k] = row_rstd * (to_float(dy_raw[k]) * w[k] - mean_g - xhat * mean_g_xhat);
                }
                if constexpr (kFused) {
                    float dh[W];
                    load_chunk<W>(dh, dh_out + base + c);
#pragma unroll
                    for (int k = 0; k < W; ++k) dx[k] += dh[k];
                }
                store_chunk<W>(dinp + base + c, dx);
            }
        }
    }

    // Warps add their sums into shared memory one after another: a fixed order. Every
    // column is owned by exactly one lane of each warp; warp 0 initializes all of them.
    for (int turn = 0; turn < kBackwardWarps; ++turn) {
        if (warp == turn) {
#pragma unroll
            for (int i = 0; i < kChunks; ++i) {
                const int c = (i * kWarpSize + lane) * W;
                if (c < C) {
                    if constexpr (W % 4 == 0) {
                        // 16-byte accesses: a lane's W floats are contiguous, so scalar accesses would put
                        // the warp's lanes W floats apart, a W-way bank conflict (4-way fp32, 8-way 16-bit;
                        // measured by the simulator's memory counters). As float4 the 8 lanes of a phase
                        // read 8 * 16 bytes: fp32 conflict-free, 16-bit inputs 2-way (lanes 32 B apart).
                        // Aligned: C % W == 0 on this path and the dynamic shared memory is 16-byte aligned.
#pragma unroll
                        for (int k = 0; k < W; k += 4) {
                            float4* w4 = reinterpret_cast<float4*>(block_sums + c + k);
                            float4* b4 = reinterpret_cast<float4*>(block_sums + C + c + k);
                            const float4 w = turn == 0 ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : *w4;
                            const float4 b = turn == 0 ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : *b4;
                            *w4 = make_float4(w.x + dweight[i][k], w.y + dweight[i][k + 1], w.z + dweight[i][k + 2],
                                              w.w + dweight[i][k + 3]);
                            *b4 = make_float4(b.x + dbias[i][k], b.y + dbias[i][k + 1], b.z + dbias[i][k + 2],
                                              b.w + dbias[i][k + 3]);
                        }
                    } else {
#pragma unroll
                        for (int k = 0; k < W; ++k) {
                            block_sums[c + k] = (turn == 0 ? 0.0f : block_sums[c + k]) + dweight[i][k];
                            block_sums[C + c + k] = (turn == 0 ? 0.0f : block_sums[C + c + k]) + dbias[i][k];
                        }
                    }
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

// ---- backward, any C: one warp per block, partial sums kept in the block's scratch row
// (lane j reads and writes only columns j, j + 32, ...: no other thread touches them).

template <typename T, bool kFused>
__global__ void __launch_bounds__(kWarpSize)
layernorm_backward_generic_kernel(T* __restrict__ dinp, float* __restrict__ partials,
                                  const T* __restrict__ dout, const T* __restrict__ dh_out,
                                  const T* __restrict__ inp, const T* __restrict__ weight,
                                  const float* __restrict__ mean, const float* __restrict__ rstd, long long rows,
                                  int C, long long rows_per_block) {
    const int lane = threadIdx.x;
    const long long row_begin = static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
    float* dweight_partial = partials + static_cast<long long>(blockIdx.x) * C;
    float* dbias_partial = partials + (static_cast<long long>(gridDim.x) + blockIdx.x) * C;
    for (int c = lane; c < C; c += kWarpSize) dweight_partial[c] = dbias_partial[c] = 0.0f;

    for (long long row = row_begin; row < row_end; ++row) {
        const long long base = row * C;
        const float row_mean = mean[row];
        const float row_rstd = rstd[row];
        float sum_g = 0.0f, sum_g_xhat = 0.0f;
        for (int c = lane; c < C; c += kWarpSize) {
            const float xhat = (to_float(inp[base + c]) - row_mean) * row_rstd;
            const float g = to_float(dout[base + c]) * to_float(weight[c]);
            sum_g += g;
            sum_g_xhat += g * xhat;
        }
        const float mean_g = warp_reduce_sum(sum_g) / C;
        const float mean_g_xhat = warp_reduce_sum(sum_g_xhat) / C;
        for (int c = lane; c < C; c += kWarpSize) {
            const float xhat = (to_float(inp[base + c]) - row_mean) * row_rstd;
            const float dy = to_float(dout[base + c]);
            float dx = row_rstd * (dy * to_float(weight[c]) - mean_g - xhat * mean_g_xhat);
            if constexpr (kFused) dx += to_float(dh_out[base + c]);
            dinp[base + c] = from_float<T>(dx);
            dweight_partial[c] += dy * xhat;
            dbias_partial[c] += dy;
        }
    }
}

// ---- dweight, dbias = fixed-order sums of the partials over blocks

constexpr int kReduceCols = 32;   // columns per block (threadIdx.x): one 128-byte line per partial row
constexpr int kReduceLanes = 32;  // partial rows summed in parallel (threadIdx.y), then in order

// dweight, dbias: (C,); partials: (2, num_partials, C) float32. blockIdx.y: 0 dweight, 1 dbias.
template <typename T>
__global__ void __launch_bounds__(kReduceCols * kReduceLanes)
layernorm_reduce_partials_kernel(T* __restrict__ dweight, T* __restrict__ dbias, const float* __restrict__ partials,
                                 int num_partials, int C) {
    __shared__ float sums[kReduceLanes][kReduceCols];
    const int c = blockIdx.x * kReduceCols + threadIdx.x;
    const float* src = partials + static_cast<long long>(blockIdx.y) * num_partials * C;
    float acc = 0.0f;
    if (c < C) {
#pragma unroll 4
        for (int p = threadIdx.y; p < num_partials; p += kReduceLanes) acc += src[static_cast<long long>(p) * C + c];
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
#pragma unroll
        for (int j = 0; j < kReduceLanes; ++j) total += sums[j][threadIdx.x];
        (blockIdx.y == 0 ? dweight : dbias)[c] = from_float<T>(total);
    }
}

// ---- launch helpers

void check_sizes(const char* who, long long rows, int C) {
    require(rows >= 0, std::string(who) + ": rows must be >= 0");
    require(C >= 1, std::string(who) + ": C must be >= 1");
    require(rows <= (1LL << 62) / C, std::string(who) + ": rows * C too large");
    require((rows + kForwardWarps - 1) / kForwardWarps <= 0x7fffffffLL, std::string(who) + ": too many rows");
}

// residual/h_out are null for the plain LayerNorm.
template <bool kFused>
void launch_forward(const char* who, void* h_out, void* out, void* mean, void* rstd, const void* residual,
                    const void* inp, const void* weight, const void* bias, long long rows, int C, float eps,
                    int dtype, cudaStream_t stream) {
    check_sizes(who, rows, C);
    const DType type = to_dtype(dtype);
    if (rows == 0) return;
    const int grid = ceil_div(rows, kForwardWarps);
    const int block = kForwardWarps * kWarpSize;
    dispatch_dtype(type, [&](auto tag) {
        using T = decltype(tag);
        constexpr int V = Packed128<T>::size;
        T* out_t = static_cast<T*>(out);
        T* h_t = static_cast<T*>(h_out);
        float* mean_f = static_cast<float*>(mean);
        float* rstd_f = static_cast<float*>(rstd);
        const T* res_t = static_cast<const T*>(residual);
        const T* inp_t = static_cast<const T*>(inp);
        const T* w_t = static_cast<const T*>(weight);
        const T* b_t = static_cast<const T*>(bias);
        const bool vec = can_vectorize<T>(C, {out, h_out, residual, inp, weight, bias});
        const int width = vec ? V : 1;
        const int chunks = ceil_div(C, static_cast<long long>(kWarpSize) * width);
        if (chunks > kMaxChunks) {
            layernorm_forward_generic_kernel<T, kFused><<<grid, block, 0, stream>>>(
                out_t, h_t, mean_f, rstd_f, res_t, inp_t, w_t, b_t, rows, C, eps);
            return;
        }
        dispatch_chunks(chunks, [&](auto n) {
            constexpr int kChunks = decltype(n)::value;
            if (vec) {
                layernorm_forward_kernel<T, V, kChunks, kFused><<<grid, block, 0, stream>>>(
                    out_t, h_t, mean_f, rstd_f, res_t, inp_t, w_t, b_t, rows, C, eps);
            } else {
                layernorm_forward_kernel<T, 1, kChunks, kFused><<<grid, block, 0, stream>>>(
                    out_t, h_t, mean_f, rstd_f, res_t, inp_t, w_t, b_t, rows, C, eps);
            }
        });
    });
    PYLLMC_LAUNCH_CHECK(kFused ? "fused_residual_layernorm_forward_kernel" : "layernorm_forward_kernel");
}

// dh_out is null for the plain LayerNorm. scratch: (2, num_partials, C) float32.
template <bool kFused>
void launch_backward(const char* who, void* dinp, void* dweight, void* dbias, void* scratch, const void* dh_out,
                     const void* dout, const void* inp, const void* weight, const void* mean, const void* rstd,
                     long long rows, int C, int num_partials, int dtype, cudaStream_t stream) {
    check_sizes(who, rows, C);
    require(num_partials >= 1, std::string(who) + ": num_partials must be >= 1");
    const DType type = to_dtype(dtype);
    // Block b owns rows [b * rows_per_block, ...): every row belongs to one block.
    const long long rows_per_block = rows == 0 ? 1 : (rows + num_partials - 1) / num_partials;
    dispatch_dtype(type, [&](auto tag) {
        using T = decltype(tag);
        constexpr int V = Packed128<T>::size;
        T* dinp_t = static_cast<T*>(dinp);
        float* partials = static_cast<float*>(scratch);
        const T* dh_t = static_cast<const T*>(dh_out);
        const T* dout_t = static_cast<const T*>(dout);
        const T* inp_t = static_cast<const T*>(inp);
        const T* w_t = static_cast<const T*>(weight);
        const float* mean_f = static_cast<const float*>(mean);
        const float* rstd_f = static_cast<const float*>(rstd);
        const bool vec = can_vectorize<T>(C, {dinp, dh_out, dout, inp, weight});
        const int width = vec ? V : 1;
        const int chunks = ceil_div(C, static_cast<long long>(kWarpSize) * width);
        if (chunks > kMaxChunks || rounded_chunks(chunks) * width > kBackwardMaxElems) {
            layernorm_backward_generic_kernel<T, kFused><<<num_partials, kWarpSize, 0, stream>>>(
                dinp_t, partials, dout_t, dh_t, inp_t, w_t, mean_f, rstd_f, rows, C, rows_per_block);
        } else {
            // (2, C) floats: at most 2 * 96 * 32 * 4 bytes = 24 KiB, under the 48 KiB default
            const size_t smem = 2 * static_cast<size_t>(C) * sizeof(float);
            dispatch_chunks(chunks, [&](auto n) {
                constexpr int kChunks = decltype(n)::value;
                if (!vec) {
                    layernorm_backward_kernel<T, 1, kChunks, kFused>
                        <<<num_partials, kBackwardWarps * kWarpSize, smem, stream>>>(
                            dinp_t, partials, dout_t, dh_t, inp_t, w_t, mean_f, rstd_f, rows, C, rows_per_block);
                } else if constexpr (kChunks * V <= kBackwardMaxElems) {  // only these are compiled
                    layernorm_backward_kernel<T, V, kChunks, kFused>
                        <<<num_partials, kBackwardWarps * kWarpSize, smem, stream>>>(
                            dinp_t, partials, dout_t, dh_t, inp_t, w_t, mean_f, rstd_f, rows, C, rows_per_block);
                } else {
                    require(false, std::string(who) + ": no register kernel for this row (the generic one runs)");
                }
            });
        }
        PYLLMC_LAUNCH_CHECK(kFused ? "fused_residual_layernorm_backward_kernel" : "layernorm_backward_kernel");
        const dim3 reduce_grid(ceil_div(C, kReduceCols), 2);
        const dim3 reduce_block(kReduceCols, kReduceLanes);
        layernorm_reduce_partials_kernel<T><<<reduce_grid, reduce_block, 0, stream>>>(
            static_cast<T*>(dweight), static_cast<T*>(dbias), partials, num_partials, C);
        PYLLMC_LAUNCH_CHECK("layernorm_reduce_partials_kernel");
    });
}

}  // namespace

// out: (rows, C); mean, rstd: (rows,) float32; inp: (rows, C); weight, bias: (C,)
void layernorm_forward(void* out, void* mean, void* rstd, const void* inp, const void* weight, const void* bias,
                       long long rows, int C, float eps, int dtype, cudaStream_t stream) {
    launch_forward<false>("layernorm_forward", nullptr, out, mean, rstd, nullptr, inp, weight, bias, rows, C, eps,
                          dtype, stream);
}

// dinp: (rows, C); dweight, dbias: (C,); scratch: (2, num_partials, C) float32;
// dout, inp: (rows, C); weight: (C,); mean, rstd: (rows,) float32
void layernorm_backward(void* dinp, void* dweight, void* dbias, void* scratch, const void* dout, const void* inp,
                        const void* weight, const void* mean, const void* rstd, long long rows, int C,
                        int num_partials, int dtype, cudaStream_t stream) {
    launch_backward<false>("layernorm_backward", dinp, dweight, dbias, scratch, nullptr, dout, inp, weight, mean,
                           rstd, rows, C, num_partials, dtype, stream);
}

// h_out = residual + inp, out = layernorm(h_out): h_out, out, residual, inp: (rows, C);
// mean, rstd: (rows,) float32; weight, bias: (C,)
void fused_residual_layernorm_forward(void* h_out, void* out, void* mean, void* rstd, const void* residual,
                                      const void* inp, const void* weight, const void* bias, long long rows, int C,
                                      float eps, int dtype, cudaStream_t stream) {
    launch_forward<true>("fused_residual_layernorm_forward", h_out, out, mean, rstd, residual, inp, weight, bias,
                         rows, C, eps, dtype, stream);
}

// dh = dh_out + LN-backward(dout): dh, dh_out, dout, h: (rows, C); dweight, dbias: (C,);
// scratch: (2, num_partials, C) float32; weight: (C,); mean, rstd: (rows,) float32
void fused_residual_layernorm_backward(void* dh, void* dweight, void* dbias, void* scratch, const void* dh_out,
                                       const void* dout, const void* h, const void* weight, const void* mean,
                                       const void* rstd, long long rows, int C, int num_partials, int dtype,
                                       cudaStream_t stream) {
    launch_backward<true>("fused_residual_layernorm_backward", dh, dweight, dbias, scratch, dh_out, dout, h, weight,
                          mean, rstd, rows, C, num_partials, dtype, stream);
}

}  // namespace pyllmc
