// gelu.cu: GPT-2's GELU (tanh approximation), forward and backward.
//
//   gelu(x)  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
//
// Design: a pure streaming op, so the only goal is to move bytes at full bandwidth.
// Each thread handles one 128-bit vector (4 fp32 or 8 bf16/fp16 values) with one load and
// one store per tensor, computes in float, and the elements past the last full vector
// (n % vector width) go to a scalar tail handled by the first threads of the grid.
// Streaming cache hints (ld.cs / st.cs): every byte is touched exactly once.
#include "common.cuh"

namespace pyllmc {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;

// 1 + tanh(u) and 1 - tanh(u)^2 from e = exp(-2|u|) in (0, 1]:
//   u >= 0: 1 + tanh = 2 / (1 + e),  u < 0: 1 + tanh = 2e / (1 + e),  1 - tanh^2 = 4e / (1 + e)^2.
// Unlike 1 + tanhf(u) with tanhf(u) ~ -1, nothing cancels for large negative u, so the
// result keeps float32's relative accuracy in the far tail (where torch's own does not).
__device__ __forceinline__ void one_plus_tanh_and_sech2(float u, float& one_plus_tanh, float& sech2) {
    const float e = expf(-2.0f * fabsf(u));
    const float inv = 1.0f / (1.0f + e);
    one_plus_tanh = u >= 0.0f ? 2.0f * inv : 2.0f * e * inv;
    sech2 = 4.0f * e * inv * inv;
}

__device__ __forceinline__ float gelu_value(float x) {
    float one_plus_tanh, sech2;
    one_plus_tanh_and_sech2(kSqrt2OverPi * (x + kGeluCoef * x * x * x), one_plus_tanh, sech2);
    return 0.5f * x * one_plus_tanh;
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float x2 = x * x;
    float one_plus_tanh, sech2;
    one_plus_tanh_and_sech2(kSqrt2OverPi * (x + kGeluCoef * x2 * x), one_plus_tanh, sech2);
    const float du_dx = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x2);
    return 0.5f * one_plus_tanh + 0.5f * x * sech2 * du_dx;
}

// out = gelu(inp); inp, out: (n,)
template <typename T>
__global__ void gelu_forward_kernel(T* __restrict__ out, const T* __restrict__ inp, long long n) {
    constexpr int V = Packed128<T>::size;
    const long long num_vectors = n / V;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < num_vectors) {
        const Packed128<T> x = load128cs(inp + i * V);
        Packed128<T> y;
#pragma unroll
        for (int k = 0; k < V; ++k) y[k] = from_float<T>(gelu_value(to_float(x[k])));
        store128cs(out + i * V, y);
    }
    // scalar tail: fewer than V elements, one per thread of the first warp
    const long long tail = num_vectors * V + i;
    if (i < V && tail < n) out[tail] = from_float<T>(gelu_value(to_float(inp[tail])));
}

// dinp = dout * gelu'(inp); all (n,)
template <typename T>
__global__ void gelu_backward_kernel(T* __restrict__ dinp, const T* __restrict__ inp,
                                     const T* __restrict__ dout, long long n) {
    constexpr int V = Packed128<T>::size;
    const long long num_vectors = n / V;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < num_vectors) {
        const Packed128<T> x = load128cs(inp + i * V);
        const Packed128<T> dy = load128cs(dout + i * V);
        Packed128<T> dx;
#pragma unroll
        for (int k = 0; k < V; ++k) dx[k] = from_float<T>(to_float(dy[k]) * gelu_grad(to_float(x[k])));
        store128cs(dinp + i * V, dx);
    }
    const long long tail = num_vectors * V + i;
    if (i < V && tail < n) dinp[tail] = from_float<T>(to_float(dout[tail]) * gelu_grad(to_float(inp[tail])));
}

constexpr int kBlockSize = 256;

// Enough threads for every vector, and at least one warp for the tail.
template <typename T>
int gelu_grid(long long n) {
    const long long num_vectors = n / Packed128<T>::size;
    const long long threads = num_vectors > 32 ? num_vectors : 32;
    const long long blocks = (threads + kBlockSize - 1) / kBlockSize;
    require(blocks <= 0x7fffffffLL, "gelu: tensor too large for one launch");
    return static_cast<int>(blocks);
}

}  // namespace

void gelu_forward(void* out, const void* inp, long long n, int dtype, cudaStream_t stream) {
    require(n >= 0, "gelu_forward: n must be >= 0");
    if (n == 0) return;
    require(is_aligned16(out) && is_aligned16(inp), "gelu_forward: pointers must be 16-byte aligned");
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        gelu_forward_kernel<T><<<gelu_grid<T>(n), kBlockSize, 0, stream>>>(
            static_cast<T*>(out), static_cast<const T*>(inp), n);
    });
    PYLLMC_LAUNCH_CHECK("gelu_forward_kernel");
}

void gelu_backward(void* dinp, const void* inp, const void* dout, long long n, int dtype, cudaStream_t stream) {
    require(n >= 0, "gelu_backward: n must be >= 0");
    if (n == 0) return;
    require(is_aligned16(dinp) && is_aligned16(inp) && is_aligned16(dout),
            "gelu_backward: pointers must be 16-byte aligned");
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        gelu_backward_kernel<T><<<gelu_grid<T>(n), kBlockSize, 0, stream>>>(
            static_cast<T*>(dinp), static_cast<const T*>(inp), static_cast<const T*>(dout), n);
    });
    PYLLMC_LAUNCH_CHECK("gelu_backward_kernel");
}

}  // namespace pyllmc
