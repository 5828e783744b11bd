// rmsnorm.cu: RMSNorm over the last dim, and the fused residual add + RMSNorm, forward and
// backward (Llama's norm; without weight, nanochat's, also its QK-norm over the head dim).
//
//   forward:  rstd = 1 / sqrt(sum(x^2) / C + eps),  xhat = x * rstd,  y = xhat * weight
//             (no weight: y = xhat)
//   backward: g = dy * weight (no weight: g = dy)
//             dx = rstd * (g - xhat * mean(g * xhat))                        (mean over C)
//             dweight = sum_rows(dy * xhat)
//   fused:    h = residual + x (stored, rounded to the storage type), y = rmsnorm(h);
//             d(residual) = d(x) = dh = d(h_out) + RMS-backward(dy)
//
// Design: LayerNorm's (layernorm.cu) without the mean and the bias: a memory-bound op that
// touches each byte once, with the row chunks of common.cuh (128-bit vectors when C is a
// multiple of the vector width and the pointers are 16-byte aligned, else scalars).
// - A group of kLanes lanes per row (a power of two, <= 32): lane l of the group owns the
//   chunks [(i * kLanes + l) * W, +W), i < kChunks. GPT-2/Llama widths (C >= 32 * W) take the
//   whole warp; QK-norm's short rows (C = 64 or 128 over the head dim, rows = B*T*H) take
//   C / W lanes, so a bf16 warp normalizes 4 rows of 64 at once instead of leaving 24 of its
//   lanes idle. The sum of squares is reduced by xor shuffles within the group (offsets below
//   kLanes never cross it); every lane of the warp takes part, past-the-end rows with zeros.
// - The row stays in registers: one read of x (and residual), one write of y (and h).
// - C too large for registers (more than 16 chunks per lane): a generic kernel, one warp per
//   row, re-reads the row from global memory (L1/L2 hits) in each pass.
// - Backward, deterministic dweight: block b owns a fixed, contiguous range of rows; its
//   groups take those rows round-robin and accumulate dy * xhat in float registers; the groups
//   of a warp are folded by xor shuffles (fixed order), then the warps add their sums into
//   shared memory one after another and the block writes one row of float32 partial sums to
//   a scratch buffer (num_partials, C) allocated by the caller. A second kernel sums the
//   partials over b in a fixed order. No atomics: results are bitwise reproducible. Without a
//   weight there is no dweight: no partial sums, no second kernel. Whether there is a weight is a
//   template argument of the register kernels (kHasWeight): no test of the pointer inside their
//   unrolled chunk loops, no dweight registers without one.
// - rstd is saved in float32, one per row, for the backward (as layernorm's mean and rstd).
#include "common.cuh"

#include <string>
#include <type_traits>

