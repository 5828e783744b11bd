// sim_internal.h: the simulator's state shared by runtime.cpp and ptx.cpp (not seen by kernels).
#pragma once

#include "cuda_sim.h"

#include <string>
#include <vector>

namespace cuda_sim {

// How the runnable threads of a block take turns, and the blocks of a grid.
enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };
// When a cp.async copy reaches shared memory: at the cp.async.wait_group that retires its
// group (as late as the hardware may), or at once (as early as it may).
enum class CpAsyncMode : int { kAtWait = 0, kImmediate = 1 };

struct Options {
    Schedule schedule = Schedule::kForward;
    unsigned long long seed = 0;  // for Schedule::kRandom
    bool greedy = false;          // a warp runs as far as it can before the next one (else in step)
    CpAsyncMode cp_async = CpAsyncMode::kAtWait;
    int multiprocessor_count = 4;  // what cudaDeviceGetAttribute reports: a small GPU
};
Options& options();

// Counters since the last reset, for tests and for the cost of a run.
struct Stats {
    unsigned long long launches = 0;
    unsigned long long blocks = 0;
    unsigned long long threads = 0;
    unsigned long long barriers = 0;
    unsigned long long collectives = 0;
    unsigned long long switches = 0;
};
Stats& stats();

struct CpAsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    int cp_size;
    int src_size;  // bytes read from src; the rest of cp_size is zero-filled
};

// cp.async state of the running thread (ptx.cpp drives it; runtime.cpp lands what is left at exit).
struct CpAsyncState {
    std::vector<CpAsyncCopy> open;                 // issued, not yet committed
    std::vector<std::vector<CpAsyncCopy>> groups;  // committed, oldest first
};
CpAsyncState& current_cp_async(const char* what, const char* file, int line);
void land(const CpAsyncCopy& copy);

// The source location of the collective whose combine function is running (for its errors).
struct Site {
    const char* file;
    int line;
};
extern Site g_combine_site;

}  // namespace cuda_sim
