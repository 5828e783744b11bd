// attention.cu: causal scaled-dot-product attention, forward and backward (FlashAttention-2 style).
//
// Math, per (b, h), with scale = 1/sqrt(D), rows i and keys j in [0, T):
//   S_ij  = scale * q_i . k_j                     (only j <= i: causal)
//   lse_i = log sum_{j<=i} exp(S_ij)              (natural log; saved by the forward for the backward)
//   P_ij  = exp(S_ij - lse_i)
//   o_i   = sum_j P_ij v_j
// Backward, given dO:
//   delta_i = sum_d dO_id O_id                    (= sum_j P_ij dP_ij)
//   dP_ij   = dO_i . v_j
//   dS_ij   = P_ij (dP_ij - delta_i)
//   dV_j    = sum_{i>=j} P_ij dO_i
//   dK_j    = scale * sum_{i>=j} dS_ij q_i
//   dQ_i    = scale * sum_{j<=i} dS_ij k_j
//
// Design (bf16 / fp16, D in {64, 128}: the tensor-core path):
// - All five products use mma.sync.m16n8k16 (16-bit inputs, fp32 accumulators). Operands come
//   from shared memory through ldmatrix (x4; .trans where the operand must be read down the
//   columns of a row-major tile). Smem rows are padded by 8 elements (16 bytes) so the 8 row
//   addresses of one ldmatrix hit 8 different 16-byte bank groups: no bank conflicts.
// - Tiles are streamed gmem -> smem with cp.async (16 bytes per thread per copy), double-buffered:
//   tile j+1 is in flight while tile j is used. Rows past T are zero-filled by cp.async
//   (src-size 0), so the math never sees garbage; masks make their contribution exactly zero.
// - Forward: one CTA (4 warps) per (64 query rows, b, h); each warp owns 16 query rows and keeps
//   its Q fragments in registers. K/V tiles of 64 keys; S = Q K^T, online softmax in fp32 with
//   exp2 (the scale is folded into log2(e)/sqrt(D)), P converted in registers to the A operand
//   of P V (an m16n8 accumulator pair is exactly one m16k16 A fragment). Causal: only key tiles
//   up to the diagonal are visited; only tiles that cross the diagonal or the end T are masked.
// - Backward: a preprocess kernel computes delta; a dK/dV kernel (CTA = 64 keys, each warp 16
//   keys) walks the query tiles from the diagonal to the end, computing S^T = K Q^T and
//   dP^T = V dO^T so that P^T and dS^T land in accumulator layout and feed dV += P^T dO and
//   dK += dS^T Q directly; a dQ kernel (CTA = 64 query rows) walks the key tiles up to the
//   diagonal: dQ += dS K. No atomics: every output element is owned by exactly one thread,
//   and each is reduced in a fixed order, so results are deterministic.
// - Grouped-query attention (GQA; H_kv = 1 is multi-query): k, v, dk, dv have H_kv heads, H_kv dividing H;
//   query head h reads kv head h / (H / H_kv) in place (kv_head_of: a pointer offset, K/V are never repeated).
//   The forward and dQ grids stay per query head. The dK/dV grid is per kv head: a CTA owns 64 keys of one kv
//   head and walks (query head, query tile) steps, the group's H / H_kv query heads in head order, each from
//   its diagonal tile to the end, accumulating in the same fp32 registers; the double buffer prefetches across
//   head boundaries. Deterministic (fixed order, no atomics); no extra registers or shared memory beyond a few
//   indices; H_kv = H is exactly the multi-head kernel.
// - The ordering of the grid: heavy CTAs (long causal loops) are scheduled first.
// - Shared memory per CTA (bytes, 16-bit elements, rows padded to D + 8): forward 5 * 64 rows
//   (46,080 at D=64, 87,040 at D=128); dK/dV 2 * 64 + 4 * kBr rows + 4 * kBr floats (56,320 / 70,144);
//   dQ 2 * 64 + 4 * kBc rows: with kBc = 64, 55,296 at D=64 but 104,448 at D=128, more than the
//   99 KB (101,376) a block may opt in to on sm_86 / sm_89 / sm_120; there the launcher takes
//   kBc = 32 (69,632), chosen from the device's opt-in limit, and keeps kBc = 64 where it fits
//   (sm_80, sm_90, sm_100).
// - Compute capability 8.0+ only (mma.sync with bf16, cp.async, ldmatrix): built for an older
//   architecture (sm_75), the tensor-core kernels' bodies are a trap, and the launchers refuse
//   bf16/fp16 on a device below 8.0 with a message before any launch; float32 runs everywhere.
//
// - Memory access, measured by the simulator's counters (python dev/sim_counters.py): loads (cp.async,
//   16 bytes a lane) and ldmatrix are at the ideal, conflict-free thanks to the padded rows. The
//   outputs O, dK, dV, dQ are stored straight from the mma accumulators, a 4-byte pair per lane over
//   8 rows: 8 sectors per request where 4 would do. Kept for now: they are written once per tile
//   (a small share of the bytes a CTA moves); staging them through the padded shared tile for
//   16-byte row stores is the known fix, worth it only once a GPU times it.
//
// float32 inputs (D in {32, 64, 128}) take a simple path, all in fp32 (no tensor cores): one warp
// per row (the lanes split D), keys visited one at a time from global memory (L2-resident).
// Slow but simple; it exists so float32 models and tests run, not for speed.
//
// Layout: q, out, dout, dq are (B, H, T, D), k, v, dk, dv (B, H_kv, T, D), with D contiguous and any batch,
// head and position strides (HeadStrides), so GPT-2 needs no copies: q, k, v are views of the c_attn
// output (B, T, 3C) (position stride 3C), dq, dk, dv views of one (B, T, 3, H, D) buffer (the
// qkv gradient), out a (B, T, H, D) buffer, i.e. (B, T, C) with the heads side by side. The
// tensor-core path copies 16-byte chunks, so there every stride must be a multiple of 8 elements
// and every base pointer 16-byte aligned (the launchers check). lse, delta: (B, H, T) fp32, contiguous.
#include "common.cuh"

#include <array>
#include <type_traits>

namespace pyllmc {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ceil(a / b) for non-negative ints, in device code (common.cuh's ceil_div is host-only).
__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

// Element strides of one (B, H, T, D) operand: batch, head, position (D has stride 1).
struct HeadStrides {
    long long b, h, t;
};

// The first element of head bh = b * num_heads + h (the kernels' blockIdx.x) of `base`.
template <typename P>
__device__ __forceinline__ P* head_of(P* base, const HeadStrides& s, int bh, int num_heads) {
    return base + static_cast<long long>(bh / num_heads) * s.b + static_cast<long long>(bh % num_heads) * s.h;
}

// Grouped-query attention: the first element of the key/value head that query head bh = b * num_heads + h
// reads, head h / group of batch b in `base` (B, num_heads / group, T, D); group = 1 is multi-head attention.
// K and V are indexed in place, never repeated per query head.
template <typename P>
__device__ __forceinline__ P* kv_head_of(P* base, const HeadStrides& s, int bh, int num_heads, int group) {
    return base + static_cast<long long>(bh / num_heads) * s.b + static_cast<long long>(bh % num_heads / group) * s.h;
}

// ----------------------------------------------------------------------------
// PTX wrappers (sm_80+)

// cp.async, ldmatrix and mma.sync.m16n8k16 with bf16 need sm_80: compiled for an older GPU
// (nvcc -arch=sm_75), the wrappers trap instead (never reached: the launchers check the
// device's compute capability first). The host pass and the CPU simulator see the real code.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PYLLMC_ATTENTION_SM80 1
#else
#define PYLLMC_ATTENTION_SM80 0
#endif

#if PYLLMC_ATTENTION_SM80
// Shared-memory address of a generic pointer, as the 32-bit operand PTX wants.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16-byte async copy gmem -> smem. When !valid, src-size is 0: nothing is read and the 16
// destination bytes are zero-filled (PTX: cp.async with src-size < cp-size fills the rest with
// zeros). `src` must still be a valid address; callers pass the start of the tensor then.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if PYLLMC_ATTENTION_SM80
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
                 "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
                 : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if PYLLMC_ATTENTION_SM80
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    __trap();
#endif
}
// Wait until at most N committed groups of this thread are still in flight (groups complete in
// commit order). A __syncthreads() must follow before other threads' copies are read.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if PYLLMC_ATTENTION_SM80
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    __trap();
#endif
}

