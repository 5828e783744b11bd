// runtime.cpp: the simulator's scheduler. Blocks run one after another; a block's threads are
// fibers that run until they reach a barrier, a warp collective or their end, in the order the
// schedule gives (forward, reversed, or seeded random warps and lanes). Also: the launch checks,
// shared memory, the fault handler that turns a bad access into a launch error, and the CUDA
// runtime API functions that the launchers and bindings call.
#include "sim_internal.h"
#include "counters.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if CUDA_SIM_FCONTEXT
#include <boost/context/detail/fcontext.hpp>
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuda_sim {

namespace {

constexpr std::size_t kStackBytes = 256 * 1024;     // per simulated thread, plus a guard page
constexpr std::size_t kStaticSharedBytes = 48 * 1024;  // CUDA's limit on static __shared__
constexpr std::size_t kDefaultDynamicLimit = 48 * 1024;
constexpr std::uint32_t kDynamicSharedOffset = 0x10000;  // shared addresses: static arena, then dynamic

// See DeviceProfile (sim_internal.h) for the source of these numbers.
constexpr DeviceProfile kProfiles[] = {
    // name     parts                        cc     smem/block opt-in   smem/SM  regs/SM regs/block thr/block thr/SM SMs
    {"sm_75", "T4, RTX 2080 (Turing)", 7, 5, 49152, 65536, 65536, 65536, 65536, 1024, 1024, 40},
    {"sm_80", "A100 (Ampere)", 8, 0, 49152, 166912, 167936, 65536, 65536, 1024, 2048, 108},
    {"sm_86", "RTX 3090, A10 (Ampere)", 8, 6, 49152, 101376, 102400, 65536, 65536, 1024, 1536, 82},
    {"sm_89", "RTX 4090, L4 (Ada)", 8, 9, 49152, 101376, 102400, 65536, 65536, 1024, 1536, 128},
    {"sm_90", "H100, H200 (Hopper)", 9, 0, 49152, 232448, 233472, 65536, 65536, 1024, 2048, 132},
    {"sm_100", "B200 (Blackwell)", 10, 0, 49152, 232448, 233472, 65536, 65536, 1024, 2048, 148},
    {"sm_120", "RTX 5090 (Blackwell)", 12, 0, 49152, 101376, 102400, 65536, 65536, 1024, 1536, 170},
};
constexpr int kDefaultProfile = 4;  // sm_90
const DeviceProfile* g_device = &kProfiles[kDefaultProfile];

std::size_t page_size() {
    static const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    return page;
}
std::size_t round_up(std::size_t n, std::size_t m) { return (n + m - 1) / m * m; }

// ---- memory with a guard page right after the usable bytes

struct GuardedRegion {
    unsigned char* map = nullptr;
    std::size_t map_bytes = 0;
    unsigned char* guard = nullptr;  // one page, PROT_NONE
    std::size_t capacity = 0;

    // Usable bytes [guard - round_up(bytes, 16), guard): 16-byte aligned, ending at the guard.
    unsigned char* reserve(std::size_t bytes) {
        if (bytes > capacity || map == nullptr) {
            release();
            capacity = round_up(std::max<std::size_t>(bytes, 1), page_size());
            map_bytes = capacity + page_size();
            void* p = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) throw std::runtime_error("cuda_sim: out of memory for shared memory");
            map = static_cast<unsigned char*>(p);
            guard = map + capacity;
            mprotect(guard, page_size(), PROT_NONE);
        }
        return guard - round_up(bytes, 16);
    }
    void release() {
        if (map) munmap(map, map_bytes);
        map = guard = nullptr;
        capacity = map_bytes = 0;
    }
    bool in_guard(const void* p) const {
        return guard && p >= guard && p < guard + page_size();
    }
};

struct Stack {
    unsigned char* base = nullptr;  // guard page [base, base + page), then the stack
    std::size_t bytes = 0;          // mapping size
    unsigned char* top() const { return base + bytes; }
    bool in_guard(const void* p) const { return p >= base && p < base + page_size(); }
};

// A deque: growing it keeps the threads' pointers to the stacks already handed out valid.
std::deque<Stack>& stack_pool() {
    static std::deque<Stack> pool;
    return pool;
}

Stack& stack_for(int i) {
    auto& pool = stack_pool();
    while (static_cast<int>(pool.size()) <= i) {
        Stack s;
        s.bytes = kStackBytes + page_size();
        void* p = mmap(nullptr, s.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::runtime_error("cuda_sim: out of memory for thread stacks");
        s.base = static_cast<unsigned char*>(p);
        mprotect(s.base, page_size(), PROT_NONE);
        pool.push_back(s);
    }
    return pool[i];
}

// ---- threads, warps, blocks

enum ThreadState : int { kRunnable, kBlocked, kExited, kAborted };

struct Thread {
    ThreadRegs regs;
    int linear = 0, warp = 0, lane = 0;
    ThreadState state = kRunnable;
#if CUDA_SIM_FCONTEXT
    boost::context::detail::fcontext_t context = nullptr;
#else
    ucontext_t context;
#endif
    Stack* stack = nullptr;
    void* asan_fake_stack = nullptr;  // AddressSanitizer's state of this fiber while it is switched out
    const char* wait_name = nullptr;  // what it is blocked in, for deadlock reports
    const char* wait_file = nullptr;
    int wait_line = 0;
    CpAsyncState cp_async;
};

struct PendingCollective {
    const char* name;
    unsigned mask;
    unsigned arrived;
    CombineFn combine;
    void* slots[32];
    const char* file;
    int line;
};

struct Warp {
    unsigned lanes = 0;   // lanes that exist (a last partial warp has fewer)
    unsigned exited = 0;
    std::vector<PendingCollective> pending;
};

struct Launch {
    const char* name;
    const void* kernel;
    void (*invoke)(const void*);
    const void* data;
    LaunchConfig cfg;
    std::size_t dynamic_limit;  // the kernel's MaxDynamicSharedMemorySize (default 48 KiB)
    bool dynamic_limit_set;
};

struct Block {
    uint3 idx{0, 0, 0};
    int num_threads = 0;
    int exited = 0;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    // __syncthreads
    int barrier_arrived = 0;
    const char* barrier_file = nullptr;
    int barrier_line = 0;
    int barrier_op = 0;
    int barrier_acc = 0;
    int barrier_result = 0;
    // shared memory
    unsigned char* dynamic = nullptr;
    std::size_t dynamic_bytes = 0;
    unsigned char* arena = nullptr;  // static __shared__ variables
    std::size_t arena_used = 0;
    std::vector<std::pair<int, void*>> static_vars;
    // the first error
    bool failed = false;
    std::string error;
};

Options g_options;
Stats g_stats;
Launch* g_launch = nullptr;
Block g_block;
Thread* g_thread = nullptr;
ThreadRegs g_host_regs{{0, 0, 0}};
GuardedRegion g_dynamic_region, g_static_region;
std::map<const void*, int> g_dynamic_limits;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
std::recursive_mutex g_launch_mutex;

cudaError_t g_last_error = cudaSuccess;
cudaError_t g_message_error = cudaSuccess;  // the error g_message describes
std::string g_message;

void set_error(cudaError_t code, const std::string& message) {
    g_last_error = code;
    g_message_error = code;
    g_message = message;
}

std::string vformat(const char* fmt, va_list args) {
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, args);
    return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string s = vformat(fmt, args);
    va_end(args);
    return s;
}

std::string where(const char* file, int line) {
    if (!file) return "";
    return format(" (%s:%d)", file, line);
}

// ---- fibers

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told about every stack switch, or it misreads the new stack. Each
// side keeps its "fake stack" across the switch; a fiber that ends hands in null (freed).
const void* g_scheduler_stack_bottom = nullptr;
std::size_t g_scheduler_stack_size = 0;
void* g_scheduler_fake_stack = nullptr;
void asan_enter_fiber(Thread* t) {
    __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, t->stack->base + page_size(), kStackBytes);
}
void asan_entered_fiber() {  // in the fiber: learn the scheduler's stack, to switch back to it
    __sanitizer_finish_switch_fiber(g_thread->asan_fake_stack, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
}
void asan_leave_fiber(bool exiting) {
    __sanitizer_start_switch_fiber(exiting ? nullptr : &g_thread->asan_fake_stack, g_scheduler_stack_bottom,
                                   g_scheduler_stack_size);
}
void asan_back_in_scheduler() { __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr); }
// A reused stack still carries the redzones of the frames its last fiber never returned from.
void asan_fresh_stack(Thread* t) { __asan_unpoison_memory_region(t->stack->base + page_size(), kStackBytes); }
#else
void asan_fresh_stack(Thread*) {}
void asan_enter_fiber(Thread*) {}
void asan_entered_fiber() {}
void asan_leave_fiber(bool) {}
void asan_back_in_scheduler() {}
#endif

