// bindings.cpp: the pybind11 module pyllmc._C, one Python function per kernel launcher.
//
// Tensors arrive as integer device pointers (torch's tensor.data_ptr()), sizes, a dtype
// code (pyllmc/ops/_common.py: DTYPE_CODES) and the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream). Memory is always allocated on the Python
// side. The Python ops layer validates shapes, dtypes and devices before calling here;
// the launchers re-check what would make a kernel read or write out of bounds.
// Every launcher is keyword-only (py::kw_only()): its arguments are a row of bare integers, so a
// swapped pair of pointers would still run; a call by name cannot swap them, and a positional call
// raises TypeError. Call them as ext.gelu_forward(out=..., inp=..., n=..., dtype=..., stream=...).
// Nothing else lives in this file. The same file also builds pyllmc._C_sim, the kernels
// compiled for the CPU simulator (pyllmc/cuda_sim.py, csrc/sim/), which adds its controls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>  // host API only: this file is compiled by the C++ compiler, not nvcc

namespace py = pybind11;
using ptr_t = std::uintptr_t;

#ifndef PYLLMC_EXTENSION_NAME
#define PYLLMC_EXTENSION_NAME _C
#endif
#ifdef PYLLMC_CUDA_SIM
namespace pyllmc_sim {
void bind(py::module_& m);  // csrc/sim/module.cpp: schedule, cp.async mode, self-tests
}
#endif

#ifndef PYLLMC_CUDA_ARCHS  // setup.py defines it: the -gencode list the kernels were built for
#define PYLLMC_CUDA_ARCHS ""
#endif