namespace pyllmc {
namespace {

constexpr int kWarpSize = 32;
constexpr int kForwardWarps = 4;   // warps per forward block
constexpr int kBackwardWarps = 8;  // warps sharing one block's partial sums in the backward
// Backward register budget, as layernorm.cu's (whose backward keeps two float sums per element:
// this one keeps one): up to kKeepRowElems elements per lane the row (x, dy) stays in registers
// between the two passes, past kBackwardMaxElems the generic kernel runs.
constexpr int kKeepRowElems = 48;
constexpr int kBackwardMaxElems = 96;

// Sum over the kLanes lanes of an aligned group (a power of two <= 32); every lane of the warp
// calls it. kLanes == 32 is warp_reduce_sum.
template <int kLanes>
__device__ __forceinline__ float group_reduce_sum(float v) {
    static_assert(kLanes >= 1 && kLanes <= kWarpSize && (kLanes & (kLanes - 1)) == 0, "a power of two <= 32");
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// ---- forward, row in registers

// kFused: h_out = residual + inp (rounded to T), then the RMSNorm of h_out.
// out, h_out, residual, inp: (rows, C); weight: (C,) or null; rstd: (rows,) float32.
// Thread t of the grid serves row (blockIdx.x * blockDim.x + t) / kLanes. kHasWeight: weight is not null.
// Launch bounds: at least 4 blocks per SM (at most 128 registers) for rows of up to 64 elements per lane,
// 1 for longer ones (128 floats of a row). Without a minimum ptxas spilled 4-12 bytes in a few 16-bit
// instances at 40-96 registers (sm_90).
template <typename T, int W, int kChunks, int kLanes, bool kFused, bool kHasWeight>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize, kChunks * W <= 64 ? 4 : 1)
rmsnorm_forward_kernel(T* __restrict__ out, T* __restrict__ h_out, float* __restrict__ rstd_out,
                       const T* __restrict__ residual, const T* __restrict__ inp, const T* __restrict__ weight,
                       long long rows, int C, float eps) {
    constexpr int kRowsPerWarp = kWarpSize / kLanes;
    const int lane = threadIdx.x % kLanes;
    long long row;  // this lane's row
    bool valid;     // a row past the end: its lanes add zeros to the shuffles, store nothing
    if constexpr (kLanes == kWarpSize) {  // one row per warp: layernorm.cu's indexing
        row = static_cast<long long>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarpSize;
        if (row >= rows) return;  // the whole warp leaves together: no shuffle loses a lane
        valid = true;
    } else {
        const long long warp_row =
            (static_cast<long long>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarpSize) * kRowsPerWarp;
        if (warp_row >= rows) return;  // the whole warp leaves together
        row = warp_row + (threadIdx.x % kWarpSize) / kLanes;
        valid = row < rows;
    }
    const long long base = row * C;

    float x[kChunks][W];  // this lane's part of the row
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * kLanes + lane) * W;
        if (valid && c < C) {
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
            for (int k = 0; k < W; ++k) sq += x[i][k] * x[i][k];
        }
    }
    const float rstd = rsqrtf(group_reduce_sum<kLanes>(sq) / C + eps);
    if (!valid) return;  // after the last shuffle

#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * kLanes + lane) * W;
        if (c < C) {
            float w[W], y[W];
            if constexpr (kHasWeight) load_chunk<W>(w, weight + c);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                y[k] = x[i][k] * rstd;
                if constexpr (kHasWeight) y[k] *= w[k];
            }
            store_chunk<W>(out + base + c, y);
        }
    }
    if (lane == 0) rstd_out[row] = rstd;
}

// ---- forward, any C: one warp per row, re-reads the row (lane j reads back only what lane j wrote)

template <typename T, bool kFused>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize)
rmsnorm_forward_generic_kernel(T* __restrict__ out, T* __restrict__ h_out, float* __restrict__ rstd_out,
                               const T* __restrict__ residual, const T* __restrict__ inp,
                               const T* __restrict__ weight, long long rows, int C, float eps) {
    const int lane = threadIdx.x % kWarpSize;
    const long long row = static_cast<long long>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarpSize;
    if (row >= rows) return;
    const long long base = row * C;

    float sq = 0.0f;
    for (int c = lane; c < C; c += kWarpSize) {
        float v = to_float(inp[base + c]);
        if constexpr (kFused) {
            const T h = from_float<T>(v + to_float(residual[base + c]));
            h_out[base + c] = h;
            v = to_float(h);
        }
        sq += v * v;
    }
    const float rstd = rsqrtf(warp_reduce_sum(sq) / C + eps);
    for (int c = lane; c < C; c += kWarpSize) {
        // h_out once written (plain loads: this kernel wrote it, so no read-only cache path), else inp
        const float xhat = (kFused ? to_float(h_out[base + c]) : to_float(inp[base + c])) * rstd;
        out[base + c] = from_float<T>(weight != nullptr ? xhat * to_float(weight[c]) : xhat);
    }
    if (lane == 0) rstd_out[row] = rstd;
}

// ---- backward, row in registers

