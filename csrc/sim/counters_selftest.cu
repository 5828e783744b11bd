// counters_selftest.cu: kernels whose memory counters are known by hand (tests/test_sim_counters.py
// checks each exactly in the "counters" build). One warp each; `in` and `out` are 256-byte aligned
// and hold 4096 floats.
#include "common.cuh"

#include <cstdint>
#include <cstring>

namespace cuda_sim_counters_selftest {
namespace {

// Global: 32 lanes x 4 B, consecutive: 4 sectors per request (read and write).
__global__ void ka_copy(float* out, const float* in) { out[threadIdx.x] = in[threadIdx.x]; }
// Every other float: the read spans 256 B, 8 sectors.
__global__ void ka_stride2(float* out, const float* in) { out[threadIdx.x] = in[2 * threadIdx.x]; }
// Shifted by 4 B: 128 B over 5 sectors.
__global__ void ka_misaligned(float* out, const float* in) { out[threadIdx.x] = in[threadIdx.x + 1]; }
// Every lane the same float: 1 sector.
__global__ void ka_broadcast(float* out, const float* in) { out[threadIdx.x] = in[0]; }
// 16 B per lane, consecutive: 512 B, 16 sectors.
__global__ void ka_float4(float* out, const float* in) {
    reinterpret_cast<float4*>(out)[threadIdx.x] = reinterpret_cast<const float4*>(in)[threadIdx.x];
}
// 16 B per lane every 32 B: 32 sectors for 512 B.
__global__ void ka_float4_stride2(float* out, const float* in) {
    reinterpret_cast<float4*>(out)[threadIdx.x] = reinterpret_cast<const float4*>(in)[2 * threadIdx.x];
}

// A 32 x 32 transpose through shared memory: row writes are conflict-free; column reads of a
// 32-float row pitch hit one bank 32 times (32-way), of a 33-float pitch 32 banks once (1-way).
template <int kPitch>
__global__ void ka_transpose(float* out, const float* in) {
    __shared__ float tile[32 * kPitch];
    const int lane = threadIdx.x;
    for (int r = 0; r < 32; ++r) tile[r * kPitch + lane] = in[r * 32 + lane];
    __syncwarp();
    for (int r = 0; r < 32; ++r) out[r * 32 + lane] = tile[lane * kPitch + r];
}

// ldmatrix.x4: lane l gives row l at l * kRowBytes. 128 B apart, the 8 rows of a phase share
// banks 0-3 (8-way); 144 B apart they cover all 32 banks (1-way).
template <int kRowBytes>
__global__ void ka_ldmatrix(float* out, const float* in) {
    __shared__ __align__(16) unsigned char tile[32 * kRowBytes];
    const int lane = threadIdx.x;
    for (int i = lane; i < 32 * kRowBytes / 4; i += 32) reinterpret_cast<float*>(tile)[i] = in[i];
    __syncwarp();
    uint32_t r[4];
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(tile + lane * kRowBytes));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
    for (int k = 0; k < 4; ++k) out[32 * k + lane] = __uint_as_float(r[k]);
}

}  // namespace
}  // namespace cuda_sim_counters_selftest

// Runs known-answer kernel `which` (0..9, in the order of KNOWN_ANSWERS in pyllmc/sim_counters.py)
// on one warp; returns the CUDA error code. Called through ctypes.
extern "C" __attribute__((visibility("default"))) int pyllmc_counters_known_answer(int which, float* out,
                                                                                  const float* in) {
    using namespace cuda_sim_counters_selftest;
    switch (which) {
        case 0: ka_copy<<<1, 32>>>(out, in); break;
        case 1: ka_stride2<<<1, 32>>>(out, in); break;
        case 2: ka_misaligned<<<1, 32>>>(out, in); break;
        case 3: ka_broadcast<<<1, 32>>>(out, in); break;
        case 4: ka_float4<<<1, 32>>>(out, in); break;
        case 5: ka_float4_stride2<<<1, 32>>>(out, in); break;
        case 6: ka_transpose<32><<<1, 32>>>(out, in); break;
        case 7: ka_transpose<33><<<1, 32>>>(out, in); break;
        case 8: ka_ldmatrix<128><<<1, 32>>>(out, in); break;
        case 9: ka_ldmatrix<144><<<1, 32>>>(out, in); break;
        default: return static_cast<int>(cudaErrorInvalidValue);
    }
    return static_cast<int>(cudaGetLastError());
}