namespace pyllmc {
// device.cu
cudaError_t probe_kernel_image();
// gelu.cu
void gelu_forward(void* out, const void* inp, long long n, int dtype, cudaStream_t stream);
void gelu_backward(void* dinp, const void* inp, const void* dout, long long n, int dtype, cudaStream_t stream);
// swiglu.cu
void swiglu_forward(void* out, const void* a, const void* b, long long rows, long long cols, long long out_stride,
                    long long a_stride, long long b_stride, int dtype, cudaStream_t stream);
void swiglu_backward(void* da, void* db, const void* dout, const void* a, const void* b, long long rows,
                     long long cols, long long da_stride, long long db_stride, long long dout_stride,
                     long long a_stride, long long b_stride, int dtype, cudaStream_t stream);
void relu2_forward(void* out, const void* inp, long long n, int dtype, cudaStream_t stream);
void relu2_backward(void* dinp, const void* inp, const void* dout, long long n, int dtype, cudaStream_t stream);
// rope.cu
void rope_forward(void* out, const void* inp, const float* cosines, const float* sines, long long B, long long T,
                  long long H, long long D, long long out_stride_b, long long out_stride_t, long long out_stride_h,
                  long long inp_stride_b, long long inp_stride_t, long long inp_stride_h, long long start,
                  long long table_rows, int dtype, cudaStream_t stream);
void rope_backward(void* dinp, const void* dout, const float* cosines, const float* sines, long long B, long long T,
                   long long H, long long D, long long dinp_stride_b, long long dinp_stride_t, long long dinp_stride_h,
                   long long dout_stride_b, long long dout_stride_t, long long dout_stride_h, long long start,
                   long long table_rows, int dtype, cudaStream_t stream);
// adamw.cu
void adamw_step(const void* tensors, int num_tensors, const void* chunk_to_tensor, long long num_chunks,
                long long chunk_size, const void* hyper, int num_rows, cudaStream_t stream);
void adamw_step_device_hyper(const void* tensors, int num_tensors, const void* chunk_to_tensor, long long num_chunks,
                             long long chunk_size, const void* hyper, int num_rows, cudaStream_t stream);
int adamw_chunk_size();
int adamw_max_rows();
// attention.cu
void attention_forward(void* out, float* lse, const void* q, const void* k, const void* v, const long long* strides,
                       int B, int H, int H_kv, int T, int D, int dtype, cudaStream_t stream);
void attention_backward(void* dq, void* dk, void* dv, float* delta, const void* dout, const void* out,
                        const float* lse, const void* q, const void* k, const void* v, const long long* strides,
                        int B, int H, int H_kv, int T, int D, int dtype, cudaStream_t stream);
// layernorm.cu
void layernorm_forward(void* out, void* mean, void* rstd, const void* inp, const void* weight, const void* bias,
                       long long rows, int C, float eps, int dtype, cudaStream_t stream);
void layernorm_backward(void* dinp, void* dweight, void* dbias, void* scratch, const void* dout, const void* inp,
                        const void* weight, const void* mean, const void* rstd, long long rows, int C,
                        int num_partials, int dtype, cudaStream_t stream);
void fused_residual_layernorm_forward(void* h_out, void* out, void* mean, void* rstd, const void* residual,
                                      const void* inp, const void* weight, const void* bias, long long rows, int C,
                                      float eps, int dtype, cudaStream_t stream);
void fused_residual_layernorm_backward(void* dh, void* dweight, void* dbias, void* scratch, const void* dh_out,
                                       const void* dout, const void* h, const void* weight, const void* mean,
                                       const void* rstd, long long rows, int C, int num_partials, int dtype,
                                       cudaStream_t stream);
// rmsnorm.cu (weight, dweight, scratch: null without a gain)
void rmsnorm_forward(void* out, void* rstd, const void* inp, const void* weight, long long rows, int C, float eps,
                     int dtype, cudaStream_t stream);
void rmsnorm_backward(void* dinp, void* dweight, void* scratch, const void* dout, const void* inp, const void* weight,
                      const void* rstd, long long rows, int C, int num_partials, int dtype, cudaStream_t stream);
void fused_residual_rmsnorm_forward(void* h_out, void* out, void* rstd, const void* residual, const void* inp,
                                    const void* weight, long long rows, int C, float eps, int dtype,
                                    cudaStream_t stream);
void fused_residual_rmsnorm_backward(void* dh, void* dweight, void* scratch, const void* dh_out, const void* dout,
                                     const void* h, const void* weight, const void* rstd, long long rows, int C,
                                     int num_partials, int dtype, cudaStream_t stream);
// cross_entropy.cu
void cross_entropy_forward(float* loss, float* stats, float* n_valid, float* row_losses, const void* logits,
                           const long long* targets, long long N, long long V, long long row_stride,
                           long long ignore_index, int dtype, cudaStream_t stream, int reduction = 0,
                           float label_smoothing = 0.0f, float lse_square_scale = 0.0f, float softcap = 0.0f);
void cross_entropy_backward(void* dlogits, const void* logits, const long long* targets, const float* stats,
                            const float* n_valid, const float* dloss, long long N, long long V, long long row_stride,
                            long long ignore_index, int dtype, cudaStream_t stream, int reduction = 0,
                            float label_smoothing = 0.0f, float lse_square_scale = 0.0f, float softcap = 0.0f);
void cross_entropy_fused_forward_backward(float* loss, float* n_valid, float* row_losses, void* logits,
                                          const long long* targets, long long N, long long V, long long row_stride,
                                          long long pad_end, long long ignore_index, float loss_scale, int dtype,
                                          cudaStream_t stream, int reduction = 0, float label_smoothing = 0.0f,
                                          float lse_square_scale = 0.0f, float softcap = 0.0f,
                                          float* stats = nullptr);
void cross_entropy_scale_grad(void* dlogits, const float* dloss, long long N, long long V, long long row_stride,
                              int dtype, cudaStream_t stream, bool per_row = false);
}  // namespace pyllmc