// kFused: dinp = dh_out + RMS-backward(dout) (the gradient of h = residual + x).
// dinp, dout, dh_out, inp: (rows, C); weight: (C,) or null; rstd: (rows,) float32;
// partials: (gridDim.x, C) float32, the dweight sums of each block (null without a weight).
// Block b owns rows [b * rows_per_block, (b + 1) * rows_per_block); its groups of kLanes lanes
// take them round-robin, a warp's groups always together (the loop bound is the warp's).
// Launch bounds: 2 blocks per SM (cuda_num_partials) for up to 24 elements per lane, as layernorm.
// kHasWeight: weight (and partials) not null.
template <typename T, int W, int kChunks, int kLanes, bool kFused, bool kHasWeight>
__global__ void __launch_bounds__(kBackwardWarps * kWarpSize, kChunks * W <= 24 ? 2 : 1)
rmsnorm_backward_kernel(T* __restrict__ dinp, float* __restrict__ partials, const T* __restrict__ dout,
                        const T* __restrict__ dh_out, const T* __restrict__ inp, const T* __restrict__ weight,
                        const float* __restrict__ rstd, long long rows, int C, long long rows_per_block) {
    extern __shared__ float block_sums[];  // (C,): this block's dweight (only with a weight)
    constexpr int kRowsPerWarp = kWarpSize / kLanes;
    const int lane = threadIdx.x % kLanes;
    const int warp = threadIdx.x / kWarpSize;
    const int group = (threadIdx.x % kWarpSize) / kLanes;  // this lane's row within the warp's rows
    constexpr bool has_weight = kHasWeight;
    const long long row_begin = static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;

    float dweight[kChunks][W];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
#pragma unroll
        for (int k = 0; k < W; ++k) dweight[i][k] = 0.0f;
    }

    constexpr bool kKeepRow = kChunks * W <= kKeepRowElems;
    static_assert(kChunks * W <= kBackwardMaxElems, "the launcher takes the generic kernel for longer rows");
    for (long long warp_row = row_begin + warp * kRowsPerWarp; warp_row < row_end;
         warp_row += kBackwardWarps * kRowsPerWarp) {
        const long long row = warp_row + group;
        const bool valid = kLanes == kWarpSize || row < row_end;  // a whole warp's row is valid
        const long long base = row * C;
        const float row_rstd = valid ? rstd[row] : 0.0f;
        Chunk<T, W> x_row[kKeepRow ? kChunks : 1], dy_row[kKeepRow ? kChunks : 1];  // this lane's part of the row
        float sum_g_xhat = 0.0f;  // g = dy * weight
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int c = (i * kLanes + lane) * W;
            if (valid && c < C) {
                const Chunk<T, W> x_raw = load_raw<W>(inp + base + c);
                const Chunk<T, W> dy_raw = load_raw<W>(dout + base + c);
                if constexpr (kKeepRow) {
                    x_row[i] = x_raw;
                    dy_row[i] = dy_raw;
                }
                float w[W];
                if constexpr (has_weight) {
                    load_chunk<W>(w, weight + c);
                } else {
#pragma unroll
                    for (int k = 0; k < W; ++k) w[k] = 1.0f;
                }
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float xhat = to_float(x_raw[k]) * row_rstd;
                    const float dy = to_float(dy_raw[k]);
                    sum_g_xhat += dy * w[k] * xhat;
                    dweight[i][k] += dy * xhat;
                }
            }
        }
        const float mean_g_xhat = group_reduce_sum<kLanes>(sum_g_xhat) / C;
        if (!valid) continue;  // after the row's only shuffle; the loop bound is the warp's
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
            const int c = (i * kLanes + lane) * W;
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
                if constexpr (has_weight) {
                    load_chunk<W>(w, weight + c);  // an L1 hit: weight is shared by every row
                } else {
#pragma unroll
                    for (int k = 0; k < W; ++k) w[k] = 1.0f;
                }
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const float xhat = to_float(x_raw[k]) * row_rstd;
                    dx[k] = row_rstd * (to_float(dy_raw[k]) * w[k] - xhat * mean_g_xhat);
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
    if constexpr (!has_weight) return;  // no dweight: no partial sums

    // Fold the warp's groups into its first (xor shuffles: the same order on every run): lane l of
    // group 0 then holds the warp's sums of the columns that lane l of every group owns.
    if constexpr (kLanes < kWarpSize) {
#pragma unroll
        for (int offset = kLanes; offset < kWarpSize; offset <<= 1) {
#pragma unroll
            for (int i = 0; i < kChunks; ++i) {
#pragma unroll
                for (int k = 0; k < W; ++k) dweight[i][k] += __shfl_xor_sync(0xffffffffu, dweight[i][k], offset);
            }
        }
    }
    // Warps add their sums into shared memory one after another: a fixed order. Every column is
    // owned by exactly one lane of each warp's first group; warp 0 initializes all of them.
    for (int turn = 0; turn < kBackwardWarps; ++turn) {
        if (warp == turn && group == 0) {
#pragma unroll
            for (int i = 0; i < kChunks; ++i) {
                const int c = (i * kLanes + lane) * W;
                if (c < C) {
                    if constexpr (W % 4 == 0) {
                        // 16-byte accesses, as layernorm.cu's merge: scalar ones would put the lanes W floats
                        // apart (a W-way bank conflict). Aligned: C % W == 0 here, dynamic smem 16-byte aligned.
#pragma unroll
                        for (int k = 0; k < W; k += 4) {
                            float4* w4 = reinterpret_cast<float4*>(block_sums + c + k);
                            const float4 w = turn == 0 ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : *w4;
                            *w4 = make_float4(w.x + dweight[i][k], w.y + dweight[i][k + 1], w.z + dweight[i][k + 2],
                                              w.w + dweight[i][k + 3]);
                        }
                    } else {
#pragma unroll
                        for (int k = 0; k < W; ++k) {
                            block_sums[c + k] = (turn == 0 ? 0.0f : block_sums[c + k]) + dweight[i][k];
                        }
                    }
                }
            }
        }
        __syncthreads();
    }
    float* dweight_partial = partials + static_cast<long long>(blockIdx.x) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dweight_partial[c] = block_sums[c];
}

