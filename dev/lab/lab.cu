// lab.cu: what each ladder's library holds once, besides its rungs: lab.cuh's launch switch and,
// in the simulator's build, the switch of the simulator's warp schedule.
#include "lab.cuh"

int lab_synchronize_after_launch = 1;

// 0 while a GPU timing loop runs the rungs back to back (a synchronize per launch would time the
// host's round trip, not the kernel); 1 otherwise, so a fault surfaces in the call that caused it.
LAB_EXPORT void lab_set_synchronize(int on) { lab_synchronize_after_launch = on; }

#ifdef PYLLMC_CUDA_SIM
#include "sim_internal.h"

// The order in which the simulator's warps take turns (pyllmc.cuda_sim.SCHEDULES: 0 forward,
// 1 reverse, 2 random with `seed`; greedy: a warp runs as far as it can before the next). A race,
// or a sum whose order depends on which warp comes first (atomics), shows as a different answer
// under another schedule.
LAB_EXPORT void lab_set_schedule(int schedule, unsigned long long seed, int greedy) {
    cuda_sim::options().schedule = static_cast<cuda_sim::Schedule>(schedule);
    cuda_sim::options().seed = seed;
    cuda_sim::options().greedy = greedy != 0;
}
#endif
