// rope.cu: rotary position embedding (RoPE) for the Llama family, forward and backward.
//
//   x (B, T, H, D), D even, half = D / 2; position p = start + t; cos, sin: (rows, half) float32 tables
//   x1 = x[..., :half], x2 = x[..., half:]                       ("rotate halves": Hugging Face, nanochat)
//   out1 = x1 cos[p] - x2 sin[p],   out2 = x1 sin[p] + x2 cos[p]  (each pair (x1[j], x2[j]) turned by p theta_j)
//   dx1 = dy1 cos[p] + dy2 sin[p],  dx2 = -dy1 sin[p] + dy2 cos[p] (the inverse rotation: the transpose)
//
// The backward is the forward with sin negated, so both run one device function (rope_slot) with the
// sign of sin a template argument. cos and sin get no gradient.
//
// Design: a streaming op like swiglu.cu; the goal is to move x's bytes at full bandwidth. x is read
// where it is: any strides on B, T and H, the last dim contiguous, so q and k are views of the packed
// (B, T, (H + 2 H_kv) D) qkv projection, read in place (pyllmc/ops/rope.py has the bytes). The output
// is written with its own strides (a fresh contiguous tensor from the ops layer). The tables are
// small ((T, half) float32: 256 KiB at T = 1024, half = 32) and shared by every (b, h): they live in
// L2, so DRAM traffic is x in + out.
//
// A thread takes one slot: W consecutive pairs j..j+W-1 of one (b, t, h) head row, i.e. W elements of
// x1 and the W matching elements of x2, and W entries of the cos and sin rows of position start + t.
// W = V (one 128-bit vector of x1 and one of x2: 4 fp32 or 8 bf16 / fp16; the same W floats of each
// table as one or two 128-bit loads) when every pointer is 16-byte aligned and half and every stride
// of x and out are multiples of V (kVector), else W = 1 (plain loads, still coalesced across the warp).
// Slots are numbered (b, t, h, slot) in that order, so a warp walks whole head rows (coalesced) and
// no lane idles at any H or D. Index math: two 64-bit divisions per thread (slot -> token, token ->
// (b, t)) and one 32-bit (-> h, slot), ~200 instructions: a 16-bit slot moves 32 B of x and 32 B of
// out, which on an H100 leaves ~500 instructions of budget per thread at full bandwidth.
// Compute in float, round once to the storage type. Offsets are 64-bit; streaming cache hints on x
// and out (touched once), the default path for the tables (re-read by every (b, h)).
#include "common.cuh"

#include <initializer_list>
#include <string>
#include <type_traits>

namespace pyllmc {
namespace {

constexpr int kBlockSize = 256;

// The strides (in elements) of a (B, T, H, D) tensor whose last dim is contiguous.
struct Strides3 {
    long long b, t, h;
};

// W consecutive floats of a table row; vectorized when W is a multiple of 4 (the pointer is then
// 16-byte aligned: the launcher checked the base, and half and j are multiples of W).
template <int W>
__device__ __forceinline__ void load_table(float (&dst)[W], const float* src) {
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int k = 0; k < W; k += 4) {
            const Packed128<float> v = load128(src + k);
#pragma unroll
            for (int e = 0; e < 4; ++e) dst[k + e] = v[e];
        }
    } else {
#pragma unroll
        for (int k = 0; k < W; ++k) dst[k] = src[k];
    }
}

