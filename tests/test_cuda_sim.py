"""The CUDA simulator itself (pyllmc.cuda_sim, csrc/sim/): its source rewrite, its PTX
instructions against numpy models of the PTX ISA, CUDA's rules it enforces, and the kernels
of csrc/ under every schedule and in the AddressSanitizer build.

The [cuda] tests of the other files check the kernels' answers on the simulator; this file
checks the simulator, and that the kernels' answers do not depend on the order threads run in.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cuda_driver  # dev/cuda_driver.py (pytest puts dev/ on sys.path)
from pyllmc import cuda_sim

ROOT = Path(__file__).resolve().parent.parent


def sim():
    """The loaded simulator module, or skip (only on a machine that can build it)."""
    if not cuda_sim.enabled():
        pytest.skip("the CUDA simulator is off (PYLLMC_CUDA_SIM is not 1: a GPU is here or it was turned off)")
    try:
        return cuda_sim.load()
    except cuda_sim.BuildError as err:
        pytest.skip(f"the CUDA simulator cannot be built here: {err}")


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# ---- the source rewrite ------------------------------------------------------------------------

LAUNCH_SOURCE = """\
// a comment with kernel<<<1, 2>>>(x) and asm("nop") in it
template <typename T, int N>
__global__ void k(T* x) {}
void f(float* x, cudaStream_t s) {
    k<float, 3 * 2>
        <<<dim3(1, 2), 64, 0, s>>>(
            x);
    other_kernel<<<1, 32>>>();
}
"""


def test_rewrite_turns_launches_into_calls_and_keeps_lines():
    out = cuda_sim.rewrite(LAUNCH_SOURCE, "/src/k.cu")
    assert out.startswith('#line 1 "/src/k.cu"\n')
    body = out.split("\n", 1)[1]
    assert body.count("\n") == LAUNCH_SOURCE.count("\n"), "line numbers must not move"
    assert '::cuda_sim::launch("k<float, 3 * 2>", k<float, 3 * 2>' in body
    assert ", ::cuda_sim::config(dim3(1, 2), 64, 0, s)" in body
    assert '::cuda_sim::launch("other_kernel", other_kernel, ::cuda_sim::config(1, 32));' in body
    assert "kernel<<<1, 2>>>(x)" in body, "comments are left alone"


def test_rewrite_shared_memory_declarations():
    src = ("__global__ void k() {\n"
           "    extern __shared__ __align__(16) unsigned char raw[];\n"
           "    __shared__ float sums[4][32];\n"
           "    __shared__ int one;\n"
           "}\n")
    out = cuda_sim.rewrite(src, "k.cu", file_index=2)
    assert "unsigned char* raw = ::cuda_sim::dynamic_shared_ptr<unsigned char>(16, __FILE__, __LINE__);" in out
    assert "auto& sums = ::cuda_sim::static_shared_ref<float[4][32]>(2001, 0, __FILE__, __LINE__);" in out
    assert "auto& one = ::cuda_sim::static_shared_ref<int>(2002, 0, __FILE__, __LINE__);" in out


def test_rewrite_inline_ptx_binds_every_operand():
    src = ('void f(unsigned (&r)[4], const void* p) {\n'
           '    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n"\n'
           '                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])\n'
           '                 : "r"(smem_u32(p))\n'
           '                 : "memory");\n'
           '    asm volatile("cp.async.commit_group;\\n" ::: "memory");\n'
           '}\n')
    out = cuda_sim.rewrite(src, "k.cu")
    assert out.count("\n") == src.count("\n") + 1
    assert ('::cuda_sim::asm_exec("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n", '
            '{::cuda_sim::asm_operand("=r", (r[0])), ::cuda_sim::asm_operand("=r", (r[1])), '
            '::cuda_sim::asm_operand("=r", (r[2])), ::cuda_sim::asm_operand("=r", (r[3])), '
            '::cuda_sim::asm_operand("r", (smem_u32(p)))}, __FILE__, __LINE__)') in out
    assert '::cuda_sim::asm_exec("cp.async.commit_group;\\n", {}, __FILE__, __LINE__)' in out


@pytest.mark.parametrize("src, match", [
    ('void f() {\n  asm volatile("bar.sync 0;");\n}\n', r"k\.cu:2: inline PTX 'bar\.sync' is not supported"),
    ('void f(int x) {\n\n  asm("mov.b32 %0, %1;" : "=r"(x) : "r"(x));\n}\n', r"k\.cu:3: inline PTX 'mov\.b32'"),
    ("__global__ void k() {\n  static __shared__ float s[4];\n}\n", r"k\.cu:2: 'static __shared__'"),
    ("__global__ void k() {\n  __shared__ float a[4], b[4];\n}\n", r"k\.cu:2: one variable"),
    ("__global__ void k() {\n  extern __shared__ float a[8];\n}\n", r"k\.cu:2: extern __shared__ must be"),
])
def test_rewrite_refuses_what_it_cannot_run(src, match):
    with pytest.raises(cuda_sim.RewriteError, match=match):
        cuda_sim.rewrite(src, "k.cu")


def test_every_csrc_file_rewrites():
    """The project's own kernels pass the rewrite (every asm they hold is simulated)."""
    for path in sorted((ROOT / "csrc").glob("*.cu*")):
        source = path.read_text()
        out = cuda_sim.rewrite(source, str(path))
        assert out.count("\n") == source.count("\n") + 1, path.name
        if "<<<" in source.replace("<<<...>>>", ""):
            assert "::cuda_sim::launch(" in out, path.name


