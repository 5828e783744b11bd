// device.cu: can this build's kernels run on the current GPU? One probe the backend chooser asks.
//
// The extension may be built for architectures the GPU is not (a wheel built for sm_80/sm_90 on a
// B200 or an RTX 5090 without the PTX to JIT from, a T4 below every target): it imports, sees the
// device, and its first real launch would fail with "no kernel image is available for execution on
// the device". The probe launches a one-thread kernel compiled with the very flags of every other
// kernel file (same -gencode list, so the same images) and reports what the runtime says, so
// pyllmc.available_backends() can refuse the cuda backend up front with a reason a user can act on.
#include "common.cuh"

namespace pyllmc {
namespace {

__global__ void probe_kernel(int* out) {
    if (out != nullptr) *out = 1;
}

}  // namespace

// cudaSuccess when a kernel of this build launches on the current device; else the launch's error
// (cudaErrorNoKernelImageForDevice when no image fits and no PTX can be JIT-compiled for it).
cudaError_t probe_kernel_image() {
    probe_kernel<<<1, 1>>>(nullptr);
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    cudaGetLastError();  // leave no sticky launch error for the next caller
    return err;
}

}  // namespace pyllmc