// One slot: out = rotate(inp) by +angle (kSinSign = 1, the forward) or -angle (kSinSign = -1, the
// backward: inp = dout, out = dinp). inp, out: (B, T, H, D) with their strides; cos, sin: (rows, half).
template <typename T, bool kVector, int kSinSign>
__device__ __forceinline__ void rope_slot(T* __restrict__ out, const T* __restrict__ inp,
                                          const float* __restrict__ cosines, const float* __restrict__ sines,
                                          long long B, long long seq_len, int H, int half, Strides3 out_stride,
                                          Strides3 inp_stride, long long start) {
    constexpr int V = Packed128<T>::size;
    constexpr int W = kVector ? V : 1;  // pairs per slot
    const int slots_per_row = half / W;  // exact: the vector path needs half % V == 0
    const long long slots_per_token = static_cast<long long>(H) * slots_per_row;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= B * seq_len * slots_per_token) return;
    const long long token = i / slots_per_token;                          // b * T + t
    const int rem = static_cast<int>(i - token * slots_per_token);        // < H * slots_per_row <= 2^31
    const int h = rem / slots_per_row;
    const int j = (rem - h * slots_per_row) * W;                          // first pair of the slot
    const long long b = token / seq_len;
    const long long t = token - b * seq_len;

    const T* x1 = inp + b * inp_stride.b + t * inp_stride.t + h * inp_stride.h + j;  // x2 = x1 + half
    T* o1 = out + b * out_stride.b + t * out_stride.t + h * out_stride.h + j;
    const long long table_offset = (start + t) * half + j;               // row start + t of (rows, half)
    float c[W], s[W];
    load_table<W>(c, cosines + table_offset);
    load_table<W>(s, sines + table_offset);

    float a[W], g[W];  // x1 and x2 of the slot
    if constexpr (kVector) {
        const Packed128<T> v1 = load128cs(x1);
        const Packed128<T> v2 = load128cs(x1 + half);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            a[k] = to_float(v1[k]);
            g[k] = to_float(v2[k]);
        }
    } else {
        a[0] = to_float(x1[0]);
        g[0] = to_float(x1[half]);
    }
    float y1[W], y2[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
        const float sk = kSinSign * s[k];
        y1[k] = a[k] * c[k] - g[k] * sk;
        y2[k] = a[k] * sk + g[k] * c[k];
    }
    if constexpr (kVector) {
        Packed128<T> w1, w2;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            w1[k] = from_float<T>(y1[k]);
            w2[k] = from_float<T>(y2[k]);
        }
        store128cs(o1, w1);
        store128cs(o1 + half, w2);
    } else {
        o1[0] = from_float<T>(y1[0]);
        o1[half] = from_float<T>(y2[0]);
    }
}

// out (B, T, H, D) = x rotated by the angles of positions start..start+T-1
template <typename T, bool kVector>
__global__ void rope_forward_kernel(T* __restrict__ out, const T* __restrict__ inp, const float* __restrict__ cosines,
                                    const float* __restrict__ sines, long long B, long long seq_len, int H, int half,
                                    Strides3 out_stride, Strides3 inp_stride, long long start) {
    rope_slot<T, kVector, 1>(out, inp, cosines, sines, B, seq_len, H, half, out_stride, inp_stride, start);
}

// dinp (B, T, H, D) = dout rotated back (the transpose of the forward's rotation)
template <typename T, bool kVector>
__global__ void rope_backward_kernel(T* __restrict__ dinp, const T* __restrict__ dout,
                                     const float* __restrict__ cosines, const float* __restrict__ sines, long long B,
                                     long long seq_len, int H, int half, Strides3 dinp_stride, Strides3 dout_stride,
                                     long long start) {
    rope_slot<T, kVector, -1>(dinp, dout, cosines, sines, B, seq_len, H, half, dinp_stride, dout_stride, start);
}

// Checks what would make a launch read or write out of bounds, or write one element twice; true when
// there is anything to do.
bool check_launch(const char* what, long long B, long long T, long long H, long long D, Strides3 out_stride,
                  Strides3 inp_stride, long long start, long long table_rows) {
    const std::string w(what);
    require(B >= 0 && T >= 0 && H >= 0 && D >= 0, w + ": B, T, H and D must be >= 0");
    require(D % 2 == 0, w + ": D must be even (the halves x1 | x2)");
    require(H <= 0x7fffffffLL && D <= 0x7fffffffLL && H * (D / 2) <= 0x7fffffffLL,
            w + ": H * D / 2 must fit in 32 bits");
    require(start >= 0 && table_rows >= 0 && start + T <= table_rows,
            w + ": positions start..start+T-1 must be rows of the cos/sin tables");
    require(inp_stride.b >= 0 && inp_stride.t >= 0 && inp_stride.h >= 0, w + ": strides must be >= 0");
    // out's rows must not overlap (else one slot's writes land on another's): nested, innermost h
    if (H > 1) require(out_stride.h >= D, w + ": out's head stride must be >= D");
    if (T > 1) require(out_stride.t >= (H - 1) * out_stride.h + D, w + ": out's T stride overlaps its heads");
    if (B > 1) require(out_stride.b >= (T - 1) * out_stride.t + (H - 1) * out_stride.h + D,
                       w + ": out's B stride overlaps its rows");
    return B > 0 && T > 0 && H > 0 && D > 0;
}