namespace {
template <typename T = void>
T* as_ptr(ptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t as_stream(ptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

PYBIND11_MODULE(PYLLMC_EXTENSION_NAME, m) {
    m.doc() = "pyllmc CUDA kernels (raw-pointer launchers; use pyllmc.ops instead)";
#ifdef PYLLMC_CUDA_SIM
    pyllmc_sim::bind(m);
#endif

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
    m.def("device_error_name", [] {
        int n = 0;
        cudaError_t err = cudaGetDeviceCount(&n);
        cudaGetLastError();
        return err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err));
    }, "The runtime's error name when it sees no device (e.g. 'cudaErrorInsufficientDriver'), else ''.");
    m.def("cuda_driver_version", [] {
        int version = 0;
        if (cudaDriverGetVersion(&version) != cudaSuccess) version = 0;
        cudaGetLastError();
        return version;
    }, "The newest CUDA version the installed driver supports (e.g. 12080), 0 without a driver.");
    m.def("built_archs", [] { return std::string(PYLLMC_CUDA_ARCHS); },
          "The architectures the kernels were compiled for, as PYLLMC_CUDA_ARCH spells them (e.g. '80;90+PTX').");
    m.def("kernel_image_error", [] {
        cudaError_t err = pyllmc::probe_kernel_image();
        return err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    }, "'' when this build's kernels launch on the current device, else the runtime's error (e.g. "
       "'cudaErrorNoKernelImageForDevice: ...').");

    // ---- gelu
    m.def("gelu_forward", [](ptr_t out, ptr_t inp, long long n, int dtype, ptr_t stream) {
        pyllmc::gelu_forward(as_ptr(out), as_ptr(inp), n, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("inp"), py::arg("n"), py::arg("dtype"), py::arg("stream"));
    m.def("gelu_backward", [](ptr_t dinp, ptr_t inp, ptr_t dout, long long n, int dtype, ptr_t stream) {
        pyllmc::gelu_backward(as_ptr(dinp), as_ptr(inp), as_ptr(dout), n, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dinp"), py::arg("inp"), py::arg("dout"), py::arg("n"), py::arg("dtype"),
       py::arg("stream"));

    // ---- swiglu ((rows, cols) operands, the last dim contiguous, each with its row stride in elements) and relu2
    m.def("swiglu_forward", [](ptr_t out, ptr_t a, ptr_t b, long long rows, long long cols, long long out_stride,
                               long long a_stride, long long b_stride, int dtype, ptr_t stream) {
        pyllmc::swiglu_forward(as_ptr(out), as_ptr(a), as_ptr(b), rows, cols, out_stride, a_stride, b_stride, dtype,
                               as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("a"), py::arg("b"), py::arg("rows"), py::arg("cols"),
       py::arg("out_stride"), py::arg("a_stride"), py::arg("b_stride"), py::arg("dtype"), py::arg("stream"));
    m.def("swiglu_backward", [](ptr_t da, ptr_t db, ptr_t dout, ptr_t a, ptr_t b, long long rows, long long cols,
                                long long da_stride, long long db_stride, long long dout_stride, long long a_stride,
                                long long b_stride, int dtype, ptr_t stream) {
        pyllmc::swiglu_backward(as_ptr(da), as_ptr(db), as_ptr(dout), as_ptr(a), as_ptr(b), rows, cols, da_stride,
                                db_stride, dout_stride, a_stride, b_stride, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("da"), py::arg("db"), py::arg("dout"), py::arg("a"), py::arg("b"), py::arg("rows"),
       py::arg("cols"), py::arg("da_stride"), py::arg("db_stride"), py::arg("dout_stride"), py::arg("a_stride"),
       py::arg("b_stride"), py::arg("dtype"), py::arg("stream"));
    m.def("relu2_forward", [](ptr_t out, ptr_t inp, long long n, int dtype, ptr_t stream) {
        pyllmc::relu2_forward(as_ptr(out), as_ptr(inp), n, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("inp"), py::arg("n"), py::arg("dtype"), py::arg("stream"));
    m.def("relu2_backward", [](ptr_t dinp, ptr_t inp, ptr_t dout, long long n, int dtype, ptr_t stream) {
        pyllmc::relu2_backward(as_ptr(dinp), as_ptr(inp), as_ptr(dout), n, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dinp"), py::arg("inp"), py::arg("dout"), py::arg("n"), py::arg("dtype"),
       py::arg("stream"));

    // ---- rope ((B, T, H, D) tensors, the last dim contiguous, strides of B, T, H in elements; cos, sin: float32
    // (table_rows, D / 2) contiguous, rows start..start+T-1 used)
    m.def("rope_forward", [](ptr_t out, ptr_t inp, ptr_t cos, ptr_t sin, long long B, long long T, long long H,
                             long long D, long long out_stride_b, long long out_stride_t, long long out_stride_h,
                             long long inp_stride_b, long long inp_stride_t, long long inp_stride_h, long long start,
                             long long table_rows, int dtype, ptr_t stream) {
        pyllmc::rope_forward(as_ptr(out), as_ptr(inp), as_ptr<const float>(cos), as_ptr<const float>(sin), B, T, H,
                             D, out_stride_b, out_stride_t, out_stride_h, inp_stride_b, inp_stride_t, inp_stride_h,
                             start, table_rows, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("inp"), py::arg("cos"), py::arg("sin"), py::arg("B"), py::arg("T"),
       py::arg("H"), py::arg("D"), py::arg("out_stride_b"), py::arg("out_stride_t"), py::arg("out_stride_h"),
       py::arg("inp_stride_b"), py::arg("inp_stride_t"), py::arg("inp_stride_h"), py::arg("start"),
       py::arg("table_rows"), py::arg("dtype"), py::arg("stream"));
    m.def("rope_backward", [](ptr_t dinp, ptr_t dout, ptr_t cos, ptr_t sin, long long B, long long T, long long H,
                              long long D, long long dinp_stride_b, long long dinp_stride_t, long long dinp_stride_h,
                              long long dout_stride_b, long long dout_stride_t, long long dout_stride_h,
                              long long start, long long table_rows, int dtype, ptr_t stream) {
        pyllmc::rope_backward(as_ptr(dinp), as_ptr(dout), as_ptr<const float>(cos), as_ptr<const float>(sin), B, T,
                              H, D, dinp_stride_b, dinp_stride_t, dinp_stride_h, dout_stride_b, dout_stride_t,
                              dout_stride_h, start, table_rows, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dinp"), py::arg("dout"), py::arg("cos"), py::arg("sin"), py::arg("B"), py::arg("T"),
       py::arg("H"), py::arg("D"), py::arg("dinp_stride_b"), py::arg("dinp_stride_t"), py::arg("dinp_stride_h"),
       py::arg("dout_stride_b"), py::arg("dout_stride_t"), py::arg("dout_stride_h"), py::arg("start"),
       py::arg("table_rows"), py::arg("dtype"), py::arg("stream"));

    // ---- adamw (hyper is a HOST pointer: its rows are copied into the launch's parameters)
    m.def("adamw_step", [](ptr_t tensors, int num_tensors, ptr_t chunk_to_tensor, long long num_chunks,
                           long long chunk_size, ptr_t hyper, int num_hyper_rows, ptr_t stream) {
        pyllmc::adamw_step(as_ptr(tensors), num_tensors, as_ptr(chunk_to_tensor), num_chunks, chunk_size,
                           as_ptr(hyper), num_hyper_rows, as_stream(stream));
    }, py::kw_only(), py::arg("tensors"), py::arg("num_tensors"), py::arg("chunk_to_tensor"), py::arg("num_chunks"),
       py::arg("chunk_size"), py::arg("hyper"), py::arg("num_hyper_rows"), py::arg("stream"));
    // capturable mode: hyper is a DEVICE pointer, read by the kernel when it runs
    m.def("adamw_step_device_hyper", [](ptr_t tensors, int num_tensors, ptr_t chunk_to_tensor, long long num_chunks,
                                        long long chunk_size, ptr_t hyper, int num_hyper_rows, ptr_t stream) {
        pyllmc::adamw_step_device_hyper(as_ptr(tensors), num_tensors, as_ptr(chunk_to_tensor), num_chunks, chunk_size,
                                        as_ptr(hyper), num_hyper_rows, as_stream(stream));
    }, py::kw_only(), py::arg("tensors"), py::arg("num_tensors"), py::arg("chunk_to_tensor"), py::arg("num_chunks"),
       py::arg("chunk_size"), py::arg("hyper"), py::arg("num_hyper_rows"), py::arg("stream"));
    m.def("adamw_chunk_size", &pyllmc::adamw_chunk_size, "Elements per block of adamw_step.");
    m.def("adamw_max_rows", &pyllmc::adamw_max_rows, "Hyperparameter rows one adamw_step launch takes.");

    // ---- attention (causal, scale 1/sqrt(D); lse and delta are float32 (B, H, T) contiguous; strides: a list
    // of the (batch, head, position) element strides of every (B, H or H_kv, T, D) operand, in the launcher's
    // order; k, v, dk, dv have H_kv heads (grouped-query attention, H_kv dividing H; the default -1 means H)
    m.def("attention_forward", [](ptr_t out, ptr_t lse, ptr_t q, ptr_t k, ptr_t v, const std::vector<long long>& strides,
                                  int B, int H, int T, int D, int dtype, ptr_t stream, int H_kv) {
        if (strides.size() != 12) throw std::invalid_argument("pyllmc: attention_forward: strides must hold 12 values");
        pyllmc::attention_forward(as_ptr(out), as_ptr<float>(lse), as_ptr(q), as_ptr(k), as_ptr(v), strides.data(), B,
                                  H, H_kv < 0 ? H : H_kv, T, D, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strides"),
       py::arg("B"), py::arg("H"), py::arg("T"), py::arg("D"), py::arg("dtype"), py::arg("stream"),
       py::arg("H_kv") = -1);
    m.def("attention_backward", [](ptr_t dq, ptr_t dk, ptr_t dv, ptr_t delta, ptr_t dout, ptr_t out, ptr_t lse,
                                   ptr_t q, ptr_t k, ptr_t v, const std::vector<long long>& strides, int B, int H,
                                   int T, int D, int dtype, ptr_t stream, int H_kv) {
        if (strides.size() != 24) throw std::invalid_argument("pyllmc: attention_backward: strides must hold 24 values");
        pyllmc::attention_backward(as_ptr(dq), as_ptr(dk), as_ptr(dv), as_ptr<float>(delta), as_ptr(dout),
                                   as_ptr(out), as_ptr<const float>(lse), as_ptr(q), as_ptr(k), as_ptr(v),
                                   strides.data(), B, H, H_kv < 0 ? H : H_kv, T, D, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("dout"), py::arg("out"),
       py::arg("lse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strides"), py::arg("B"), py::arg("H"),
       py::arg("T"), py::arg("D"), py::arg("dtype"), py::arg("stream"), py::arg("H_kv") = -1);

    // ---- layernorm
    m.def("layernorm_forward", [](ptr_t out, ptr_t mean, ptr_t rstd, ptr_t inp, ptr_t weight, ptr_t bias,
                                  long long rows, int C, float eps, int dtype, ptr_t stream) {
        pyllmc::layernorm_forward(as_ptr(out), as_ptr(mean), as_ptr(rstd), as_ptr(inp), as_ptr(weight), as_ptr(bias),
                                  rows, C, eps, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("inp"), py::arg("weight"),
       py::arg("bias"), py::arg("rows"), py::arg("C"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
    m.def("layernorm_backward", [](ptr_t dinp, ptr_t dweight, ptr_t dbias, ptr_t scratch, ptr_t dout, ptr_t inp,
                                   ptr_t weight, ptr_t mean, ptr_t rstd, long long rows, int C, int num_partials,
                                   int dtype, ptr_t stream) {
        pyllmc::layernorm_backward(as_ptr(dinp), as_ptr(dweight), as_ptr(dbias), as_ptr(scratch), as_ptr(dout),
                                   as_ptr(inp), as_ptr(weight), as_ptr(mean), as_ptr(rstd), rows, C, num_partials,
                                   dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dinp"), py::arg("dweight"), py::arg("dbias"), py::arg("scratch"), py::arg("dout"),
       py::arg("inp"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("C"),
       py::arg("num_partials"), py::arg("dtype"), py::arg("stream"));
    m.def("fused_residual_layernorm_forward", [](ptr_t h_out, ptr_t out, ptr_t mean, ptr_t rstd, ptr_t residual,
                                                 ptr_t inp, ptr_t weight, ptr_t bias, long long rows, int C,
                                                 float eps, int dtype, ptr_t stream) {
        pyllmc::fused_residual_layernorm_forward(as_ptr(h_out), as_ptr(out), as_ptr(mean), as_ptr(rstd),
                                                 as_ptr(residual), as_ptr(inp), as_ptr(weight), as_ptr(bias), rows, C,
                                                 eps, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("h_out"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("residual"),
       py::arg("inp"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("C"), py::arg("eps"),
       py::arg("dtype"), py::arg("stream"));
    m.def("fused_residual_layernorm_backward", [](ptr_t dh, ptr_t dweight, ptr_t dbias, ptr_t scratch, ptr_t dh_out,
                                                  ptr_t dout, ptr_t h, ptr_t weight, ptr_t mean, ptr_t rstd,
                                                  long long rows, int C, int num_partials, int dtype, ptr_t stream) {
        pyllmc::fused_residual_layernorm_backward(as_ptr(dh), as_ptr(dweight), as_ptr(dbias), as_ptr(scratch),
                                                  as_ptr(dh_out), as_ptr(dout), as_ptr(h), as_ptr(weight),
                                                  as_ptr(mean), as_ptr(rstd), rows, C, num_partials, dtype,
                                                  as_stream(stream));
    }, py::kw_only(), py::arg("dh"), py::arg("dweight"), py::arg("dbias"), py::arg("scratch"), py::arg("dh_out"),
       py::arg("dout"), py::arg("h"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rows"),
       py::arg("C"), py::arg("num_partials"), py::arg("dtype"), py::arg("stream"));

    // ---- rmsnorm (weight, dweight, scratch: 0 without a gain)
    m.def("rmsnorm_forward", [](ptr_t out, ptr_t rstd, ptr_t inp, ptr_t weight, long long rows, int C, float eps,
                                int dtype, ptr_t stream) {
        pyllmc::rmsnorm_forward(as_ptr(out), as_ptr(rstd), as_ptr(inp), as_ptr(weight), rows, C, eps, dtype,
                                as_stream(stream));
    }, py::kw_only(), py::arg("out"), py::arg("rstd"), py::arg("inp"), py::arg("weight"), py::arg("rows"),
       py::arg("C"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
    m.def("rmsnorm_backward", [](ptr_t dinp, ptr_t dweight, ptr_t scratch, ptr_t dout, ptr_t inp, ptr_t weight,
                                 ptr_t rstd, long long rows, int C, int num_partials, int dtype, ptr_t stream) {
        pyllmc::rmsnorm_backward(as_ptr(dinp), as_ptr(dweight), as_ptr(scratch), as_ptr(dout), as_ptr(inp),
                                 as_ptr(weight), as_ptr(rstd), rows, C, num_partials, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dinp"), py::arg("dweight"), py::arg("scratch"), py::arg("dout"), py::arg("inp"),
       py::arg("weight"), py::arg("rstd"), py::arg("rows"), py::arg("C"), py::arg("num_partials"), py::arg("dtype"),
       py::arg("stream"));
    m.def("fused_residual_rmsnorm_forward", [](ptr_t h_out, ptr_t out, ptr_t rstd, ptr_t residual, ptr_t inp,
                                               ptr_t weight, long long rows, int C, float eps, int dtype,
                                               ptr_t stream) {
        pyllmc::fused_residual_rmsnorm_forward(as_ptr(h_out), as_ptr(out), as_ptr(rstd), as_ptr(residual),
                                               as_ptr(inp), as_ptr(weight), rows, C, eps, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("h_out"), py::arg("out"), py::arg("rstd"), py::arg("residual"), py::arg("inp"),
       py::arg("weight"), py::arg("rows"), py::arg("C"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
    m.def("fused_residual_rmsnorm_backward", [](ptr_t dh, ptr_t dweight, ptr_t scratch, ptr_t dh_out, ptr_t dout,
                                                ptr_t h, ptr_t weight, ptr_t rstd, long long rows, int C,
                                                int num_partials, int dtype, ptr_t stream) {
        pyllmc::fused_residual_rmsnorm_backward(as_ptr(dh), as_ptr(dweight), as_ptr(scratch), as_ptr(dh_out),
                                                as_ptr(dout), as_ptr(h), as_ptr(weight), as_ptr(rstd), rows, C,
                                                num_partials, dtype, as_stream(stream));
    }, py::kw_only(), py::arg("dh"), py::arg("dweight"), py::arg("scratch"), py::arg("dh_out"), py::arg("dout"),
       py::arg("h"), py::arg("weight"), py::arg("rstd"), py::arg("rows"), py::arg("C"), py::arg("num_partials"),
       py::arg("dtype"), py::arg("stream"));

    // ---- cross_entropy
    m.def("cross_entropy_forward", [](ptr_t loss, ptr_t stats, ptr_t n_valid, ptr_t row_losses, ptr_t logits,
                                      ptr_t targets, long long N, long long V, long long row_stride,
                                      long long ignore_index, int dtype, ptr_t stream, int reduction,
                                      float label_smoothing, float lse_square_scale, float softcap) {
        pyllmc::cross_entropy_forward(as_ptr<float>(loss), as_ptr<float>(stats), as_ptr<float>(n_valid),
                                      as_ptr<float>(row_losses), as_ptr(logits), as_ptr<const long long>(targets), N,
                                      V, row_stride, ignore_index, dtype, as_stream(stream), reduction,
                                      label_smoothing, lse_square_scale, softcap);
    }, py::kw_only(), py::arg("loss"), py::arg("stats"), py::arg("n_valid"), py::arg("row_losses"), py::arg("logits"),
       py::arg("targets"), py::arg("N"), py::arg("V"), py::arg("row_stride"), py::arg("ignore_index"), py::arg("dtype"),
       py::arg("stream"), py::arg("reduction") = 0, py::arg("label_smoothing") = 0.0f,
       py::arg("lse_square_scale") = 0.0f, py::arg("softcap") = 0.0f);
    m.def("cross_entropy_backward", [](ptr_t dlogits, ptr_t logits, ptr_t targets, ptr_t stats, ptr_t n_valid,
                                       ptr_t dloss, long long N, long long V, long long row_stride,
                                       long long ignore_index, int dtype, ptr_t stream, int reduction,
                                       float label_smoothing, float lse_square_scale, float softcap) {
        pyllmc::cross_entropy_backward(as_ptr(dlogits), as_ptr(logits), as_ptr<const long long>(targets),
                                       as_ptr<const float>(stats), as_ptr<const float>(n_valid),
                                       as_ptr<const float>(dloss), N, V, row_stride, ignore_index, dtype,
                                       as_stream(stream), reduction, label_smoothing, lse_square_scale, softcap);
    }, py::kw_only(), py::arg("dlogits"), py::arg("logits"), py::arg("targets"), py::arg("stats"), py::arg("n_valid"),
       py::arg("dloss"), py::arg("N"), py::arg("V"), py::arg("row_stride"), py::arg("ignore_index"), py::arg("dtype"),
       py::arg("stream"), py::arg("reduction") = 0, py::arg("label_smoothing") = 0.0f,
       py::arg("lse_square_scale") = 0.0f, py::arg("softcap") = 0.0f);
    m.def("cross_entropy_fused_forward_backward", [](ptr_t loss, ptr_t n_valid, ptr_t row_losses, ptr_t logits,
                                                     ptr_t targets, long long N, long long V, long long row_stride,
                                                     long long pad_end, long long ignore_index, float loss_scale,
                                                     int dtype, ptr_t stream, int reduction, float label_smoothing,
                                                     float lse_square_scale, float softcap, ptr_t stats) {
        pyllmc::cross_entropy_fused_forward_backward(as_ptr<float>(loss), as_ptr<float>(n_valid),
                                                     as_ptr<float>(row_losses), as_ptr(logits),
                                                     as_ptr<const long long>(targets), N, V, row_stride, pad_end,
                                                     ignore_index, loss_scale, dtype, as_stream(stream), reduction,
                                                     label_smoothing, lse_square_scale, softcap,
                                                     as_ptr<float>(stats));
    }, py::kw_only(), py::arg("loss"), py::arg("n_valid"), py::arg("row_losses"), py::arg("logits"), py::arg("targets"),
       py::arg("N"), py::arg("V"), py::arg("row_stride"), py::arg("pad_end"), py::arg("ignore_index"),
       py::arg("loss_scale"), py::arg("dtype"), py::arg("stream"), py::arg("reduction") = 0,
       py::arg("label_smoothing") = 0.0f, py::arg("lse_square_scale") = 0.0f, py::arg("softcap") = 0.0f,
       py::arg("stats") = 0);
    m.def("cross_entropy_scale_grad", [](ptr_t dlogits, ptr_t dloss, long long N, long long V, long long row_stride,
                                         int dtype, ptr_t stream, bool per_row) {
        pyllmc::cross_entropy_scale_grad(as_ptr(dlogits), as_ptr<const float>(dloss), N, V, row_stride, dtype,
                                         as_stream(stream), per_row);
    }, py::kw_only(), py::arg("dlogits"), py::arg("dloss"), py::arg("N"), py::arg("V"), py::arg("row_stride"),
       py::arg("dtype"), py::arg("stream"), py::arg("per_row") = false);
}
