// Rung 2: one fused kernel. The warp that adds a row's residual already holds h in registers: it
// writes h (the backward and the next residual need it), then normalizes the same registers and
// writes out. h is never read back from memory: 4 tensors of rows x C moved instead of rung 1's 5,
// and one launch instead of two. Nothing else changes: the same loads, widths and reductions.
#include "lab.cuh"
#include "row_chunks.cuh"

constexpr int kRowsPerBlock = 4;  // warps per block

// h_out, out, residual, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,).
// C <= kChunks * 32 * W, C % W == 0.
template <int W, int kChunks>
__global__ void residual_layernorm_fused_kernel(float* h_out, float* out, float* mean, float* rstd,
                                                const float* residual, const float* inp, const float* weight,
                                                const float* bias, long long rows, int C, float eps) {
    const int lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (row >= rows) return;
    const long long base = row * C;
    float x[kChunks][W];  // this lane's part of h, in registers
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * 32 + lane) * W;
        if (c < C) {
            float r[W];
            const vec_t<W> in_v = *as_vec<W>(inp + base + c);
            unpack(x[i], in_v);
            const vec_t<W> res_v = *as_vec<W>(residual + base + c);
            unpack(r, res_v);
            for (int k = 0; k < W; ++k) x[i][k] += r[k];
            *as_vec<W>(h_out + base + c) = pack<W>(x[i]);
            for (int k = 0; k < W; ++k) sum += x[i][k];
        }
    }
    const float m = warp_sum(sum) / C;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * 32 + lane) * W;
        if (c < C) {
            // h is still in x[i]: the variance and the output need no global load
            for (int k = 0; k < W; ++k) sq += (x[i][k] - m) * (x[i][k] - m);
        }
    }
    const float s = rsqrtf(warp_sum(sq) / C + eps);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * 32 + lane) * W;
        if (c < C) {
            float w[W], b[W], y[W];
            const vec_t<W> w_v = *as_vec<W>(weight + c);
            unpack(w, w_v);
            const vec_t<W> b_v = *as_vec<W>(bias + c);
            unpack(b, b_v);
            for (int k = 0; k < W; ++k) y[k] = (x[i][k] - m) * s * w[k] + b[k];
            *as_vec<W>(out + base + c) = pack<W>(y);
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// h, out, residual, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,)
LAB_EXPORT int lab_residual_layernorm_2_fused(float* h, float* out, float* mean, float* rstd, const float* residual,
                                              const float* inp, const float* weight, const float* bias, long long rows,
                                              int C, float eps, char* err, int err_len) {
    if (rows == 0) return 0;
    const bool vectorize = C % 4 == 0 && aligned16(h) && aligned16(out) && aligned16(residual) && aligned16(inp) &&
                           aligned16(weight) && aligned16(bias);
    bool fits = true;
    const int code = lab_run(err, err_len, [&] {
        fits = launch_row_chunks(C, vectorize, [&](auto width, auto chunks) {
            constexpr int W = decltype(width)::value, kChunks = decltype(chunks)::value;
            residual_layernorm_fused_kernel<W, kChunks>
                <<<(rows + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock * 32>>>(h, out, mean, rstd, residual, inp,
                                                                                      weight, bias, rows, C, eps);
        });
    });
    return fits ? code : lab_fail(err, err_len, "2_fused: the row is too long for registers");
}
