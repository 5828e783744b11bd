"""Shared test setup.

Triton kernels: on a machine without a GPU they run on CPU tensors in Triton's
interpreter. triton.jit picks the interpreter when a kernel is *defined*, so the switch
must be on before pyllmc.kernels is imported: it is set here, at collection, only when
no GPU is visible. It changes nothing but the Triton kernels (the torch backend, the CUDA
extension and torch.compile's CPU code do not read it). On a GPU machine it stays off
and the same tests run the compiled kernels on the GPU.

CUDA kernels: on a machine without a GPU they run on the CPU simulator (pyllmc.cuda_sim):
PYLLMC_CUDA_SIM=1 is set here unless the environment says otherwise (PYLLMC_CUDA_SIM=0 turns
it off), so every [cuda] test runs the real csrc/ kernels through the ops layer on CPU
tensors. The simulator is built once per session, before the first test, from this
checkout's csrc/ (PYLLMC_CSRC); a build failure stops the run. It simulates the GPU that
PYLLMC_CUDA_SIM_DEVICE names (default sm_90; the header says which); tests/test_cuda_profiles.py
switches between GPUs in-process.

Markers and limits: tests that run CUDA kernels ([cuda] parametrizations, GPU-only tests)
are marked `gpu` (`pytest -m gpu` is the GPU check's test stage); PYLLMC_TEST_TIMEOUT=N fails
a test that runs longer than N seconds (a SIGALRM between Python bytecodes), and ends the whole
run with every thread's stack min(N, 30) s later if the test is stuck inside C code (a kernel that never
returns).

Random inputs: every test draws fresh inputs from a seed made of the session seed and the
test's id. The session seed is random unless PYLLMC_TEST_SEED is set, and is printed in
the header, so any failure can be replayed exactly.
"""

import faulthandler
import os
import random
import signal
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PYLLMC_CUDA_SIM", "1")
os.environ.setdefault("PYLLMC_CSRC", str(Path(__file__).resolve().parent.parent / "csrc"))

