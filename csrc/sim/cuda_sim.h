// cuda_sim.h: runs pyllmc's CUDA kernels on the CPU, for CI machines without a GPU.
//
// Every csrc/*.cu file is compiled, unmodified in meaning, by the host C++ compiler with this
// header force-included (-include cuda_sim.h) after a small source rewrite
// (pyllmc/cuda_sim.py) that turns the three constructs no macro can express into calls:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::cuda_sim::launch("kernel", kernel, config(...), args)
//   extern __shared__ T x[];  /  __shared__ T x[N];  ->  per-block shared memory from the simulator
//   asm volatile("ptx" : outs : ins : clobbers);  ->  ::cuda_sim::asm_exec("ptx", {operands}, ...)
// Line numbers are kept, so compiler errors and the simulator's messages point at csrc/.
//
// The model (runtime.cpp, ptx.cpp):
// - Blocks run one after another on the calling OS thread; the threads of a block run as
//   cooperative fibers (each with its own guarded stack) that switch only at barriers and warp
//   collectives. Between two such points a thread runs alone, so atomics are plain
//   read-modify-writes and the order in which warps (and lanes) run is a choice: forward,
//   reversed, or a seeded random order, with warps moving in step or each running as far as
//   it can (greedy) (set_schedule): order-dependent races show as results that change.
// - __syncthreads is a block barrier: exited threads count as arrived, and reaching it from
//   two different source lines at once is an error. Warp collectives (shuffles, votes,
//   __syncwarp, ldmatrix, mma) wait for every lane of their mask; lanes that disagree on the
//   mask, or a mask that names an exited lane, are errors, and so is a deadlock.
// - Shared memory: dynamic shared memory is filled with 0xFF at every block start and ends at
//   a guard page; static __shared__ variables come from a 48 KiB per-block arena, also filled
//   with 0xFF. A fault on a guard page (or any invalid address) inside a kernel becomes a
//   launch error that names the kernel, block and thread, not a crash.
// - Inline PTX (mma.sync m16n8k16, ldmatrix, cp.async) is executed exactly per the PTX ISA's
//   fragment layouts, warp-collectively; cp.async lands either at its wait_group or at once.
// - Errors are reported as CUDA does: the launch sets the sticky "last error" and
//   cudaGetLastError() returns it; cudaGetErrorString() then gives the simulator's message.
//
// Not modelled: memory races other than those a schedule exposes (no racecheck), the GPU's
// exact float rounding (glibc math, no FMA contraction, fast intrinsics computed exactly),
// occupancy, __launch_bounds__, register limits, streams (every launch is synchronous).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

#define PYLLMC_CUDA_SIM 1

