// Rung 4: tensor cores. Both products, S = Q K^T and P V, are matrix multiplies, and an mma.sync
// instruction has a warp multiply a 16 x 16 bf16 tile by a 16 x 8 bf16 tile into a 16 x 8 float32
// accumulator (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32) far faster than the float32 FMAs
// of rungs 1-3. So the work is cut into strips of 16 query rows (the m16 of the instruction), one per
// warp; a block of 4 warps owns 64 rows, and every K / V tile in shared memory now serves 64 rows
// (rung 3: 16). The inputs are bf16 (2 bytes, half of float32's traffic; the call converts them);
// the softmax stays float32, in the accumulators' registers.
// Each operand lives in registers in the instruction's fragment layout: with g = lane / 4 and
// t = lane % 4, lane (g, t) holds rows g and g + 8, columns 2t, 2t + 1 (and 2t + 8, 2t + 9) of A;
// columns 2t, 2t + 1 of rows g and g + 8 of the accumulator. Here the fragments are read from the
// shared tiles by hand, 32 bits (two bf16) at a time: along a row for Q and K, down a column (two
// 16-bit loads) for V. Rows are padded by 8 bf16 (16 bytes): lanes g = 0..7 read 8 rows at the same
// column, and with rows of D = 64 bf16 (128 bytes) all 8 would be in the same bank; with 144-byte
// rows row g starts 4 g banks further on. The score accumulators become the A fragment of P V with
// no data movement: the accumulator of keys 16 kk .. 16 kk + 15 has exactly the A layout.
// Today's kernel (rung 6) is this plus ldmatrix (one instruction loads a warp's fragments),
// cp.async double buffering (the next tile is in flight while this one is used), exp2 with the scale
// folded in, and only the diagonal tiles masked.
#include "lab.cuh"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // query rows per block: a 16-row strip per warp
constexpr int kKeys = 32;           // keys per K / V tile (static shared memory stays under 48 KB at D = 128)
constexpr int kPad = 8;             // bf16 added to each shared row: 16 bytes

// d += a b: a 16 x 16 (row-major) times a 16 x 8 (column-major) bf16 tile, float32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two bf16, `lo` in the low half (the lower column).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
}
// Two neighbouring bf16 of a row: one 32-bit load.
__device__ __forceinline__ uint32_t row_pair(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }
// Two bf16 of a column, rows r and r + 1 (`stride` apart): two 16-bit loads.
__device__ __forceinline__ uint32_t column_pair(const bf16* p, int stride) {
    const uint32_t lo = *reinterpret_cast<const uint16_t*>(p), hi = *reinterpret_cast<const uint16_t*>(p + stride);
    return lo | (hi << 16);
}

// Rows row0 .. row0 + ROWS - 1 of a (T, D) bf16 matrix into a (ROWS, D + kPad) shared tile, 16 bytes per
// thread per step (coalesced); rows past T are zero.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, int row0, int T) {
    constexpr int kChunksPerRow = D / 8;
    for (int e = threadIdx.x; e < ROWS * kChunksPerRow; e += kWarps * 32) {
        const int r = e / kChunksPerRow, c = e % kChunksPerRow;
        uint4 chunk = make_uint4(0, 0, 0, 0);
        if (row0 + r < T) chunk = *reinterpret_cast<const uint4*>(src + static_cast<long long>(row0 + r) * D + 8 * c);
        *reinterpret_cast<uint4*>(tile + r * (D + kPad) + 8 * c) = chunk;
    }
}

