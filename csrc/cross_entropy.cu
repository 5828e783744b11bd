// cross_entropy.cu: cross-entropy over the vocabulary, forward, backward, and llm.c's fused
// classifier (loss and dlogits in one kernel, written over the logits).
//
//   m_i    = max_j x_ij,  d_i = sum_j exp(x_ij - m_i) (row max and sum, kept apart)
//   loss_i = (m_i - x_i,t_i) + log d_i                (= lse_i - x_i,t_i; 0 for ignored rows)
//   loss   = sum_i loss_i / max(n_valid, 1)           (n_valid: rows not ignored)
//   dx_ij  = (exp(x_ij - m_i) * (1 / d_i) - [j == t_i]) * dloss / max(n_valid, 1)
//
// Why m and d apart: exp(x - lse) with lse rounded to one float32 number gives every probability
// of the row the relative error of that rounding, up to half an ulp of |lse| (2e-6 at |lse| ~ 40),
// 5x PyTorch's own. exp(x - m) is exact in its argument where p is large (x - m is exact when
// x lies within a factor 2 of m), and 1 / d is one correctly rounded division per row: each p is
// then off by exp's error + d's summation error + 2 roundings (the reciprocal, the product), a few
// 1e-7 relative. A division per element would save one rounding (2^-24) and cost an IEEE
// division per element; the reciprocal keeps the gradient pass a multiply per element.
//
// Design: one block per row (up to 1024 threads), so a row of GPT-2's 50257 classes is read
// by the whole block with coalesced 128-bit loads. Each thread keeps an online softmax (its
// running max and sum of exp(x - max), rescaled once per 128-bit vector when the max grows);
// the block merges them with two fixed-order reductions. All math in float32; exponentials
// are exp2f of (x - max) * log2(e) (the subtraction first keeps large logits exact). The
// forward saves (m, d) per row, float32 (N, 2), 8 bytes a row, for the backward.
//
// Rows may lie further apart than V (row_stride >= V: GPT-2 passes the (N, V) view of its
// padded (N, Vp) logits), and a row's start need not be 16-byte aligned: each row is split
// into a scalar head up to the first aligned address, 128-bit vectors, and a scalar tail.
// Gradients use the same layout as the logits; padding columns [V, row_stride) get zeros
// where the caller owns them.
//
// The loss is reduced deterministically: per-row losses go to a workspace, then a single
// block sums them in a fixed order (no atomics). n_valid is counted the same way.
//
// Fused classifier: pass 1 reads the row for its max and sum, pass 2 reads it again (it is
// still in L2: at most a few hundred KB per SM are in flight) and writes dlogits in place,
// so the logits are read from DRAM once and no separate gradient buffer exists. Like llm.c's
// 1 / (B*T*grad_accum), a loss scale s is baked in: the loss is s * mean and dlogits its
// gradient for dloss = 1 (the trainer passes s = 1 / grad_accum_steps). Only an upstream
// gradient other than 1 needs cross_entropy_scale_grad, another pass over (N, V).
//
// Options (Liger-Kernel's; ops.cross_entropy's docstring has the math), all float32:
//   z_ij    = softcap * tanh(x_ij / softcap)              soft-capped logits (Gemma 2), softcap > 0
//   loss_i  = (1 - eps) (lse_i - z_i,t_i) + eps (lse_i - mean_j z_ij) + zs lse_i^2
//   dz_ij   = exp(z_ij - m_i) * (1 / d_i) (1 + 2 zs lse_i) - (1 - eps) [j == t_i] - eps / V
//   dx_ij   = dz_ij * (1 - t_ij)(1 + t_ij),  t_ij = tanh(x_ij / softcap)   (dx = dz without a cap)
// (eps: label smoothing, PyTorch's definition; zs: PaLM's z-loss scale). They live in the kernels'
// kOpts = true instantiation; kOpts = false is the plain loss's per-element code, unchanged, so
// the default path pays nothing for them (sm_90: the same registers, 0 spills). The row's scale
// (dloss / n_valid for reduction "mean", dloss for "sum", dloss[row] for "none") is a runtime
// choice made once per row (a strided load and a select; the backward kernel takes 32 registers
// where it took 29-32).
//
// Targets outside [0, V) other than ignore_index are rejected by the Python layer; the
// kernels still never read out of bounds for them (the target column is only read when in
// range) and their row loss comes out NaN.
#include "common.cuh"