void thread_main(Thread* t);

#if CUDA_SIM_FCONTEXT
namespace bctx = boost::context::detail;
bctx::fcontext_t g_scheduler_context = nullptr;

void fiber_entry(bctx::transfer_t from) {
    g_scheduler_context = from.fctx;
    asan_entered_fiber();
    thread_main(static_cast<Thread*>(from.data));
}
void start_fiber(Thread* t) { t->context = bctx::make_fcontext(t->stack->top(), kStackBytes, fiber_entry); }
void resume(Thread* t) {
    asan_enter_fiber(t);
    const bctx::transfer_t back = bctx::jump_fcontext(t->context, t);
    asan_back_in_scheduler();
    t->context = back.fctx;
}
void to_scheduler(bool exiting) {
    asan_leave_fiber(exiting);
    const bctx::transfer_t back = bctx::jump_fcontext(g_scheduler_context, nullptr);
    asan_entered_fiber();
    g_scheduler_context = back.fctx;
}
#else
ucontext_t g_scheduler_context;

void fiber_entry(unsigned hi, unsigned lo) {
    asan_entered_fiber();
    thread_main(reinterpret_cast<Thread*>((static_cast<std::uintptr_t>(hi) << 32) | lo));
}
void start_fiber(Thread* t) {
    getcontext(&t->context);
    t->context.uc_stack.ss_sp = t->stack->base + page_size();
    t->context.uc_stack.ss_size = kStackBytes;
    t->context.uc_link = nullptr;
    const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(t);
    makecontext(&t->context, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(p >> 32),
                static_cast<unsigned>(p & 0xffffffffu));
}
void resume(Thread* t) {
    asan_enter_fiber(t);
    swapcontext(&g_scheduler_context, &t->context);
    asan_back_in_scheduler();
}
void to_scheduler(bool exiting) {
    asan_leave_fiber(exiting);
    swapcontext(&g_thread->context, &g_scheduler_context);
    asan_entered_fiber();
}
#endif