// Launch bounds guide nvcc's register allocation; on the CPU they mean nothing.
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace cuda_sim {

// ----------------------------------------------------------------------------
// the built-in variables of the running thread

struct ThreadRegs {
    uint3 thread_idx;
};
extern ThreadRegs* g_regs;  // the running thread's (a zero index outside kernels)
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// ----------------------------------------------------------------------------
// runtime entry points (runtime.cpp)

// Fails the running kernel with a message (printf-style); never returns.
[[noreturn]] void failf(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

// Block barrier; op: 0 plain, 1 count, 2 and, 3 or of `predicate` over the block.
int syncthreads(int op, int predicate, const char* file, int line);

// A warp collective: every lane of `mask` calls it with its own `slot`; when the last one
// arrives, combine(slots, mask) runs once (slots[l] is lane l's slot, null outside the mask)
// and writes each lane's results into its slot. `name` identifies the collective kind: lanes
// that meet with different names or masks are an error.
using CombineFn = void (*)(void* const* slots, unsigned mask);
void warp_collective(const char* name, unsigned mask, CombineFn combine, void* slot, const char* file, int line);
[[noreturn]] void fail_collective(const char* name, int lane, const char* what);  // from inside a combine

unsigned lanes_not_exited();  // __activemask's approximation: the running warp's live lanes
int lane_id();

// Shared memory of the running block.
void* dynamic_shared(std::size_t align, const char* file, int line);
void* static_shared(int site, std::size_t bytes, std::size_t align, const char* file, int line);
std::size_t cvta_to_shared(const void* p, const char* file, int line);
// A shared address (as __cvta_generic_to_shared gives) back to memory, `bytes` long, checked.
void* shared_pointer(std::uint32_t address, std::size_t bytes, const char* what, const char* file, int line);

// Inline PTX (ptx.cpp): one operand as the compiler would bind it ("=r"(x), "l"(p), "n"(3) ...).
struct AsmOperand {
    const char* constraint;
    void* ptr;  // the lvalue (outputs) or a temporary holding the value (inputs)
    unsigned size;
};
template <class T>
AsmOperand asm_operand(const char* constraint, T&& x) {
    return AsmOperand{constraint, const_cast<void*>(static_cast<const void*>(&x)), static_cast<unsigned>(sizeof(x))};
}
void asm_exec(const char* ptx, std::initializer_list<AsmOperand> operands, const char* file, int line);

// ----------------------------------------------------------------------------
// launches

struct LaunchConfig {
    dim3 grid;
    dim3 block;
    std::size_t smem;
    cudaStream_t stream;
};
inline LaunchConfig config(dim3 grid, dim3 block, std::size_t smem = 0, cudaStream_t stream = 0) {
    return LaunchConfig{grid, block, smem, stream};
}

// Runs every block of the grid; `invoke(data)` runs the kernel body for the current thread.
void run_grid(const char* name, const void* kernel, const LaunchConfig& cfg, void (*invoke)(const void*),
              const void* data, const char* file, int line);

template <class... Params, class... Args>
void launch(const char* name, void (*kernel)(Params...), const LaunchConfig& cfg, Args&&... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
    // The parameters are converted and copied once, as the CUDA runtime does into the launch's
    // parameter space; every thread's call copies them again (by value).
    struct Data {
        void (*kernel)(Params...);
        std::tuple<std::decay_t<Params>...> params;
    };
    const Data data{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_grid(
        name, reinterpret_cast<const void*>(kernel), cfg,
        [](const void* p) {
            const Data& d = *static_cast<const Data*>(p);
            std::apply(d.kernel, d.params);
        },
        &data, __builtin_FILE(), __builtin_LINE());
}

// `__shared__ T x[N];` (T[N] as the type), one object per block.
template <class T>
T& static_shared_ref(int site, std::size_t align, const char* file, int line) {
    const std::size_t a = align > alignof(T) ? align : alignof(T);
    return *static_cast<T*>(static_shared(site, sizeof(T), a, file, line));
}
template <class T>
T* dynamic_shared_ptr(std::size_t align, const char* file, int line) {
    return static_cast<T*>(dynamic_shared(align > alignof(T) ? align : alignof(T), file, line));
}

// ----------------------------------------------------------------------------
// shuffles (PTX shfl.sync semantics: segments of `width` lanes, out-of-range reads give the
// caller's own value)

enum ShflMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflBfly = 3 };

struct ShflSlot {
    std::uint64_t value;
    std::uint64_t result;
    int mode;
    int b;      // source lane / offset / xor mask
    int width;  // segment width
};
void shfl_combine(void* const* slots, unsigned mask);

template <class T>
T shfl(const char* name, unsigned mask, T var, ShflMode mode, int b, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    ShflSlot slot{};
    std::memcpy(&slot.value, &var, sizeof(T));
    slot.mode = mode;
    slot.b = b;
    slot.width = width;
    warp_collective(name, mask, &shfl_combine, &slot, file, line);
    T out;
    std::memcpy(&out, &slot.result, sizeof(T));
    return out;
}

struct VoteSlot {
    int predicate;
    unsigned result;
};
void ballot_combine(void* const* slots, unsigned mask);

}  // namespace cuda_sim

// cuda_runtime.h declares this template (kernel pointer -> const void*) only for nvcc.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

// ----------------------------------------------------------------------------
// CUDA's device-side names (global namespace, as nvcc provides them)

#define threadIdx (static_cast<const uint3&>(::cuda_sim::g_regs->thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_sim::g_block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_sim::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_sim::g_grid_dim))
static constexpr int warpSize = 32;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_sim::syncthreads(0, 0, file, line);
}
inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_sim::syncthreads(1, p != 0, file, line);
}
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_sim::syncthreads(2, p != 0, file, line);
}
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_sim::syncthreads(3, p != 0, file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_sim::VoteSlot slot{0, 0};
    ::cuda_sim::warp_collective("__syncwarp", mask, &::cuda_sim::ballot_combine, &slot, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_sim::VoteSlot slot{p != 0, 0};
    ::cuda_sim::warp_collective("__ballot_sync", mask, &::cuda_sim::ballot_combine, &slot, file, line);
    return slot.result;
}
inline int __any_sync(unsigned mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_sim::VoteSlot slot{p != 0, 0};
    ::cuda_sim::warp_collective("__any_sync", mask, &::cuda_sim::ballot_combine, &slot, file, line);
    return slot.result != 0;
}
inline int __all_sync(unsigned mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_sim::VoteSlot slot{p != 0, 0};
    ::cuda_sim::warp_collective("__all_sync", mask, &::cuda_sim::ballot_combine, &slot, file, line);
    return slot.result == mask;
}
inline unsigned __activemask() { return ::cuda_sim::lanes_not_exited(); }

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
    return ::cuda_sim::shfl("__shfl_sync", mask, var, ::cuda_sim::kShflIdx, src_lane, width, file, line);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
    return ::cuda_sim::shfl("__shfl_up_sync", mask, var, ::cuda_sim::kShflUp, static_cast<int>(delta), width, file,
                            line);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
    return ::cuda_sim::shfl("__shfl_down_sync", mask, var, ::cuda_sim::kShflDown, static_cast<int>(delta), width,
                            file, line);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
    return ::cuda_sim::shfl("__shfl_xor_sync", mask, var, ::cuda_sim::kShflBfly, lane_mask, width, file, line);
}