#include <cfloat>
#include <cmath>

namespace pyllmc {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
// Start of every running max: finite, so (running max - new max) is never inf - inf, and
// small enough that scaling it by log2(e) cannot overflow.
constexpr float kLowest = -1.0e38f;
constexpr int kMaxThreads = 1024;
constexpr int kReduceThreads = 1024;

// The loss options of the kOpts kernels (defaults: the plain cross-entropy).
struct CeOptions {
    float smoothing;    // label smoothing eps in [0, 1)
    float z_scale;      // z-loss scale zs >= 0
    float softcap;      // > 0, or 0 for no cap
    float inv_softcap;  // 1 / softcap, rounded once on the host (0 without a cap)
};

// The logit the softmax sees: softcap * tanh(x / softcap), or x.
template <bool kOpts>
__device__ __forceinline__ float cap_logit(float x, const CeOptions& opt) {
    if (!kOpts || opt.softcap == 0.0f) return x;
    return opt.softcap * tanhf(x * opt.inv_softcap);
}

// Where a row switches between scalar and 128-bit accesses:
// [0, head) scalar, [head, vec_end) whole 16-byte vectors, [vec_end, V) scalar.
struct RowSplit {
    int head;
    int vec_end;
};

// `row` is element-aligned (always true for torch tensors); its 16-byte misalignment sets the head.
template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int V, bool vectorize) {
    constexpr int W = Packed128<T>::size;
    if (!vectorize) return {V, V};
    const int misaligned = static_cast<int>((reinterpret_cast<std::uintptr_t>(row) & 15) / sizeof(T));
    const int head = min(V, (W - misaligned) % W);
    return {head, head + (V - head) / W * W};
}

// Online softmax state of one thread: running max, and the sum of exp(x - max) over the
// values seen so far.
struct SoftmaxStats {
    float max;
    float sum;
    float sum_z;  // sum of the (capped) logits, kOpts only: label smoothing's mean logit
};

template <int K>
__device__ __forceinline__ void stats_add(SoftmaxStats& st, const float (&x)[K]) {
    float new_max = st.max;
#pragma unroll
    for (int k = 0; k < K; ++k) new_max = fmaxf(new_max, x[k]);
    float sum = st.sum * exp2f((st.max - new_max) * kLog2e);
#pragma unroll
    for (int k = 0; k < K; ++k) sum += exp2f((x[k] - new_max) * kLog2e);
    st.max = new_max;
    st.sum = sum;
}

__device__ __forceinline__ void stats_add_one(SoftmaxStats& st, float x) {
    const float one[1] = {x};
    stats_add<1>(st, one);
}

// Row max and sum of exp(x - row max) over the whole block (every thread gets them).
// kStreaming: evict-first loads, for a row that is not read again soon.
// kOpts: over the capped logits, with their sum too.
template <typename T, bool kStreaming, bool kOpts>
__device__ SoftmaxStats row_softmax_stats(const T* row, int V, RowSplit split, float* shared, const CeOptions& opt) {
    constexpr int W = Packed128<T>::size;
    SoftmaxStats st{kLowest, 0.0f, 0.0f};
    for (int j = threadIdx.x; j < split.head; j += blockDim.x) {
        const float z = cap_logit<kOpts>(to_float(row[j]), opt);
        if (kOpts) st.sum_z += z;
        stats_add_one(st, z);
    }
    for (int j = split.head + threadIdx.x * W; j < split.vec_end; j += blockDim.x * W) {
        const Packed128<T> packed = kStreaming ? load128cs(row + j) : load128(row + j);
        float x[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
            x[k] = cap_logit<kOpts>(to_float(packed[k]), opt);
            if (kOpts) st.sum_z += x[k];
        }
        stats_add<W>(st, x);
    }
    for (int j = split.vec_end + threadIdx.x; j < V; j += blockDim.x) {
        const float z = cap_logit<kOpts>(to_float(row[j]), opt);
        if (kOpts) st.sum_z += z;
        stats_add_one(st, z);
    }

    const float row_max = block_reduce_max(st.max, shared);
    const float row_sum = block_reduce_sum(st.sum * exp2f((st.max - row_max) * kLog2e), shared);
    const float sum_z = kOpts ? block_reduce_sum(st.sum_z, shared) : 0.0f;
    return {row_max, row_sum, sum_z};
}

