// swiglu.cu: the gated MLP activations, forward and backward: Llama's SwiGLU and nanochat's relu^2.
//
//   swiglu(a, b) = silu(a) * b,  silu(a) = a s,  s = sigmoid(a) = 1 / (1 + exp(-a))
//   da = dout * b * silu'(a),    silu'(a) = s + a s (1 - s) = s (1 + a (1 - s))
//   db = dout * silu(a)
//   relu2(x) = relu(x)^2,        dx = dout * 2 relu(x)
//
// s and 1 - s from e = exp(-|a|) in (0, 1]: a >= 0: s = 1 / (1 + e), 1 - s = e / (1 + e); a < 0 the
// two swap. exp never sees a positive argument, so nothing overflows at any |a| (exp(-a) is inf
// past a = -88.7, and inf * 0 = NaN waits in a s (1 - s)), and 1 - s keeps float32's relative
// accuracy where s rounds to 1 (1 - s computed as a difference is off by up to an ulp of 1).
//
// Design: streaming ops, as gelu.cu; the only goal is to move bytes at full bandwidth. swiglu's
// operands are (rows, cols) matrices, the last dim contiguous, each with its own row stride:
// a and b may be the halves [a | b] of one (rows, 2 cols) tensor (one fused w1|w3 matmul's output,
// row stride 2 cols), read in place, and the backward writes da and db into the halves of one
// (rows, 2 cols) buffer the same way (the gradient of that tensor; see pyllmc/ops/swiglu.py for
// the bytes this saves). Contiguous operands (every stride == cols) are one row of rows * cols.
// A row is cut into slots of V consecutive elements (one 128-bit vector of each operand: 4 fp32
// or 8 bf16/fp16) when every pointer is 16-byte aligned and every row stride a multiple of V
// (kVector; the halves of a packed tensor are when cols % V == 0), else of one element (plain
// loads, still coalesced across the warp); the last slot of a row may be short (a scalar loop).
// One thread per slot, the slots of all rows numbered row by row: no idle lanes at any row width.
// Compute in float, round once to the storage type; streaming cache hints (every byte is touched
// once). relu2 is the same kernel shape on one contiguous row.
#include "common.cuh"

#include <initializer_list>
#include <string>
#include <type_traits>

namespace pyllmc {
namespace {

// s = sigmoid(a) and 1 - s, without overflow (see the top of the file)
__device__ __forceinline__ void sigmoid_and_complement(float a, float& s, float& one_minus_s) {
    const float e = expf(-fabsf(a));
    const float inv = 1.0f / (1.0f + e);
    s = a >= 0.0f ? inv : e * inv;
    one_minus_s = a >= 0.0f ? e * inv : inv;
}

__device__ __forceinline__ float swiglu_value(float a, float b) {
    float s, one_minus_s;
    sigmoid_and_complement(a, s, one_minus_s);
    return a * s * b;
}

// da and db of one element, from dout, a, b
__device__ __forceinline__ void swiglu_grads(float dy, float a, float b, float& da, float& db) {
    float s, one_minus_s;
    sigmoid_and_complement(a, s, one_minus_s);
    da = dy * b * (s * (1.0f + a * one_minus_s));
    db = dy * (a * s);
}

// One thread per slot, the slots of all rows numbered row by row.
struct SlotGrid {
    int blocks;
    bool vector;
};

constexpr int kBlockSize = 256;

// This thread's slot: its row and first column; false past the last slot. One 64-bit division
// per thread where there are several rows (~70 instructions: a memory-bound kernel has ~400 to
// spare per 16-byte slot on an H100), none for one row (contiguous operands, relu2).
__device__ __forceinline__ bool slot_of_thread(long long rows, long long cols, int width, long long& row,
                                               long long& col) {
    const long long slots_per_row = (cols + width - 1) / width;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= rows * slots_per_row) return false;
    row = rows == 1 ? 0 : i / slots_per_row;
    col = (i - row * slots_per_row) * width;
    return true;
}

// Calls f(std::true_type{}) or f(std::false_type{}): one launch site per kernel for both slot kinds.
template <typename F>
void dispatch_vector(bool vector, F&& f) {
    if (vector) f(std::true_type{});
    else f(std::false_type{});
}

// out = silu(a) * b; out, a, b: (rows, cols), row strides out_stride, a_stride, b_stride
template <typename T, bool kVector>
__global__ void swiglu_forward_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b,
                                      long long rows, long long cols, long long out_stride, long long a_stride,
                                      long long b_stride) {
    constexpr int V = Packed128<T>::size;
    constexpr int W = kVector ? V : 1;  // elements per slot
    long long row, col;
    if (!slot_of_thread(rows, cols, W, row, col)) return;
    T* o = out + row * out_stride + col;
    const T* pa = a + row * a_stride + col;
    const T* pb = b + row * b_stride + col;
    if (kVector && col + V <= cols) {
        const Packed128<T> x = load128cs(pa);
        const Packed128<T> g = load128cs(pb);
        Packed128<T> y;
#pragma unroll
        for (int k = 0; k < V; ++k) y[k] = from_float<T>(swiglu_value(to_float(x[k]), to_float(g[k])));
        store128cs(o, y);
    } else {  // one element, or the short last slot of a row
        for (int k = 0; k < W && col + k < cols; ++k)
            o[k] = from_float<T>(swiglu_value(to_float(pa[k]), to_float(pb[k])));
    }
}