// ldmatrix.m8n8.x4.b16: four 8x8 matrices of 16-bit elements. Lanes 8m..8m+7 give the addresses
// of rows 0..7 of matrix m (each row 16 contiguous bytes, 16-byte aligned). Result register r[m]
// of lane l holds matrix m's row l/4, columns 2*(l%4) and 2*(l%4)+1 (lower column in the low
// 16 bits). With .trans, lane l gets the transposed element pair instead: rows 2*(l%4) and
// 2*(l%4)+1 of column l/4 (PTX ISA, "Warp-level matrix load instruction: ldmatrix").
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if PYLLMC_ATTENTION_SM80
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row_address))
                 : "memory");
#else
    r[0] = r[1] = r[2] = r[3] = 0;
    __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
#if PYLLMC_ATTENTION_SM80
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row_address))
                 : "memory");
#else
    r[0] = r[1] = r[2] = r[3] = 0;
    __trap();
#endif
}

// d += a * b with mma.sync.aligned.m16n8k16.row.col, fp32 accumulate. With g = lane/4, t = lane%4
// (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A (16x16, row-major), 4 regs of 2 elements (PTX elements a0..a7 in pairs):
//     a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1),
//     a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9)
//   B (16x8, "col": element (k, n)), 2 regs: b0 = (rows k = 2t, 2t+1, col n = g), b1 = (rows 2t+8, 2t+9, col g)
//   C/D (16x8 fp32), 4 floats: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// In every 32-bit register the element with the lower k (or column) index is in the low half.
template <typename Elem>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !PYLLMC_ATTENTION_SM80
    __trap();
#else
    if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        static_assert(std::is_same_v<Elem, __half>, "mma_16816: bf16 or fp16 only");
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

// Two floats -> one 32-bit register of two 16-bit elements, `lo` in the low half.
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half), .y = hi
        return *reinterpret_cast<uint32_t*>(&v);
    } else {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
}

// ----------------------------------------------------------------------------
// Fragment helpers. A tile in smem is row-major with row stride kStride<D> elements.
//
// The accumulator -> A-operand identity used for P V, P^T dO, dS^T Q and dS K: the 16x16 A
// fragment (registers a[0..3]) covering columns 16kk..16kk+15 is, by the layouts above,
//   a[0] = c[2kk][0..1], a[1] = c[2kk][2..3], a[2] = c[2kk+1][0..1], a[3] = c[2kk+1][2..3]
// where c[n] is the 16x8 accumulator of columns 8n..8n+7 (same rows g / g+8, same cols 2t, 2t+1
// within each 8-column half).

constexpr int kPad = 8;  // elements: 16 bytes per row, so 8 consecutive rows start in 8 distinct bank groups
template <int D>
constexpr int kStride = D + kPad;

// A operand (16x16, row-major) for rows row0..row0+15, columns col0..col0+15 of a tile.
// Matrices: m0 = rows 0-7 / cols 0-7 (a[0]), m1 = rows 8-15 / cols 0-7 (a[1]), m2 = rows 0-7 / cols 8-15
// (a[2]), m3 = rows 8-15 / cols 8-15 (a[3]). Lane l addresses matrix l/8, row l%8:
//   row = row0 + (l % 8) + 8 * ((l / 8) % 2) = row0 + (l & 15),  col = col0 + 8 * (l / 16).
template <int STRIDE, typename Elem>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const Elem* tile, int row0, int col0, int lane) {
    ldmatrix_x4(a, tile + (row0 + (lane & 15)) * STRIDE + col0 + ((lane >> 4) << 3));
}

// B operands for two adjacent n8 tiles when the tile is stored as (n, k) rows: B(k, n) = tile[n0 + n][k0 + k]
// (K for Q K^T, V for dO V^T, Q / dO for K Q^T / V dO^T). Non-transposed ldmatrix of an 8x8 block
// with rows = n, cols = k gives lane l row n = l/4, cols k = 2(l%4)+{0,1}: exactly b0 (or b1 for
// k + 8). Matrices: m0 = n 0-7 / k 0-7 (b0 of tile n0), m1 = n 0-7 / k 8-15 (b1 of tile n0),
// m2 = n 8-15 / k 0-7 (b0 of tile n0+8), m3 = n 8-15 / k 8-15 (b1 of tile n0+8). Lane l addresses
//   n = n0 + (l % 8) + 8 * (l / 16),  k = k0 + 8 * ((l / 8) % 2).
// Result: b[0], b[1] for columns n0..n0+7; b[2], b[3] for n0+8..n0+15.
template <int STRIDE, typename Elem>
__device__ __forceinline__ void load_b_frags_nk(uint32_t (&b)[4], const Elem* tile, int n0, int k0, int lane) {
    ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * STRIDE + k0 + (((lane >> 3) & 1) << 3));
}

// B operands for two adjacent n8 tiles when the tile is stored as (k, n) rows: B(k, n) = tile[k0 + k][n0 + n]
// (V for P V, dO for P^T dO, Q for dS^T Q, K for dS K). ldmatrix.trans of an 8x8 block with
// rows = k, cols = n gives lane l rows k = 2(l%4)+{0,1} of column n = l/4: exactly b0 (b1 for
// k + 8). Matrices: m0 = k 0-7 / n 0-7 (b0 of tile n0), m1 = k 8-15 / n 0-7 (b1 of tile n0),
// m2 = k 0-7 / n 8-15 (b0 of tile n0+8), m3 = k 8-15 / n 8-15 (b1 of tile n0+8). Lane l addresses
//   k = k0 + (l & 15),  n = n0 + 8 * (l / 16).
template <int STRIDE, typename Elem>
__device__ __forceinline__ void load_b_frags_kn(uint32_t (&b)[4], const Elem* tile, int k0, int n0, int lane) {
    ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * STRIDE + n0 + ((lane >> 4) << 3));
}

// Async copy of rows row0..row0+ROWS-1 of a (seq_len, D) matrix, rows row_stride elements apart, into a
// (ROWS, kStride<D>) smem tile; rows >= seq_len are zero-filled. 16-byte chunks: gmem chunk offsets
// (row * row_stride + 8c) * 2 bytes are multiples of 16 because row_stride % 8 == 0 (the launchers check)
// and the head's base is 16-byte aligned.
template <int ROWS, int D, int THREADS, typename Elem>
__device__ __forceinline__ void load_tile_async(Elem* tile, const Elem* gmem, long long row_stride, int row0,
                                                int seq_len) {
    static_assert(sizeof(Elem) == 2, "tensor-core tiles hold 16-bit elements: 8 per 16-byte chunk");
    static_assert(D % 8 == 0 && (kStride<D> * sizeof(Elem)) % 16 == 0, "smem rows must stay 16-byte aligned");
    constexpr int kChunksPerRow = D * static_cast<int>(sizeof(Elem)) / 16;
    constexpr int kChunks = ROWS * kChunksPerRow;
    static_assert(kChunks % THREADS == 0, "load_tile_async: chunks must split evenly over the threads");
#pragma unroll
    for (int it = 0; it < kChunks / THREADS; ++it) {
        const int i = it * THREADS + threadIdx.x;
        const int r = i / kChunksPerRow;
        const int c = i % kChunksPerRow;
        const int row = row0 + r;
        const bool valid = row < seq_len;
        const Elem* src = gmem + (valid ? row * row_stride + c * 8 : 0);
        cp_async_16(tile + r * kStride<D> + c * 8, src, valid);
    }
}

// ----------------------------------------------------------------------------
// Tensor-core forward

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
// Every kernel here declares __launch_bounds__(threads, 1): one block per SM is enough, so ptxas may
// give each thread what it needs (without the 1, ptxas for sm_100 held the D=64 forward to 128
// registers and the float32 dK/dV kernel to 32, and both spilled).