// The running thread gives the CPU back to the scheduler; returns when it is resumed.
void yield() {
    ++g_stats.switches;
    to_scheduler(false);
}

std::string thread_name(const Thread& t) {
    return format("block (%u, %u, %u) thread (%u, %u, %u) [warp %d lane %d]", g_block.idx.x, g_block.idx.y,
                  g_block.idx.z, t.regs.thread_idx.x, t.regs.thread_idx.y, t.regs.thread_idx.z, t.warp, t.lane);
}

// Ends the running thread's part in the launch with an error; never returns.
[[noreturn]] void fail_thread(const std::string& message) {
    Thread* t = g_thread;
    if (!g_block.failed) {
        g_block.failed = true;
        g_block.error = thread_name(*t) + ": " + message;
    }
    t->state = kAborted;
    to_scheduler(true);
    std::abort();  // an aborted fiber is never resumed
}

// ---- barrier

void release_barrier() {
    g_block.barrier_result = g_block.barrier_acc;
    g_block.barrier_arrived = 0;
    for (int i = 0; i < g_block.num_threads; ++i) {
        Thread& t = g_block.threads[i];
        if (t.state == kBlocked && t.wait_name == nullptr) t.state = kRunnable;  // wait_name null: the barrier
    }
}

// ---- thread lifetime

void thread_main(Thread* t) {
    std::string error;
    try {
        g_launch->invoke(g_launch->data);
    } catch (const std::exception& e) {
        error = e.what();
    } catch (...) {
        error = "unknown C++ exception";
    }
    if (!error.empty()) fail_thread("exception in kernel code: " + error);

    // Copies still in flight complete (as on the GPU) before the thread is gone.
    for (auto& group : t->cp_async.groups)
        for (const auto& copy : group) land(copy);
    for (const auto& copy : t->cp_async.open) land(copy);
    t->cp_async.groups.clear();
    t->cp_async.open.clear();

    Warp& w = g_block.warps[t->warp];
    const unsigned bit = 1u << t->lane;
    for (const PendingCollective& p : w.pending) {
        if ((p.mask & bit) && !(p.arrived & bit)) {
            fail_thread(format("exits while lanes 0x%08x of its warp wait for it in %s(mask 0x%08x)%s: every lane "
                               "of a collective's mask must reach it",
                               p.arrived, p.name, p.mask, where(p.file, p.line).c_str()));
        }
    }
    t->state = kExited;
    w.exited |= bit;
    ++g_block.exited;
    // An exited thread counts as arrived at the barrier (as on sm_70 and later).
    if (g_block.barrier_arrived > 0 && g_block.barrier_arrived + g_block.exited == g_block.num_threads)
        release_barrier();
    to_scheduler(true);
    std::abort();
}

// ---- scheduling