// da = dout * b * silu'(a), db = dout * silu(a); all (rows, cols) with their own row strides
template <typename T, bool kVector>
__global__ void swiglu_backward_kernel(T* __restrict__ da, T* __restrict__ db, const T* __restrict__ dout,
                                       const T* __restrict__ a, const T* __restrict__ b, long long rows,
                                       long long cols, long long da_stride, long long db_stride,
                                       long long dout_stride, long long a_stride, long long b_stride) {
    constexpr int V = Packed128<T>::size;
    constexpr int W = kVector ? V : 1;
    long long row, col;
    if (!slot_of_thread(rows, cols, W, row, col)) return;
    T* pda = da + row * da_stride + col;
    T* pdb = db + row * db_stride + col;
    const T* pdy = dout + row * dout_stride + col;
    const T* pa = a + row * a_stride + col;
    const T* pb = b + row * b_stride + col;
    if (kVector && col + V <= cols) {
        const Packed128<T> dy = load128cs(pdy);
        const Packed128<T> x = load128cs(pa);
        const Packed128<T> g = load128cs(pb);
        Packed128<T> dx, dg;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float ga, gb;
            swiglu_grads(to_float(dy[k]), to_float(x[k]), to_float(g[k]), ga, gb);
            dx[k] = from_float<T>(ga);
            dg[k] = from_float<T>(gb);
        }
        store128cs(pda, dx);
        store128cs(pdb, dg);
    } else {
        for (int k = 0; k < W && col + k < cols; ++k) {
            float ga, gb;
            swiglu_grads(to_float(pdy[k]), to_float(pa[k]), to_float(pb[k]), ga, gb);
            pda[k] = from_float<T>(ga);
            pdb[k] = from_float<T>(gb);
        }
    }
}

// out = relu(inp)^2; inp, out: (n,) as one row of the slot grid
template <typename T, bool kVector>
__global__ void relu2_forward_kernel(T* __restrict__ out, const T* __restrict__ inp, long long n) {
    constexpr int V = Packed128<T>::size;
    constexpr int W = kVector ? V : 1;
    long long row, i;
    if (!slot_of_thread(1, n, W, row, i)) return;
    if (kVector && i + V <= n) {
        const Packed128<T> x = load128cs(inp + i);
        Packed128<T> y;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float r = fmaxf(to_float(x[k]), 0.0f);
            y[k] = from_float<T>(r * r);
        }
        store128cs(out + i, y);
    } else {
        for (int k = 0; k < W && i + k < n; ++k) {
            const float r = fmaxf(to_float(inp[i + k]), 0.0f);
            out[i + k] = from_float<T>(r * r);
        }
    }
}

// dinp = dout * 2 relu(inp); all (n,)
template <typename T, bool kVector>
__global__ void relu2_backward_kernel(T* __restrict__ dinp, const T* __restrict__ inp, const T* __restrict__ dout,
                                      long long n) {
    constexpr int V = Packed128<T>::size;
    constexpr int W = kVector ? V : 1;
    long long row, i;
    if (!slot_of_thread(1, n, W, row, i)) return;
    if (kVector && i + V <= n) {
        const Packed128<T> x = load128cs(inp + i);
        const Packed128<T> dy = load128cs(dout + i);
        Packed128<T> dx;
#pragma unroll
        for (int k = 0; k < V; ++k) dx[k] = from_float<T>(to_float(dy[k]) * (2.0f * fmaxf(to_float(x[k]), 0.0f)));
        store128cs(dinp + i, dx);
    } else {
        for (int k = 0; k < W && i + k < n; ++k)
            dinp[i + k] = from_float<T>(to_float(dout[i + k]) * (2.0f * fmaxf(to_float(inp[i + k]), 0.0f)));
    }
}

// The slots and grid of a (rows, cols) launch. vector: every pointer 16-byte aligned and every row
// stride a multiple of V (rows == 1: strides unused). Contiguous operands were folded into one row.
template <typename T>
SlotGrid slot_grid(long long rows, long long cols, bool aligned, std::initializer_list<long long> strides,
                   const char* what) {
    constexpr int V = Packed128<T>::size;
    bool vector = aligned;
    if (rows > 1)
        for (long long s : strides) vector = vector && s % V == 0;
    const long long slots = rows * (vector ? (cols + V - 1) / V : cols);
    const long long blocks = (slots + kBlockSize - 1) / kBlockSize;
    require(blocks <= 0x7fffffffLL, std::string(what) + ": tensors too large for one launch");
    return {static_cast<int>(blocks), vector};
}

