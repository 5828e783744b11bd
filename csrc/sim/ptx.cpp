// ptx.cpp: the inline PTX instructions pyllmc's kernels use, executed on the CPU.
//
// Each `asm` statement arrives (through the source rewrite) as its PTX text and its operands
// bound as the compiler would ("=r"(x) -> x's address, "l"(p) -> p's value, ...). The text is
// parsed once per call site. Supported, per the PTX ISA:
//   cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}   16-byte (cg) or 4/8/16 (ca)
//   cp.async.commit_group / cp.async.wait_group N / cp.async.wait_all
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared{::cta}.b16 {r...}, [addr]
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 {d0..d3}, {a0..a3}, {b0, b1}, {c0..c3}
// ldmatrix and mma are warp collectives: all 32 lanes' operands are gathered, the instruction is
// computed from the ISA's fragment layouts, and each lane gets its registers back. mma multiplies
// exactly and accumulates in double, rounding once to float (the tensor cores round their fp32
// sums differently: a few ulp). Anything else is an error, never silently skipped.
#include "sim_internal.h"
#include "counters.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

namespace cuda_sim {
namespace {

enum class Op { kCpAsync, kCommit, kWaitGroup, kWaitAll, kLdmatrix, kMma };

// One PTX argument: a list of operand numbers ({%0, %1}), an address ([%4]), an operand (%2)
// or a literal (16).
struct Arg {
    std::vector<int> refs;
    bool address = false;
    bool literal = false;
    long long value = 0;
};

struct Instruction {
    Op op;
    std::string text;
    std::vector<Arg> args;
    int cp_size = 0;        // cp.async
    bool cache_global = false;
    int matrices = 0;       // ldmatrix
    bool trans = false;
    bool a_bf16 = false;    // mma: bf16 (else f16) inputs
};

[[noreturn]] void bad_ptx(const std::string& text, const char* why, const char* file, int line) {
    failf(file, line, "inline PTX \"%s\": %s", text.c_str(), why);
}

std::string trim(const std::string& s) {
    std::size_t b = 0, e = s.size();
    while (b < e && (std::isspace(static_cast<unsigned char>(s[b])) || s[b] == ';')) ++b;
    while (e > b && (std::isspace(static_cast<unsigned char>(s[e - 1])) || s[e - 1] == ';')) --e;
    return s.substr(b, e - b);
}

Arg parse_arg(const std::string& raw, const std::string& text, const char* file, int line) {
    const std::string s = trim(raw);
    Arg arg;
    auto parse_ref = [&](const std::string& r) {
        const std::string t = trim(r);
        if (t.size() < 2 || t[0] != '%') bad_ptx(text, "expected an operand %N", file, line);
        return std::atoi(t.c_str() + 1);
    };
    if (s.empty()) bad_ptx(text, "empty argument", file, line);
    if (s.front() == '{') {
        if (s.back() != '}') bad_ptx(text, "unbalanced braces", file, line);
        std::string inner = s.substr(1, s.size() - 2);
        std::size_t start = 0;
        while (start <= inner.size()) {
            const std::size_t comma = inner.find(',', start);
            arg.refs.push_back(parse_ref(inner.substr(start, comma - start)));
            if (comma == std::string::npos) break;
            start = comma + 1;
        }
    } else if (s.front() == '[') {
        if (s.back() != ']') bad_ptx(text, "unbalanced brackets", file, line);
        arg.address = true;
        arg.refs.push_back(parse_ref(s.substr(1, s.size() - 2)));
    } else if (s.front() == '%') {
        arg.refs.push_back(parse_ref(s));
    } else {
        arg.literal = true;
        arg.value = std::strtoll(s.c_str(), nullptr, 0);
    }
    return arg;
}

Instruction parse(const char* ptx, const char* file, int line) {
    Instruction ins;
    ins.text = trim(ptx);
    const std::string& text = ins.text;
    const std::size_t space = text.find_first_of(" \t\n");
    const std::string mnemonic = text.substr(0, space);
    if (space != std::string::npos) {
        const std::string rest = text.substr(space);
        int depth = 0;
        std::string current;
        for (char c : rest) {
            if (c == '{' || c == '[') ++depth;
            if (c == '}' || c == ']') --depth;
            if (c == ',' && depth == 0) {
                ins.args.push_back(parse_arg(current, text, file, line));
                current.clear();
            } else {
                current += c;
            }
        }
        if (!trim(current).empty()) ins.args.push_back(parse_arg(current, text, file, line));
    }
    auto need_args = [&](std::size_t lo, std::size_t hi) {
        if (ins.args.size() < lo || ins.args.size() > hi) bad_ptx(text, "wrong number of arguments", file, line);
    };

    if (mnemonic == "cp.async.ca.shared.global" || mnemonic == "cp.async.cg.shared.global") {
        ins.op = Op::kCpAsync;
        ins.cache_global = mnemonic == "cp.async.cg.shared.global";
        need_args(3, 4);
        if (!ins.args[0].address || !ins.args[1].address) bad_ptx(text, "expected [dst], [src]", file, line);
        if (!ins.args[2].literal) bad_ptx(text, "cp-size must be a literal", file, line);
        ins.cp_size = static_cast<int>(ins.args[2].value);
        if (ins.cache_global ? ins.cp_size != 16 : (ins.cp_size != 4 && ins.cp_size != 8 && ins.cp_size != 16))
            bad_ptx(text, "cp-size must be 16 for .cg, 4, 8 or 16 for .ca", file, line);
    } else if (mnemonic == "cp.async.commit_group") {
        ins.op = Op::kCommit;
        need_args(0, 0);
    } else if (mnemonic == "cp.async.wait_group") {
        ins.op = Op::kWaitGroup;
        need_args(1, 1);
    } else if (mnemonic == "cp.async.wait_all") {
        ins.op = Op::kWaitAll;
        need_args(0, 0);
    } else if (mnemonic.rfind("ldmatrix.sync.aligned.m8n8.", 0) == 0) {
        ins.op = Op::kLdmatrix;
        std::string rest = mnemonic.substr(std::string("ldmatrix.sync.aligned.m8n8.").size());
        if (rest.rfind("x1", 0) == 0) ins.matrices = 1;
        else if (rest.rfind("x2", 0) == 0) ins.matrices = 2;
        else if (rest.rfind("x4", 0) == 0) ins.matrices = 4;
        else bad_ptx(text, "ldmatrix: expected .x1, .x2 or .x4", file, line);
        rest = rest.substr(2);
        if (rest.rfind(".trans", 0) == 0) {
            ins.trans = true;
            rest = rest.substr(6);
        }
        if (rest != ".shared.b16" && rest != ".shared::cta.b16") bad_ptx(text, "ldmatrix: expected .shared.b16", file, line);
        need_args(2, 2);
        if (static_cast<int>(ins.args[0].refs.size()) != ins.matrices || !ins.args[1].address)
            bad_ptx(text, "ldmatrix: expected {one register per matrix}, [address]", file, line);
    } else if (mnemonic == "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" ||
               mnemonic == "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") {
        ins.op = Op::kMma;
        ins.a_bf16 = mnemonic.find(".bf16.") != std::string::npos;
        need_args(4, 4);
        const std::size_t sizes[4] = {4, 4, 2, 4};
        for (int i = 0; i < 4; ++i) {
            if (ins.args[i].refs.size() != sizes[i]) bad_ptx(text, "mma: expected {d x4}, {a x4}, {b x2}, {c x4}", file, line);
        }
    } else {
        bad_ptx(text, "instruction not supported by the simulator (add it to csrc/sim/ptx.cpp, with a self-test)",
                file, line);
    }
    return ins;
}

// ---- operands

const AsmOperand& operand(std::initializer_list<AsmOperand> ops, int n, const Instruction& ins, const char* file,
                          int line) {
    if (n < 0 || n >= static_cast<int>(ops.size())) bad_ptx(ins.text, "operand number out of range", file, line);
    return ops.begin()[n];
}

unsigned long long read_int(const AsmOperand& op) {
    switch (op.size) {
        case 1: return *static_cast<const unsigned char*>(op.ptr);
        case 2: return *static_cast<const unsigned short*>(op.ptr);
        case 4: return *static_cast<const unsigned*>(op.ptr);
        default: return *static_cast<const unsigned long long*>(op.ptr);
    }
}

// An argument's integer value: a literal or the operand it names.
long long arg_value(const Arg& a, std::initializer_list<AsmOperand> ops, const Instruction& ins, const char* file,
                    int line) {
    if (a.literal) return a.value;
    return static_cast<long long>(read_int(operand(ops, a.refs[0], ins, file, line)));
}

void check_constraint(const AsmOperand& op, char letter, bool output, const Instruction& ins, const char* file,
                      int line) {
    const char* c = op.constraint;
    const bool is_output = c[0] == '=' || c[0] == '+';
    const char got = is_output ? c[1] : c[0];
    const unsigned size = letter == 'l' ? 8 : 4;
    if (got != letter || is_output != output || op.size != size)
        bad_ptx(ins.text, "operand constraint or size does not fit the instruction", file, line);
}

// ---- 16-bit floats (exact conversions)

float bf16_to_float(std::uint32_t bits) { return __uint_as_float((bits & 0xffffu) << 16); }

float f16_to_float(std::uint32_t bits) {
    const std::uint32_t sign = (bits >> 15) & 1u, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    float value;
    if (exponent == 0) value = std::ldexp(static_cast<float>(mantissa), -24);
    else if (exponent == 31) value = mantissa ? NAN : INFINITY;
    else value = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
    return sign ? -value : value;
}

// ---- ldmatrix

struct LdmatrixSlot {
    std::uint32_t address;   // this lane's row address (lanes 8m..8m+7: rows 0..7 of matrix m)
    std::uint32_t* out[4];
    int matrices;
    bool trans;
};

void ldmatrix_combine(void* const* slots, unsigned) {
    const LdmatrixSlot* first = static_cast<LdmatrixSlot*>(slots[0]);
    const int matrices = first->matrices;
    std::uint16_t m[4][8][8];  // [matrix][row][col]
    for (int k = 0; k < matrices; ++k) {
        for (int r = 0; r < 8; ++r) {
            const LdmatrixSlot* s = static_cast<LdmatrixSlot*>(slots[8 * k + r]);
            if (s->address % 16 != 0) fail_collective("ldmatrix", 8 * k + r, "row address not 16-byte aligned");
            const void* row = shared_pointer(s->address, 16, "ldmatrix", g_combine_site.file, g_combine_site.line);
            std::memcpy(m[k][r], row, 16);
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        const LdmatrixSlot* s = static_cast<LdmatrixSlot*>(slots[lane]);
        if (s->matrices != matrices || s->trans != first->trans)
            fail_collective("ldmatrix", lane, "lanes disagree on the ldmatrix shape");
        const int row = lane / 4, col = 2 * (lane % 4);
        for (int k = 0; k < matrices; ++k) {
            // without .trans: (row, col), (row, col + 1); with .trans: (col, row), (col + 1, row)
            const std::uint32_t lo = first->trans ? m[k][col][row] : m[k][row][col];
            const std::uint32_t hi = first->trans ? m[k][col + 1][row] : m[k][row][col + 1];
            *s->out[k] = lo | (hi << 16);
        }
    }
}

// ---- mma.m16n8k16

struct MmaSlot {
    std::uint32_t a[4];
    std::uint32_t b[2];
    float c[4];
    float* d[4];
    bool bf16;
};

void mma_combine(void* const* slots, unsigned) {
    float A[16][16], B[16][8], C[16][8];
    const bool bf16 = static_cast<MmaSlot*>(slots[0])->bf16;
    auto unpack = [bf16](std::uint32_t reg, float& lo, float& hi) {
        lo = bf16 ? bf16_to_float(reg) : f16_to_float(reg & 0xffffu);
        hi = bf16 ? bf16_to_float(reg >> 16) : f16_to_float(reg >> 16);
    };
    // Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs), g = lane / 4, t = lane % 4:
    //   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
    //   B: b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 2t+8..2t+9, n = g)
    //   C, D: c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
    for (int lane = 0; lane < 32; ++lane) {
        const MmaSlot* s = static_cast<MmaSlot*>(slots[lane]);
        if (s->bf16 != bf16) fail_collective("mma", lane, "lanes disagree on the mma input type");
        const int g = lane / 4, t = lane % 4;
        unpack(s->a[0], A[g][2 * t], A[g][2 * t + 1]);
        unpack(s->a[1], A[g + 8][2 * t], A[g + 8][2 * t + 1]);
        unpack(s->a[2], A[g][2 * t + 8], A[g][2 * t + 9]);
        unpack(s->a[3], A[g + 8][2 * t + 8], A[g + 8][2 * t + 9]);
        unpack(s->b[0], B[2 * t][g], B[2 * t + 1][g]);
        unpack(s->b[1], B[2 * t + 8][g], B[2 * t + 9][g]);
        C[g][2 * t] = s->c[0];
        C[g][2 * t + 1] = s->c[1];
        C[g + 8][2 * t] = s->c[2];
        C[g + 8][2 * t + 1] = s->c[3];
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 8; ++j) {
            double acc = C[i][j];
            for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * B[k][j];
            D[i][j] = static_cast<float>(acc);
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        const MmaSlot* s = static_cast<MmaSlot*>(slots[lane]);
        const int g = lane / 4, t = lane % 4;
        *s->d[0] = D[g][2 * t];
        *s->d[1] = D[g][2 * t + 1];
        *s->d[2] = D[g + 8][2 * t];
        *s->d[3] = D[g + 8][2 * t + 1];
    }
}

std::unordered_map<const char*, Instruction>& parsed_cache() {
    static std::unordered_map<const char*, Instruction> cache;
    return cache;
}

}  // namespace

void asm_exec(const char* ptx, std::initializer_list<AsmOperand> ops, const char* file, int line) {
    auto& cache = parsed_cache();
    auto it = cache.find(ptx);
    if (it == cache.end()) it = cache.emplace(ptx, parse(ptx, file, line)).first;
    const Instruction& ins = it->second;

    switch (ins.op) {
        case Op::kCpAsync: {
            CpAsyncState& state = current_cp_async("cp.async", file, line);
            const AsmOperand& dst_op = operand(ops, ins.args[0].refs[0], ins, file, line);
            const AsmOperand& src_op = operand(ops, ins.args[1].refs[0], ins, file, line);
            check_constraint(dst_op, 'r', false, ins, file, line);
            check_constraint(src_op, 'l', false, ins, file, line);
            const std::uint32_t dst_address = static_cast<std::uint32_t>(read_int(dst_op));
            const auto* src = reinterpret_cast<const unsigned char*>(static_cast<std::uintptr_t>(read_int(src_op)));
            const long long src_size = ins.args.size() > 3 ? arg_value(ins.args[3], ops, ins, file, line) : ins.cp_size;
            if (src_size < 0 || src_size > ins.cp_size)
                failf(file, line, "cp.async: src-size %lld outside [0, %d]", src_size, ins.cp_size);
            if (dst_address % ins.cp_size != 0 || reinterpret_cast<std::uintptr_t>(src) % ins.cp_size != 0)
                failf(file, line, "cp.async: addresses must be aligned to the %d-byte copy", ins.cp_size);
            CpAsyncCopy copy{static_cast<unsigned char*>(shared_pointer(dst_address, ins.cp_size, "cp.async", file, line)),
                             src, ins.cp_size, static_cast<int>(src_size)};
            if (g_counting) {  // the memory counters: a global read and a shared write, 16 B (cg) or cp-size
                if (src_size > 0) counters_record(ptx, src, static_cast<unsigned>(src_size), false, file, line, "cp.async");
                counters_record(ptx, copy.dst, static_cast<unsigned>(ins.cp_size), true, file, line, "cp.async");
            }
            if (options().cp_async == CpAsyncMode::kImmediate) land(copy);
            else state.open.push_back(copy);
            return;
        }
        case Op::kCommit: {
            CpAsyncState& state = current_cp_async("cp.async.commit_group", file, line);
            state.groups.push_back(std::move(state.open));
            state.open.clear();
            return;
        }
        case Op::kWaitGroup:
        case Op::kWaitAll: {
            CpAsyncState& state = current_cp_async("cp.async.wait_group", file, line);
            long long keep = 0;
            if (ins.op == Op::kWaitAll) {
                state.groups.push_back(std::move(state.open));  // wait_all = commit_group + wait_group 0
                state.open.clear();
            } else {
                keep = arg_value(ins.args[0], ops, ins, file, line);
                if (keep < 0) failf(file, line, "cp.async.wait_group %lld: N must be >= 0", keep);
            }
            // Groups complete in commit order: all but the newest `keep` have landed now.
            while (static_cast<long long>(state.groups.size()) > keep) {
                for (const CpAsyncCopy& copy : state.groups.front()) land(copy);
                state.groups.erase(state.groups.begin());
            }
            return;
        }
        case Op::kLdmatrix: {
            LdmatrixSlot slot{};
            for (int k = 0; k < ins.matrices; ++k) {
                const AsmOperand& out = operand(ops, ins.args[0].refs[k], ins, file, line);
                check_constraint(out, 'r', true, ins, file, line);
                slot.out[k] = static_cast<std::uint32_t*>(out.ptr);
            }
            const AsmOperand& address = operand(ops, ins.args[1].refs[0], ins, file, line);
            check_constraint(address, 'r', false, ins, file, line);
            slot.address = static_cast<std::uint32_t>(read_int(address));
            slot.matrices = ins.matrices;
            slot.trans = ins.trans;
            // The memory counters: lanes 8m..8m+7 each read one 16-byte row of matrix m.
            if (g_counting && lane_id() < 8 * ins.matrices)
                counters_record(ptx, shared_pointer(slot.address, 16, "ldmatrix", file, line), 16, false, file, line,
                                "ldmatrix");
            warp_collective(ins.trans ? "ldmatrix.trans" : "ldmatrix", 0xffffffffu, &ldmatrix_combine, &slot, file,
                            line);
            return;
        }
        case Op::kMma: {
            MmaSlot slot{};
            slot.bf16 = ins.a_bf16;
            for (int i = 0; i < 4; ++i) {
                const AsmOperand& d = operand(ops, ins.args[0].refs[i], ins, file, line);
                if (d.constraint[0] != '+' && d.constraint[0] != '=') bad_ptx(ins.text, "mma: d must be outputs", file, line);
                if (d.size != 4) bad_ptx(ins.text, "mma: d must be floats", file, line);
                slot.d[i] = static_cast<float*>(d.ptr);
                const AsmOperand& a = operand(ops, ins.args[1].refs[i], ins, file, line);
                check_constraint(a, 'r', false, ins, file, line);
                slot.a[i] = static_cast<std::uint32_t>(read_int(a));
                const AsmOperand& c = operand(ops, ins.args[3].refs[i], ins, file, line);
                if (c.size != 4 || (c.constraint[0] == '=')) bad_ptx(ins.text, "mma: c must be read floats", file, line);
                std::memcpy(&slot.c[i], c.ptr, 4);
            }
            for (int i = 0; i < 2; ++i) {
                const AsmOperand& b = operand(ops, ins.args[2].refs[i], ins, file, line);
                check_constraint(b, 'r', false, ins, file, line);
                slot.b[i] = static_cast<std::uint32_t>(read_int(b));
            }
            warp_collective(ins.a_bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", 0xffffffffu, &mma_combine, &slot,
                            file, line);
            return;
        }
    }
}

}  // namespace cuda_sim