// The loss of a row that is not ignored, from its stats and its target's (capped) logit.
template <bool kOpts>
__device__ __forceinline__ float row_loss(const SoftmaxStats& st, float z_target, int V, const CeOptions& opt) {
    const float log_sum = logf(st.sum);
    // (max - z_t) + log(sum) rather than lse - z_t: no cancellation for confident rows
    const float nll = (st.max - z_target) + log_sum;
    if (!kOpts) return nll;
    float loss = nll;
    if (opt.smoothing != 0.0f) {  // PyTorch's: (1 - eps) nll + eps * mean_j (lse - z_j)
        const float smooth = (st.max - st.sum_z / static_cast<float>(V)) + log_sum;
        loss = (1.0f - opt.smoothing) * nll + opt.smoothing * smooth;
    }
    const float lse = st.max + log_sum;
    return loss + opt.z_scale * lse * lse;
}

// The per-row constants of a kOpts gradient row.
struct GradRow {
    float p_scale;   // (1 / d) (1 + 2 zs lse): p = exp(z - m) * p_scale carries the z-loss term
    float target_w;  // 1 - eps, subtracted at the target
    float uniform;   // eps / V, subtracted everywhere
};

template <bool kOpts>
__device__ __forceinline__ GradRow grad_row(float row_max, float row_sum, int V, const CeOptions& opt) {
    const float inv_sum = 1.0f / row_sum;
    if (!kOpts) return {inv_sum, 1.0f, 0.0f};
    const float lse = row_max + logf(row_sum);
    return {inv_sum * (1.0f + 2.0f * opt.z_scale * lse), 1.0f - opt.smoothing, opt.smoothing / static_cast<float>(V)};
}

// p = exp(x - row_max) / row_sum, with inv_sum = 1 / row_sum rounded once per row
__device__ __forceinline__ float softmax_grad(float x, float row_max, float inv_sum, bool is_target, float scale) {
    const float p = exp2f((x - row_max) * kLog2e) * inv_sum;
    return (is_target ? p - 1.0f : p) * scale;
}

// The kOpts gradient of one logit x: through the cap (its tanh' = (1 - t)(1 + t)), smoothing and z-loss.
template <bool kOpts>
__device__ __forceinline__ float logit_grad(float x, float row_max, const GradRow& g, bool is_target, float scale,
                                            const CeOptions& opt) {
    if (!kOpts) return softmax_grad(x, row_max, g.p_scale, is_target, scale);
    float z = x, dcap = 1.0f;
    if (opt.softcap != 0.0f) {
        const float t = tanhf(x * opt.inv_softcap);
        z = opt.softcap * t;
        dcap = (1.0f - t) * (1.0f + t);  // 1 - t^2 without its cancellation near |t| = 1
    }
    const float p = exp2f((z - row_max) * kLog2e) * g.p_scale;
    const float dz = (is_target ? p - g.target_w : p) - g.uniform;
    return dz * scale * dcap;
}

// out[j] = (softmax(in)[j] - [j == target]) * scale for j < V, zeros for j in [V, pad_end);
// softmax from the row's max and 1 / sum.
// out and in may be the same row (the fused kernel): each element is read, then written,
// by the same thread, so no __restrict__ and no race.
template <typename T, bool kOpts>
__device__ void write_row_grad(T* out, const T* in, int V, long long pad_end, RowSplit split, float row_max,
                               const GradRow& gr, long long target, float scale, const CeOptions& opt) {
    constexpr int W = Packed128<T>::size;
    for (int j = threadIdx.x; j < split.head; j += blockDim.x)
        out[j] = from_float<T>(logit_grad<kOpts>(to_float(in[j]), row_max, gr, j == target, scale, opt));
    for (int j = split.head + threadIdx.x * W; j < split.vec_end; j += blockDim.x * W) {
        const Packed128<T> x = load128cs(in + j);
        Packed128<T> g;
#pragma unroll
        for (int k = 0; k < W; ++k)
            g[k] = from_float<T>(logit_grad<kOpts>(to_float(x[k]), row_max, gr, j + k == target, scale, opt));
        store128cs(out + j, g);
    }
    for (int j = split.vec_end + threadIdx.x; j < V; j += blockDim.x)
        out[j] = from_float<T>(logit_grad<kOpts>(to_float(in[j]), row_max, gr, j == target, scale, opt));
    for (long long j = V + threadIdx.x; j < pad_end; j += blockDim.x) out[j] = from_float<T>(0.0f);
}

