// counters.cpp: the GPU's memory counters, counted on the simulator (see counters.h for how the
// accesses arrive, pyllmc/sim_counters.py for the report).
//
// The model, per block, at its end:
// - Warp requests. Between two synchronization points the lanes of a warp run one after another,
//   so the k-th time lane l executes an access site is lane l's part of the warp's k-th request of
//   that site: request (site, warp, k) gathers one access of each lane that got there.
// - Global memory: a request costs the distinct 32-byte sectors its lanes touch (Nsight Compute's
//   l1tex__t_sectors_..._ld/st per request); the least it could cost is ceil(unique bytes / 32).
// - Shared memory: 32 banks of 4 bytes. A request is served in phases of 128 bytes: 32 lanes for
//   accesses up to 4 bytes, 16 for 8-byte and 8 for 16-byte accesses; within a phase a bank serves
//   one 4-byte word per wavefront (lanes reading the same word share it). Wavefronts against
//   phases: an n-way conflict costs n times the phases.
// - Unique bytes: the global bytes a launch reads (writes) at least once, the least DRAM traffic it
//   can have; summed per block, the least L2 traffic with a perfect L1 and no sharing across blocks.
// These are counts of the source's accesses as compiled for the CPU: no caches, no timing, and
// nvcc's own vectorization and instruction selection are not seen.
#include "counters.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <vector>

