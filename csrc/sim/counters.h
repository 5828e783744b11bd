// counters.h: the simulator's memory counters (counters.cpp), as runtime.cpp and ptx.cpp see them.
//
// In the "counters" build (pyllmc/cuda_sim.py) the kernel units are compiled with GCC's
// ThreadSanitizer instrumentation but linked without its runtime: every load and store of kernel
// code calls __tsan_readN / __tsan_writeN, which counters.cpp defines. It keeps the accesses that
// reach the GPU's memory (global, or the block's shared memory; not a thread's own stack, nor the
// simulator's state), groups them into warp requests at each block's end, and counts sectors,
// bank wavefronts and unique bytes per launch, per source site. ptx.cpp records cp.async and
// ldmatrix, whose memory traffic is the emulation's, not the kernel's code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_sim.h"

namespace cuda_sim {

// What the running simulated thread may touch without it being memory traffic, and where the
// block's shared memory is (runtime.cpp answers; false outside a kernel's thread).
struct CountersView {
    int linear = 0;  // the thread's index in its block
    const unsigned char* stack_lo = nullptr;
    const unsigned char* stack_hi = nullptr;
    const unsigned char* threads_lo = nullptr;  // the simulator's per-thread records (threadIdx lives there)
    const unsigned char* threads_hi = nullptr;
    const unsigned char* arena = nullptr;  // static __shared__, shared addresses [0, arena_bytes)
    std::size_t arena_bytes = 0;
    const unsigned char* dynamic = nullptr;  // dynamic shared, shared addresses 0x10000 + offset
    std::size_t dynamic_bytes = 0;
};
bool counters_view(CountersView* view);

extern bool g_counting;  // recording is on (set from Python); every hook returns at once when off

void counters_launch_begin(const char* name);
void counters_block_end();
void counters_launch_end();
// One access by the running thread. `site` identifies the instruction (a return address, or the
// PTX text of an emulated instruction, with `file`:`line`).
void counters_record(const void* site, const void* address, unsigned size, bool write, const char* file = nullptr,
                     int line = 0, const char* what = nullptr);

}  // namespace cuda_sim