template <int D>
struct FwdTiles {
    static constexpr int kBr = 64;  // query rows per CTA: 16 per warp
    static constexpr int kBc = 64;  // keys per smem tile
    static_assert(kBr == 16 * kTcWarps, "each warp owns 16 query rows");
    static_assert(kBc % 16 == 0 && D % 16 == 0, "mma k/n steps are 16 wide");
    // q tile, then 2 stages of (k tile, v tile)
    static constexpr int kSmemElems = kBr * kStride<D> + 4 * kBc * kStride<D>;
};

// out: (B, H, T, D); lse: (B, H, T); q, k, v: (B, H, T, D). grid (B*H, ceil(T / kBr)), block 128.
template <typename Elem, int D>
__global__ void __launch_bounds__(kTcThreads, 1)
attention_forward_tc_kernel(Elem* __restrict__ out, float* __restrict__ lse, const Elem* __restrict__ q,
                            const Elem* __restrict__ k, const Elem* __restrict__ v, HeadStrides out_s,
                            HeadStrides q_s, HeadStrides k_s, HeadStrides v_s, int num_heads, int group,
                            int seq_len, float scale_log2) {
    using Tiles = FwdTiles<D>;
    constexpr int kBr = Tiles::kBr, kBc = Tiles::kBc, S = kStride<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Elem* q_smem = reinterpret_cast<Elem*>(smem_raw);  // (kBr, S)
    Elem* k_smem = q_smem + kBr * S;                   // (2, kBc, S)
    Elem* v_smem = k_smem + 2 * kBc * S;               // (2, kBc, S)

    const int q_tile = gridDim.y - 1 - blockIdx.y;  // longest causal loops first
    const int q_start = q_tile * kBr;
    q = head_of(q, q_s, blockIdx.x, num_heads);
    k = kv_head_of(k, k_s, blockIdx.x, num_heads, group);
    v = kv_head_of(v, v_s, blockIdx.x, num_heads, group);
    out = head_of(out, out_s, blockIdx.x, num_heads);
    lse += static_cast<size_t>(blockIdx.x) * seq_len;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;     // mma fragment coordinates
    const int row_a = q_start + warp * 16 + g;  // this thread's rows: row_a and row_a + 8

    // Keys 0 .. min(q_start + kBr, T) - 1 can be attended by some row of this tile.
    const int num_kv_tiles = ceil_div_dev(min(q_start + kBr, seq_len), kBc);

    load_tile_async<kBr, D, kTcThreads>(q_smem, q, q_s.t, q_start, seq_len);
    cp_async_commit();
    load_tile_async<kBc, D, kTcThreads>(k_smem, k, k_s.t, 0, seq_len);
    load_tile_async<kBc, D, kTcThreads>(v_smem, v, v_s.t, 0, seq_len);
    cp_async_commit();
    cp_async_wait<1>();  // the q group is done (the k/v tile 0 group may still fly)
    __syncthreads();

    uint32_t q_frag[D / 16][4];  // this warp's 16 rows x D, as A fragments
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) load_a_frag<S>(q_frag[ks], q_smem, warp * 16, ks * 16, lane);

    float o_acc[D / 8][4];  // (16 rows, D): n-tile nt holds columns 8nt..8nt+7
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) o_acc[nt][0] = o_acc[nt][1] = o_acc[nt][2] = o_acc[nt][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled scores, rows row_a, row_a + 8
    float row_sum[2] = {0.0f, 0.0f};            // this thread's partial sum of exp2(s - row_max) (quad-reduced at the end)

    for (int j = 0; j < num_kv_tiles; ++j) {
        if (j + 1 < num_kv_tiles) {  // prefetch tile j+1 into the other stage (last read in iteration j-1)
            const int next = (j + 1) & 1;
            load_tile_async<kBc, D, kTcThreads>(k_smem + next * kBc * S, k, k_s.t, (j + 1) * kBc, seq_len);
            load_tile_async<kBc, D, kTcThreads>(v_smem + next * kBc * S, v, v_s.t, (j + 1) * kBc, seq_len);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const Elem* k_tile = k_smem + (j & 1) * kBc * S;  // (kBc, S)
        const Elem* v_tile = v_smem + (j & 1) * kBc * S;  // (kBc, S)

        // s = Q K^T for this warp's 16 rows x kBc keys: B(k = d, n = key) = k_tile[key][d].
        float s[kBc / 8][4];
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
            for (int np = 0; np < kBc / 16; ++np) {
                uint32_t b[4];
                load_b_frags_nk<S>(b, k_tile, np * 16, ks * 16, lane);
                mma_16816<Elem>(s[2 * np], q_frag[ks], b[0], b[1]);
                mma_16816<Elem>(s[2 * np + 1], q_frag[ks], b[2], b[3]);
            }
        }

        // Scale into log2 units; mask keys > row (causal) and keys >= T. Only tiles that reach past
        // the first row of the CTA or past T need it. Element e of n-tile nt: row row_a + 8 * (e / 2),
        // key kv_start + 8 nt + 2t + e % 2.
        const int kv_start = j * kBc;
        const bool needs_mask = (kv_start + kBc - 1 > q_start) || (kv_start + kBc > seq_len);
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] *= scale_log2;
                if (needs_mask) {
                    const int key = kv_start + nt * 8 + 2 * t + (e & 1);
                    const int row = row_a + 8 * (e >> 1);
                    if (key > row || key >= seq_len) s[nt][e] = -INFINITY;
                }
            }
        }

        // Online softmax; the 4 threads of a quad (same g) share rows, so reduce over xor 1, 2.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < kBc / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float new_max = fmaxf(row_max[r], tile_max);
            // Key 0 of tile 0 is valid for every row, so new_max is finite from the first tile on;
            // the guard only keeps -inf - -inf (NaN) out should a row ever see no valid key.
            const float ref = new_max == -INFINITY ? 0.0f : new_max;
            const float correction = exp2f(row_max[r] - ref);  // exp2(-inf) = 0 on the first tile
            row_max[r] = new_max;
            row_sum[r] *= correction;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o_acc[nt][2 * r] *= correction;
                o_acc[nt][2 * r + 1] *= correction;
            }
#pragma unroll
            for (int nt = 0; nt < kBc / 8; ++nt) {
                const float p0 = exp2f(s[nt][2 * r] - ref);  // masked: exp2(-inf) = 0
                const float p1 = exp2f(s[nt][2 * r + 1] - ref);
                s[nt][2 * r] = p0;
                s[nt][2 * r + 1] = p1;
                row_sum[r] += p0 + p1;
            }
        }

        // o += P V: P's accumulators become A fragments (identity above); B(k = key, n = d) = v_tile[key][d].
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack2<Elem>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<Elem>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                load_b_frags_kn<S>(b, v_tile, kk * 16, dp * 16, lane);
                mma_16816<Elem>(o_acc[2 * dp], a, b[0], b[1]);
                mma_16816<Elem>(o_acc[2 * dp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with this stage before iteration j+1 refills it
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float total = row_sum[r];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        const int row = row_a + 8 * r;
        if (row < seq_len) {
            const float inv = 1.0f / total;  // total >= 1: the row max contributes exp2(0)
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                // columns 8nt + 2t, 8nt + 2t + 1: one aligned 32-bit store
                *reinterpret_cast<uint32_t*>(out + row * out_s.t + nt * 8 + 2 * t) =
                    pack2<Elem>(o_acc[nt][2 * r] * inv, o_acc[nt][2 * r + 1] * inv);
            }
            if (t == 0) lse[row] = (row_max[r] + log2f(total)) * kLn2;
        }
    }
}

// ----------------------------------------------------------------------------
// Backward preprocess: delta = rowsum(dout * out)

