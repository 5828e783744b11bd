// Rung 1: the block's `x = x + attn(...)` then `ln_2(x)` as two kernels, the way an eager framework
// runs them op by op. A residual-add kernel writes h = residual + inp; then the LayerNorm kernel
// (layernorm_forward's best: a warp per row, float4 loads, the row in registers) reads h back. Each
// kernel is at its own ideal, yet the pair moves one more (rows, C) tensor than the op needs: h
// goes out to memory and comes straight back in. For a memory-bound op that is the whole cost: 5
// tensors of rows x C moved where 4 would do.
#include "lab.cuh"
#include "row_chunks.cuh"

constexpr int kRowsPerBlock = 4;  // warps per block

// h, residual, inp: (n,), n % W == 0; thread t owns floats [t W, t W + W)
template <int W>
__global__ void residual_add_kernel(float* h, const float* residual, const float* inp, long long n) {
    const long long i = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    if (i >= n) return;
    float a[W], b[W];
    const vec_t<W> res_v = *as_vec<W>(residual + i);
    unpack(a, res_v);
    const vec_t<W> inp_v = *as_vec<W>(inp + i);
    unpack(b, inp_v);
    for (int k = 0; k < W; ++k) a[k] += b[k];
    *as_vec<W>(h + i) = pack<W>(a);
}

// out, h: (rows, C); weight, bias: (C,); mean, rstd: (rows,). C <= kChunks * 32 * W, C % W == 0.
// h: what residual_add_kernel wrote, read back from memory.
template <int W, int kChunks>
__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* h, const float* weight,
                                         const float* bias, long long rows, int C, float eps) {
    const int lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (row >= rows) return;
    const long long base = row * C;
    float x[kChunks][W];  // this lane's part of the row, in registers
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int c = (i * 32 + lane) * W;
        if (c < C) {
            const vec_t<W> h_v = *as_vec<W>(h + base + c);  // the second trip of h through memory
            unpack(x[i], h_v);
            for (int k = 0; k < W; ++k) sum += x[i][k];
        }
    }
    const float m = warp_sum(sum) / C;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        if ((i * 32 + lane) * W < C) {
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
LAB_EXPORT int lab_residual_layernorm_1_two_kernels(float* h, float* out, float* mean, float* rstd,
                                                    const float* residual, const float* inp, const float* weight,
                                                    const float* bias, long long rows, int C, float eps, char* err,
                                                    int err_len) {
    if (rows == 0) return 0;
    const long long n = rows * C;
    const bool vectorize = C % 4 == 0 && aligned16(h) && aligned16(out) && aligned16(residual) && aligned16(inp) &&
                           aligned16(weight) && aligned16(bias);
    bool fits = true;
    const int code = lab_run(err, err_len, [&] {
        const int block = 256;
        if (vectorize) residual_add_kernel<4><<<(n / 4 + block - 1) / block, block>>>(h, residual, inp, n);
        else residual_add_kernel<1><<<(n + block - 1) / block, block>>>(h, residual, inp, n);
        fits = launch_row_chunks(C, vectorize, [&](auto width, auto chunks) {
            constexpr int W = decltype(width)::value, kChunks = decltype(chunks)::value;
            layernorm_forward_kernel<W, kChunks><<<(rows + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock * 32>>>(
                out, mean, rstd, h, weight, bias, rows, C, eps);
        });
    });
    return fits ? code : lab_fail(err, err_len, "1_two_kernels: the row is too long for registers");
}