namespace cuda_sim {

bool g_counting = false;

namespace {

constexpr std::uint64_t kSharedSpace = 1, kWrite = 2;

struct Event {
    std::uint64_t key;      // site << 2 | space | write
    std::uint32_t thread;   // linear index in the block
    std::uint32_t k;        // this thread's k-th execution of the site
    std::uint64_t address;  // global: the address; shared: the shared-window offset
    std::uint32_t size;
};

struct SiteStats {
    const void* site = nullptr;
    bool shared = false, write = false;
    const char* file = nullptr;  // emulated instructions only; else the site is a code address
    int line = 0;
    const char* what = nullptr;
    unsigned width = 0;  // widest access
    std::uint64_t accesses = 0, bytes = 0, requests = 0;
    std::uint64_t sectors = 0, ideal_sectors = 0;        // global
    std::uint64_t wavefronts = 0, ideal_wavefronts = 0;  // shared
};

using ByteMap = std::unordered_map<std::uint64_t, std::uint32_t>;  // 32-byte sector -> bytes touched

struct LaunchStats {
    std::string name;
    std::uint64_t blocks = 0, threads_per_block = 0;
    std::unordered_map<std::uint64_t, SiteStats> sites;
    std::vector<std::uint64_t> site_order;  // first appearance
    ByteMap read, written;                  // the whole launch
    std::uint64_t block_read_bytes = 0, block_written_bytes = 0;  // per block, summed
};

struct State {
    std::vector<LaunchStats> launches;
    LaunchStats* launch = nullptr;
    std::vector<Event> events;  // this block's
    std::unordered_map<std::uint64_t, std::vector<std::uint32_t>> executions;  // key -> per-thread count
    ByteMap block_read, block_written;
    // the running thread's view, refreshed when the running thread changes
    const ThreadRegs* regs = nullptr;
    bool valid = false;
    CountersView view;
    // memory that is never traffic: the simulator's image (its globals) and the launching thread's stack
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> ignored;
    std::uintptr_t host_stack_lo = 0, host_stack_hi = 0;
    std::uintptr_t module_base = 0;
};

State& state() {
    static State s;
    return s;
}

int collect_image(struct dl_phdr_info* info, std::size_t, void* data) {
    State& s = *static_cast<State*>(data);
    const auto self = reinterpret_cast<std::uintptr_t>(&state);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
        if (self >= lo && self < hi) {  // our own object: keep all its segments
            for (int j = 0; j < info->dlpi_phnum; ++j) {
                const ElfW(Phdr)& q = info->dlpi_phdr[j];
                if (q.p_type == PT_LOAD)
                    s.ignored.emplace_back(info->dlpi_addr + q.p_vaddr, info->dlpi_addr + q.p_vaddr + q.p_memsz);
            }
            s.module_base = info->dlpi_addr;
            return 1;
        }
    }
    return 0;
}

void add_bytes(ByteMap& map, std::uint64_t address, unsigned size) {
    while (size > 0) {
        const std::uint64_t sector = address >> 5;
        const unsigned first = address & 31, n = std::min<unsigned>(size, 32 - first);
        const std::uint32_t bits = n == 32 ? 0xffffffffu : (((1u << n) - 1u) << first);
        map[sector] |= bits;
        address += n;
        size -= n;
    }
}

std::uint64_t count_bytes(const ByteMap& map) {
    std::uint64_t n = 0;
    for (const auto& [sector, bits] : map) n += __builtin_popcount(bits);
    return n;
}

// One warp request of a global site: distinct sectors, and the least it could touch.
void count_global(const Event* first, const Event* last, SiteStats& st) {
    std::vector<std::uint64_t> sectors;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (const Event* e = first; e != last; ++e) {
        for (std::uint64_t s = e->address >> 5; s <= (e->address + e->size - 1) >> 5; ++s) sectors.push_back(s);
        ranges.emplace_back(e->address, e->address + e->size);
    }
    std::sort(sectors.begin(), sectors.end());
    st.sectors += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    std::sort(ranges.begin(), ranges.end());
    std::uint64_t unique = 0, end = 0;
    for (const auto& [lo, hi] : ranges) {
        const std::uint64_t from = std::max(lo, end);
        if (hi > from) unique += hi - from;
        end = std::max(end, hi);
    }
    st.ideal_sectors += (unique + 31) / 32;
}

// One warp request of a shared site: wavefronts (the most distinct words any bank serves, per
// phase) and phases.
void count_shared(const Event* first, const Event* last, SiteStats& st) {
    unsigned width = 0;
    for (const Event* e = first; e != last; ++e) width = std::max(width, e->size);
    const unsigned lanes_per_phase = width >= 16 ? 8 : width == 8 ? 16 : 32;
    std::vector<std::pair<std::uint32_t, std::uint64_t>> words[4];  // per phase: (bank, word)
    for (const Event* e = first; e != last; ++e) {
        auto& phase = words[((e->thread % 32) / lanes_per_phase) % 4];
        for (std::uint64_t w = e->address >> 2; w <= (e->address + e->size - 1) >> 2; ++w)
            phase.emplace_back(static_cast<std::uint32_t>(w % 32), w);
    }
    for (auto& phase : words) {
        if (phase.empty()) continue;
        std::sort(phase.begin(), phase.end());
        phase.erase(std::unique(phase.begin(), phase.end()), phase.end());
        std::uint64_t most = 0, run = 0;
        for (std::size_t i = 0; i < phase.size(); ++i) {
            run = (i > 0 && phase[i].first == phase[i - 1].first) ? run + 1 : 1;
            most = std::max(most, run);
        }
        st.wavefronts += most;
        st.ideal_wavefronts += 1;
    }
}

bool refresh(State& s) {
    s.regs = g_regs;
    s.valid = counters_view(&s.view);
    return s.valid;
}

void json_string(std::string& out, const char* text) {
    out += '"';
    for (const char* p = text ? text : ""; *p; ++p) {
        if (*p == '"' || *p == '\\') out += '\\';
        if (static_cast<unsigned char>(*p) >= 0x20) out += *p;
    }
    out += '"';
}

}  // namespace

void counters_launch_begin(const char* name) {
    if (!g_counting) return;
    State& s = state();
    if (s.module_base == 0) dl_iterate_phdr(&collect_image, &s);
    // The launch's parameters sit in the launching thread's frame; every thread copies them.
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void* base = nullptr;
        std::size_t size = 0;
        pthread_attr_getstack(&attr, &base, &size);
        pthread_attr_destroy(&attr);
        const auto lo = reinterpret_cast<std::uintptr_t>(base);
        s.host_stack_lo = lo;
        s.host_stack_hi = lo + size;
    }
    s.launches.emplace_back();
    s.launch = &s.launches.back();
    s.launch->name = name;
    s.regs = nullptr;
}