// An ignored row: zero gradient over [0, pad_end), nothing read.
template <typename T>
__device__ void zero_row(T* out, long long pad_end) {
    for (long long j = threadIdx.x; j < pad_end; j += blockDim.x) out[j] = from_float<T>(0.0f);
}

__device__ __forceinline__ float mean_scale(const float* n_valid) { return 1.0f / fmaxf(*n_valid, 1.0f); }

// The reductions, as the Python layer numbers them.
constexpr int kMean = 0;
constexpr int kSum = 1;
constexpr int kNone = 2;

// One block per row. stats: (N, 2) (row max, sum of exp(x - max)); row_losses, targets: (N,);
// logits: (N, V), rows row_stride apart
template <typename T, bool kOpts>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_forward_kernel(float* __restrict__ stats, float* __restrict__ row_losses, const T* __restrict__ logits,
                             const long long* __restrict__ targets, int V, long long row_stride,
                             long long ignore_index, CeOptions opt) {
    __shared__ float shared[32];
    const long long row = blockIdx.x;
    const long long target = targets[row];
    if (target == ignore_index) {  // the whole block leaves together: no reduction is left waiting
        if (threadIdx.x == 0) {
            stats[2 * row] = 0.0f;  // (0, 1): lse 0, never read
            stats[2 * row + 1] = 1.0f;
            row_losses[row] = 0.0f;
        }
        return;
    }
    const T* x = logits + row * row_stride;
    const SoftmaxStats st = row_softmax_stats<T, true, kOpts>(x, V, split_row(x, V, true), shared, opt);
    if (threadIdx.x == 0) {
        const float x_target = (target >= 0 && target < V) ? cap_logit<kOpts>(to_float(x[target]), opt) : NAN;
        stats[2 * row] = st.max;
        stats[2 * row + 1] = st.sum;
        row_losses[row] = row_loss<kOpts>(st, x_target, V, opt);
    }
}

// dlogits: (N, V) rows row_stride apart, with columns up to pad_end written; logits: same
// layout; targets: (N,); stats: (N, 2) from the forward; n_valid: (); dloss: () or, with
// dloss_stride 1 (reduction "none"), (N,); mean: divide by n_valid (reduction "mean")
template <typename T, bool kOpts>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_backward_kernel(T* __restrict__ dlogits, const T* __restrict__ logits,
                              const long long* __restrict__ targets, const float* __restrict__ stats,
                              const float* __restrict__ n_valid, const float* __restrict__ dloss,
                              long long dloss_stride, bool mean, int V, long long row_stride, long long pad_end,
                              long long ignore_index, bool vectorize, CeOptions opt) {
    const long long row = blockIdx.x;
    const long long target = targets[row];
    T* out = dlogits + row * row_stride;
    if (target == ignore_index) {
        zero_row(out, pad_end);
        return;
    }
    const T* x = logits + row * row_stride;
    const float scale = dloss[row * dloss_stride] * (mean ? mean_scale(n_valid) : 1.0f);
    write_row_grad<T, kOpts>(out, x, V, pad_end, split_row(x, V, vectorize), stats[2 * row],
                             grad_row<kOpts>(stats[2 * row], stats[2 * row + 1], V, opt), target, scale, opt);
}

// The fused classifier. row_losses, targets: (N,); logits: (N, V) rows row_stride apart,
// overwritten with dlogits (and zeros up to pad_end); n_valid: () counted beforehand; mean:
// divide the gradient by n_valid (reduction "mean"; "sum" and "none" write each row's gradient
// of its own loss); stats: (N, 2) (row max, sum) like the forward's, or null (not wanted).
template <typename T, bool kOpts>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_fused_kernel(float* __restrict__ row_losses, float* __restrict__ stats, T* logits,
                           const long long* __restrict__ targets, const float* __restrict__ n_valid, int V,
                           long long row_stride, long long pad_end, long long ignore_index, float loss_scale,
                           bool mean, CeOptions opt) {
    __shared__ float shared[32];
    const long long row = blockIdx.x;
    const long long target = targets[row];
    T* x = logits + row * row_stride;
    if (target == ignore_index) {
        zero_row(x, pad_end);
        if (threadIdx.x == 0) {
            row_losses[row] = 0.0f;
            if (stats) {
                stats[2 * row] = 0.0f;
                stats[2 * row + 1] = 1.0f;
            }
        }
        return;
    }
    // Read before pass 2 overwrites it; the reductions in pass 1 order this read before any write.
    const float x_target =
        (threadIdx.x == 0 && target >= 0 && target < V) ? cap_logit<kOpts>(to_float(x[target]), opt) : NAN;
    const RowSplit split = split_row(x, V, true);
    // keep the row in L2 for pass 2
    const SoftmaxStats st = row_softmax_stats<T, false, kOpts>(x, V, split, shared, opt);
    if (threadIdx.x == 0) {
        row_losses[row] = row_loss<kOpts>(st, x_target, V, opt);
        if (stats) {
            stats[2 * row] = st.max;
            stats[2 * row + 1] = st.sum;
        }
    }
    write_row_grad<T, kOpts>(x, x, V, pad_end, split, st.max, grad_row<kOpts>(st.max, st.sum, V, opt), target,
                             loss_scale * (mean ? mean_scale(n_valid) : 1.0f), opt);
}