unsigned long long splitmix64(unsigned long long& x) {
    unsigned long long z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

std::vector<int> order_of_lanes(int n) {
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    return order;
}

// 0..n-1 in the schedule's order; `salt` makes every block's random order its own.
std::vector<int> order_of(int n, unsigned long long salt) {
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    if (g_options.schedule == Schedule::kReverse) {
        std::reverse(order.begin(), order.end());
    } else if (g_options.schedule == Schedule::kRandom) {
        unsigned long long state = g_options.seed * 0x2545f4914f6cdd1dull + salt;
        for (int i = n - 1; i > 0; --i) std::swap(order[i], order[splitmix64(state) % (i + 1)]);
    }
    return order;
}

void deadlock() {
    // Group the blocked threads by what they wait in.
    std::string report;
    std::map<std::string, int> waits;
    for (int i = 0; i < g_block.num_threads; ++i) {
        const Thread& t = g_block.threads[i];
        if (t.state != kBlocked) continue;
        const std::string what = (t.wait_name ? t.wait_name : "__syncthreads") + where(t.wait_file, t.wait_line);
        ++waits[what];
    }
    for (const auto& [what, count] : waits) report += format("; %d thread(s) wait in %s", count, what.c_str());
    g_block.failed = true;
    g_block.error = format("block (%u, %u, %u): deadlock, no thread can go on (%d of %d exited)%s", g_block.idx.x,
                           g_block.idx.y, g_block.idx.z, g_block.exited, g_block.num_threads, report.c_str());
}

void run_block(const uint3& idx, unsigned long long block_linear) {
    Block& b = g_block;
    const dim3 bd = g_launch->cfg.block;
    b.idx = idx;
    b.num_threads = static_cast<int>(bd.x * bd.y * bd.z);
    b.exited = 0;
    b.barrier_arrived = 0;
    b.failed = false;
    b.error.clear();
    const int num_warps = (b.num_threads + 31) / 32;
    b.warps.assign(num_warps, Warp{});
    for (int w = 0; w < num_warps; ++w) {
        const int lanes = std::min(32, b.num_threads - 32 * w);
        b.warps[w].lanes = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    // shared memory: dynamic filled with 0xFF (reads of what no thread wrote show), static arena empty
    b.dynamic_bytes = g_launch->cfg.smem;
    b.dynamic = g_dynamic_region.reserve(b.dynamic_bytes);
    std::memset(b.dynamic, 0xFF, b.dynamic_bytes);
    b.arena = g_static_region.reserve(kStaticSharedBytes);
    b.arena_used = 0;
    b.static_vars.clear();

    if (static_cast<int>(b.threads.size()) < b.num_threads) b.threads.resize(b.num_threads);
    for (int i = 0; i < b.num_threads; ++i) {
        Thread& t = b.threads[i];
        t.linear = i;
        t.warp = i / 32;
        t.lane = i % 32;
        t.regs.thread_idx = uint3{static_cast<unsigned>(i) % bd.x, (static_cast<unsigned>(i) / bd.x) % bd.y,
                                  static_cast<unsigned>(i) / (bd.x * bd.y)};
        t.state = kRunnable;
        t.wait_name = nullptr;
        t.wait_file = nullptr;
        t.wait_line = 0;
        t.cp_async.open.clear();
        t.cp_async.groups.clear();
        t.stack = &stack_for(i);
        t.asan_fake_stack = nullptr;
        asan_fresh_stack(&t);
        start_fiber(&t);
    }
    // Who runs next. Warps take turns in the schedule's order (drawn anew every round under the
    // random schedule); a warp's lanes go in ascending order (a random one under the random
    // schedule). In step (the default), every runnable lane takes one step per round, so warps
    // move together from one barrier or collective to the next; greedy, a warp runs until none
    // of its lanes can before the next warp's turn, so warps drift as far apart as the barriers
    // allow: a read that only a later barrier would protect then sees what a faster warp wrote.
    const bool random = g_options.schedule == Schedule::kRandom;
    const unsigned long long salt = block_linear * 0x100000001b3ull;
    std::vector<std::vector<int>> warp_lanes(num_warps);  // per warp: its threads in turn order
    for (int w = 0; w < num_warps; ++w) {
        const int lanes = std::min(32, b.num_threads - 32 * w);
        for (int l : random ? order_of(lanes, salt + 131 * w + 7) : order_of_lanes(lanes)) warp_lanes[w].push_back(32 * w + l);
    }
    std::vector<int> warp_order = order_of(num_warps, salt);

    g_block_idx = idx;
    ++g_stats.blocks;
    g_stats.threads += b.num_threads;
    for (unsigned long long round = 1; b.exited < b.num_threads; ++round) {
        if (random && round > 1) warp_order = order_of(num_warps, salt + round * 0x9e3779b9ull);
        bool ran = false;
        for (int w : warp_order) {
            for (bool again = true; again;) {
                again = false;
                for (int i : warp_lanes[w]) {
                    Thread& t = b.threads[i];
                    if (t.state != kRunnable) continue;
                    g_thread = &t;
                    g_regs = &t.regs;
                    resume(&t);
                    g_thread = nullptr;
                    g_regs = &g_host_regs;
                    ran = true;
                    if (b.failed) return;
                    again = g_options.greedy;
                }
            }
        }
        if (!ran) {
            deadlock();
            return;
        }
    }
}

// ---- faults inside kernels: a message and a clean launch error instead of a crash

char g_fault_message[1024];
struct sigaction g_previous_segv, g_previous_bus;
bool g_handler_installed = false;
thread_local bool t_running_grid = false;

// A frame larger than the guard page can jump past it: the stack pointer tells an overflow too.
bool is_stack_overflow(const void* address, std::uintptr_t sp) {
    const Stack* s = g_thread->stack;
    return s && (s->in_guard(address) || sp < reinterpret_cast<std::uintptr_t>(s->base) + page_size());
}

void describe_fault(const void* address, bool stack_overflow) {
    const Block& b = g_block;
    if (stack_overflow) {
        snprintf(g_fault_message, sizeof g_fault_message,
                 "stack overflow: the thread used more than its %zu KiB of stack", kStackBytes / 1024);
    } else if (g_dynamic_region.in_guard(address)) {
        snprintf(g_fault_message, sizeof g_fault_message,
                 "shared memory access out of bounds: byte %td past the end of this launch's %zu bytes of dynamic "
                 "shared memory (too little requested at launch, or an index past the tile?)",
                 static_cast<const unsigned char*>(address) - g_dynamic_region.guard, b.dynamic_bytes);
    } else if (g_static_region.in_guard(address)) {
        snprintf(g_fault_message, sizeof g_fault_message,
                 "shared memory access out of bounds: past the end of the static __shared__ arena");
    } else {
        snprintf(g_fault_message, sizeof g_fault_message,
                 "invalid memory access at address %p (a global pointer or index out of bounds?)", address);
    }
}

extern "C" void cuda_sim_fault_trampoline() { fail_thread(g_fault_message); }

void on_fault(int sig, siginfo_t* info, void* context) {
    if (!t_running_grid || g_thread == nullptr) {
        // not a kernel's fault: let the previous handler (or the default action) have it
        sigaction(sig, sig == SIGSEGV ? &g_previous_segv : &g_previous_bus, nullptr);
        return;
    }
    // Resume the faulting thread in the trampoline (which fails it) instead of the faulting
    // instruction, on a stack it still owns.
    ucontext_t* uc = static_cast<ucontext_t*>(context);
#if defined(__x86_64__)
    std::uintptr_t sp = static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RSP]);
    const bool stack_overflow = is_stack_overflow(info->si_addr, sp);
    describe_fault(info->si_addr, stack_overflow);
    if (stack_overflow) sp = reinterpret_cast<std::uintptr_t>(g_thread->stack->top());
    sp = ((sp - 512) & ~static_cast<std::uintptr_t>(15)) - 8;  // below the red zone; aligned as after a call
    uc->uc_mcontext.gregs[REG_RSP] = static_cast<greg_t>(sp);
    uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&cuda_sim_fault_trampoline);
