// selftest.cu: small kernels that pin down the simulator itself (tests/test_cuda_sim.py checks
// them against numpy models of the PTX ISA and of CUDA's rules). Built only into pyllmc._C_sim,
// through the same source rewrite as csrc/*.cu.
#include "common.cuh"

#include <cstdint>

namespace cuda_sim_selftest {
namespace {

using pyllmc::require;

void check_launch(const char* name) { PYLLMC_LAUNCH_CHECK(name); }

// ---- mma.sync m16n8k16: each lane's registers in, its d registers out

template <typename Elem>
__global__ void mma_kernel(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
    const int lane = threadIdx.x;
    uint32_t ra[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
    uint32_t rb0 = b[2 * lane], rb1 = b[2 * lane + 1];
    float acc[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
    if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "r"(rb0), "r"(rb1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "r"(rb0), "r"(rb1));
    }
    for (int i = 0; i < 4; ++i) d[4 * lane + i] = acc[i];
}

// ---- ldmatrix: shared memory holds `image`; lane l's row address is image + offsets[l] elements

template <int kMatrices, bool kTrans>
__device__ void ldmatrix_regs(uint32_t (&r)[4], uint32_t address) {
    if constexpr (kMatrices == 1 && !kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
    } else if constexpr (kMatrices == 1) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
    } else if constexpr (kMatrices == 2 && !kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1])
                     : "r"(address));
    } else if constexpr (kMatrices == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1])
                     : "r"(address));
    } else if constexpr (!kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    }
}

template <int kMatrices, bool kTrans>
__global__ void ldmatrix_kernel(uint32_t* out, const uint16_t* image, int image_elems, const int* offsets) {
    extern __shared__ __align__(16) uint16_t tile[];
    for (int i = threadIdx.x; i < image_elems; i += blockDim.x) tile[i] = image[i];
    __syncthreads();
    const int lane = threadIdx.x;
    uint32_t r[4] = {0, 0, 0, 0};
    ldmatrix_regs<kMatrices, kTrans>(r, static_cast<uint32_t>(__cvta_generic_to_shared(tile + offsets[lane])));
    for (int m = 0; m < 4; ++m) out[4 * lane + m] = r[m];
}

// ---- cp.async: three groups per thread (16 bytes, 5 bytes + zero fill, 0 bytes + zero fill),
// shared memory copied out after wait_group 2 (only the first group must have landed) and at the end.

__device__ void cp_async(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(static_cast<uint32_t>(
                     __cvta_generic_to_shared(dst))),
                 "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
                 : "memory");
}

__global__ void cp_async_kernel(unsigned char* after_first, unsigned char* after_all, const unsigned char* src) {
    extern __shared__ __align__(16) unsigned char buffer[];  // (3, 32, 16) bytes
    const int t = threadIdx.x;
    const int sizes[3] = {16, 5, 0};
    for (int g = 0; g < 3; ++g) {
        cp_async(buffer + (g * 32 + t) * 16, src + (g * 32 + t) * 16, sizes[g]);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    asm volatile("cp.async.wait_group %0;\n" ::"n"(2) : "memory");
    for (int i = 0; i < 3 * 16; ++i) after_first[t * 48 + i] = buffer[(i / 16 * 32 + t) * 16 + i % 16];
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0) : "memory");
    for (int i = 0; i < 3 * 16; ++i) after_all[t * 48 + i] = buffer[(i / 16 * 32 + t) * 16 + i % 16];
}

// ---- shuffles and votes (lanes outside `mask` do not take part and write -1)

__global__ void shfl_kernel(int* out, const int* in, int mode, int b, int width, unsigned mask) {
    const int lane = threadIdx.x;
    int r = -1;
    if (mask & (1u << lane)) {
        switch (mode) {
            case 0: r = __shfl_sync(mask, in[lane], b, width); break;
            case 1: r = __shfl_up_sync(mask, in[lane], b, width); break;
            case 2: r = __shfl_down_sync(mask, in[lane], b, width); break;
            default: r = __shfl_xor_sync(mask, in[lane], b, width); break;
        }
    }
    out[lane] = r;
}