// dlogits (N, V) rows row_stride apart *= dloss[row * dloss_stride] (dloss () with stride 0, or
// (N,) with stride 1: reduction "none"); nothing moves in a row whose factor is 1.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_scale_grad_kernel(T* __restrict__ dlogits, const float* __restrict__ dloss, long long dloss_stride,
                                int V, long long row_stride) {
    constexpr int W = Packed128<T>::size;
    const float scale = dloss[blockIdx.x * dloss_stride];
    if (scale == 1.0f) return;
    T* row = dlogits + static_cast<long long>(blockIdx.x) * row_stride;
    const RowSplit split = split_row(row, V, true);
    for (int j = threadIdx.x; j < split.head; j += blockDim.x) row[j] = from_float<T>(to_float(row[j]) * scale);
    for (int j = split.head + threadIdx.x * W; j < split.vec_end; j += blockDim.x * W) {
        Packed128<T> g = load128cs(row + j);
#pragma unroll
        for (int k = 0; k < W; ++k) g[k] = from_float<T>(to_float(g[k]) * scale);
        store128cs(row + j, g);
    }
    for (int j = split.vec_end + threadIdx.x; j < V; j += blockDim.x) row[j] = from_float<T>(to_float(row[j]) * scale);
}

// n_valid (): the number of targets (N,) that are not ignore_index. One block, fixed order;
// float32 counts are exact up to 2^24 rows.
__global__ void __launch_bounds__(kReduceThreads)
cross_entropy_count_kernel(float* __restrict__ n_valid, const long long* __restrict__ targets, long long N,
                           long long ignore_index) {
    __shared__ float shared[32];
    float count = 0.0f;
    for (long long i = threadIdx.x; i < N; i += blockDim.x) count += targets[i] != ignore_index ? 1.0f : 0.0f;
    count = block_reduce_sum(count, shared);
    if (threadIdx.x == 0) *n_valid = count;
}

// loss () = loss_scale * sum of row_losses (N,) / max(n_valid, 1) (without the division unless mean).
// One block, fixed order: deterministic.
__global__ void __launch_bounds__(kReduceThreads)
cross_entropy_mean_kernel(float* __restrict__ loss, const float* __restrict__ row_losses,
                          const float* __restrict__ n_valid, long long N, float loss_scale, bool mean) {
    __shared__ float shared[32];
    float total = 0.0f;
    for (long long i = threadIdx.x; i < N; i += blockDim.x) total += row_losses[i];
    total = block_reduce_sum(total, shared);
    if (threadIdx.x == 0) *loss = total * (mean ? mean_scale(n_valid) : 1.0f) * loss_scale;
}

// Threads per row: enough for one 128-bit vector each, a power of two in [32, 1024].
template <typename T>
int row_threads(int V) {
    const int vectors = ceil_div(V, Packed128<T>::size);
    int threads = 32;
    while (threads < vectors && threads < kMaxThreads) threads *= 2;
    return threads;
}

void check_sizes(const char* who, long long N, long long V, long long row_stride) {
    const std::string name(who);
    require(N >= 0, name + ": N must be >= 0");
    require(N <= 0x7fffffffLL, name + ": N must fit one grid (<= 2^31 - 1 rows)");
    // int column indices, with room for a block's stride past the end
    require(V >= 1 && V <= (1LL << 30), name + ": V must be in [1, 2^30]");
    require(row_stride >= V, name + ": row_stride must be >= V");
    require(N == 0 || row_stride <= (0x7fffffffffffffffLL - V) / N, name + ": N * row_stride overflows");
}