// delta: (B*H*T,) = (B, H, T); dout, out: (B, H, T, D). One warp per row, 8 rows per block.
template <typename Elem>
__global__ void attention_backward_delta_kernel(float* __restrict__ delta, const Elem* __restrict__ dout,
                                                const Elem* __restrict__ out, HeadStrides dout_s, HeadStrides out_s,
                                                int num_heads, int seq_len, long long rows, int D) {
    const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together; no block-level sync below
    const int bh = static_cast<int>(row / seq_len);
    const long long position = row % seq_len;
    const Elem* dout_row = head_of(dout, dout_s, bh, num_heads) + position * dout_s.t;
    const Elem* out_row = head_of(out, out_s, bh, num_heads) + position * out_s.t;
    float sum = 0.0f;
    for (int d = lane; d < D; d += 32) sum += to_float(dout_row[d]) * to_float(out_row[d]);
    sum = warp_reduce_sum(sum);  // fixed butterfly order: deterministic
    if (lane == 0) delta[row] = sum;
}

// ----------------------------------------------------------------------------
// Tensor-core backward: dK, dV

template <int D>
struct DkdvTiles {
    static constexpr int kBc = 64;             // keys per CTA: 16 per warp
    static constexpr int kBr = D <= 64 ? 64 : 32;  // query rows per streamed tile (fewer at D=128: registers)
    static_assert(kBc == 16 * kTcWarps, "each warp owns 16 keys");
    static_assert(kBr % 16 == 0 && kBc % kBr == 0, "query tiles must align with the key tile (diagonal start)");
    static_assert(D % 16 == 0, "mma k/n steps are 16 wide");
    // k tile, v tile, then 2 stages of (q tile, dout tile); then floats: 2 stages of (lse * log2e, delta)
    static constexpr int kSmemElems = 2 * kBc * kStride<D> + 4 * kBr * kStride<D>;
    static constexpr int kSmemFloats = 4 * kBr;
};

// Async loads of query tile `qt` (rows qt*kBr ...) of query head bh = b * num_heads + h into `stage`: q, dout
// via cp.async; lse (in log2 units) and delta via plain loads (rows >= T get 0; their P is masked to 0 anyway).
// q, dout, lse, delta: the whole tensors ((B, H, T, D) and (B, H, T)).
template <int D, typename Elem>
__device__ __forceinline__ void dkdv_load_q_stage(Elem* q_stage, Elem* do_stage, float* lse_stage,
                                                  float* delta_stage, const Elem* q, const HeadStrides& q_s,
                                                  const Elem* dout, const HeadStrides& dout_s, const float* lse,
                                                  const float* delta, int bh, int num_heads, int qt, int seq_len) {
    constexpr int kBr = DkdvTiles<D>::kBr;
    const int row0 = qt * kBr;
    load_tile_async<kBr, D, kTcThreads>(q_stage, head_of(q, q_s, bh, num_heads), q_s.t, row0, seq_len);
    load_tile_async<kBr, D, kTcThreads>(do_stage, head_of(dout, dout_s, bh, num_heads), dout_s.t, row0, seq_len);
    lse += static_cast<size_t>(bh) * seq_len;
    delta += static_cast<size_t>(bh) * seq_len;
    for (int i = threadIdx.x; i < kBr; i += kTcThreads) {
        const int row = row0 + i;
        lse_stage[i] = row < seq_len ? lse[row] * kLog2e : 0.0f;
        delta_stage[i] = row < seq_len ? delta[row] : 0.0f;
    }
}

// dk, dv: (B, H_kv, T, D) written; k, v: (B, H_kv, T, D); dout, q: (B, H, T, D); lse, delta: (B, H, T).
// grid (B*H_kv, ceil(T / kBc)), block 128. Grouped-query attention: one CTA owns kBc keys of one kv head and
// sums their dK, dV over the kv head's group of H / H_kv query heads, in head order, in its fp32 accumulators.
template <typename Elem, int D>
__global__ void __launch_bounds__(kTcThreads, 1)
attention_backward_dkdv_tc_kernel(Elem* __restrict__ dk, Elem* __restrict__ dv, const Elem* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const Elem* __restrict__ q, const Elem* __restrict__ k,
                                  const Elem* __restrict__ v, HeadStrides dk_s, HeadStrides dv_s,
                                  HeadStrides dout_s, HeadStrides q_s, HeadStrides k_s, HeadStrides v_s,
                                  int num_heads, int num_kv_heads, int seq_len, float scale_log2, float scale) {
    using Tiles = DkdvTiles<D>;
    constexpr int kBr = Tiles::kBr, kBc = Tiles::kBc, S = kStride<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Elem* k_smem = reinterpret_cast<Elem*>(smem_raw);  // (kBc, S)
    Elem* v_smem = k_smem + kBc * S;                   // (kBc, S)
    Elem* q_smem = v_smem + kBc * S;                   // (2, kBr, S)
    Elem* do_smem = q_smem + 2 * kBr * S;              // (2, kBr, S)
    float* lse_smem = reinterpret_cast<float*>(do_smem + 2 * kBr * S);  // (2, kBr), log2 units
    float* delta_smem = lse_smem + 2 * kBr;                             // (2, kBr)

    const int key_start = blockIdx.y * kBc;  // early key tiles have the longest loops: scheduled first
    // blockIdx.x = b * num_kv_heads + kv head; its query heads are bh0 .. bh0 + group - 1 (bh = b * num_heads + h)
    const int group = num_heads / num_kv_heads;
    const int bh0 = blockIdx.x / num_kv_heads * num_heads + blockIdx.x % num_kv_heads * group;
    k = head_of(k, k_s, blockIdx.x, num_kv_heads);
    v = head_of(v, v_s, blockIdx.x, num_kv_heads);
    dk = head_of(dk, dk_s, blockIdx.x, num_kv_heads);
    dv = head_of(dv, dv_s, blockIdx.x, num_kv_heads);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int key_a = key_start + warp * 16 + g;  // this thread's keys (accumulator rows): key_a, key_a + 8

    // Query tiles that can attend these keys: from the one holding key_start (rows >= key_start) to the end.
    const int first_q_tile = key_start / kBr;  // exact: kBr divides kBc
    const int num_q_tiles = ceil_div_dev(seq_len, kBr);
    // One step per (query head, query tile), head-major: query head bh0 + step / tiles_per_head, tile
    // first_q_tile + step % tiles_per_head. The double buffer prefetches across head boundaries too.
    const int tiles_per_head = num_q_tiles - first_q_tile;
    const int num_steps = group * tiles_per_head;

    load_tile_async<kBc, D, kTcThreads>(k_smem, k, k_s.t, key_start, seq_len);
    load_tile_async<kBc, D, kTcThreads>(v_smem, v, v_s.t, key_start, seq_len);
    dkdv_load_q_stage<D>(q_smem, do_smem, lse_smem, delta_smem, q, q_s, dout, dout_s, lse, delta, bh0, num_heads,
                         first_q_tile, seq_len);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];  // (16 keys, D)
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[nt][e] = dv_acc[nt][e] = 0.0f;
    }

    for (int step = 0; step < num_steps; ++step) {
        const int stage = step & 1;
        if (step + 1 < num_steps) {  // prefetch into the other stage (last read in the previous iteration)
            const int next = stage ^ 1;
            dkdv_load_q_stage<D>(q_smem + next * kBr * S, do_smem + next * kBr * S, lse_smem + next * kBr,
                                 delta_smem + next * kBr, q, q_s, dout, dout_s, lse, delta,
                                 bh0 + (step + 1) / tiles_per_head, num_heads,
                                 first_q_tile + (step + 1) % tiles_per_head, seq_len);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const Elem* q_tile = q_smem + stage * kBr * S;    // (kBr, S)
        const Elem* do_tile = do_smem + stage * kBr * S;  // (kBr, S)
        const float* lse_tile = lse_smem + stage * kBr;   // (kBr,)
        const float* delta_tile = delta_smem + stage * kBr;

        // st = K Q^T and dpt = V dO^T for this warp's 16 keys x kBr queries.
        // A = k_smem / v_smem rows (key, d); B(k = d, n = query) = q_tile[query][d] / do_tile[query][d].
        float st[kBr / 8][4], dpt[kBr / 8][4];
#pragma unroll
        for (int nt = 0; nt < kBr / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
        }
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t a_k[4], a_v[4];
            load_a_frag<S>(a_k, k_smem, warp * 16, ks * 16, lane);
            load_a_frag<S>(a_v, v_smem, warp * 16, ks * 16, lane);
#pragma unroll
            for (int np = 0; np < kBr / 16; ++np) {
                uint32_t b[4];
                load_b_frags_nk<S>(b, q_tile, np * 16, ks * 16, lane);
                mma_16816<Elem>(st[2 * np], a_k, b[0], b[1]);
                mma_16816<Elem>(st[2 * np + 1], a_k, b[2], b[3]);
                load_b_frags_nk<S>(b, do_tile, np * 16, ks * 16, lane);
                mma_16816<Elem>(dpt[2 * np], a_v, b[0], b[1]);
                mma_16816<Elem>(dpt[2 * np + 1], a_v, b[2], b[3]);
            }
        }

        // P^T and dS^T in place. Element e of n-tile nt: key key_a + 8 * (e / 2), query column
        // 8 nt + 2t + e % 2 of the tile. Masked (P = 0): key > query (causal) or query >= T; keys >= T
        // are only ever seen with query < T <= key, so the causal test covers them.
        const int q_start = (first_q_tile + step % tiles_per_head) * kBr;
        const bool needs_mask = (key_start + kBc - 1 > q_start) || (q_start + kBr > seq_len);
#pragma unroll
        for (int nt = 0; nt < kBr / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = nt * 8 + 2 * t + (e & 1);
                float p = exp2f(st[nt][e] * scale_log2 - lse_tile[col]);
                if (needs_mask) {
                    const int key = key_a + 8 * (e >> 1);
                    const int query = q_start + col;
                    if (key > query || query >= seq_len) p = 0.0f;
                }
                st[nt][e] = p;                              // P^T
                dpt[nt][e] = p * (dpt[nt][e] - delta_tile[col]);  // dS^T
            }
        }

        // dv += P^T dO and dk += dS^T Q: accumulators -> A fragments over kk (16 queries each);
        // B(k = query, n = d) = do_tile[query][d] / q_tile[query][d].