template <typename T>
bool vectorizable(long long D, std::initializer_list<const void*> pointers, std::initializer_list<long long> strides) {
    constexpr int V = Packed128<T>::size;
    if ((D / 2) % V != 0) return false;
    for (const void* p : pointers)
        if (!is_aligned16(p)) return false;
    for (long long s : strides)
        if (s % V != 0) return false;
    return true;
}

// A stride that is never multiplied by a nonzero index (its dim has extent 1) does not count.
long long used(long long stride, long long extent) { return extent > 1 ? stride : 0; }

// Calls f(std::true_type{}) or f(std::false_type{}): one launch site per kernel for both slot kinds.
template <typename F>
void dispatch_vector(bool vector, F&& f) {
    if (vector) f(std::true_type{});
    else f(std::false_type{});
}

template <int kSinSign>
void launch(const char* what, void* out, const void* inp, const float* cosines, const float* sines, long long B,
            long long T, long long H, long long D, Strides3 out_stride, Strides3 inp_stride, long long start,
            int dtype, cudaStream_t stream) {
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T_ = decltype(tag);
        constexpr int V = Packed128<T_>::size;
        const bool vector = vectorizable<T_>(
            D, {out, inp, cosines, sines},
            {used(out_stride.b, B), used(out_stride.t, T), used(out_stride.h, H), used(inp_stride.b, B),
             used(inp_stride.t, T), used(inp_stride.h, H)});
        const long long slots = B * T * H * (vector ? D / 2 / V : D / 2);
        const long long blocks = (slots + kBlockSize - 1) / kBlockSize;
        require(blocks <= 0x7fffffffLL, std::string(what) + ": tensors too large for one launch");
        dispatch_vector(vector, [&](auto v) {
            constexpr bool kVector = decltype(v)::value;
            if constexpr (kSinSign > 0) {
                rope_forward_kernel<T_, kVector><<<static_cast<int>(blocks), kBlockSize, 0, stream>>>(
                    static_cast<T_*>(out), static_cast<const T_*>(inp), cosines, sines, B, T, static_cast<int>(H),
                    static_cast<int>(D / 2), out_stride, inp_stride, start);
            } else {
                rope_backward_kernel<T_, kVector><<<static_cast<int>(blocks), kBlockSize, 0, stream>>>(
                    static_cast<T_*>(out), static_cast<const T_*>(inp), cosines, sines, B, T, static_cast<int>(H),
                    static_cast<int>(D / 2), out_stride, inp_stride, start);
            }
        });
    });
}

}  // namespace

void rope_forward(void* out, const void* inp, const float* cosines, const float* sines, long long B, long long T,
                  long long H, long long D, long long out_stride_b, long long out_stride_t, long long out_stride_h,
                  long long inp_stride_b, long long inp_stride_t, long long inp_stride_h, long long start,
                  long long table_rows, int dtype, cudaStream_t stream) {
    const Strides3 out_stride{out_stride_b, out_stride_t, out_stride_h};
    const Strides3 inp_stride{inp_stride_b, inp_stride_t, inp_stride_h};
    if (!check_launch("rope_forward", B, T, H, D, out_stride, inp_stride, start, table_rows)) return;
    launch<1>("rope_forward", out, inp, cosines, sines, B, T, H, D, out_stride, inp_stride, start, dtype, stream);
    PYLLMC_LAUNCH_CHECK("rope_forward_kernel");
}

void rope_backward(void* dinp, const void* dout, const float* cosines, const float* sines, long long B, long long T,
                   long long H, long long D, long long dinp_stride_b, long long dinp_stride_t, long long dinp_stride_h,
                   long long dout_stride_b, long long dout_stride_t, long long dout_stride_h, long long start,
                   long long table_rows, int dtype, cudaStream_t stream) {
    const Strides3 dinp_stride{dinp_stride_b, dinp_stride_t, dinp_stride_h};
    const Strides3 dout_stride{dout_stride_b, dout_stride_t, dout_stride_h};
    if (!check_launch("rope_backward", B, T, H, D, dinp_stride, dout_stride, start, table_rows)) return;
    launch<-1>("rope_backward", dinp, dout, cosines, sines, B, T, H, D, dinp_stride, dout_stride, start, dtype, stream);
    PYLLMC_LAUNCH_CHECK("rope_backward_kernel");
}

}  // namespace pyllmc