// The options of a launcher, checked; *opts: whether any is off its default (the kOpts kernels).
CeOptions check_options(const char* who, int reduction, float label_smoothing, float lse_square_scale,
                        float softcap, bool* opts) {
    const std::string name(who);
    require(reduction == kMean || reduction == kSum || reduction == kNone,
            name + ": reduction must be 0 (mean), 1 (sum) or 2 (none)");
    require(label_smoothing >= 0.0f && label_smoothing < 1.0f, name + ": label_smoothing must be in [0, 1)");
    require(lse_square_scale >= 0.0f && std::isfinite(lse_square_scale), name + ": lse_square_scale must be >= 0");
    require(softcap >= 0.0f && std::isfinite(softcap), name + ": softcap must be > 0 (or 0: none)");
    *opts = label_smoothing != 0.0f || lse_square_scale != 0.0f || softcap != 0.0f;
    return {label_smoothing, lse_square_scale, softcap, softcap != 0.0f ? 1.0f / softcap : 0.0f};
}

// kernel<T, kOpts> for a runtime flag: the plain loss keeps its own instantiation.
template <typename F>
void dispatch_opts(bool opts, F&& f) {
    if (opts) {
        f(std::true_type{});
    } else {
        f(std::false_type{});
    }
}

}  // namespace

// stats: (N, 2) float32, each row's (max, sum of exp(x - max)) for the backward. reduction "none":
// the caller reads row_losses (N,) and loss is not written.
void cross_entropy_forward(float* loss, float* stats, float* n_valid, float* row_losses, const void* logits,
                           const long long* targets, long long N, long long V, long long row_stride,
                           long long ignore_index, int dtype, cudaStream_t stream, int reduction,
                           float label_smoothing, float lse_square_scale, float softcap) {
    check_sizes("cross_entropy_forward", N, V, row_stride);
    bool opts = false;
    const CeOptions opt =
        check_options("cross_entropy_forward", reduction, label_smoothing, lse_square_scale, softcap, &opts);
    require(loss && n_valid, "cross_entropy_forward: null loss or n_valid");
    require(N == 0 || (stats && row_losses && logits && targets), "cross_entropy_forward: null pointer");
    if (N > 0) {
        dispatch_dtype(to_dtype(dtype), [&](auto tag) {
            using T = decltype(tag);
            dispatch_opts(opts, [&](auto kopts) {
                constexpr bool kOpts = decltype(kopts)::value;
                cross_entropy_forward_kernel<T, kOpts>
                    <<<static_cast<int>(N), row_threads<T>(static_cast<int>(V)), 0, stream>>>(
                        stats, row_losses, static_cast<const T*>(logits), targets, static_cast<int>(V), row_stride,
                        ignore_index, opt);
            });
        });
        PYLLMC_LAUNCH_CHECK("cross_entropy_forward_kernel");
    }
    cross_entropy_count_kernel<<<1, kReduceThreads, 0, stream>>>(n_valid, targets, N, ignore_index);
    PYLLMC_LAUNCH_CHECK("cross_entropy_count_kernel");
    if (reduction != kNone) {
        cross_entropy_mean_kernel<<<1, kReduceThreads, 0, stream>>>(loss, row_losses, n_valid, N, 1.0f,
                                                                    reduction == kMean);
        PYLLMC_LAUNCH_CHECK("cross_entropy_mean_kernel");
    }
}

// dloss: () float32, or (N,) for reduction "none"
void cross_entropy_backward(void* dlogits, const void* logits, const long long* targets, const float* stats,
                            const float* n_valid, const float* dloss, long long N, long long V, long long row_stride,
                            long long ignore_index, int dtype, cudaStream_t stream, int reduction,
                            float label_smoothing, float lse_square_scale, float softcap) {
    check_sizes("cross_entropy_backward", N, V, row_stride);
    bool opts = false;
    const CeOptions opt =
        check_options("cross_entropy_backward", reduction, label_smoothing, lse_square_scale, softcap, &opts);
    if (N == 0) return;
    require(dlogits && logits && targets && stats && n_valid && dloss, "cross_entropy_backward: null pointer");
    // dlogits holds N full rows of row_stride elements: its padding columns are zeroed.
    // 128-bit accesses need logits and dlogits equally misaligned (then every row splits alike).
    const bool vectorize =
        ((reinterpret_cast<std::uintptr_t>(dlogits) - reinterpret_cast<std::uintptr_t>(logits)) & 15) == 0;
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        dispatch_opts(opts, [&](auto kopts) {
            constexpr bool kOpts = decltype(kopts)::value;
            cross_entropy_backward_kernel<T, kOpts>
                <<<static_cast<int>(N), row_threads<T>(static_cast<int>(V)), 0, stream>>>(
                    static_cast<T*>(dlogits), static_cast<const T*>(logits), targets, stats, n_valid, dloss,
                    reduction == kNone ? 1 : 0, reduction == kMean, static_cast<int>(V), row_stride, row_stride,
                    ignore_index, vectorize, opt);
        });
    });
    PYLLMC_LAUNCH_CHECK("cross_entropy_backward_kernel");
}

