// lab.cuh: what every rung of the kernel lab shares: one way to hand a launch's outcome back to
// Python (dev/lab/lab.py calls each rung's extern "C" entry through ctypes, no bindings).
//
// An entry returns 0, or 1 with a message in `err`: a launch error (a bad configuration, a fault
// the simulator caught inside the kernel) or an exception of a launcher's checks. Nothing may
// throw across the C boundary, so every entry runs its launch through lab_run.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <exception>

#define LAB_EXPORT extern "C" __attribute__((visibility("default")))

inline int lab_fail(char* err, int err_len, const char* message) {
    std::snprintf(err, static_cast<size_t>(err_len), "%s", message);
    return 1;
}

// Set by lab_set_synchronize (lab.cu): 0 only inside a GPU timing loop.
extern int lab_synchronize_after_launch;

// Runs `launch` (a lambda holding the <<<...>>> launch or a launcher call), then reads the sticky
// error (launches are synchronous on the simulator; on a GPU the synchronize is where a fault
// inside the kernel would surface).
template <typename F>
int lab_run(char* err, int err_len, F&& launch) {
    try {
        launch();
        cudaError_t status = cudaGetLastError();
        if (status == cudaSuccess && lab_synchronize_after_launch) status = cudaDeviceSynchronize();
        if (status != cudaSuccess) return lab_fail(err, err_len, cudaGetErrorString(status));
        return 0;
    } catch (const std::exception& e) {
        return lab_fail(err, err_len, e.what());
    }
}