void counters_record(const void* site, const void* address, unsigned size, bool write, const char* file, int line,
                     const char* what) {
    State& s = state();
    if (s.launch == nullptr || size == 0) return;
    if (g_regs != s.regs && !refresh(s)) return;
    if (!s.valid) return;
    const CountersView& v = s.view;
    const auto* p = static_cast<const unsigned char*>(address);
    if (p >= v.stack_lo && p < v.stack_hi) return;  // the thread's own locals: registers on a GPU
    if (p >= v.threads_lo && p < v.threads_hi) return;
    std::uint64_t shared = 0, where;
    if (p >= v.arena && p < v.arena + v.arena_bytes) {
        shared = kSharedSpace;
        where = static_cast<std::uint64_t>(p - v.arena);
    } else if (p >= v.dynamic && p < v.dynamic + v.dynamic_bytes) {
        shared = kSharedSpace;
        where = 0x10000 + static_cast<std::uint64_t>(p - v.dynamic);
    } else {
        const auto a = reinterpret_cast<std::uintptr_t>(p);
        if (a >= s.host_stack_lo && a < s.host_stack_hi) return;
        for (const auto& [lo, hi] : s.ignored)
            if (a >= lo && a < hi) return;
        where = a;
        add_bytes(write ? s.block_written : s.block_read, a, size);
        add_bytes(write ? s.launch->written : s.launch->read, a, size);
    }
    const std::uint64_t key = (reinterpret_cast<std::uintptr_t>(site) << 2) | shared | (write ? kWrite : 0);
    auto& counts = s.executions[key];
    if (counts.size() <= static_cast<std::size_t>(v.linear)) counts.resize(v.linear + 1, 0);
    s.events.push_back(Event{key, static_cast<std::uint32_t>(v.linear), counts[v.linear]++, where, size});
    auto [it, fresh] = s.launch->sites.try_emplace(key);
    SiteStats& st = it->second;
    if (fresh) {
        st.site = site;
        st.shared = shared != 0;
        st.write = write;
        st.file = file;
        st.line = line;
        st.what = what;
        s.launch->site_order.push_back(key);
    }
    st.width = std::max(st.width, size);
    st.accesses += 1;
    st.bytes += size;
}

void counters_block_end() {
    if (!g_counting) return;
    State& s = state();
    if (s.launch == nullptr) return;
    LaunchStats& l = *s.launch;
    l.blocks += 1;
    l.threads_per_block = static_cast<std::uint64_t>(g_block_dim.x) * g_block_dim.y * g_block_dim.z;
    auto& ev = s.events;
    std::sort(ev.begin(), ev.end(), [](const Event& a, const Event& b) {
        if (a.key != b.key) return a.key < b.key;
        if (a.thread / 32 != b.thread / 32) return a.thread / 32 < b.thread / 32;
        if (a.k != b.k) return a.k < b.k;
        return a.thread < b.thread;
    });
    for (std::size_t i = 0; i < ev.size();) {
        std::size_t j = i + 1;
        while (j < ev.size() && ev[j].key == ev[i].key && ev[j].thread / 32 == ev[i].thread / 32 && ev[j].k == ev[i].k) ++j;
        SiteStats& st = l.sites[ev[i].key];
        st.requests += 1;
        if (st.shared) count_shared(&ev[i], &ev[j], st);
        else count_global(&ev[i], &ev[j], st);
        i = j;
    }
    ev.clear();
    s.executions.clear();
    l.block_read_bytes += count_bytes(s.block_read);
    l.block_written_bytes += count_bytes(s.block_written);
    s.block_read.clear();
    s.block_written.clear();
    s.regs = nullptr;  // the next block may place shared memory elsewhere
}

void counters_launch_end() {
    if (!g_counting) return;
    State& s = state();
    s.launch = nullptr;
    s.events.clear();
    s.executions.clear();
    s.regs = nullptr;
}

}  // namespace cuda_sim

// ----------------------------------------------------------------------------
// ThreadSanitizer's entry points, called by the instrumented kernel code (the "counters" build).
// The return address identifies the access site.

using cuda_sim::counters_record;
using cuda_sim::g_counting;

#define CUDA_SIM_TSAN_ACCESS(name, size, write)                                              \
    extern "C" void name(void* address) {                                                    \
        if (g_counting) counters_record(__builtin_return_address(0), address, size, write); \
    }
