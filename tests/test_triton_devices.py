"""The Triton kernels on every GPU their users have, checked on the CPU.

- Tiles from the device: the attention kernels choose (BLOCK_M, BLOCK_N, num_warps, num_stages)
  from the device's compute capability and opt-in shared memory per block, shrinking a config
  whose estimated shared memory does not fit (kernels/attention.py). The estimate is checked
  against what the compiler allocates by dev/triton_report.py (tests/test_triton_gpu_compile.py);
  here: every choice fits every architecture's limit, and sm_80 / sm_90 keep the tables' tiles.
- Launches on the tensors' device: Triton launches on the current device, so every Triton launch
  of every op and of the optimizer runs inside pyllmc.ops._common.triton_launch(tensor), which
  makes the tensor's device current (a no-op for the interpreter's CPU tensors).
"""

import contextlib
import types

import pytest
import torch

import pyllmc
from pyllmc import ops
from pyllmc.kernels import _common
from pyllmc.kernels import attention as attention_kernels

# The architectures users train on and their opt-in shared memory per block (bytes).
SHARED_MEMORY = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 120: 101376, 90: 232448, 100: 232448}
KERNELS = ("fwd", "dkdv", "dq")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_the_architecture_table_is_the_users_gpus():
    assert _common.SHARED_MEMORY_PER_BLOCK == SHARED_MEMORY


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY))
def test_attention_tiles_fit_every_architecture(arch):
    capability, limit = (arch // 10, arch % 10), SHARED_MEMORY[arch]
    for dtype in DTYPES:
        for head_dim in attention_kernels.HEAD_DIMS:
            for kernel in KERNELS:
                config = attention_kernels.gpu_block_config(kernel, head_dim, dtype, capability, limit)
                block_m, block_n, warps, stages = config
                where = f"sm_{arch} {kernel} D={head_dim} {dtype}: {config}"
                estimate = attention_kernels.shared_memory_estimate(kernel, head_dim, dtype, config, capability)
                assert estimate <= limit, f"{where} needs ~{estimate} B of shared memory; the GPU has {limit}"
                assert min(block_m, block_n) >= 16 and stages >= 1 and warps in (4, 8), where
                if kernel == "dkdv":
                    assert block_n % block_m == 0, where
                else:
                    assert block_m % block_n == 0, where


@pytest.mark.parametrize("arch", [80, 90])
def test_sm80_and_sm90_keep_their_tables(arch):
    """The tables were tuned there; a device-aware choice must not change them."""
    table = attention_kernels._HOPPER_16BIT if arch == 90 else attention_kernels._AMPERE_16BIT
    for dtype in DTYPES:
        for head_dim in attention_kernels.HEAD_DIMS:
            for kernel in KERNELS:
                want = (attention_kernels._FP32 if dtype == torch.float32 else table)[head_dim][kernel]
                got = attention_kernels.gpu_block_config(kernel, head_dim, dtype, (arch // 10, 0), SHARED_MEMORY[arch])
                assert got == want, f"sm_{arch} {kernel} D={head_dim} {dtype}"


def test_turing_bf16_takes_fma_tiles():
    """A T4 has no bf16 tensor cores: its bf16 dots run on the FMA units, with small one-stage tiles
    (the tensor-core tiles needed 80 KB of its 64 KB and spilled 6.6 KB per thread)."""
    for kernel in KERNELS:
        config = attention_kernels.gpu_block_config(kernel, 64, torch.bfloat16, (7, 5), SHARED_MEMORY[75])
        assert config[3] == 1 and config[0] * config[1] <= 64 * 32, (kernel, config)
        fp16 = attention_kernels.gpu_block_config(kernel, 64, torch.float16, (7, 5), SHARED_MEMORY[75])
        assert fp16[3] > 1, f"fp16 has tensor cores on sm_75: {kernel} {fp16}"


def test_less_shared_memory_gives_smaller_configs():
    """The same GPU with less shared memory gets a config that fits it: stages go first."""
    for kernel in KERNELS:
        full = attention_kernels.gpu_block_config(kernel, 128, torch.bfloat16, (8, 0), SHARED_MEMORY[80])
        for limit in (101376, 65536, 49152, 32768):
            small = attention_kernels.gpu_block_config(kernel, 128, torch.bfloat16, (8, 0), limit)
            assert attention_kernels.shared_memory_estimate(kernel, 128, torch.bfloat16, small, (8, 0)) <= limit
            assert small[0] * small[1] * small[3] <= full[0] * full[1] * full[3]
    with pytest.raises(ValueError, match="no tile fits in 4096 bytes"):
        attention_kernels.gpu_block_config("fwd", 128, torch.bfloat16, (8, 0), 4096)


def test_the_estimate_grows_with_every_dimension():
    base = attention_kernels.shared_memory_estimate("fwd", 64, torch.bfloat16, (64, 32, 4, 2), (8, 0))
    for config in ((128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 4)):
        assert attention_kernels.shared_memory_estimate("fwd", 64, torch.bfloat16, config, (8, 0)) > base
    assert attention_kernels.shared_memory_estimate("fwd", 128, torch.bfloat16, (64, 32, 4, 2), (8, 0)) > base
    assert attention_kernels.shared_memory_estimate("fwd", 64, torch.float32, (64, 32, 4, 2), (8, 0)) > base
    # wgmma keeps num_stages buffers where mma.sync keeps num_stages - 1
    assert attention_kernels.shared_memory_estimate("fwd", 64, torch.bfloat16, (64, 32, 4, 3), (9, 0)) > \
        attention_kernels.shared_memory_estimate("fwd", 64, torch.bfloat16, (64, 32, 4, 3), (8, 0))


def test_the_device_is_asked(monkeypatch):
    """gpu_of reads capability, SMs and opt-in shared memory from the device, and the launch
    configuration follows: an sm_86 with 99 KB and a hypothetical sm_80 with 48 KB."""
    devices = {0: dict(major=8, minor=6, multi_processor_count=84, shared_memory_per_block_optin=101376),
               1: dict(major=8, minor=0, multi_processor_count=108, shared_memory_per_block_optin=49152)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(**devices[index]))
    _common._describe.cache_clear()
    try:
        gpu = _common.gpu_of(torch.device("cuda", 0))
        assert gpu == _common.GPU((8, 6), 84, 101376)
        for index, props in devices.items():
            device = torch.device("cuda", index)
            for kernel in KERNELS:
                config = attention_kernels.block_config(kernel, 128, torch.bfloat16, device, 1024)
                assert config == attention_kernels.gpu_block_config(
                    kernel, 128, torch.bfloat16, (props["major"], props["minor"]),
                    props["shared_memory_per_block_optin"])
                assert attention_kernels.shared_memory_estimate(kernel, 128, torch.bfloat16, config, (8, 0)) <= \
                    props["shared_memory_per_block_optin"]
    finally:
        _common._describe.cache_clear()


# ---- launches on the tensors' device ----------------------------------------------------------------

def test_triton_launch_selects_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def spy_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", spy_device)
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    with ops._common.triton_launch(on_gpu1):
        assert entered == [torch.device("cuda", 1)]
    with ops._common.triton_launch(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)], "a CPU tensor selected a device"


@pytest.fixture
def launch_spy(monkeypatch):
    """Replaces triton_launch wherever it is used and records, for every Triton kernel launch,
    the device of the tensor whose triton_launch block it ran in (None: outside any)."""
    import importlib

    if not pyllmc.available_backends()["triton"].available:
        pytest.skip("the triton backend is unavailable here")
    inside: list = []
    launches: list = []
    real = ops._common.triton_launch

    @contextlib.contextmanager
    def spy(t):
        inside.append(t.device)
        try:
            with real(t):
                yield
        finally:
            inside.pop()

    # the modules, not the ops
    for name in ("_common", "attention", "cross_entropy", "gelu", "layernorm", "rmsnorm", "swiglu", "rope"):
        monkeypatch.setattr(importlib.import_module(f"pyllmc.ops.{name}"), "triton_launch", spy)
    run_class = type(attention_kernels.attention_forward_kernel)  # JITFunction, or the interpreter's
    original_run = run_class.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn.__name__ if hasattr(self, "fn") else str(self), inside[-1] if inside else None))
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(run_class, "run", recording_run)
    return launches