#pragma unroll
        for (int kk = 0; kk < kBr / 16; ++kk) {
            uint32_t a_p[4], a_ds[4];
            a_p[0] = pack2<Elem>(st[2 * kk][0], st[2 * kk][1]);
            a_p[1] = pack2<Elem>(st[2 * kk][2], st[2 * kk][3]);
            a_p[2] = pack2<Elem>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
            a_p[3] = pack2<Elem>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
            a_ds[0] = pack2<Elem>(dpt[2 * kk][0], dpt[2 * kk][1]);
            a_ds[1] = pack2<Elem>(dpt[2 * kk][2], dpt[2 * kk][3]);
            a_ds[2] = pack2<Elem>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            a_ds[3] = pack2<Elem>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                load_b_frags_kn<S>(b, do_tile, kk * 16, dp * 16, lane);
                mma_16816<Elem>(dv_acc[2 * dp], a_p, b[0], b[1]);
                mma_16816<Elem>(dv_acc[2 * dp + 1], a_p, b[2], b[3]);
                load_b_frags_kn<S>(b, q_tile, kk * 16, dp * 16, lane);
                mma_16816<Elem>(dk_acc[2 * dp], a_ds, b[0], b[1]);
                mma_16816<Elem>(dk_acc[2 * dp + 1], a_ds, b[2], b[3]);
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key_a + 8 * r;
        if (key < seq_len) {
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                const int col = nt * 8 + 2 * t;
                *reinterpret_cast<uint32_t*>(dk + key * dk_s.t + col) =
                    pack2<Elem>(dk_acc[nt][2 * r] * scale, dk_acc[nt][2 * r + 1] * scale);
                *reinterpret_cast<uint32_t*>(dv + key * dv_s.t + col) =
                    pack2<Elem>(dv_acc[nt][2 * r], dv_acc[nt][2 * r + 1]);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Tensor-core backward: dQ

// BC: keys per streamed tile. 64, or 32 where the 64-key tiles do not fit the device's shared
// memory (D = 128 on a 99 KB GPU: see the design note; the launcher chooses).
template <int D, int BC = 64>
struct DqTiles {
    static constexpr int kBr = 64;  // query rows per CTA: 16 per warp
    static constexpr int kBc = BC;  // keys per streamed tile
    static_assert(kBr == 16 * kTcWarps, "each warp owns 16 query rows");
    static_assert(kBc % 16 == 0 && D % 16 == 0, "mma k/n steps are 16 wide");
    static_assert(kBr % kBc == 0, "key tiles must align with the query tile (the diagonal tile is the last)");
    // q tile, dout tile, then 2 stages of (k tile, v tile)
    static constexpr int kSmemElems = 2 * kBr * kStride<D> + 4 * kBc * kStride<D>;
};

// dq: (B, H, T, D) written; others as in the dK/dV kernel. grid (B*H, ceil(T / kBr)), block 128.
template <typename Elem, int D, int BC>
__global__ void __launch_bounds__(kTcThreads, 1)
attention_backward_dq_tc_kernel(Elem* __restrict__ dq, const Elem* __restrict__ dout, const float* __restrict__ lse,
                                const float* __restrict__ delta, const Elem* __restrict__ q,
                                const Elem* __restrict__ k, const Elem* __restrict__ v, HeadStrides dq_s,
                                HeadStrides dout_s, HeadStrides q_s, HeadStrides k_s, HeadStrides v_s, int num_heads,
                                int group, int seq_len, float scale_log2, float scale) {
    using Tiles = DqTiles<D, BC>;
    constexpr int kBr = Tiles::kBr, kBc = Tiles::kBc, S = kStride<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Elem* q_smem = reinterpret_cast<Elem*>(smem_raw);  // (kBr, S)
    Elem* do_smem = q_smem + kBr * S;                  // (kBr, S)
    Elem* k_smem = do_smem + kBr * S;                  // (2, kBc, S)
    Elem* v_smem = k_smem + 2 * kBc * S;               // (2, kBc, S)

    const int q_tile = gridDim.y - 1 - blockIdx.y;  // longest causal loops first
    const int q_start = q_tile * kBr;
    q = head_of(q, q_s, blockIdx.x, num_heads);
    k = kv_head_of(k, k_s, blockIdx.x, num_heads, group);
    v = kv_head_of(v, v_s, blockIdx.x, num_heads, group);
    dout = head_of(dout, dout_s, blockIdx.x, num_heads);
    dq = head_of(dq, dq_s, blockIdx.x, num_heads);
    lse += static_cast<size_t>(blockIdx.x) * seq_len;
    delta += static_cast<size_t>(blockIdx.x) * seq_len;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row_a = q_start + warp * 16 + g;  // this thread's rows: row_a, row_a + 8

    float row_lse[2], row_delta[2];  // rows >= T: 0 (never stored; their dS is 0 since dO rows are 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row_a + 8 * r;
        row_lse[r] = row < seq_len ? lse[row] * kLog2e : 0.0f;
        row_delta[r] = row < seq_len ? delta[row] : 0.0f;
    }

    const int num_kv_tiles = ceil_div_dev(min(q_start + kBr, seq_len), kBc);

    load_tile_async<kBr, D, kTcThreads>(q_smem, q, q_s.t, q_start, seq_len);
    load_tile_async<kBr, D, kTcThreads>(do_smem, dout, dout_s.t, q_start, seq_len);
    load_tile_async<kBc, D, kTcThreads>(k_smem, k, k_s.t, 0, seq_len);
    load_tile_async<kBc, D, kTcThreads>(v_smem, v, v_s.t, 0, seq_len);
    cp_async_commit();

    float dq_acc[D / 8][4];  // (16 rows, D)
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) dq_acc[nt][0] = dq_acc[nt][1] = dq_acc[nt][2] = dq_acc[nt][3] = 0.0f;

    for (int j = 0; j < num_kv_tiles; ++j) {
        if (j + 1 < num_kv_tiles) {
            const int next = (j + 1) & 1;
            load_tile_async<kBc, D, kTcThreads>(k_smem + next * kBc * S, k, k_s.t, (j + 1) * kBc, seq_len);
            load_tile_async<kBc, D, kTcThreads>(v_smem + next * kBc * S, v, v_s.t, (j + 1) * kBc, seq_len);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const Elem* k_tile = k_smem + (j & 1) * kBc * S;  // (kBc, S)
        const Elem* v_tile = v_smem + (j & 1) * kBc * S;  // (kBc, S)

        // s = Q K^T, dp = dO V^T for this warp's 16 rows x kBc keys. A = q_smem / do_smem rows;
        // B(k = d, n = key) = k_tile[key][d] / v_tile[key][d].
        float s[kBc / 8][4], dp[kBc / 8][4];
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
        }
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t a_q[4], a_do[4];
            load_a_frag<S>(a_q, q_smem, warp * 16, ks * 16, lane);
            load_a_frag<S>(a_do, do_smem, warp * 16, ks * 16, lane);
#pragma unroll
            for (int np = 0; np < kBc / 16; ++np) {
                uint32_t b[4];
                load_b_frags_nk<S>(b, k_tile, np * 16, ks * 16, lane);
                mma_16816<Elem>(s[2 * np], a_q, b[0], b[1]);
                mma_16816<Elem>(s[2 * np + 1], a_q, b[2], b[3]);
                load_b_frags_nk<S>(b, v_tile, np * 16, ks * 16, lane);
                mma_16816<Elem>(dp[2 * np], a_do, b[0], b[1]);
                mma_16816<Elem>(dp[2 * np + 1], a_do, b[2], b[3]);
            }
        }

        // dS = P (dP - delta) in place of dp. Element e of n-tile nt: row row_a + 8 * (e / 2), key
        // kv_start + 8 nt + 2t + e % 2. Masked (P = 0): key > row or key >= T.
        const int kv_start = j * kBc;
        const bool needs_mask = (kv_start + kBc - 1 > q_start) || (kv_start + kBc > seq_len);
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                float p = exp2f(s[nt][e] * scale_log2 - row_lse[r]);
                if (needs_mask) {
                    const int key = kv_start + nt * 8 + 2 * t + (e & 1);
                    const int row = row_a + 8 * r;
                    if (key > row || key >= seq_len) p = 0.0f;
                }
                dp[nt][e] = p * (dp[nt][e] - row_delta[r]);
            }
        }

        // dq += dS K: dS accumulators -> A fragments over kk (16 keys each); B(k = key, n = d) = k_tile[key][d].