#elif defined(__aarch64__)
    std::uintptr_t sp = uc->uc_mcontext.sp;
    const bool stack_overflow = is_stack_overflow(info->si_addr, sp);
    describe_fault(info->si_addr, stack_overflow);
    if (stack_overflow) sp = reinterpret_cast<std::uintptr_t>(g_thread->stack->top());
    uc->uc_mcontext.sp = (sp - 512) & ~static_cast<std::uintptr_t>(15);
    uc->uc_mcontext.pc = reinterpret_cast<std::uintptr_t>(&cuda_sim_fault_trampoline);
#else
    (void)uc;
    describe_fault(info->si_addr, false);
    write(2, g_fault_message, strlen(g_fault_message));
    sigaction(sig, sig == SIGSEGV ? &g_previous_segv : &g_previous_bus, nullptr);
#endif
}

void install_fault_handler() {
    static std::vector<unsigned char> alt_stack(64 * 1024);
    stack_t ss{};
    ss.ss_sp = alt_stack.data();
    ss.ss_size = alt_stack.size();
    sigaltstack(&ss, nullptr);  // the faulting stack may be the overflowed one
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous_segv);
    sigaction(SIGBUS, &sa, &g_previous_bus);
    g_handler_installed = true;
}

void restore_fault_handler() {
    if (!g_handler_installed) return;
    sigaction(SIGSEGV, &g_previous_segv, nullptr);
    sigaction(SIGBUS, &g_previous_bus, nullptr);
    g_handler_installed = false;
}

// ---- launch checks (what the CUDA runtime refuses before a kernel runs)

bool check_launch(const Launch& l, std::string& why, cudaError_t& code) {
    const dim3 g = l.cfg.grid, b = l.cfg.block;
    code = cudaErrorInvalidConfiguration;
    if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
        static_cast<unsigned long long>(b.x) * b.y * b.z > static_cast<unsigned>(g_device->max_threads_per_block)) {
        why = format("invalid block (%u, %u, %u): each dim >= 1, x, y <= 1024, z <= 64, at most %d threads (%s)", b.x,
                     b.y, b.z, g_device->max_threads_per_block, g_device->name);
        return false;
    }
    if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
        why = format("invalid grid (%u, %u, %u): each dim >= 1, x < 2^31, y, z <= 65535", g.x, g.y, g.z);
        return false;
    }
    if (l.cfg.smem > static_cast<std::size_t>(g_device->smem_per_block_optin)) {
        code = cudaErrorInvalidValue;
        why = format("%zu bytes of dynamic shared memory, more than the %d a block may have on %s", l.cfg.smem,
                     g_device->smem_per_block_optin, g_device->name);
        return false;
    }
    if (l.cfg.smem > l.dynamic_limit) {
        code = cudaErrorInvalidValue;
        why = format("%zu bytes of dynamic shared memory, more than the kernel's limit of %zu%s", l.cfg.smem,
                     l.dynamic_limit,
                     l.dynamic_limit_set ? "" : " (above 48 KiB a kernel needs cudaFuncSetAttribute("
                                                "cudaFuncAttributeMaxDynamicSharedMemorySize) first)");
        return false;
    }
    return true;
}

}  // namespace

// ----------------------------------------------------------------------------
// entry points (cuda_sim.h)

ThreadRegs* g_regs = &g_host_regs;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim{1, 1, 1};
dim3 g_grid_dim{1, 1, 1};
Site g_combine_site{nullptr, 0};

Options& options() { return g_options; }
Stats& stats() { return g_stats; }