SESSION_SEED = int(os.environ.get("PYLLMC_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    from pyllmc import cuda_sim

    if cuda_sim.enabled():
        device = cuda_sim.device_name_from_env()  # ValueError for an unknown PYLLMC_CUDA_SIM_DEVICE
        capability, optin, gpus = cuda_sim.DEVICES[device]
        cuda = (f"simulated on the CPU (PYLLMC_CUDA_SIM=1) as {device} ({gpus}: compute capability "
                f"{capability[0]}.{capability[1]}, {optin} B shared memory per block; PYLLMC_CUDA_SIM_DEVICE)")
    else:
        cuda = "pyllmc._C"
    return (f"pyllmc: PYLLMC_TEST_SEED={SESSION_SEED}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  "
            f"cuda backend: {cuda}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # -q (the README's command) hides the header: a failure must still say how to replay its inputs
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"pyllmc: the failures above drew their inputs from PYLLMC_TEST_SEED={SESSION_SEED} "
                                    f"(set it to replay them)")


_stderr_copy = None  # the terminal's stderr, kept before pytest captures fd 2 during tests


def pytest_configure(config):
    global _stderr_copy
    _stderr_copy = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")


def pytest_unconfigure(config):
    global _stderr_copy
    faulthandler.cancel_dump_traceback_later()  # no watchdog may write to the copy once it is closed
    if _stderr_copy is not None:
        _stderr_copy.close()
        _stderr_copy = None


def pytest_sessionstart(session):
    """Build the CUDA simulator up front: its compile errors are this run's first news."""
    from pyllmc import cuda_sim

    if not cuda_sim.enabled():
        return
    try:
        cuda_sim.toolchain()
    except cuda_sim.BuildError as err:  # no compiler or CUDA headers: the [cuda] tests skip, saying so
        print(f"\npyllmc: the CUDA simulator cannot be built here ({err}); [cuda] tests will skip")
        return
    cuda_sim.load()  # BuildError / RewriteError: a kernel that does not compile is a failed run


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec else ()
        if "cuda" in params or "on_gpu_only" in item.fixturenames:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _time_limit():
    seconds = int(os.environ.get("PYLLMC_TEST_TIMEOUT", "0") or 0)
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"the test ran past its {seconds} s limit (PYLLMC_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    # SIGALRM's handler runs only when the interpreter gets control back; a test stuck inside C code
    # (a simulated kernel waiting forever, malloc's lock after a kernel wrote past a tensor's end)
    # never gives it back. faulthandler's watchdog thread then prints every stack and ends the run.
    faulthandler.dump_traceback_later(seconds + min(30, seconds), exit=True, file=_stderr_copy or sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_SYS_PATH_AT_START: list = []


def pytest_collection(session):
    _SYS_PATH_AT_START[:] = sys.path


def pytest_collection_finish(session):
    """No test module may leave a folder on sys.path: the repository root there lets its folders
    shadow installed packages for every test after it. (pytest's own insert of tests/ is allowed.)"""
    tests_dir = str(Path(__file__).resolve().parent)
    added = [entry for entry in sys.path if entry not in _SYS_PATH_AT_START and entry != tests_dir]
    if added:
        raise pytest.UsageError(f"collecting the tests left {added} on sys.path: import the module under a "
                                f"try/finally that removes the entry again")


def _installed_library_internals(entry: str) -> bool:
    """A folder inside an installed package (torch's inductor puts setuptools' vendored packages there on
    first use and relies on it later): a library's own business, not a test's."""
    return "site-packages" in Path(entry).parts or "dist-packages" in Path(entry).parts


@pytest.fixture(autouse=True)
def _sys_path_unchanged(request):
    """A test that edits sys.path restores it (else the next tests import from wherever it pointed)."""
    before = list(sys.path)
    yield
    if sys.path == before:
        return
    added = [entry for entry in sys.path if entry not in before]
    if added and all(_installed_library_internals(entry) for entry in added) and \
            [entry for entry in sys.path if entry not in added] == before:
        return
    removed = [entry for entry in before if entry not in sys.path]
    what = f"added {added}, removed {removed}" if added or removed else "reordered or duplicated entries"
    sys.path[:] = before
    pytest.fail(f"{request.node.nodeid} changed sys.path ({what}) and did not restore it", pytrace=False)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = (SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def kernel_device(backend_name: str) -> torch.device:
    """The device a kernel backend's tests run on, or skip with the reason it can't run."""
    import pyllmc

    status = pyllmc.available_backends()[backend_name]
    if not status.available:
        pytest.skip(f"backend {backend_name!r} unavailable: {status.reason}")
    if status.simulated:
        return torch.device("cpu")  # the CUDA kernels on the CPU simulator
    if backend_name == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")  # triton under the interpreter


def interpreted(backend_name: str, device: torch.device) -> bool:
    """True when a kernel backend's tests run in Triton's CPU interpreter (slow; bf16 dots wrong)."""
    return backend_name == "triton" and device.type == "cpu"


def simulated(backend_name: str, device: torch.device) -> bool:
    """True when the cuda backend's tests run on the CPU simulator (exact numerics, ~us per barrier)."""
    return backend_name == "cuda" and device.type == "cpu"


@pytest.fixture(params=["cuda", "triton"])
def kernel_backend(request):
    """(backend name, device) for each kernel implementation; skips a backend that can't run."""
    return request.param, kernel_device(request.param)


def expect_cuda_backend_device_error(call_on) -> None:
    """`call_on(device)` runs an op with backend="cuda" on inputs placed on `device`. Asserts the
    error for inputs on the wrong device: a ValueError naming the device the backend takes (CUDA
    tensors on a GPU, CPU tensors on the simulator), or BackendUnavailableError where it cannot run."""
    import pyllmc

    status = pyllmc.available_backends()["cuda"]
    if not status.available:
        with pytest.raises(pyllmc.BackendUnavailableError, match="cuda"):
            call_on("cpu")
    elif status.simulated:
        with pytest.raises(ValueError, match=r"backend 'cuda' is simulated on the CPU here \(PYLLMC_CUDA_SIM=1\): "
                                             r"it runs on CPU tensors; the inputs are on meta"):
            call_on("meta")
    else:
        with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors; the inputs are on cpu"):
            call_on("cpu")


def cuda_extension_modules() -> list:
    """The builds of the CUDA launchers importable here: pyllmc._C (when nvcc built it) and the
    CPU simulator's pyllmc._C_sim (when it is on). Their host-side checks run on either."""
    from pyllmc import cuda_sim

    modules = []
    try:
        from pyllmc import _C

        modules.append(_C)
    except ImportError:
        pass
    if cuda_sim.enabled():
        modules.append(cuda_sim.load())
    return modules


@pytest.fixture
def on_gpu_only():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def trainer():
    """train_gpt2.py as a module, for tests that call its functions in-process (a subprocess would pay
    torch's import per call). The trainer is a script at the repository root, not part of the installed
    package, so it is run from its path (runpy, as `python train_gpt2.py` would) rather than imported:
    putting the root on sys.path would make the source tree's pyllmc shadow the installed one."""
    import runpy
    import types

    return types.SimpleNamespace(**runpy.run_path(str(Path(__file__).resolve().parent.parent / "train_gpt2.py"),
                                                  run_name="train_gpt2"))