#pragma unroll
        for (int kk = 0; kk < kBc / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack2<Elem>(dp[2 * kk][0], dp[2 * kk][1]);
            a[1] = pack2<Elem>(dp[2 * kk][2], dp[2 * kk][3]);
            a[2] = pack2<Elem>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            a[3] = pack2<Elem>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t b[4];
                load_b_frags_kn<S>(b, k_tile, kk * 16, dn * 16, lane);
                mma_16816<Elem>(dq_acc[2 * dn], a, b[0], b[1]);
                mma_16816<Elem>(dq_acc[2 * dn + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row_a + 8 * r;
        if (row < seq_len) {
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                *reinterpret_cast<uint32_t*>(dq + row * dq_s.t + nt * 8 + 2 * t) =
                    pack2<Elem>(dq_acc[nt][2 * r] * scale, dq_acc[nt][2 * r + 1] * scale);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// float32 path: one warp per row, lane l holds elements d = l + 32c (c < D/32), keys one by one.

constexpr int kFp32RowsPerBlock = 4;  // warps per block
constexpr int kFp32Threads = kFp32RowsPerBlock * 32;

// out: (B, H, T, D); lse: (B, H, T); q, k, v: (B, H, T, D). grid (B*H, ceil(T / 4)), block 128.
template <int D>
__global__ void __launch_bounds__(kFp32Threads, 1)
attention_forward_fp32_kernel(float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                              const float* __restrict__ k, const float* __restrict__ v, HeadStrides out_s,
                              HeadStrides q_s, HeadStrides k_s, HeadStrides v_s, int num_heads, int group,
                              int seq_len, float scale) {
    constexpr int C = D / 32;
    static_assert(D % 32 == 0, "lanes split D evenly");
    const int row = (gridDim.y - 1 - blockIdx.y) * kFp32RowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= seq_len) return;  // warp-uniform; no block-level sync in this kernel
    q = head_of(q, q_s, blockIdx.x, num_heads);
    k = kv_head_of(k, k_s, blockIdx.x, num_heads, group);
    v = kv_head_of(v, v_s, blockIdx.x, num_heads, group);
    out = head_of(out, out_s, blockIdx.x, num_heads);
    lse += static_cast<size_t>(blockIdx.x) * seq_len;

    float q_reg[C], o_reg[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        q_reg[c] = q[row * q_s.t + lane + 32 * c] * scale;
        o_reg[c] = 0.0f;
    }
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int key = 0; key <= row; ++key) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) dot += q_reg[c] * k[key * k_s.t + lane + 32 * c];
        const float score = warp_reduce_sum(dot);  // identical in every lane
        const float new_max = fmaxf(running_max, score);
        const float correction = expf(running_max - new_max);  // 0 for the first key
        const float p = expf(score - new_max);
        running_sum = running_sum * correction + p;
#pragma unroll
        for (int c = 0; c < C; ++c) o_reg[c] = o_reg[c] * correction + p * v[key * v_s.t + lane + 32 * c];
        running_max = new_max;
    }
    const float inv = 1.0f / running_sum;
#pragma unroll
    for (int c = 0; c < C; ++c) out[row * out_s.t + lane + 32 * c] = o_reg[c] * inv;
    if (lane == 0) lse[row] = running_max + logf(running_sum);
}

// dq: (B, H, T, D); one warp per query row i: dq_i = scale * sum_{j<=i} dS_ij k_j.
template <int D>
__global__ void __launch_bounds__(kFp32Threads, 1)
attention_backward_dq_fp32_kernel(float* __restrict__ dq, const float* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const float* __restrict__ q, const float* __restrict__ k,
                                  const float* __restrict__ v, HeadStrides dq_s, HeadStrides dout_s,
                                  HeadStrides q_s, HeadStrides k_s, HeadStrides v_s, int num_heads, int group,
                                  int seq_len, float scale) {
    constexpr int C = D / 32;
    static_assert(D % 32 == 0, "lanes split D evenly");
    const int row = (gridDim.y - 1 - blockIdx.y) * kFp32RowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= seq_len) return;
    q = head_of(q, q_s, blockIdx.x, num_heads);
    k = kv_head_of(k, k_s, blockIdx.x, num_heads, group);
    v = kv_head_of(v, v_s, blockIdx.x, num_heads, group);
    dout = head_of(dout, dout_s, blockIdx.x, num_heads);
    dq = head_of(dq, dq_s, blockIdx.x, num_heads);
    lse += static_cast<size_t>(blockIdx.x) * seq_len;
    delta += static_cast<size_t>(blockIdx.x) * seq_len;

    float q_reg[C], do_reg[C], dq_reg[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        q_reg[c] = q[row * q_s.t + lane + 32 * c];
        do_reg[c] = dout[row * dout_s.t + lane + 32 * c];
        dq_reg[c] = 0.0f;
    }
    const float row_lse = lse[row], row_delta = delta[row];
    for (int key = 0; key <= row; ++key) {
        float qk = 0.0f, dov = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            qk += q_reg[c] * k[key * k_s.t + lane + 32 * c];
            dov += do_reg[c] * v[key * v_s.t + lane + 32 * c];
        }
        qk = warp_reduce_sum(qk);
        dov = warp_reduce_sum(dov);
        const float p = expf(qk * scale - row_lse);
        const float ds = p * (dov - row_delta);
#pragma unroll
        for (int c = 0; c < C; ++c) dq_reg[c] += ds * k[key * k_s.t + lane + 32 * c];
    }
#pragma unroll
    for (int c = 0; c < C; ++c) dq[row * dq_s.t + lane + 32 * c] = dq_reg[c] * scale;
}