bool counters_view(CountersView* v) {
    if (g_thread == nullptr || g_launch == nullptr) return false;
    v->linear = g_thread->linear;
    v->stack_lo = g_thread->stack->base;
    v->stack_hi = g_thread->stack->top();
    v->threads_lo = reinterpret_cast<const unsigned char*>(g_block.threads.data());
    v->threads_hi = reinterpret_cast<const unsigned char*>(g_block.threads.data() + g_block.threads.size());
    v->arena = g_block.arena;
    v->arena_bytes = kStaticSharedBytes;
    v->dynamic = g_block.dynamic;
    v->dynamic_bytes = g_block.dynamic_bytes;
    return true;
}

const DeviceProfile* device_profiles(int* count) {
    *count = static_cast<int>(sizeof(kProfiles) / sizeof(kProfiles[0]));
    return kProfiles;
}
const DeviceProfile& device() { return *g_device; }
std::vector<LaunchRecord>& launch_log() {
    static std::vector<LaunchRecord> log;
    return log;
}
bool set_device(const std::string& name) {
    for (const DeviceProfile& p : kProfiles) {
        if (name == p.name) {
            std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
            g_device = &p;
            g_dynamic_limits.clear();
            return true;
        }
    }
    return false;
}

void failf(const char* file, int line, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string message = vformat(fmt, args);
    va_end(args);
    message += where(file, line);
    if (g_thread == nullptr) throw std::runtime_error("cuda_sim: " + message);
    fail_thread(message);
}

void fail_collective(const char* name, int lane, const char* what) {
    failf(g_combine_site.file, g_combine_site.line, "%s: lane %d: %s", name, lane, what);
}

namespace {
Thread* running_thread(const char* what, const char* file, int line) {
    if (g_thread == nullptr) throw std::runtime_error(std::string("cuda_sim: ") + what + " called outside a kernel" +
                                                      where(file, line));
    return g_thread;
}
}  // namespace

int syncthreads(int op, int predicate, const char* file, int line) {
    Thread* t = running_thread("__syncthreads", file, line);
    Block& b = g_block;
    ++g_stats.barriers;
    if (b.barrier_arrived == 0) {
        b.barrier_file = file;
        b.barrier_line = line;
        b.barrier_op = op;
        b.barrier_acc = op == 2 ? 1 : 0;
    } else if (b.barrier_line != line || b.barrier_op != op ||
               (b.barrier_file != file && std::strcmp(b.barrier_file, file) != 0)) {
        failf(file, line,
              "reaches __syncthreads while %d other thread(s) wait at the one at %s:%d: a barrier in divergent "
              "code (every thread of the block must reach the same __syncthreads)",
              b.barrier_arrived, b.barrier_file, b.barrier_line);
    }
    if (op == 1) b.barrier_acc += predicate;
    if (op == 2) b.barrier_acc &= predicate;
    if (op == 3) b.barrier_acc |= predicate;
    ++b.barrier_arrived;
    t->wait_name = nullptr;
    t->wait_file = file;
    t->wait_line = line;
    t->state = kBlocked;
    if (b.barrier_arrived + b.exited == b.num_threads) release_barrier();
    yield();
    return b.barrier_result;
}

void warp_collective(const char* name, unsigned mask, CombineFn combine, void* slot, const char* file, int line) {
    Thread* t = running_thread(name, file, line);
    Warp& w = g_block.warps[t->warp];
    const unsigned bit = 1u << t->lane;
    ++g_stats.collectives;
    if (!(mask & bit)) failf(file, line, "%s with mask 0x%08x, which leaves out the calling lane", name, mask);
    if (mask & ~w.lanes)
        failf(file, line, "%s with mask 0x%08x names lanes that do not exist in this warp (lanes 0x%08x: the "
              "block has %d threads)", name, mask, w.lanes, g_block.num_threads);
    if (mask & w.exited)
        failf(file, line, "%s with mask 0x%08x waits for lanes 0x%08x that have exited (an early return before "
              "a warp collective?)", name, mask, mask & w.exited);
    PendingCollective* pending = nullptr;
    for (PendingCollective& p : w.pending) {
        if (p.mask & mask) pending = &p;
    }
    if (pending == nullptr) {
        w.pending.push_back(PendingCollective{name, mask, 0u, combine, {}, file, line});
        pending = &w.pending.back();
    } else if (pending->mask != mask || pending->combine != combine ||
               (pending->name != name && std::strcmp(pending->name, name) != 0)) {
        failf(file, line, "%s(mask 0x%08x) while lanes 0x%08x of its warp wait in %s(mask 0x%08x)%s: lanes "
              "disagree on a warp collective", name, mask, pending->arrived, pending->name, pending->mask,
              where(pending->file, pending->line).c_str());
    }
    pending->slots[t->lane] = slot;
    pending->arrived |= bit;
    t->wait_name = name;
    t->wait_file = file;
    t->wait_line = line;
    if (pending->arrived == pending->mask) {
        const PendingCollective done = *pending;
        w.pending.erase(w.pending.begin() + (pending - w.pending.data()));
        g_combine_site = Site{file, line};
        done.combine(done.slots, mask);
        for (int l = 0; l < 32; ++l) {
            if (mask & (1u << l)) g_block.threads[32 * t->warp + l].state = kRunnable;
        }
    } else {
        t->state = kBlocked;
    }
    yield();  // even the last lane gives way, so the schedule alone decides who runs next
}

