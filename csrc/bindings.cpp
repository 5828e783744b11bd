// bindings.cpp: the pybind11 module pyllmc._C, one Python function per kernel launcher.
//
// Tensors arrive as integer device pointers (torch's tensor.data_ptr()), sizes, a dtype
// code (pyllmc/ops/_common.py: DTYPE_CODES) and the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream). Memory is always allocated on the Python
// side. The Python ops layer validates shapes, dtypes and devices before calling here;
// the launchers re-check what would make a kernel read or write out of bounds.
// Nothing else lives in this file.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include <cuda_runtime.h>  // host API only: this file is compiled by the C++ compiler, not nvcc

namespace py = pybind11;
using ptr_t = std::uintptr_t;

namespace pyllmc {
// gelu.cu
void gelu_forward(void* out, const void* inp, long long n, int dtype, cudaStream_t stream);
void gelu_backward(void* dinp, const void* inp, const void* dout, long long n, int dtype, cudaStream_t stream);
}  // namespace pyllmc

namespace {
template <typename T = void>
T* as_ptr(ptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t as_stream(ptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "pyllmc CUDA kernels (raw-pointer launchers; use pyllmc.ops instead)";

    // ---- device queries
    m.def("device_count", [] {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
            cudaGetLastError();  // clear the "no driver" error so later calls start clean
            n = 0;
        }
        return n;
    },
          "Number of CUDA devices the CUDA runtime sees (0 when there is no GPU or no driver).");
    m.def("device_error", [] {
        int n = 0;
        cudaError_t err = cudaGetDeviceCount(&n);
        cudaGetLastError();
        return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
    }, "Why the CUDA runtime sees no device: the runtime's error string, or '' when it sees one.");
    m.def("cuda_runtime_version", [] { return CUDART_VERSION; },
          "CUDA runtime version the extension was built with (e.g. 13000).");

    // ---- gelu
    m.def("gelu_forward", [](ptr_t out, ptr_t inp, long long n, int dtype, ptr_t stream) {
        pyllmc::gelu_forward(as_ptr(out), as_ptr(inp), n, dtype, as_stream(stream));
    }, py::arg("out"), py::arg("inp"), py::arg("n"), py::arg("dtype"), py::arg("stream"));
    m.def("gelu_backward", [](ptr_t dinp, ptr_t inp, ptr_t dout, long long n, int dtype, ptr_t stream) {
        pyllmc::gelu_backward(as_ptr(dinp), as_ptr(inp), as_ptr(dout), n, dtype, as_stream(stream));
    }, py::arg("dinp"), py::arg("inp"), py::arg("dout"), py::arg("n"), py::arg("dtype"), py::arg("stream"));
}
