// module.cpp: the simulator's controls and self-tests, added to pyllmc._C_sim (bindings.cpp
// calls pyllmc_sim::bind when built with PYLLMC_CUDA_SIM). Pointers are CPU addresses.
// As in bindings.cpp, every function of more than one argument is keyword-only (py::kw_only()),
// so that swapped pointers or sizes raise TypeError instead of running.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sim_internal.h"

namespace py = pybind11;
using ptr_t = std::uintptr_t;

namespace cuda_sim_selftest {  // selftest.cu
void mma(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16);
void ldmatrix(uint32_t* out, const uint16_t* image, int image_elems, const int* offsets, int matrices, bool trans);
void cp_async(unsigned char* after_first, unsigned char* after_all, const unsigned char* src);
void shfl(int* out, const int* in, int mode, int b, int width, unsigned mask);
void vote(unsigned* out, const int* predicates, unsigned mask);
void syncthreads_count(int* out, const int* predicates, int threads);
void order(int* order_out, int* counter, int blocks, int threads);
void static_shared(float* out);
void misuse(const char* which, void* out, long long arg);
}  // namespace cuda_sim_selftest

namespace pyllmc_sim {

template <typename T = void>
T* as_ptr(ptr_t p) { return reinterpret_cast<T*>(p); }

void bind(py::module_& m) {
    using cuda_sim::options;
    m.def("sim_set_schedule", [](int schedule, unsigned long long seed, bool greedy) {
        if (schedule < 0 || schedule > 2) throw std::invalid_argument("schedule must be 0, 1 or 2");
        options().schedule = static_cast<cuda_sim::Schedule>(schedule);
        options().seed = seed;
        options().greedy = greedy;
    }, py::kw_only(), py::arg("schedule"), py::arg("seed"), py::arg("greedy"));
    m.def("sim_set_cp_async", [](int mode) {
        if (mode < 0 || mode > 1) throw std::invalid_argument("cp_async mode must be 0 or 1");
        options().cp_async = static_cast<cuda_sim::CpAsyncMode>(mode);
    }, py::arg("mode"));
    m.def("sim_get_options", [] {
        py::dict d;
        d["schedule"] = static_cast<int>(options().schedule);
        d["seed"] = options().seed;
        d["greedy"] = options().greedy;
        d["cp_async"] = static_cast<int>(options().cp_async);
        d["multiprocessor_count"] = options().multiprocessor_count;
        return d;
    });
    m.def("sim_device_names", [] {
        int count = 0;
        const cuda_sim::DeviceProfile* profiles = cuda_sim::device_profiles(&count);
        py::list names;
        for (int i = 0; i < count; ++i) names.append(profiles[i].name);
        return names;
    });
    m.def("sim_set_device", [](const std::string& name) {
        if (!cuda_sim::set_device(name)) {
            int count = 0;
            const cuda_sim::DeviceProfile* profiles = cuda_sim::device_profiles(&count);
            std::string known;
            for (int i = 0; i < count; ++i) known += std::string(i ? ", " : "") + profiles[i].name;
            throw std::invalid_argument("unknown simulated device " + name + "; known: " + known);
        }
    }, py::arg("name"));
    m.def("sim_device", [] {
        const cuda_sim::DeviceProfile& p = cuda_sim::device();
        py::dict d;
        d["name"] = p.name;
        d["gpus"] = p.gpus;
        d["compute_capability"] = py::make_tuple(p.major, p.minor);
        d["smem_per_block"] = p.smem_per_block;
        d["smem_per_block_optin"] = p.smem_per_block_optin;
        d["smem_per_sm"] = p.smem_per_sm;
        d["regs_per_sm"] = p.regs_per_sm;
        d["regs_per_block"] = p.regs_per_block;
        d["max_threads_per_block"] = p.max_threads_per_block;
        d["max_threads_per_sm"] = p.max_threads_per_sm;
        d["full_multiprocessor_count"] = p.multiprocessor_count;
        d["multiprocessor_count"] = options().multiprocessor_count;
        return d;
    });
    m.def("sim_device_attribute", [](int attr) {
        int value = 0;
        if (cudaDeviceGetAttribute(&value, static_cast<cudaDeviceAttr>(attr), 0) != cudaSuccess)
            throw std::invalid_argument("cudaDeviceGetAttribute: attribute " + std::to_string(attr) + " not simulated");
        return value;
    }, py::arg("attr"));
    m.def("sim_stats", [] {
        const cuda_sim::Stats& s = cuda_sim::stats();
        py::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["threads"] = s.threads;
        d["barriers"] = s.barriers;
        d["collectives"] = s.collectives;
        d["switches"] = s.switches;
        return d;
    });
    m.def("sim_reset_stats", [] {
        cuda_sim::stats() = cuda_sim::Stats{};
        cuda_sim::launch_log().clear();
    });
    m.def("sim_launches", [] {
        py::list out;
        for (const cuda_sim::LaunchRecord& r : cuda_sim::launch_log()) {
            py::dict d;
            d["name"] = r.name;
            d["smem"] = r.smem;
            d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
            d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
            out.append(d);
        }
        return out;
    });
    m.def("sim_info", [] {
        py::dict d;
        d["fibers"] = CUDA_SIM_FCONTEXT ? "fcontext" : "ucontext";
#if defined(__SANITIZE_ADDRESS__)
        d["sanitize"] = true;
#else
        d["sanitize"] = false;
#endif
        return d;
    });

    // ---- self-tests of the simulator (tests/test_cuda_sim.py)
    namespace st = cuda_sim_selftest;
    m.def("selftest_mma", [](ptr_t d, ptr_t a, ptr_t b, ptr_t c, bool bf16) {
        st::mma(as_ptr<float>(d), as_ptr<const uint32_t>(a), as_ptr<const uint32_t>(b), as_ptr<const float>(c), bf16);
    }, py::kw_only(), py::arg("d"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("bf16"));
    m.def("selftest_ldmatrix", [](ptr_t out, ptr_t image, int image_elems, ptr_t offsets, int matrices, bool trans) {
        st::ldmatrix(as_ptr<uint32_t>(out), as_ptr<const uint16_t>(image), image_elems, as_ptr<const int>(offsets),
                     matrices, trans);
    }, py::kw_only(), py::arg("out"), py::arg("image"), py::arg("image_elems"), py::arg("offsets"), py::arg("matrices"),
       py::arg("trans"));
    m.def("selftest_cp_async", [](ptr_t after_first, ptr_t after_all, ptr_t src) {
        st::cp_async(as_ptr<unsigned char>(after_first), as_ptr<unsigned char>(after_all),
                     as_ptr<const unsigned char>(src));
    }, py::kw_only(), py::arg("after_first"), py::arg("after_all"), py::arg("src"));
    // b is the shuffle's second operand: srcLane (mode 0, __shfl_sync), delta (1 up, 2 down) or laneMask (3 xor)
    m.def("selftest_shfl", [](ptr_t out, ptr_t values, int mode, int b, int width, unsigned mask) {
        st::shfl(as_ptr<int>(out), as_ptr<const int>(values), mode, b, width, mask);
    }, py::kw_only(), py::arg("out"), py::arg("values"), py::arg("mode"), py::arg("b"), py::arg("width"),
       py::arg("mask"));
    m.def("selftest_vote", [](ptr_t out, ptr_t predicates, unsigned mask) {
        st::vote(as_ptr<unsigned>(out), as_ptr<const int>(predicates), mask);
    }, py::kw_only(), py::arg("out"), py::arg("predicates"), py::arg("mask"));
    m.def("selftest_syncthreads_count", [](ptr_t out, ptr_t predicates, int threads) {
        st::syncthreads_count(as_ptr<int>(out), as_ptr<const int>(predicates), threads);
    }, py::kw_only(), py::arg("out"), py::arg("predicates"), py::arg("threads"));
    m.def("selftest_order", [](ptr_t order, ptr_t counter, int blocks, int threads) {
        st::order(as_ptr<int>(order), as_ptr<int>(counter), blocks, threads);
    }, py::kw_only(), py::arg("order"), py::arg("counter"), py::arg("blocks"), py::arg("threads"));
    m.def("selftest_static_shared", [](ptr_t out) { st::static_shared(as_ptr<float>(out)); }, py::arg("out"));
    m.def("selftest_misuse", [](const std::string& which, ptr_t out, long long arg) {
        st::misuse(which.c_str(), as_ptr(out), arg);
    }, py::kw_only(), py::arg("which"), py::arg("out"), py::arg("arg") = 0);
}

}  // namespace pyllmc_sim