unsigned lanes_not_exited() {
    Thread* t = running_thread("__activemask", nullptr, 0);
    const Warp& w = g_block.warps[t->warp];
    return w.lanes & ~w.exited;
}

int lane_id() { return running_thread("lane_id", nullptr, 0)->lane; }

void shfl_combine(void* const* slots, unsigned mask) {
    // PTX shfl.sync: c = ((32 - width) << 8) | clamp, segmask = c[12:8], clamp = c[4:0] (31 for
    // idx/down/bfly, 0 for up); maxLane = (lane & segmask) | (clamp & ~segmask), minLane = lane & segmask.
    for (int lane = 0; lane < 32; ++lane) {
        ShflSlot* s = static_cast<ShflSlot*>(slots[lane]);
        if (!s) continue;
        const int width = s->width;
        if (width < 1 || width > 32 || (width & (width - 1)) != 0)
            fail_collective("shuffle", lane, "width must be a power of two in [1, 32]");
        const int segmask = 32 - width;
        const int clamp = s->mode == kShflUp ? 0 : 31;
        const int max_lane = (lane & segmask) | (clamp & ~segmask);
        const int min_lane = lane & segmask;
        int j = lane;
        bool in_range = false;
        switch (s->mode) {
            case kShflIdx: j = min_lane | (s->b & ~segmask & 31); in_range = j <= max_lane; break;
            case kShflUp: j = lane - s->b; in_range = j >= max_lane; break;
            case kShflDown: j = lane + s->b; in_range = j <= max_lane; break;
            case kShflBfly: j = lane ^ (s->b & 31); in_range = j <= max_lane; break;
        }
        if (!in_range) j = lane;
        if (!(mask & (1u << j))) fail_collective("shuffle", lane, "reads a lane outside the mask (undefined on the GPU)");
        s->result = static_cast<ShflSlot*>(slots[j])->value;
    }
}

void ballot_combine(void* const* slots, unsigned mask) {
    unsigned ballot = 0;
    for (int lane = 0; lane < 32; ++lane) {
        if (slots[lane] && static_cast<VoteSlot*>(slots[lane])->predicate) ballot |= 1u << lane;
    }
    for (int lane = 0; lane < 32; ++lane) {
        if (slots[lane]) static_cast<VoteSlot*>(slots[lane])->result = ballot & mask;
    }
}

void* dynamic_shared(std::size_t align, const char* file, int line) {
    running_thread("extern __shared__", file, line);
    if (align > 16) failf(file, line, "dynamic shared memory aligned to %zu bytes (the simulator gives 16)", align);
    return g_block.dynamic;
}

void* static_shared(int site, std::size_t bytes, std::size_t align, const char* file, int line) {
    running_thread("__shared__", file, line);
    Block& b = g_block;
    for (const auto& [s, p] : b.static_vars) {
        if (s == site) return p;
    }
    const std::size_t offset = round_up(b.arena_used, std::max<std::size_t>(align, 1));
    if (offset + bytes > kStaticSharedBytes)
        failf(file, line, "static __shared__ memory of this kernel passes %zu bytes (CUDA's limit is 48 KiB)",
              kStaticSharedBytes);
    const std::size_t limit = static_cast<std::size_t>(g_launch->dynamic_limit_set ? g_device->smem_per_block_optin
                                                                                   : g_device->smem_per_block);
    if (offset + bytes + b.dynamic_bytes > limit)
        failf(file, line, "%zu bytes of static plus %zu of dynamic shared memory exceed the %zu a block may have (%s)",
              offset + bytes, b.dynamic_bytes, limit, g_device->name);
    void* p = b.arena + offset;
    std::memset(p, 0xFF, bytes);  // uninitialized shared memory reads as NaN / -1, not zero
    b.arena_used = offset + bytes;
    b.static_vars.emplace_back(site, p);
    return p;
}

std::size_t cvta_to_shared(const void* p, const char* file, int line) {
    running_thread("__cvta_generic_to_shared", file, line);
    const unsigned char* c = static_cast<const unsigned char*>(p);
    const Block& b = g_block;
    // As on the GPU, any address of the block's shared window converts, also past what the launch
    // allocated: the instruction that then touches it is what fails.
    if (c >= b.arena && c < b.arena + kStaticSharedBytes) return static_cast<std::size_t>(c - b.arena);
    if (c >= b.dynamic && c < b.dynamic + g_device->smem_per_block_optin)
        return kDynamicSharedOffset + (c - b.dynamic);
    failf(file, line, "__cvta_generic_to_shared(%p): not an address in this block's shared memory", p);
}

void* shared_pointer(std::uint32_t address, std::size_t bytes, const char* what, const char* file, int line) {
    const Block& b = g_block;
    if (address >= kDynamicSharedOffset) {
        const std::size_t offset = address - kDynamicSharedOffset;
        if (offset + bytes > b.dynamic_bytes)
            failf(file, line, "%s touches shared bytes [%zu, %zu) of dynamic shared memory, but the launch has %zu",
                  what, offset, offset + bytes, b.dynamic_bytes);
        return b.dynamic + offset;
    }
    if (address + bytes > b.arena_used)
        failf(file, line, "%s touches static shared bytes [%u, %zu), past the %zu bytes of __shared__ variables",
              what, address, address + bytes, b.arena_used);
    return b.arena + address;
}