// ---- backward, any C: one warp per block, partial sums kept in the block's scratch row
// (lane j reads and writes only columns j, j + 32, ...: no other thread touches them).

template <typename T, bool kFused>
__global__ void __launch_bounds__(kWarpSize)
rmsnorm_backward_generic_kernel(T* __restrict__ dinp, float* __restrict__ partials, const T* __restrict__ dout,
                                const T* __restrict__ dh_out, const T* __restrict__ inp,
                                const T* __restrict__ weight, const float* __restrict__ rstd, long long rows,
                                int C, long long rows_per_block) {
    const int lane = threadIdx.x;
    const bool has_weight = weight != nullptr;
    const long long row_begin = static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
    float* dweight_partial = has_weight ? partials + static_cast<long long>(blockIdx.x) * C : nullptr;
    if (has_weight) {
        for (int c = lane; c < C; c += kWarpSize) dweight_partial[c] = 0.0f;
    }

    for (long long row = row_begin; row < row_end; ++row) {
        const long long base = row * C;
        const float row_rstd = rstd[row];
        float sum_g_xhat = 0.0f;
        for (int c = lane; c < C; c += kWarpSize) {
            const float xhat = to_float(inp[base + c]) * row_rstd;
            const float g = to_float(dout[base + c]) * (has_weight ? to_float(weight[c]) : 1.0f);
            sum_g_xhat += g * xhat;
        }
        const float mean_g_xhat = warp_reduce_sum(sum_g_xhat) / C;
        for (int c = lane; c < C; c += kWarpSize) {
            const float xhat = to_float(inp[base + c]) * row_rstd;
            const float dy = to_float(dout[base + c]);
            float dx = row_rstd * (dy * (has_weight ? to_float(weight[c]) : 1.0f) - xhat * mean_g_xhat);
            if constexpr (kFused) dx += to_float(dh_out[base + c]);
            dinp[base + c] = from_float<T>(dx);
            if (has_weight) dweight_partial[c] += dy * xhat;
        }
    }
}