__global__ void vote_kernel(unsigned* out, const int* predicates, unsigned mask) {
    const int lane = threadIdx.x;
    if (!(mask & (1u << lane))) return;
    out[3 * lane] = __ballot_sync(mask, predicates[lane]);
    out[3 * lane + 1] = __any_sync(mask, predicates[lane]);
    out[3 * lane + 2] = __all_sync(mask, predicates[lane]);
}

__global__ void syncthreads_count_kernel(int* out, const int* predicates) {
    out[threadIdx.x] = __syncthreads_count(predicates[threadIdx.x]);
}

// ---- the order in which threads pass two points with a warp collective between them:
// event 2 * thread before the shuffle, 2 * thread + 1 after it

__global__ void order_kernel(int* order, int* counter) {
    int* events = order + blockIdx.x * 2 * blockDim.x;
    events[atomicAdd(counter + blockIdx.x, 1)] = 2 * threadIdx.x;
    const int v = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
    events[atomicAdd(counter + blockIdx.x, 1)] = 2 * (v ^ 1) + 1;
    __syncthreads();
}

// ---- what a real GPU leaves undefined, or refuses, and the simulator reports

__global__ void static_shared_kernel(float* out) {
    __shared__ float never_written[4];
    out[threadIdx.x] = never_written[threadIdx.x % 4];
}

__global__ void divergent_barrier_kernel(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x == 0) {
        __syncthreads();  // waits for lanes 1..31, which wait in the shuffle for lane 0
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

__global__ void early_exit_kernel(float* out) {
    if (threadIdx.x >= 16) return;  // half the warp leaves, the rest shuffles with a full mask
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void mask_mismatch_kernel(int* out) {
    const unsigned mask = threadIdx.x < 16 ? 0xffffffffu : 0xffff0000u;  // overlapping, not equal
    out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<int>(threadIdx.x), 1);
}

__global__ void shared_overflow_kernel(float* out, int index) {
    extern __shared__ float values[];  // the launch gives 64 floats
    values[index] = 1.0f;
    out[threadIdx.x] = values[0];
}

__global__ void bad_global_kernel(float* out, long long offset) { out[offset] = 1.0f; }

__device__ int deep(int n) {
    volatile char scratch[4096];
    scratch[n % 4096] = static_cast<char>(n);
    return n == 0 ? scratch[0] : deep(n - 1) + scratch[n % 4096];
}
__global__ void stack_overflow_kernel(int* out, int depth) { out[threadIdx.x] = deep(depth); }

__global__ void ldmatrix_out_of_bounds_kernel(uint32_t* out) {
    extern __shared__ __align__(16) uint16_t tile[];  // the launch gives 64 elements: 8 rows of 16 bytes
    uint32_t r[4];
    // row addresses up to row 31 of a 16-byte-row tile: rows 8.. are past the end
    ldmatrix_regs<4, false>(r, static_cast<uint32_t>(__cvta_generic_to_shared(tile + 8 * (threadIdx.x % 32))));
    out[threadIdx.x] = r[0];
}

__global__ void empty_kernel(int* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *out = 1;
}
// A kernel of its own for the opt-in case: the attribute stays set on the kernel it names.
__global__ void opted_in_kernel(int* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *out = 2;
}

}  // namespace

// ---- launchers (called from csrc/sim/module.cpp)

void mma(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16) {
    if (bf16) mma_kernel<__nv_bfloat16><<<1, 32>>>(d, a, b, c);
    else mma_kernel<__half><<<1, 32>>>(d, a, b, c);
    check_launch("mma_kernel");
}

