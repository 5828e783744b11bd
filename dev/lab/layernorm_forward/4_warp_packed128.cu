// Rung 4: the warp-per-row kernel with 128-bit loads, and the row kept in registers. Lane l owns
// the float4 chunks l, l + 32, ... of its row (kChunks of them, a compile-time count so the array
// lives in registers): the row is read from global memory once, with a quarter of rung 3's
// requests per pass and none for the second and third passes, which now run on registers.
// Needs C % 4 == 0 and 16-byte aligned rows; other shapes take rung 3's scalar kernel (as today's
// launcher does).
#include "lab.cuh"

constexpr int kRowsPerBlock = 4;  // warps per block

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// out, inp: (rows, C); weight, bias: (C,); mean, rstd: (rows,). C <= kChunks * 128, C % 4 == 0.
template <int kChunks>
__global__ void layernorm_warp_packed128_kernel(float* out, float* mean, float* rstd, const float* inp,
                                                const float* weight, const float* bias, long long rows, int C,
                                                float eps) {
    const int lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (row >= rows) return;
    const float4* x = reinterpret_cast<const float4*>(inp + row * C);
    const int vectors = C / 4;
    float4 v[kChunks];  // this lane's part of the row, in registers
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int j = i * 32 + lane;
        if (j < vectors) {
            v[i] = x[j];
            sum += v[i].x + v[i].y + v[i].z + v[i].w;
        }
    }
    const float m = warp_sum(sum) / C;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        if (i * 32 + lane < vectors) {
            const float a = v[i].x - m, b = v[i].y - m, c = v[i].z - m, d = v[i].w - m;
            sq += a * a + b * b + c * c + d * d;
        }
    }
    const float s = rsqrtf(warp_sum(sq) / C + eps);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
    float4* y = reinterpret_cast<float4*>(out + row * C);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int j = i * 32 + lane;
        if (j < vectors) {
            const float4 w = w4[j], b = b4[j];
            float4 r;
            r.x = (v[i].x - m) * s * w.x + b.x;
            r.y = (v[i].y - m) * s * w.y + b.y;
            r.z = (v[i].z - m) * s * w.z + b.z;
            r.w = (v[i].w - m) * s * w.w + b.w;
            y[j] = r;
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// rung 3's kernel, for the shapes the vector path cannot take
LAB_EXPORT int lab_layernorm_forward_3_warp_shuffle(float* out, float* mean, float* rstd, const float* inp,
                                                    const float* weight, const float* bias, long long rows, int C,
                                                    float eps, char* err, int err_len);

LAB_EXPORT int lab_layernorm_forward_4_warp_packed128(float* out, float* mean, float* rstd, const float* inp,
                                                      const float* weight, const float* bias, long long rows, int C,
                                                      float eps, char* err, int err_len) {
    const auto aligned = [](const void* p) { return reinterpret_cast<unsigned long long>(p) % 16 == 0; };
    const int chunks = (C / 4 + 31) / 32;
    if (C % 4 != 0 || chunks > 8 || !aligned(out) || !aligned(inp) || !aligned(weight) || !aligned(bias))
        return lab_layernorm_forward_3_warp_shuffle(out, mean, rstd, inp, weight, bias, rows, C, eps, err, err_len);
    if (rows == 0) return 0;
    const long long grid = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    // one instance per register budget: 1, 2, 4 or 8 float4 chunks per lane (C up to 1024)
    const int k = chunks <= 1 ? 1 : chunks <= 2 ? 2 : chunks <= 4 ? 4 : 8;
    return lab_run(err, err_len, [&] {
        const int threads = kRowsPerBlock * 32;
        if (k == 1)
            layernorm_warp_packed128_kernel<1><<<grid, threads>>>(out, mean, rstd, inp, weight, bias, rows, C, eps);
        if (k == 2)
            layernorm_warp_packed128_kernel<2><<<grid, threads>>>(out, mean, rstd, inp, weight, bias, rows, C, eps);
        if (k == 4)
            layernorm_warp_packed128_kernel<4><<<grid, threads>>>(out, mean, rstd, inp, weight, bias, rows, C, eps);
        if (k == 8)
            layernorm_warp_packed128_kernel<8><<<grid, threads>>>(out, mean, rstd, inp, weight, bias, rows, C, eps);
    });
}