// ---- dweight = fixed-order sums of the partials over blocks

constexpr int kReduceCols = 32;   // columns per block (threadIdx.x): one 128-byte line per partial row
constexpr int kReduceLanes = 32;  // partial rows summed in parallel (threadIdx.y), then in order

// dweight: (C,); partials: (num_partials, C) float32.
template <typename T>
__global__ void __launch_bounds__(kReduceCols * kReduceLanes)
rmsnorm_reduce_partials_kernel(T* __restrict__ dweight, const float* __restrict__ partials, int num_partials, int C) {
    __shared__ float sums[kReduceLanes][kReduceCols];
    const int c = blockIdx.x * kReduceCols + threadIdx.x;
    float acc = 0.0f;
    if (c < C) {
#pragma unroll 4
        for (int p = threadIdx.y; p < num_partials; p += kReduceLanes) acc += partials[static_cast<long long>(p) * C + c];
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
#pragma unroll
        for (int j = 0; j < kReduceLanes; ++j) total += sums[j][threadIdx.x];
        dweight[c] = from_float<T>(total);
    }
}

// ---- launch helpers

// Lanes per row: the whole warp unless the row is one chunk for fewer lanes (QK-norm's short rows),
// then the next power of two >= its W-wide chunks.
int lanes_per_row(int C, int width) {
    const int chunks = ceil_div(C, width);
    int lanes = 1;
    while (lanes < chunks && lanes < kWarpSize) lanes *= 2;
    return lanes;
}

// Calls f(std::bool_constant<b>).
template <typename F>
void dispatch_bool(bool b, F&& f) {
    if (b) {
        f(std::true_type{});
    } else {
        f(std::false_type{});
    }
}

// Calls f(lanes, chunks) with both as std::integral_constant: (kLanes < 32, 1 chunk) or (32, the
// rounded chunk count).
template <typename F>
void dispatch_lanes(int C, int width, F&& f) {
    const int lanes = lanes_per_row(C, width);
    const auto one = std::integral_constant<int, 1>{};
    switch (lanes) {
        case 1: f(std::integral_constant<int, 1>{}, one); break;
        case 2: f(std::integral_constant<int, 2>{}, one); break;
        case 4: f(std::integral_constant<int, 4>{}, one); break;
        case 8: f(std::integral_constant<int, 8>{}, one); break;
        case 16: f(std::integral_constant<int, 16>{}, one); break;
        default:
            dispatch_chunks(ceil_div(C, static_cast<long long>(kWarpSize) * width),
                            [&](auto n) { f(std::integral_constant<int, kWarpSize>{}, n); });
            break;
    }
}

void check_sizes(const char* who, long long rows, int C) {
    require(rows >= 0, std::string(who) + ": rows must be >= 0");
    require(C >= 1, std::string(who) + ": C must be >= 1");
    require(rows <= (1LL << 62) / C, std::string(who) + ": rows * C too large");
    require((rows + kForwardWarps - 1) / kForwardWarps <= 0x7fffffffLL, std::string(who) + ": too many rows");
}