// dk, dv: (B, H_kv, T, D); k, v: (B, H_kv, T, D); q, dout: (B, H, T, D); lse, delta: (B, H, T).
// grid (B*H_kv, ceil(T / 4)); one warp per key j of a kv head: dv_j = sum_h sum_{i>=j} P_ij dO_i and
// dk_j = scale * sum_h sum_{i>=j} dS_ij q_i, h over the kv head's query heads, in head order.
template <int D>
__global__ void __launch_bounds__(kFp32Threads, 1)
attention_backward_dkdv_fp32_kernel(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    const float* __restrict__ q, const float* __restrict__ k,
                                    const float* __restrict__ v, HeadStrides dk_s, HeadStrides dv_s,
                                    HeadStrides dout_s, HeadStrides q_s, HeadStrides k_s, HeadStrides v_s,
                                    int num_heads, int num_kv_heads, int seq_len, float scale) {
    constexpr int C = D / 32;
    static_assert(D % 32 == 0, "lanes split D evenly");
    const int key = blockIdx.y * kFp32RowsPerBlock + threadIdx.x / 32;  // early keys have the longest loops
    const int lane = threadIdx.x % 32;
    if (key >= seq_len) return;
    // blockIdx.x = b * num_kv_heads + kv head; its query heads are bh0 .. bh0 + group - 1 (bh = b * num_heads + h)
    const int group = num_heads / num_kv_heads;
    const int bh0 = blockIdx.x / num_kv_heads * num_heads + blockIdx.x % num_kv_heads * group;
    k = head_of(k, k_s, blockIdx.x, num_kv_heads);
    v = head_of(v, v_s, blockIdx.x, num_kv_heads);
    dk = head_of(dk, dk_s, blockIdx.x, num_kv_heads);
    dv = head_of(dv, dv_s, blockIdx.x, num_kv_heads);

    float k_reg[C], v_reg[C], dk_reg[C], dv_reg[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        k_reg[c] = k[key * k_s.t + lane + 32 * c];
        v_reg[c] = v[key * v_s.t + lane + 32 * c];
        dk_reg[c] = dv_reg[c] = 0.0f;
    }
    for (int bh = bh0; bh < bh0 + group; ++bh) {
        const float* q_h = head_of(q, q_s, bh, num_heads);
        const float* dout_h = head_of(dout, dout_s, bh, num_heads);
        const float* lse_h = lse + static_cast<size_t>(bh) * seq_len;
        const float* delta_h = delta + static_cast<size_t>(bh) * seq_len;
        for (int row = key; row < seq_len; ++row) {
            float qk = 0.0f, dov = 0.0f;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                qk += q_h[row * q_s.t + lane + 32 * c] * k_reg[c];
                dov += dout_h[row * dout_s.t + lane + 32 * c] * v_reg[c];
            }
            qk = warp_reduce_sum(qk);
            dov = warp_reduce_sum(dov);
            const float p = expf(qk * scale - lse_h[row]);
            const float ds = p * (dov - delta_h[row]);
#pragma unroll
            for (int c = 0; c < C; ++c) {
                dv_reg[c] += p * dout_h[row * dout_s.t + lane + 32 * c];
                dk_reg[c] += ds * q_h[row * q_s.t + lane + 32 * c];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
        dk[key * dk_s.t + lane + 32 * c] = dk_reg[c] * scale;
        dv[key * dv_s.t + lane + 32 * c] = dv_reg[c];
    }
}

// ----------------------------------------------------------------------------
// launch helpers

// The most dynamic shared memory a block of the current device may opt in to, bytes.
size_t max_smem_optin() {
    int device = 0, max_optin = 0;
    PYLLMC_CUDA_CHECK(cudaGetDevice(&device));
    PYLLMC_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return static_cast<size_t>(max_optin);
}

// The tensor-core kernels (bf16 / fp16) need compute capability 8.0 (see the design note).
void require_tensor_cores(const char* name) {
    int device = 0, major = 0, minor = 0;
    PYLLMC_CUDA_CHECK(cudaGetDevice(&device));
    PYLLMC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    PYLLMC_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    require(major >= 8, std::string(name) + ": attention in bfloat16/float16 needs compute capability 8.0+ "
                        "(mma.sync, cp.async, ldmatrix); this GPU is " + std::to_string(major) + "." +
                        std::to_string(minor) + ": use float32, or the triton/torch backend");
}

// Dynamic smem above 48 KB needs an explicit opt-in per kernel (and per device: set at every launch).
template <typename Kernel>
void set_smem_and_check(Kernel kernel, size_t smem_bytes, const char* name) {
    const size_t max_optin = max_smem_optin();
    require(smem_bytes <= max_optin,
            std::string(name) + ": needs " + std::to_string(smem_bytes) + " bytes of shared memory, the device allows " +
                std::to_string(max_optin));
    PYLLMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem_bytes)));
}

// Calls f(std::integral_constant<int, D>{}) for the supported head dims of the dtype; throws otherwise.
template <typename Elem, typename F>
void dispatch_head_dim(int D, const char* name, F&& f) {
    if constexpr (std::is_same_v<Elem, float>) {
        switch (D) {
            case 32: f(std::integral_constant<int, 32>{}); return;
            case 64: f(std::integral_constant<int, 64>{}); return;
            case 128: f(std::integral_constant<int, 128>{}); return;
        }
        require(false, std::string(name) + ": float32 supports head dim D in {32, 64, 128}, got " + std::to_string(D));
    } else {
        switch (D) {
            case 64: f(std::integral_constant<int, 64>{}); return;
            case 128: f(std::integral_constant<int, 128>{}); return;
        }
        require(false, std::string(name) + ": bfloat16/float16 support head dim D in {64, 128}, got " +
                           std::to_string(D));
    }
}

// Shared size checks; returns false when there is nothing to compute.
bool check_sizes(int B, int H, int H_kv, int T, int D, const char* name, int rows_per_cta) {
    require(B >= 0 && H >= 0 && T >= 0 && D > 0, std::string(name) + ": sizes must be non-negative (D > 0)");
    require((H_kv > 0 && H % H_kv == 0) || (H == 0 && H_kv == 0),
            std::string(name) + ": H_kv (the key/value heads) must be positive and divide H = " + std::to_string(H) +
                ", got " + std::to_string(H_kv));
    if (B == 0 || H == 0 || T == 0) return false;
    require(static_cast<long long>(B) * H <= 0x7fffffffLL, std::string(name) + ": B * H too large for one launch");
    require(ceil_div(T, rows_per_cta) <= 65535, std::string(name) + ": T too large for one launch");
    return true;
}

}  // namespace

// ----------------------------------------------------------------------------
// launchers

