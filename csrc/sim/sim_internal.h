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

// The GPU the simulator answers for: what cudaDeviceGetAttribute reports, the largest
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) it accepts, and what a launch may use.
// Values: NVIDIA's CUDA C++ Programming Guide, table "Technical Specifications per Compute
// Capability" (shared memory per SM and opt-in per block, which is per SM minus the 1 KB the
// driver reserves per block from 8.0 on; threads per SM); the SM count is the named part's.
struct DeviceProfile {
    const char* name;        // "sm_90"
    const char* gpus;        // the parts it stands for
    int major, minor;        // compute capability
    int smem_per_block;      // default limit of static + dynamic shared memory per block
    int smem_per_block_optin;  // the most a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    int smem_per_sm;
    int regs_per_sm, regs_per_block;
    int max_threads_per_block, max_threads_per_sm;
    int multiprocessor_count;  // the full part's; the simulator reports options().multiprocessor_count
};
const DeviceProfile* device_profiles(int* count);  // the table, sm_75 first
const DeviceProfile& device();                      // the current one (sm_90 until set_device)
// Switches the simulated device (false, changing nothing, for an unknown name). Like a new
// CUDA context, it forgets every kernel's MaxDynamicSharedMemorySize.
bool set_device(const std::string& name);

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

// The launches that ran since the last reset of the stats (the first kMaxLaunchLog of them): what
// each asked for, so tests can check the configuration a launcher chose.
struct LaunchRecord {
    std::string name;  // the kernel expression of the launch, as written in the source
    std::size_t smem;  // dynamic shared memory, bytes
    dim3 grid, block;
};
constexpr std::size_t kMaxLaunchLog = 4096;
std::vector<LaunchRecord>& launch_log();

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