// Operands whose row stride is cols (all contiguous) are one row of rows * cols: long vectors, one
// short slot in all instead of one per row.
void fold_contiguous(long long& rows, long long& cols, std::initializer_list<long long> strides) {
    if (rows <= 1) return;
    for (long long s : strides)
        if (s != cols) return;
    cols *= rows;
    rows = 1;
}

void check_strides(const char* what, long long rows, long long cols, std::initializer_list<long long> strides) {
    require(rows >= 0 && cols >= 0, std::string(what) + ": rows and cols must be >= 0");
    // rows of one operand must not overlap (else a row's writes land in the next one's reads)
    if (rows > 1)
        for (long long s : strides) require(s >= cols, std::string(what) + ": every row stride must be >= cols");
}

}  // namespace

void swiglu_forward(void* out, const void* a, const void* b, long long rows, long long cols, long long out_stride,
                    long long a_stride, long long b_stride, int dtype, cudaStream_t stream) {
    check_strides("swiglu_forward", rows, cols, {out_stride, a_stride, b_stride});
    if (rows == 0 || cols == 0) return;
    fold_contiguous(rows, cols, {out_stride, a_stride, b_stride});
    const bool aligned = is_aligned16(out) && is_aligned16(a) && is_aligned16(b);
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        const SlotGrid g = slot_grid<T>(rows, cols, aligned, {out_stride, a_stride, b_stride}, "swiglu_forward");
        dispatch_vector(g.vector, [&](auto vector) {
            constexpr bool kVector = decltype(vector)::value;
            swiglu_forward_kernel<T, kVector><<<g.blocks, kBlockSize, 0, stream>>>(
                static_cast<T*>(out), static_cast<const T*>(a), static_cast<const T*>(b), rows, cols, out_stride,
                a_stride, b_stride);
        });
    });
    PYLLMC_LAUNCH_CHECK("swiglu_forward_kernel");
}

void swiglu_backward(void* da, void* db, const void* dout, const void* a, const void* b, long long rows,
                     long long cols, long long da_stride, long long db_stride, long long dout_stride,
                     long long a_stride, long long b_stride, int dtype, cudaStream_t stream) {
    check_strides("swiglu_backward", rows, cols, {da_stride, db_stride, dout_stride, a_stride, b_stride});
    if (rows == 0 || cols == 0) return;
    fold_contiguous(rows, cols, {da_stride, db_stride, dout_stride, a_stride, b_stride});
    const bool aligned = is_aligned16(da) && is_aligned16(db) && is_aligned16(dout) && is_aligned16(a) &&
                         is_aligned16(b);
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        const SlotGrid g = slot_grid<T>(rows, cols, aligned, {da_stride, db_stride, dout_stride, a_stride, b_stride},
                                        "swiglu_backward");
        dispatch_vector(g.vector, [&](auto vector) {
            constexpr bool kVector = decltype(vector)::value;
            swiglu_backward_kernel<T, kVector><<<g.blocks, kBlockSize, 0, stream>>>(
                static_cast<T*>(da), static_cast<T*>(db), static_cast<const T*>(dout), static_cast<const T*>(a),
                static_cast<const T*>(b), rows, cols, da_stride, db_stride, dout_stride, a_stride, b_stride);
        });
    });
    PYLLMC_LAUNCH_CHECK("swiglu_backward_kernel");
}

void relu2_forward(void* out, const void* inp, long long n, int dtype, cudaStream_t stream) {
    require(n >= 0, "relu2_forward: n must be >= 0");
    if (n == 0) return;
    const bool aligned = is_aligned16(out) && is_aligned16(inp);
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        const SlotGrid g = slot_grid<T>(1, n, aligned, {}, "relu2_forward");
        dispatch_vector(g.vector, [&](auto vector) {
            constexpr bool kVector = decltype(vector)::value;
            relu2_forward_kernel<T, kVector><<<g.blocks, kBlockSize, 0, stream>>>(
                static_cast<T*>(out), static_cast<const T*>(inp), n);
        });
    });
    PYLLMC_LAUNCH_CHECK("relu2_forward_kernel");
}

void relu2_backward(void* dinp, const void* inp, const void* dout, long long n, int dtype, cudaStream_t stream) {
    require(n >= 0, "relu2_backward: n must be >= 0");
    if (n == 0) return;
    const bool aligned = is_aligned16(dinp) && is_aligned16(inp) && is_aligned16(dout);
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        const SlotGrid g = slot_grid<T>(1, n, aligned, {}, "relu2_backward");
        dispatch_vector(g.vector, [&](auto vector) {
            constexpr bool kVector = decltype(vector)::value;
            relu2_backward_kernel<T, kVector><<<g.blocks, kBlockSize, 0, stream>>>(
                static_cast<T*>(dinp), static_cast<const T*>(inp), static_cast<const T*>(dout), n);
        });
    });
    PYLLMC_LAUNCH_CHECK("relu2_backward_kernel");
}

}  // namespace pyllmc