#define CUDA_SIM_TSAN_SIZES(prefix, write)         \
    CUDA_SIM_TSAN_ACCESS(prefix##1, 1, write)      \
    CUDA_SIM_TSAN_ACCESS(prefix##2, 2, write)      \
    CUDA_SIM_TSAN_ACCESS(prefix##4, 4, write)      \
    CUDA_SIM_TSAN_ACCESS(prefix##8, 8, write)      \
    CUDA_SIM_TSAN_ACCESS(prefix##16, 16, write)
CUDA_SIM_TSAN_SIZES(__tsan_read, false)
CUDA_SIM_TSAN_SIZES(__tsan_write, true)
CUDA_SIM_TSAN_SIZES(__tsan_unaligned_read, false)
CUDA_SIM_TSAN_SIZES(__tsan_unaligned_write, true)
CUDA_SIM_TSAN_SIZES(__tsan_volatile_read, false)
CUDA_SIM_TSAN_SIZES(__tsan_volatile_write, true)
#undef CUDA_SIM_TSAN_SIZES
#undef CUDA_SIM_TSAN_ACCESS

extern "C" {
void __tsan_read_range(void* address, unsigned long size) {
    if (g_counting) counters_record(__builtin_return_address(0), address, static_cast<unsigned>(size), false);
}
void __tsan_write_range(void* address, unsigned long size) {
    if (g_counting) counters_record(__builtin_return_address(0), address, static_cast<unsigned>(size), true);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

// ---- controls and results, for pyllmc/sim_counters.py (through ctypes: no binding needed)

__attribute__((visibility("default"))) void pyllmc_counters_enable(int on) { g_counting = on != 0; }

__attribute__((visibility("default"))) void pyllmc_counters_reset() {
    auto& s = cuda_sim::state();
    s.launches.clear();
    s.launch = nullptr;
}

// Every launch since the reset, as JSON; sites of kernel code are offsets into this module (for
// addr2line), emulated instructions carry their file and line. The text lives until the next call.
__attribute__((visibility("default"))) const char* pyllmc_counters_json() {
    static std::string out;
    auto& s = cuda_sim::state();
    if (s.module_base == 0) dl_iterate_phdr(&cuda_sim::collect_image, &s);
    out = "[";
    char buf[512];
    for (std::size_t i = 0; i < s.launches.size(); ++i) {
        const auto& l = s.launches[i];
        out += i ? ",\n{" : "{";
        out += "\"name\":";
        cuda_sim::json_string(out, l.name.c_str());
        std::snprintf(buf, sizeof buf,
                      ",\"blocks\":%llu,\"threads_per_block\":%llu,\"unique_read\":%llu,\"unique_written\":%llu,"
                      "\"block_read\":%llu,\"block_written\":%llu,\"sites\":[",
                      (unsigned long long)l.blocks, (unsigned long long)l.threads_per_block,
                      (unsigned long long)cuda_sim::count_bytes(l.read),
                      (unsigned long long)cuda_sim::count_bytes(l.written), (unsigned long long)l.block_read_bytes,
                      (unsigned long long)l.block_written_bytes);
        out += buf;
        bool first = true;
        for (const auto key : l.site_order) {
            const auto& st = l.sites.at(key);
            out += first ? "{" : ",{";
            first = false;
            const auto site = reinterpret_cast<std::uintptr_t>(st.site);
            std::snprintf(buf, sizeof buf,
                          "\"offset\":%llu,\"line\":%d,\"space\":\"%s\",\"write\":%s,\"width\":%u,\"accesses\":%llu,"
                          "\"bytes\":%llu,\"requests\":%llu,\"sectors\":%llu,\"ideal_sectors\":%llu,"
                          "\"wavefronts\":%llu,\"ideal_wavefronts\":%llu,\"file\":",
                          st.file ? 0ull : (unsigned long long)(site - s.module_base), st.line,
                          st.shared ? "shared" : "global", st.write ? "true" : "false", st.width,
                          (unsigned long long)st.accesses, (unsigned long long)st.bytes,
                          (unsigned long long)st.requests, (unsigned long long)st.sectors,
                          (unsigned long long)st.ideal_sectors, (unsigned long long)st.wavefronts,
                          (unsigned long long)st.ideal_wavefronts);
            out += buf;
            cuda_sim::json_string(out, st.file);
            out += ",\"what\":";
            cuda_sim::json_string(out, st.what);
            out += "}";
        }
        out += "]}";
    }
    out += "]";
    return out.c_str();
}
}