void ldmatrix(uint32_t* out, const uint16_t* image, int image_elems, const int* offsets, int matrices, bool trans) {
    const size_t smem = static_cast<size_t>(image_elems) * sizeof(uint16_t);
    switch (matrices * 2 + (trans ? 1 : 0)) {
        case 2: ldmatrix_kernel<1, false><<<1, 32, smem>>>(out, image, image_elems, offsets); break;
        case 3: ldmatrix_kernel<1, true><<<1, 32, smem>>>(out, image, image_elems, offsets); break;
        case 4: ldmatrix_kernel<2, false><<<1, 32, smem>>>(out, image, image_elems, offsets); break;
        case 5: ldmatrix_kernel<2, true><<<1, 32, smem>>>(out, image, image_elems, offsets); break;
        case 8: ldmatrix_kernel<4, false><<<1, 32, smem>>>(out, image, image_elems, offsets); break;
        case 9: ldmatrix_kernel<4, true><<<1, 32, smem>>>(out, image, image_elems, offsets); break;
        default: require(false, "ldmatrix selftest: matrices must be 1, 2 or 4");
    }
    check_launch("ldmatrix_kernel");
}

void cp_async(unsigned char* after_first, unsigned char* after_all, const unsigned char* src) {
    cp_async_kernel<<<1, 32, 3 * 32 * 16>>>(after_first, after_all, src);
    check_launch("cp_async_kernel");
}

void shfl(int* out, const int* in, int mode, int b, int width, unsigned mask) {
    shfl_kernel<<<1, 32>>>(out, in, mode, b, width, mask);
    check_launch("shfl_kernel");
}

void vote(unsigned* out, const int* predicates, unsigned mask) {
    vote_kernel<<<1, 32>>>(out, predicates, mask);
    check_launch("vote_kernel");
}

void syncthreads_count(int* out, const int* predicates, int threads) {
    syncthreads_count_kernel<<<1, threads>>>(out, predicates);
    check_launch("syncthreads_count_kernel");
}

void order(int* order_out, int* counter, int blocks, int threads) {
    order_kernel<<<blocks, threads>>>(order_out, counter);
    check_launch("order_kernel");
}

void static_shared(float* out) {
    static_shared_kernel<<<1, 4>>>(out);
    check_launch("static_shared_kernel");
}

// One launch per case of something the simulator must refuse; the error is the exception.
void misuse(const char* which, void* out, long long arg) {
    const std::string w(which);
    if (w == "divergent_barrier") divergent_barrier_kernel<<<1, 64>>>(static_cast<int*>(out));
    else if (w == "deadlock") deadlock_kernel<<<1, 32>>>(static_cast<int*>(out));
    else if (w == "early_exit") early_exit_kernel<<<1, 32>>>(static_cast<float*>(out));
    else if (w == "mask_mismatch") mask_mismatch_kernel<<<1, 32>>>(static_cast<int*>(out));
    else if (w == "shared_overflow") shared_overflow_kernel<<<1, 32, 64 * sizeof(float)>>>(static_cast<float*>(out), static_cast<int>(arg));
    else if (w == "bad_global") bad_global_kernel<<<1, 1>>>(static_cast<float*>(out), arg);
    else if (w == "stack_overflow") stack_overflow_kernel<<<1, 1>>>(static_cast<int*>(out), static_cast<int>(arg));
    else if (w == "ldmatrix_out_of_bounds") ldmatrix_out_of_bounds_kernel<<<1, 32, 64 * sizeof(uint16_t)>>>(static_cast<uint32_t*>(out));
    else if (w == "too_many_threads") empty_kernel<<<1, 2048>>>(static_cast<int*>(out));
    else if (w == "zero_grid") empty_kernel<<<0, 32>>>(static_cast<int*>(out));
    else if (w == "smem_without_optin") empty_kernel<<<1, 32, 64 * 1024>>>(static_cast<int*>(out));
    else if (w == "smem_with_optin") {
        PYLLMC_CUDA_CHECK(cudaFuncSetAttribute(opted_in_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
        opted_in_kernel<<<1, 32, 64 * 1024>>>(static_cast<int*>(out));
    } else require(false, "misuse selftest: unknown case " + w);
    check_launch(which);
}

}  // namespace cuda_sim_selftest