// pad_end in [V, row_stride]: columns [V, pad_end) of every row get zeros (the padding the caller owns).
// stats: (N, 2) float32 like the forward's, or null. reduction "none": the caller reads row_losses
// (each row's loss, not yet times loss_scale) and loss is not written; the gradient is each row's.
void cross_entropy_fused_forward_backward(float* loss, float* n_valid, float* row_losses, void* logits,
                                          const long long* targets, long long N, long long V, long long row_stride,
                                          long long pad_end, long long ignore_index, float loss_scale, int dtype,
                                          cudaStream_t stream, int reduction, float label_smoothing,
                                          float lse_square_scale, float softcap, float* stats) {
    check_sizes("cross_entropy_fused_forward_backward", N, V, row_stride);
    bool opts = false;
    const CeOptions opt = check_options("cross_entropy_fused_forward_backward", reduction, label_smoothing,
                                        lse_square_scale, softcap, &opts);
    require(pad_end >= V && pad_end <= row_stride, "cross_entropy_fused_forward_backward: pad_end must be in [V, row_stride]");
    require(loss && n_valid, "cross_entropy_fused_forward_backward: null loss or n_valid");
    require(N == 0 || (row_losses && logits && targets), "cross_entropy_fused_forward_backward: null pointer");
    // n_valid first: the fused kernel scales the gradient by it
    cross_entropy_count_kernel<<<1, kReduceThreads, 0, stream>>>(n_valid, targets, N, ignore_index);
    PYLLMC_LAUNCH_CHECK("cross_entropy_count_kernel");
    if (N > 0) {
        dispatch_dtype(to_dtype(dtype), [&](auto tag) {
            using T = decltype(tag);
            dispatch_opts(opts, [&](auto kopts) {
                constexpr bool kOpts = decltype(kopts)::value;
                cross_entropy_fused_kernel<T, kOpts>
                    <<<static_cast<int>(N), row_threads<T>(static_cast<int>(V)), 0, stream>>>(
                        row_losses, stats, static_cast<T*>(logits), targets, n_valid, static_cast<int>(V), row_stride,
                        pad_end, ignore_index, loss_scale, reduction == kMean, opt);
            });
        });
        PYLLMC_LAUNCH_CHECK("cross_entropy_fused_kernel");
    }
    if (reduction != kNone) {
        cross_entropy_mean_kernel<<<1, kReduceThreads, 0, stream>>>(loss, row_losses, n_valid, N, loss_scale,
                                                                    reduction == kMean);
        PYLLMC_LAUNCH_CHECK("cross_entropy_mean_kernel");
    }
}

// dloss: () float32, or (N,) with per_row (reduction "none": row i is scaled by dloss[i])
void cross_entropy_scale_grad(void* dlogits, const float* dloss, long long N, long long V, long long row_stride,
                              int dtype, cudaStream_t stream, bool per_row) {
    check_sizes("cross_entropy_scale_grad", N, V, row_stride);
    if (N == 0) return;
    require(dlogits && dloss, "cross_entropy_scale_grad: null pointer");
    dispatch_dtype(to_dtype(dtype), [&](auto tag) {
        using T = decltype(tag);
        cross_entropy_scale_grad_kernel<T><<<static_cast<int>(N), row_threads<T>(static_cast<int>(V)), 0, stream>>>(
            static_cast<T*>(dlogits), dloss, per_row ? 1 : 0, static_cast<int>(V), row_stride);
    });
    PYLLMC_LAUNCH_CHECK("cross_entropy_scale_grad_kernel");
}

}  // namespace pyllmc