// out, q, k, v: (B*H, T, D) bf16; lse: (B*H, T) float32. grid (B*H, ceil(T / kRows)), block kWarps * 32.
template <int D>
__global__ void attention_mma_kernel(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int T,
                                     float scale) {
    constexpr int S = D + kPad;  // shared row stride, elements
    __shared__ __align__(16) bf16 q_tile[kRows * S];
    __shared__ __align__(16) bf16 k_tile[kKeys * S];
    __shared__ __align__(16) bf16 v_tile[kKeys * S];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // fragment coordinates
    const int q0 = blockIdx.y * kRows;
    const int row_lo = q0 + warp * 16 + g;  // this thread's rows: row_lo and row_lo + 8
    const long long head = static_cast<long long>(blockIdx.x) * T * D;
    q += head;
    k += head;
    v += head;
    out += head;

    load_tile<kRows, D>(q_tile, q, q0, T);
    __syncthreads();
    uint32_t q_frag[D / 16][4];  // A fragments of the warp's 16 x D strip of Q, kept for every tile
    for (int ks = 0; ks < D / 16; ++ks) {
        const bf16* p = q_tile + (warp * 16 + g) * S + ks * 16 + 2 * t;
        q_frag[ks][0] = row_pair(p);              // row g,     columns 2t, 2t + 1
        q_frag[ks][1] = row_pair(p + 8 * S);      // row g + 8
        q_frag[ks][2] = row_pair(p + 8);          // row g,     columns 2t + 8, 2t + 9
        q_frag[ks][3] = row_pair(p + 8 * S + 8);  // row g + 8
    }
    float o[D / 8][4] = {};  // the strip's 16 x D output: o[nt] holds columns 8 nt .. 8 nt + 7
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};  // over this thread's columns only: the quad's 4 threads are summed at the end

    const int num_tiles = (min(q0 + kRows, T) + kKeys - 1) / kKeys;  // causal: up to the block's last row
    for (int tile = 0; tile < num_tiles; ++tile) {
        const int key0 = tile * kKeys;
        __syncthreads();  // every warp is done with the previous tile
        load_tile<kKeys, D>(k_tile, k, key0, T);
        load_tile<kKeys, D>(v_tile, v, key0, T);
        __syncthreads();

        // s = Q K^T, 16 x kKeys: B(d, key) = K[key][d], a row of the K tile
        float s[kKeys / 8][4] = {};
        for (int ks = 0; ks < D / 16; ++ks) {
            for (int nt = 0; nt < kKeys / 8; ++nt) {
                const bf16* p = k_tile + (nt * 8 + g) * S + ks * 16 + 2 * t;
                mma_bf16_16816(s[nt], q_frag[ks], row_pair(p), row_pair(p + 8));
            }
        }

        // online softmax, rung 2's, per row: s[nt][2r + e] is row row_lo + 8r, key key0 + 8nt + 2t + e;
        // the 4 threads of a quad (same g) share the row.
        for (int r = 0; r < 2; ++r) {
            const int row = row_lo + 8 * r;
            float tile_max = -INFINITY;
            for (int nt = 0; nt < kKeys / 8; ++nt) {
                for (int e = 0; e < 2; ++e) {
                    float& x = s[nt][2 * r + e];
                    x = key0 + nt * 8 + 2 * t + e <= row ? x * scale : -INFINITY;  // causal mask
                    tile_max = fmaxf(tile_max, x);
                }
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float m_new = fmaxf(m[r], tile_max);  // finite: key 0 (tile 0) is valid for every row
            const float correction = expf(m[r] - m_new);
            l[r] *= correction;
            for (int nt = 0; nt < D / 8; ++nt) {
                o[nt][2 * r] *= correction;
                o[nt][2 * r + 1] *= correction;
            }
            for (int nt = 0; nt < kKeys / 8; ++nt) {
                for (int e = 0; e < 2; ++e) {
                    const float p = expf(s[nt][2 * r + e] - m_new);
                    s[nt][2 * r + e] = p;
                    l[r] += p;
                }
            }
            m[r] = m_new;
        }

        // o += P V: the accumulators of keys 16 kk .. 16 kk + 15 are P's A fragment; B(key, d) = V[key][d],
        // down a column of the V tile
        for (int kk = 0; kk < kKeys / 16; ++kk) {
            const uint32_t a[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                   pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            for (int nt = 0; nt < D / 8; ++nt) {
                const bf16* p = v_tile + (kk * 16 + 2 * t) * S + nt * 8 + g;
                mma_bf16_16816(o[nt], a, column_pair(p, S), column_pair(p + 8 * S, S));
            }
        }
    }

    for (int r = 0; r < 2; ++r) {
        float total = l[r];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        const int row = row_lo + 8 * r;
        if (row < T) {
            for (int nt = 0; nt < D / 8; ++nt)  // columns 8 nt + 2t, 8 nt + 2t + 1: one 32-bit store
                *reinterpret_cast<uint32_t*>(out + row * D + nt * 8 + 2 * t) =
                    pack_bf16x2(o[nt][2 * r] / total, o[nt][2 * r + 1] / total);
            if (t == 0) lse[static_cast<long long>(blockIdx.x) * T + row] = m[r] + logf(total);
        }
    }
}

// out, q, k, v: (B, H, T, D) bf16, contiguous; lse: (B, H, T) float32.
LAB_EXPORT int lab_attention_4_mma_bf16(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B,
                                        int H, int T, int D, char* err, int err_len) {
    if (D != 64 && D != 128) return lab_fail(err, err_len, "rung 4 takes D in {64, 128}");
    if (B * H * T == 0) return 0;
    const dim3 grid(B * H, (T + kRows - 1) / kRows);
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    return lab_run(err, err_len, [&] {
        if (D == 64) attention_mma_kernel<64><<<grid, kWarps * 32>>>(out, lse, q, k, v, T, scale);
        if (D == 128) attention_mma_kernel<128><<<grid, kWarps * 32>>>(out, lse, q, k, v, T, scale);
    });
}