CpAsyncState& current_cp_async(const char* what, const char* file, int line) {
    return running_thread(what, file, line)->cp_async;
}

void land(const CpAsyncCopy& copy) {
    std::memcpy(copy.dst, copy.src, copy.src_size);
    std::memset(copy.dst + copy.src_size, 0, copy.cp_size - copy.src_size);
}

void run_grid(const char* name, const void* kernel, const LaunchConfig& cfg, void (*invoke)(const void*),
              const void* data, const char* file, int line) {
    std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
    if (g_thread != nullptr) failf(file, line, "launches %s from inside a kernel (not simulated)", name);
    Launch l{name, kernel, invoke, data, cfg, kDefaultDynamicLimit, false};
    const auto limit = g_dynamic_limits.find(kernel);
    if (limit != g_dynamic_limits.end()) {
        l.dynamic_limit = static_cast<std::size_t>(limit->second);
        l.dynamic_limit_set = true;
    }
    std::string why;
    cudaError_t code;
    if (!check_launch(l, why, code)) {
        set_error(code, format("cuda_sim: launch of %s refused: %s", name, why.c_str()));
        return;
    }
    ++g_stats.launches;
    if (launch_log().size() < kMaxLaunchLog) launch_log().push_back(LaunchRecord{name, cfg.smem, cfg.grid, cfg.block});
    g_launch = &l;
    g_grid_dim = cfg.grid;
    g_block_dim = cfg.block;
    t_running_grid = true;
    install_fault_handler();
    counters_launch_begin(name);

    const dim3 g = cfg.grid;
    const unsigned long long num_blocks = static_cast<unsigned long long>(g.x) * g.y * g.z;
    std::vector<int> block_order;
    const bool permute = g_options.schedule == Schedule::kRandom && num_blocks <= (1ull << 22);
    if (permute) block_order = order_of(static_cast<int>(num_blocks), 0x5bd1e995ull);
    std::string error;
    for (unsigned long long i = 0; i < num_blocks; ++i) {
        unsigned long long linear = i;
        if (g_options.schedule == Schedule::kReverse) linear = num_blocks - 1 - i;
        if (permute) linear = static_cast<unsigned long long>(block_order[i]);
        const uint3 idx{static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                        static_cast<unsigned>(linear / (static_cast<unsigned long long>(g.x) * g.y))};
        run_block(idx, linear);
        counters_block_end();
        if (g_block.failed) {
            error = g_block.error;
            break;
        }
    }

    counters_launch_end();
    restore_fault_handler();
    t_running_grid = false;
    g_launch = nullptr;
    g_block_idx = uint3{0, 0, 0};
    g_grid_dim = dim3(1, 1, 1);
    g_block_dim = dim3(1, 1, 1);
    if (!error.empty()) set_error(cudaErrorLaunchFailure, format("cuda_sim: kernel %s: %s", name, error.c_str()));
}

}  // namespace cuda_sim

// ----------------------------------------------------------------------------
// The CUDA runtime API, as far as pyllmc calls it. One simulated device, described by the
// current DeviceProfile (sm_90, the H100/H200, unless set_device chose another), with a few SMs
// (options().multiprocessor_count: grid-wide work splits stay small on a CPU); streams are
// accepted and ignored.

using cuda_sim::g_last_error;

extern "C" {

cudaError_t cudaGetLastError(void) {
    const cudaError_t e = cuda_sim::g_last_error;
    cuda_sim::g_last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return cuda_sim::g_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaErrorUnknown";
    }
}

const char* cudaGetErrorString(cudaError_t error) {
    if (error != cudaSuccess && error == cuda_sim::g_message_error && !cuda_sim::g_message.empty())
        return cuda_sim::g_message.c_str();
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
        default: return "unknown error";
    }
}

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
    if (device != 0) return cudaErrorInvalidDevice;
    const cuda_sim::DeviceProfile& d = cuda_sim::device();
    switch (attr) {
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; return cudaSuccess;
        case cudaDevAttrMaxRegistersPerBlock: *value = d.regs_per_block; return cudaSuccess;
        case cudaDevAttrMaxRegistersPerMultiprocessor: *value = d.regs_per_sm; return cudaSuccess;
        case cudaDevAttrMultiProcessorCount: *value = cuda_sim::g_options.multiprocessor_count; return cudaSuccess;
        case cudaDevAttrMaxThreadsPerBlock: *value = d.max_threads_per_block; return cudaSuccess;
        case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.max_threads_per_sm; return cudaSuccess;
        case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
        case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
        case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
        default: return cudaErrorInvalidValue;
    }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > cuda_sim::device().smem_per_block_optin) return cudaErrorInvalidValue;
        cuda_sim::g_dynamic_limits[func] = value;
        return cudaSuccess;
    }
    if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
    return cudaErrorInvalidValue;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaRuntimeGetVersion(int* version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}

}  // extern "C"