// ---- memory: cache hints are plain accesses; fences are no-ops (one thread runs at a time)

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

inline std::size_t __cvta_generic_to_shared(const void* p, const char* file = __builtin_FILE(),
                                            int line = __builtin_LINE()) {
    return ::cuda_sim::cvta_to_shared(p, file, line);
}
inline std::size_t __cvta_generic_to_global(const void* p) { return reinterpret_cast<std::size_t>(p); }

// ---- atomics: plain read-modify-writes (no other thread runs in between)

namespace cuda_sim {
template <class T> struct same { using type = T; };  // keeps the value argument out of deduction
}
#define CUDA_SIM_ATOMIC(name, expr)                                                        \
    template <class T> inline T name(T* p, typename ::cuda_sim::same<T>::type v) {          \
        const T old = *p;                                                                   \
        *p = (expr);                                                                        \
        return old;                                                                         \
    }
CUDA_SIM_ATOMIC(atomicAdd, old + v)
CUDA_SIM_ATOMIC(atomicSub, old - v)
CUDA_SIM_ATOMIC(atomicExch, v)
CUDA_SIM_ATOMIC(atomicMax, old < v ? v : old)
CUDA_SIM_ATOMIC(atomicMin, v < old ? v : old)
CUDA_SIM_ATOMIC(atomicAnd, old & v)
CUDA_SIM_ATOMIC(atomicOr, old | v)
CUDA_SIM_ATOMIC(atomicXor, old ^ v)
#undef CUDA_SIM_ATOMIC
template <class T>
inline T atomicCAS(T* p, typename ::cuda_sim::same<T>::type compare, typename ::cuda_sim::same<T>::type v) {
    const T old = *p;
    if (old == compare) *p = v;
    return old;
}

// ---- math: the CUDA-only names, computed exactly (the GPU's fast versions round differently)

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
// Round-to-nearest intrinsics: one IEEE operation each (the build disables FMA contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
inline double __longlong_as_double(long long u) { double x; std::memcpy(&x, &u, 8); return x; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// CUDA's min / max overloads for mixed integer and float arguments.
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

inline long long clock64() {
    static long long ticks = 0;
    return ++ticks;
}
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_sim::failf(file, line, "__trap() called");
}