// residual/h_out are null for the plain RMSNorm; weight is null without a gain.
template <bool kFused>
void launch_forward(const char* who, void* h_out, void* out, void* rstd, const void* residual, const void* inp,
                    const void* weight, long long rows, int C, float eps, int dtype, cudaStream_t stream) {
    check_sizes(who, rows, C);
    const DType type = to_dtype(dtype);
    if (rows == 0) return;
    const int block = kForwardWarps * kWarpSize;
    dispatch_dtype(type, [&](auto tag) {
        using T = decltype(tag);
        constexpr int V = Packed128<T>::size;
        T* out_t = static_cast<T*>(out);
        T* h_t = static_cast<T*>(h_out);
        float* rstd_f = static_cast<float*>(rstd);
        const T* res_t = static_cast<const T*>(residual);
        const T* inp_t = static_cast<const T*>(inp);
        const T* w_t = static_cast<const T*>(weight);
        const bool vec = can_vectorize<T>(C, {out, h_out, residual, inp, weight});
        const int width = vec ? V : 1;
        if (ceil_div(C, static_cast<long long>(kWarpSize) * width) > kMaxChunks) {
            rmsnorm_forward_generic_kernel<T, kFused><<<ceil_div(rows, kForwardWarps), block, 0, stream>>>(
                out_t, h_t, rstd_f, res_t, inp_t, w_t, rows, C, eps);
            return;
        }
        dispatch_lanes(C, width, [&](auto lanes, auto n) {
            constexpr int kLanes = decltype(lanes)::value;
            constexpr int kChunks = decltype(n)::value;
            // rows per block: kForwardWarps * (32 / kLanes); the grid stays <= that of one warp per row
            const int grid = ceil_div(rows, static_cast<long long>(kForwardWarps) * (kWarpSize / kLanes));
            dispatch_bool(weight != nullptr, [&](auto has_weight) {
                constexpr bool kHasWeight = decltype(has_weight)::value;
                if (vec) {
                    rmsnorm_forward_kernel<T, V, kChunks, kLanes, kFused, kHasWeight><<<grid, block, 0, stream>>>(
                        out_t, h_t, rstd_f, res_t, inp_t, w_t, rows, C, eps);
                } else {
                    rmsnorm_forward_kernel<T, 1, kChunks, kLanes, kFused, kHasWeight><<<grid, block, 0, stream>>>(
                        out_t, h_t, rstd_f, res_t, inp_t, w_t, rows, C, eps);
                }
            });
        });
    });
    PYLLMC_LAUNCH_CHECK(kFused ? "fused_residual_rmsnorm_forward_kernel" : "rmsnorm_forward_kernel");
}

// dh_out is null for the plain RMSNorm. weight, dweight and scratch are null without a gain, else
// scratch: (num_partials, C) float32.
template <bool kFused>
void launch_backward(const char* who, void* dinp, void* dweight, void* scratch, const void* dh_out, const void* dout,
                     const void* inp, const void* weight, const void* rstd, long long rows, int C, int num_partials,
                     int dtype, cudaStream_t stream) {
    check_sizes(who, rows, C);
    require(num_partials >= 1, std::string(who) + ": num_partials must be >= 1");
    require((weight == nullptr) == (dweight == nullptr) && (weight == nullptr) == (scratch == nullptr),
            std::string(who) + ": weight, dweight and scratch are all given or all null");
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
        const float* rstd_f = static_cast<const float*>(rstd);
        const bool vec = can_vectorize<T>(C, {dinp, dh_out, dout, inp, weight});
        const int width = vec ? V : 1;
        const int chunks = ceil_div(C, static_cast<long long>(kWarpSize) * width);
        if (chunks > kMaxChunks || rounded_chunks(chunks) * width > kBackwardMaxElems) {
            rmsnorm_backward_generic_kernel<T, kFused><<<num_partials, kWarpSize, 0, stream>>>(
                dinp_t, partials, dout_t, dh_t, inp_t, w_t, rstd_f, rows, C, rows_per_block);
        } else {
            // (C,) floats with a weight: at most 96 * 32 * 4 bytes = 12 KiB, under the 48 KiB default
            const size_t smem = weight != nullptr ? static_cast<size_t>(C) * sizeof(float) : 0;
            dispatch_lanes(C, width, [&](auto lanes, auto n) {
                constexpr int kLanes = decltype(lanes)::value;
                constexpr int kChunks = decltype(n)::value;
                dispatch_bool(weight != nullptr, [&](auto has_weight) {
                    constexpr bool kHasWeight = decltype(has_weight)::value;
                    if (!vec) {
                        rmsnorm_backward_kernel<T, 1, kChunks, kLanes, kFused, kHasWeight>
                            <<<num_partials, kBackwardWarps * kWarpSize, smem, stream>>>(
                                dinp_t, partials, dout_t, dh_t, inp_t, w_t, rstd_f, rows, C, rows_per_block);
                    } else if constexpr (kChunks * V <= kBackwardMaxElems) {  // only these are compiled
                        rmsnorm_backward_kernel<T, V, kChunks, kLanes, kFused, kHasWeight>
                            <<<num_partials, kBackwardWarps * kWarpSize, smem, stream>>>(
                                dinp_t, partials, dout_t, dh_t, inp_t, w_t, rstd_f, rows, C, rows_per_block);
                    } else {
                        require(false, std::string(who) + ": no register kernel for this row (the generic one runs)");
                    }
                });
            });
        }
        PYLLMC_LAUNCH_CHECK(kFused ? "fused_residual_rmsnorm_backward_kernel" : "rmsnorm_backward_kernel");
        if (weight == nullptr) return;
        rmsnorm_reduce_partials_kernel<T><<<ceil_div(C, kReduceCols), dim3(kReduceCols, kReduceLanes), 0, stream>>>(
            static_cast<T*>(dweight), partials, num_partials, C);
        PYLLMC_LAUNCH_CHECK("rmsnorm_reduce_partials_kernel");
    });
}

}  // namespace