def _every_triton_launch_path(device):
    """Forward and backward of every op (both cross-entropy paths, an upstream gradient other than 1)
    and an optimizer step, on the triton backend."""
    x = torch.randn(4, 8, 32, device=device, requires_grad=True)
    ops.gelu(x, backend="triton").sum().backward()
    ops.swiglu(*x.chunk(2, dim=-1), backend="triton").sum().backward()
    ops.swiglu_packed(x, backend="triton").sum().backward()
    ops.relu2(x, backend="triton").sum().backward()
    cos, sin = ops.rope_tables(8, 32, device=device)
    ops.rope(x.view(4, 8, 1, 32), cos, sin, backend="triton").sum().backward()
    w, b = torch.randn(32, device=device, requires_grad=True), torch.randn(32, device=device, requires_grad=True)
    ops.layernorm(x, w, b, backend="triton").sum().backward()
    residual = torch.randn(4, 8, 32, device=device, requires_grad=True)
    h, y = ops.fused_residual_layernorm(residual, x, w, b, backend="triton")
    (h.sum() + y.sum()).backward()
    ops.rmsnorm(x, w, backend="triton").sum().backward()
    h, y = ops.fused_residual_rmsnorm(residual, x, backend="triton")
    (h.sum() + y.sum()).backward()
    q, k, v = (torch.randn(1, 2, 40, 16, device=device, requires_grad=True) for _ in range(3))
    ops.attention(q, k, v, backend="triton").sum().backward()
    logits = torch.randn(6, 50, device=device, requires_grad=True)
    targets = torch.tensor([1, 2, -1, 49, 0, 7], device=device)
    ops.cross_entropy(logits, targets, backend="triton").backward()
    ops.cross_entropy(logits * 1.0, targets, inplace_backward=True, backend="triton").backward(
        torch.tensor(-2.0, device=device))
    params = [torch.randn(300, device=device, requires_grad=True), torch.randn(7, device=device).bfloat16()]
    opt = pyllmc.optim.AdamW(params, lr=1e-3, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_every_triton_launch_runs_on_the_tensors_device(launch_spy):
    """A model on cuda:1 without torch.cuda.set_device: each Triton launch must happen inside
    triton_launch of its inputs' device (under the interpreter the device is the CPU, and the
    spy sees that every launch path goes through the helper)."""
    from conftest import kernel_device

    device = kernel_device("triton")
    _every_triton_launch_path(device)
    kernels = {name for name, _ in launch_spy}
    for expected in ("gelu_forward_kernel", "gelu_backward_kernel", "layernorm_forward_kernel",
                     "layernorm_backward_kernel", "rmsnorm_forward_kernel", "rmsnorm_backward_kernel",
                     "rmsnorm_reduce_partials_kernel", "attention_forward_kernel", "attention_dkdv_kernel",
                     "attention_dq_kernel", "attention_delta_kernel", "cross_entropy_forward_kernel",
                     "cross_entropy_backward_kernel", "cross_entropy_fused_kernel",
                     "cross_entropy_scale_grad_kernel", "adamw_step_kernel", "swiglu_forward_kernel",
                     "swiglu_backward_kernel", "relu2_forward_kernel", "relu2_backward_kernel",
                     "rope_forward_kernel", "rope_backward_kernel"):
        assert expected in kernels, f"{expected} never launched: the spy misses a launch path"
    outside = [name for name, where in launch_spy if where != device]
    assert not outside, f"Triton launches outside triton_launch({device}): {sorted(set(outside))}"