namespace {

// `count` operands' (batch, head, position) strides from the host array `strides` (3 per operand).
// Strides must be non-negative; the tensor-core path copies 16-byte chunks (8 elements) and
// stores 4-byte pairs, so there each stride must be a multiple of 8 and each pointer 16-byte aligned.
template <int N>
std::array<HeadStrides, N> read_strides(const long long* strides, const void* const (&pointers)[N], bool tensor_core,
                                        const char* name, const char* const (&names)[N]) {
    require(strides != nullptr, std::string(name) + ": null strides");
    std::array<HeadStrides, N> out{};
    for (int i = 0; i < N; ++i) {
        out[i] = HeadStrides{strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
        require(out[i].b >= 0 && out[i].h >= 0 && out[i].t >= 0,
                std::string(name) + ": " + names[i] + " has a negative stride");
        if (tensor_core) {
            require(out[i].b % 8 == 0 && out[i].h % 8 == 0 && out[i].t % 8 == 0,
                    std::string(name) + ": " + names[i] + "'s batch, head and position strides must be multiples of "
                    "8 elements (16 bytes) for the bf16/fp16 kernels");
            require(is_aligned16(pointers[i]), std::string(name) + ": " + names[i] + " must be 16-byte aligned");
        }
    }
    return out;
}

}  // namespace

// out: (B, H, T, D) in dtype; lse: (B, H, T) float32, contiguous; q: (B, H, T, D), k, v: (B, H_kv, T, D) in
// dtype, H_kv dividing H (grouped-query attention: query head h reads kv head h / (H / H_kv)).
// strides: (batch, head, position) element strides of out, q, k, v, in that order (12 values).
void attention_forward(void* out, float* lse, const void* q, const void* k, const void* v, const long long* strides,
                       int B, int H, int H_kv, int T, int D, int dtype, cudaStream_t stream) {
    const DType type = to_dtype(dtype);
    const int rows_per_cta = type == DType::kFloat32 ? kFp32RowsPerBlock : 64;
    if (type != DType::kFloat32) require_tensor_cores("attention_forward");
    if (!check_sizes(B, H, H_kv, T, D, "attention_forward", rows_per_cta)) return;
    const int group = H / H_kv;
    const auto s = read_strides<4>(strides, {out, q, k, v}, type != DType::kFloat32, "attention_forward",
                                   {"out", "q", "k", "v"});
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    dispatch_dtype(type, [&](auto tag) {
        using Elem = decltype(tag);
        dispatch_head_dim<Elem>(D, "attention_forward", [&](auto head_dim) {
            constexpr int kD = decltype(head_dim)::value;
            if constexpr (std::is_same_v<Elem, float>) {
                const dim3 grid(B * H, ceil_div(T, kFp32RowsPerBlock));
                attention_forward_fp32_kernel<kD><<<grid, kFp32Threads, 0, stream>>>(
                    static_cast<float*>(out), lse, static_cast<const float*>(q), static_cast<const float*>(k),
                    static_cast<const float*>(v), s[0], s[1], s[2], s[3], H, group, T, scale);
                PYLLMC_LAUNCH_CHECK("attention_forward_fp32_kernel");
            } else {
                using Tiles = FwdTiles<kD>;
                const size_t smem = Tiles::kSmemElems * sizeof(Elem);
                auto forward_kernel = attention_forward_tc_kernel<Elem, kD>;
                set_smem_and_check(forward_kernel, smem, "attention_forward");
                const dim3 grid(B * H, ceil_div(T, Tiles::kBr));
                forward_kernel<<<grid, kTcThreads, smem, stream>>>(
                    static_cast<Elem*>(out), lse, static_cast<const Elem*>(q), static_cast<const Elem*>(k),
                    static_cast<const Elem*>(v), s[0], s[1], s[2], s[3], H, group, T, scale * kLog2e);
                PYLLMC_LAUNCH_CHECK("attention_forward_tc_kernel");
            }
        });
    });
}

// dq: (B, H, T, D), dk, dv: (B, H_kv, T, D) in dtype, fully written (dk, dv summed over each kv head's query
// heads, in a fixed order: deterministic); delta: (B, H, T) float32 workspace (filled here);
// dout, out, q: (B, H, T, D), k, v: (B, H_kv, T, D) in dtype; lse: (B, H, T) float32 from attention_forward.
// strides: (batch, head, position) element strides of dq, dk, dv, dout, out, q, k, v (24 values).
void attention_backward(void* dq, void* dk, void* dv, float* delta, const void* dout, const void* out,
                        const float* lse, const void* q, const void* k, const void* v, const long long* strides,
                        int B, int H, int H_kv, int T, int D, int dtype, cudaStream_t stream) {
    const DType type = to_dtype(dtype);
    const int rows_per_cta = type == DType::kFloat32 ? kFp32RowsPerBlock : 64;
    if (type != DType::kFloat32) require_tensor_cores("attention_backward");
    if (!check_sizes(B, H, H_kv, T, D, "attention_backward", rows_per_cta)) return;
    const int group = H / H_kv;
    const auto s = read_strides<8>(strides, {dq, dk, dv, dout, out, q, k, v}, type != DType::kFloat32,
                                   "attention_backward", {"dq", "dk", "dv", "dout", "out", "q", "k", "v"});
    const HeadStrides &dq_s = s[0], &dk_s = s[1], &dv_s = s[2], &dout_s = s[3], &out_s = s[4], &q_s = s[5],
                      &k_s = s[6], &v_s = s[7];
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    dispatch_dtype(type, [&](auto tag) {
        using Elem = decltype(tag);
        dispatch_head_dim<Elem>(D, "attention_backward", [&](auto head_dim) {
            constexpr int kD = decltype(head_dim)::value;
            // delta = rowsum(dout * out): 8 rows (warps) per block
            const long long rows = static_cast<long long>(B) * H * T;
            const long long delta_blocks = (rows + 7) / 8;
            require(delta_blocks <= 0x7fffffffLL, "attention_backward: tensor too large for one launch");
            attention_backward_delta_kernel<Elem><<<static_cast<int>(delta_blocks), 256, 0, stream>>>(
                delta, static_cast<const Elem*>(dout), static_cast<const Elem*>(out), dout_s, out_s, H, T, rows, kD);
            PYLLMC_LAUNCH_CHECK("attention_backward_delta_kernel");

            if constexpr (std::is_same_v<Elem, float>) {
                const dim3 kv_grid(B * H_kv, ceil_div(T, kFp32RowsPerBlock));
                attention_backward_dkdv_fp32_kernel<kD><<<kv_grid, kFp32Threads, 0, stream>>>(
                    static_cast<float*>(dk), static_cast<float*>(dv), static_cast<const float*>(dout), lse, delta,
                    static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), dk_s,
                    dv_s, dout_s, q_s, k_s, v_s, H, H_kv, T, scale);
                PYLLMC_LAUNCH_CHECK("attention_backward_dkdv_fp32_kernel");
                const dim3 grid(B * H, ceil_div(T, kFp32RowsPerBlock));
                attention_backward_dq_fp32_kernel<kD><<<grid, kFp32Threads, 0, stream>>>(
                    static_cast<float*>(dq), static_cast<const float*>(dout), lse, delta,
                    static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), dq_s,
                    dout_s, q_s, k_s, v_s, H, group, T, scale);
                PYLLMC_LAUNCH_CHECK("attention_backward_dq_fp32_kernel");
            } else {
                {
                    using Tiles = DkdvTiles<kD>;
                    const size_t smem = Tiles::kSmemElems * sizeof(Elem) + Tiles::kSmemFloats * sizeof(float);
                    auto dkdv_kernel = attention_backward_dkdv_tc_kernel<Elem, kD>;
                    set_smem_and_check(dkdv_kernel, smem, "attention_backward (dK/dV)");
                    const dim3 grid(B * H_kv, ceil_div(T, Tiles::kBc));
                    dkdv_kernel<<<grid, kTcThreads, smem, stream>>>(
                        static_cast<Elem*>(dk), static_cast<Elem*>(dv), static_cast<const Elem*>(dout), lse, delta,
                        static_cast<const Elem*>(q), static_cast<const Elem*>(k), static_cast<const Elem*>(v), dk_s,
                        dv_s, dout_s, q_s, k_s, v_s, H, H_kv, T, scale * kLog2e, scale);
                    PYLLMC_LAUNCH_CHECK("attention_backward_dkdv_tc_kernel");
                }
                // dQ: 64-key tiles where they fit the device's shared memory, else 32-key tiles.
                const auto launch_dq = [&](auto key_tile) {
                    constexpr int kBc = decltype(key_tile)::value;
                    using Tiles = DqTiles<kD, kBc>;
                    const size_t smem = Tiles::kSmemElems * sizeof(Elem);
                    auto dq_kernel = attention_backward_dq_tc_kernel<Elem, kD, kBc>;
                    set_smem_and_check(dq_kernel, smem, "attention_backward (dQ)");
                    const dim3 grid(B * H, ceil_div(T, Tiles::kBr));
                    dq_kernel<<<grid, kTcThreads, smem, stream>>>(
                        static_cast<Elem*>(dq), static_cast<const Elem*>(dout), lse, delta,
                        static_cast<const Elem*>(q), static_cast<const Elem*>(k), static_cast<const Elem*>(v), dq_s,
                        dout_s, q_s, k_s, v_s, H, group, T, scale * kLog2e, scale);
                    PYLLMC_LAUNCH_CHECK("attention_backward_dq_tc_kernel");
                };
                if constexpr (kD == 64) {
                    launch_dq(std::integral_constant<int, 64>{});  // 55,296 B: fits every 8.0+ GPU
                } else if (DqTiles<kD, 64>::kSmemElems * sizeof(Elem) <= max_smem_optin()) {
                    launch_dq(std::integral_constant<int, 64>{});
                } else {
                    launch_dq(std::integral_constant<int, 32>{});
                }
            }
        });
    });
}

}  // namespace pyllmc