// out: (rows, C); rstd: (rows,) float32; inp: (rows, C); weight: (C,) or null
void rmsnorm_forward(void* out, void* rstd, const void* inp, const void* weight, long long rows, int C, float eps,
                     int dtype, cudaStream_t stream) {
    launch_forward<false>("rmsnorm_forward", nullptr, out, rstd, nullptr, inp, weight, rows, C, eps, dtype, stream);
}

// dinp: (rows, C); dweight: (C,) or null; scratch: (num_partials, C) float32 or null (no weight);
// dout, inp: (rows, C); weight: (C,) or null; rstd: (rows,) float32
void rmsnorm_backward(void* dinp, void* dweight, void* scratch, const void* dout, const void* inp, const void* weight,
                      const void* rstd, long long rows, int C, int num_partials, int dtype, cudaStream_t stream) {
    launch_backward<false>("rmsnorm_backward", dinp, dweight, scratch, nullptr, dout, inp, weight, rstd, rows, C,
                           num_partials, dtype, stream);
}

// h_out = residual + inp, out = rmsnorm(h_out): h_out, out, residual, inp: (rows, C);
// rstd: (rows,) float32; weight: (C,) or null
void fused_residual_rmsnorm_forward(void* h_out, void* out, void* rstd, const void* residual, const void* inp,
                                    const void* weight, long long rows, int C, float eps, int dtype,
                                    cudaStream_t stream) {
    launch_forward<true>("fused_residual_rmsnorm_forward", h_out, out, rstd, residual, inp, weight, rows, C, eps,
                         dtype, stream);
}

// dh = dh_out + RMS-backward(dout): dh, dh_out, dout, h: (rows, C); dweight: (C,) or null;
// scratch: (num_partials, C) float32 or null; weight: (C,) or null; rstd: (rows,) float32
void fused_residual_rmsnorm_backward(void* dh, void* dweight, void* scratch, const void* dh_out, const void* dout,
                                     const void* h, const void* weight, const void* rstd, long long rows, int C,
                                     int num_partials, int dtype, cudaStream_t stream) {
    launch_backward<true>("fused_residual_rmsnorm_backward", dh, dweight, scratch, dh_out, dout, h, weight, rstd,
                          rows, C, num_partials, dtype, stream);
}

}  // namespace pyllmc