# ---- PTX instructions against the ISA -----------------------------------------------------------

def _bits16(values: np.ndarray, bf16: bool) -> np.ndarray:
    t = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16 if bf16 else torch.float16)
    return t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo | (hi << 16)).astype(np.uint32)


@pytest.mark.parametrize("bf16", [True, False])
def test_mma_m16n8k16_follows_the_fragment_layouts(bf16):
    """mma.sync.m16n8k16: registers placed per the PTX ISA's fragment tables (g = lane / 4,
    t = lane % 4); D = A B + C with exact products and one rounding."""
    m = sim()
    rng = np.random.default_rng(7)
    A = rng.standard_normal((16, 16))
    B = rng.standard_normal((16, 8))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    dtype = torch.bfloat16 if bf16 else torch.float16
    A = torch.from_numpy(A).to(dtype).double().numpy()  # the values the registers can hold
    B = torch.from_numpy(B).to(dtype).double().numpy()
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        rows_cols = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
        for i, (r, col) in enumerate(rows_cols):
            a[lane, i] = _pack(_bits16(A[r, col:col + 1], bf16), _bits16(A[r, col + 1:col + 2], bf16))[0]
        for i, k in enumerate((2 * t, 2 * t + 8)):
            b[lane, i] = _pack(_bits16(B[k:k + 1, g], bf16), _bits16(B[k + 1:k + 2, g], bf16))[0]
        c[lane] = [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    d = np.zeros((32, 4), np.float32)
    m.selftest_mma(d=ptr(d), a=ptr(a), b=ptr(b), c=ptr(c), bf16=bf16)
    want = A @ B + C
    got = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        got[g, 2 * t], got[g, 2 * t + 1], got[g + 8, 2 * t], got[g + 8, 2 * t + 1] = d[lane]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("matrices", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_follows_the_isa(matrices, trans):
    """ldmatrix.m8n8.xN{.trans}.b16: lanes 8m..8m+7 address the rows of matrix m; lane l gets
    (row l/4, cols 2(l%4), 2(l%4)+1) of each matrix, or that of its transpose with .trans."""
    m = sim()
    rng = np.random.default_rng(matrices * 2 + trans)
    image = rng.integers(0, 2**16, size=40 * 8, dtype=np.uint16)  # 40 rows of 8 elements (16 bytes)
    offsets = (rng.permutation(40)[:32] * 8).astype(np.int32)      # each lane's row, anywhere in the image
    out = np.zeros((32, 4), np.uint32)
    m.selftest_ldmatrix(out=ptr(out), image=ptr(image), image_elems=image.size, offsets=ptr(offsets),
                        matrices=matrices, trans=trans)
    for mat in range(matrices):
        tile = np.stack([image[offsets[8 * mat + r]:offsets[8 * mat + r] + 8] for r in range(8)]).astype(np.uint32)
        if trans:
            tile = tile.T
        for lane in range(32):
            row, col = lane // 4, 2 * (lane % 4)
            assert out[lane, mat] == tile[row, col] | (tile[row, col + 1] << 16), (mat, lane)
    assert (out[:, matrices:] == 0).all()


@pytest.mark.parametrize("mode", cuda_sim.CP_ASYNC_MODES)
def test_cp_async_groups_zero_fill_and_the_two_landing_models(mode):
    """cp.async with src-size 16, 5 and 0 (the rest zero-filled), one group each; after
    wait_group 2 only the oldest group must have landed ("at_wait" lands nothing earlier,
    "immediate" everything at issue); after wait_group 0 all have."""
    m = sim()
    src = np.random.default_rng(3).integers(1, 256, size=3 * 32 * 16, dtype=np.uint8)
    after_first = np.zeros((32, 3, 16), np.uint8)
    after_all = np.zeros((32, 3, 16), np.uint8)
    with cuda_sim.schedule(cp_async=mode):
        m.selftest_cp_async(after_first=ptr(after_first), after_all=ptr(after_all), src=ptr(src))
    copies = src.reshape(3, 32, 16).transpose(1, 0, 2)  # [thread][group][byte]
    landed = copies.copy()
    landed[:, 1, 5:] = 0
    landed[:, 2, :] = 0
    np.testing.assert_array_equal(after_all, landed)
    np.testing.assert_array_equal(after_first[:, 0], landed[:, 0])
    if mode == "at_wait":
        assert (after_first[:, 1:] == 0xFF).all(), "a group that was not waited for has landed"
    else:
        np.testing.assert_array_equal(after_first, landed)


def _shfl_model(mode, lane, b, width):
    """CUDA's documented shuffle semantics, per lane: the source lane (or the caller's own)."""
    start = lane // width * width
    if mode == 0:
        return start + b % width
    if mode == 1:
        return lane - b if lane - start >= b else lane
    if mode == 2:
        return lane + b if lane - start + b < width else lane
    src = lane ^ b
    return lane if src // width > lane // width else src  # later segments give the own value


@pytest.mark.parametrize("width", [32, 16, 8, 1])
@pytest.mark.parametrize("mode, b", [(0, 5), (0, 37), (1, 3), (2, 3), (3, 1), (3, 6), (3, 17)])
def test_shuffles(mode, b, width):
    m = sim()
    values = (np.arange(32, dtype=np.int32) * 10 + 1)
    out = np.zeros(32, np.int32)
    m.selftest_shfl(out=ptr(out), values=ptr(values), mode=mode, b=b, width=width, mask=0xFFFFFFFF)
    want = [values[_shfl_model(mode, lane, b, width)] for lane in range(32)]
    np.testing.assert_array_equal(out, want)


def test_votes_with_a_partial_mask():
    m = sim()
    predicates = np.array([lane % 3 == 0 for lane in range(32)], np.int32)
    mask = 0x00FF00FF
    out = np.full((32, 3), 7, np.uint32)
    m.selftest_vote(out=ptr(out), predicates=ptr(predicates), mask=mask)
    ballot = sum(1 << lane for lane in range(32) if predicates[lane] and mask >> lane & 1)
    for lane in range(32):
        if mask >> lane & 1:
            assert list(out[lane]) == [ballot, 1, 0]
        else:
            assert list(out[lane]) == [7, 7, 7]


def test_syncthreads_count():
    m = sim()
    predicates = (np.arange(96) % 5 == 0).astype(np.int32)
    out = np.zeros(96, np.int32)
    m.selftest_syncthreads_count(out=ptr(out), predicates=ptr(predicates), threads=96)
    assert (out == predicates.sum()).all()


def test_uninitialized_static_shared_memory_reads_as_nan():
    m = sim()
    out = np.zeros(4, np.float32)
    m.selftest_static_shared(out=ptr(out))
    assert (out.view(np.uint32) == 0xFFFFFFFF).all()


# ---- schedules ------------------------------------------------------------------------------------

def _order(blocks, threads):
    """Per block, the events in the order they happened: 2t when thread t passes the point
    before a warp shuffle, 2t + 1 when it passes the point after it."""
    m = sim()
    order = np.full((blocks, 2 * threads), -1, np.int32)
    counter = np.zeros(blocks, np.int32)
    m.selftest_order(order=ptr(order), counter=ptr(counter), blocks=blocks, threads=threads)
    return order


def _events(threads, phase):
    return [2 * t + phase for t in threads]


def test_schedules_order_warps_and_lanes():
    warps = [range(0, 32), range(32, 64), range(64, 96)]
    with cuda_sim.schedule("forward"):  # in step: every warp before the shuffle, then every warp after it
        want = sum((_events(w, 0) for w in warps), []) + sum((_events(w, 1) for w in warps), [])
        assert (_order(2, 96) == want).all()
    with cuda_sim.schedule("reverse"):
        back = warps[::-1]
        want = sum((_events(w, 0) for w in back), []) + sum((_events(w, 1) for w in back), [])
        assert (_order(2, 96) == want).all()
    with cuda_sim.schedule("forward", greedy=True):  # each warp all the way to the barrier, then the next
        want = sum((_events(w, 0) + _events(w, 1) for w in warps), [])
        assert (_order(2, 96) == want).all()
    with cuda_sim.schedule("random", seed=1):
        first = _order(3, 96)
    with cuda_sim.schedule("random", seed=1):
        again = _order(3, 96)
    with cuda_sim.schedule("random", seed=2):
        other = _order(3, 96)
    assert (first == again).all(), "a seed must give the same order every time"
    assert not (first == other).all()
    for row in first:
        assert sorted(row) == list(range(2 * 96))
        position = {e: i for i, e in enumerate(row)}
        assert all(position[2 * t] < position[2 * t + 1] for t in range(96))
        assert list(row[:32]) != _events(range(32), 0), "lanes and warps are shuffled"
    assert not (first[0] == first[1]).all(), "every block draws its own order"


# ---- what the simulator refuses -------------------------------------------------------------------

@pytest.mark.parametrize("case, arg, match", [
    ("divergent_barrier", 0, r"__syncthreads while 32 other thread\(s\) wait at the one at .*selftest\.cu"),
    ("deadlock", 0, r"deadlock, no thread can go on .*wait in __shfl_xor_sync"),
    ("early_exit", 0, r"waits for lanes 0xffff0000 that have exited|exits while lanes"),
    ("mask_mismatch", 0, r"lanes disagree on a warp collective"),
    ("shared_overflow", 64, r"byte 0 past the end of this launch's 256 bytes of dynamic shared memory"),
    ("bad_global", 1 << 40, r"invalid memory access at address"),
    ("stack_overflow", 200, r"stack overflow"),
    ("ldmatrix_out_of_bounds", 0, r"ldmatrix touches shared bytes \[128, 144\) of dynamic shared memory, but the launch has 128"),
    ("too_many_threads", 0, r"invalid block \(2048, 1, 1\)"),
    ("zero_grid", 0, r"invalid grid \(0, 1, 1\)"),
    ("smem_without_optin", 0, r"65536 bytes of dynamic shared memory, more than the kernel's limit of 49152"),
])
def test_misuse_is_a_clear_launch_error(case, arg, match):
    m = sim()
    out = np.zeros(64, np.float32)
    with pytest.raises(RuntimeError, match=match) as info:
        m.selftest_misuse(which=case, out=ptr(out) if case != "bad_global" else 0, arg=arg)
    assert "pyllmc CUDA error" in str(info.value)
    # the simulator carries on: the next launch runs normally
    m.selftest_misuse(which="smem_with_optin", out=ptr(out))


def test_opted_in_dynamic_shared_memory_launches():
    m = sim()
    out = np.zeros(1, np.int32)
    m.selftest_misuse(which="smem_with_optin", out=ptr(out))
    assert out[0] == 2


# ---- the extension's calling convention -----------------------------------------------------------

def _parameters(function) -> list[str]:
    """The parameters of a pybind11 function, read from the signature on its docstring's first
    line (e.g. 'gelu_forward(*, out: int, inp: int, ...) -> None' gives ['*', 'out: int', ...])."""
    line = function.__doc__.splitlines()[0]
    inside = line[line.index("(") + 1:line.rindex(") -> ")]
    params, depth, start = [], 0, 0
    for i, ch in enumerate(inside):
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            params.append(inside[start:i].strip())
            start = i + 1
    return params + [inside[start:].strip()] if inside.strip() else params


def test_launchers_take_keywords_only():
    """The launchers take rows of bare integers, where two swapped pointers would still run: a
    positional call raises TypeError (and launches nothing), a call by name runs."""
    from pyllmc.ops._common import dtype_code

    m = sim()
    x = torch.randn(37)
    out = torch.full_like(x, float("nan"))
    args = dict(out=out.data_ptr(), inp=x.data_ptr(), n=x.numel(), dtype=dtype_code(x), stream=0)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        m.gelu_forward(*args.values())
    assert out.isnan().all(), "a refused call must not launch"
    m.gelu_forward(**args)
    torch.testing.assert_close(out, torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)

    # Every function of the module that takes more than one argument, launchers and the
    # simulator's controls alike, is declared keyword-only (its signature opens with '*').
    positional = []
    for name in dir(m):
        function = getattr(m, name)
        if name.startswith("_") or not callable(function) or not function.__doc__:
            continue
        params = _parameters(function)
        if len(params) > 1 and params[0] != "*":
            positional.append(f"{name}({', '.join(params)})")
    assert len(_parameters(m.gelu_forward)) == 6 and len(_parameters(m.selftest_mma)) == 6
    assert not positional, f"functions that still take positional arguments: {positional}"


# ---- the kernels of csrc/ do not depend on the schedule ------------------------------------------

def _digests(schedule, seed=0, cp_async="at_wait", greedy=False):
    with cuda_sim.schedule(schedule, seed, cp_async, greedy):
        return {r.name: r.digest for r in cuda_driver.run_cases()}


def test_every_launcher_gives_the_same_bits_in_every_schedule():
    """All CUDA launchers (dev/cuda_driver.py: five families, three dtypes, odd shapes, forward
    and backward) give bit-identical outputs with warps run forward, reversed and in random
    orders, in step or each as far as it can (greedy), and with cp.async landing at its wait or
    at once: no result depends on the order threads run in."""
    sim()
    forward = _digests("forward")
    assert len(forward) > 50
    for schedule, seed, cp_async, greedy in (("reverse", 0, "at_wait", False), ("random", 1, "at_wait", False),
                                             ("random", 2, "immediate", False), ("forward", 0, "immediate", False),
                                             ("forward", 0, "at_wait", True), ("reverse", 0, "immediate", True),
                                             ("random", 3, "at_wait", True)):
        other = _digests(schedule, seed, cp_async, greedy)
        moved = [name for name in forward if forward[name] != other[name]]
        assert not moved, (f"{schedule}{' greedy' if greedy else ''} (seed {seed}, cp.async {cp_async}) "
                           f"changes: {moved}")


def test_the_driver_matches_the_torch_backend():
    """The driver's check: every launcher's outputs by pyllmc.testing's criteria, fp16 included (which
    the op tests mostly leave to the GPU)."""
    sim()
    results = cuda_driver.run_cases(check=True)
    bad = [(r.name, r.problems) for r in results if not r.ok]
    assert not bad, bad


@pytest.mark.slow
def test_sanitizer_build_runs_every_launcher_cleanly(tmp_path):
    """The simulator and kernels built with -fsanitize=address,undefined: every launcher runs
    over exact-size torch buffers with no report, and gives the default build's bits."""
    sim()
    try:
        preload = cuda_sim.sanitizer_preload()
    except cuda_sim.BuildError as err:
        pytest.skip(str(err))
    cuda_sim.build("sanitize")  # here, so its compile time is not the subprocess's timeout
    env = dict(os.environ, PYLLMC_CUDA_SIM="1", PYLLMC_CUDA_SIM_VARIANT="sanitize",
               LD_PRELOAD=":".join(preload),
               # Python itself leaks by design; the kernels' reports are what matter
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    out_json = tmp_path / "sanitize.json"
    run = subprocess.run([sys.executable, str(ROOT / "dev" / "cuda_driver.py"), "--json", str(out_json),
                          "--schedule", "random", "--seed", "3", "--greedy"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:] + run.stderr[-6000:])
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error:" not in run.stderr, run.stderr[-6000:]
    import json

    sanitized = {r["name"]: r["digest"] for r in json.loads(out_json.read_text())}
    assert sanitized == _digests("forward")


def test_a_test_stuck_in_c_code_ends_the_run_with_its_stack(tmp_path):
    """PYLLMC_TEST_TIMEOUT's SIGALRM cannot reach a test blocked in C code (here: the signal is
    blocked, as it is for a kernel spinning in the simulator); the watchdog must end the run."""
    stuck = tmp_path / "test_stuck.py"
    stuck.write_text("import signal, time\n\n"
                     "def test_stuck():\n"
                     "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
                     "    time.sleep(60)\n")
    env = dict(os.environ, PYLLMC_TEST_TIMEOUT="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(stuck)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode != 0
    assert "Timeout (" in done.stderr and "test_stuck" in done.stderr, done.stderr[-2000:]
