"""pyllmc.optim.AdamW on every backend against torch.optim.AdamW.

Sizes: FULL_SIZES (43M params, odd sizes, a 1-element tensor) run on the torch backend and
on the GPU backends. Under the Triton interpreter (CPU) every element costs about a
microsecond, 30 s per step of FULL_SIZES, so the Triton kernel runs the scaled-down
SMALL_SIZES there: the same shapes of problem (a big tensor, a vector, an odd product,
a single element, an odd prime-ish size), 200k params.
"""

import copy
import io

import pytest
import torch

import pyllmc
from pyllmc.optim import AdamW, bf16_stochastic_round, rng_key

FULL_SIZES = [4096 * 1024, 4096, 50304 * 768, 1, 278011]
SMALL_SIZES = [4096 * 37, 4096, 503 * 77, 1, 2781]
TINY_SIZES = [4096 * 3 + 7, 1, 2781, 77]  # for the tests that compare backends with each other
STEPS = 7
LRS = [6e-4 * (1 + 0.5 * s) for s in range(STEPS)]  # a new lr every step, as a scheduler would set it
FP32_TOL = dict(rtol=1e-5, atol=1e-6)  # float32 rounding after 7 steps (fma vs separate ops)


@pytest.fixture(params=["torch", "cuda", "triton"])
def any_backend(request):
    """(backend name, device): the torch backend runs on the GPU when there is one, else the CPU."""
    name = request.param
    if name == "torch":
        return name, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from conftest import kernel_device

    return name, kernel_device(name)


def sizes_for(name: str, device: torch.device) -> list:
    """FULL_SIZES on a GPU; the CPU (interpreter or simulator) takes the small ones."""
    return SMALL_SIZES if device.type == "cpu" else FULL_SIZES


def make_params(sizes, dtype, device):
    return [torch.randn(n, device=device).to(dtype).requires_grad_(True) for n in sizes]


def fp32_copies(params):
    return [p.detach().float().clone().requires_grad_(True) for p in params]


def two_groups(params, weight_decay, **extra):
    """A decay group (the even tensors) and a no-decay group (the odd ones, as biases / LN weights)."""
    return [{"params": params[0::2], "weight_decay": weight_decay, **extra},
            {"params": params[1::2], "weight_decay": 0.0, "betas": (0.8, 0.99), **extra}]


def assign_grad(p, g):
    """p.grad = g, also where g's dtype differs from p's (torch checks it unless grad_dtype is None)."""
    if g.dtype != p.dtype and hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    p.grad = g


def set_grads(params, refs=None, grad_dtype=None):
    for i, p in enumerate(params):
        g = torch.randn(p.shape, device=p.device).to(grad_dtype or p.dtype)
        assign_grad(p, g)
        if refs is not None:
            refs[i].grad = g.float().clone()


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def assert_state_close(opt, ref_opt, params, refs, exact):
    for p, r in zip(params, refs):
        ours, theirs = opt.state[p], ref_opt.state[r]
        assert ours["step"].item() == theirs["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours[key].dtype == torch.float32
            if exact:
                assert torch.equal(ours[key], theirs[key]), key
            else:
                torch.testing.assert_close(ours[key], theirs[key], **FP32_TOL, msg=key)


# ---- float32 params: the same as torch.optim.AdamW --------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_fp32_matches_torch_adamw(any_backend, weight_decay):
    """7 steps, lr changing every step, two param groups (decay / no decay, other betas)."""
    name, device = any_backend
    sizes = sizes_for(name, device) if weight_decay else SMALL_SIZES
    params = make_params(sizes, torch.float32, device)
    refs = fp32_copies(params)
    start = params[0].detach().clone()
    opt = AdamW(two_groups(params, weight_decay), lr=LRS[0], backend=name)
    ref_opt = torch.optim.AdamW(two_groups(refs, weight_decay), lr=LRS[0], betas=(0.9, 0.95), eps=1e-8,
                                foreach=False)
    for lr in LRS:
        set_lr(opt, lr)
        set_lr(ref_opt, lr)
        set_grads(params, refs)
        opt.step()
        ref_opt.step()
    # The torch backend is torch.optim.AdamW op for op: bitwise on the same device.
    exact = name == "torch"
    for p, r in zip(params, refs):
        assert p.dtype == torch.float32
        if exact:
            assert torch.equal(p, r)
        else:
            torch.testing.assert_close(p, r, **FP32_TOL)
    assert_state_close(opt, ref_opt, params, refs, exact)
    assert not torch.equal(params[0], start), "the params did not move"


# ---- bf16 params with fp32 master weights ----------------------------------------------------

@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_bf16_master_weights_match_fp32_reference(any_backend, grad_dtype):
    """The master copy follows torch.optim.AdamW run on fp32 copies; the bf16 param is the
    master rounded to nearest even after every step."""
    name, device = any_backend
    sizes = sizes_for(name, device) if device.type == "cuda" else SMALL_SIZES
    params = make_params(sizes, torch.bfloat16, device)
    refs = fp32_copies(params)
    opt = AdamW(two_groups(params, 0.1), lr=LRS[0], backend=name)
    ref_opt = torch.optim.AdamW(two_groups(refs, 0.1), lr=LRS[0], betas=(0.9, 0.95), foreach=False)
    exact = name == "torch"
    for lr in LRS:
        set_lr(opt, lr)
        set_lr(ref_opt, lr)
        set_grads(params, refs, grad_dtype)
        opt.step()
        ref_opt.step()
        for p, r in zip(params, refs):
            master = opt.state[p]["master"]
            assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert torch.equal(p, master.to(torch.bfloat16)), "param != master rounded to nearest even"
            if exact:
                assert torch.equal(master, r)
            else:
                torch.testing.assert_close(master, r.detach(), **FP32_TOL)
    assert_state_close(opt, ref_opt, params, refs, exact)


def test_bf16_without_master_weights(any_backend):
    """master_weights=False: the update runs on the bf16 param itself (m, v fp32), no master state.
    Kernels against the torch backend: equal up to one bf16 rounding flip on a rare element."""
    name, device = any_backend
    params = make_params(TINY_SIZES, torch.bfloat16, device)
    start = [p.detach().clone() for p in params]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opt = AdamW(two_groups(params, 0.1), lr=1e-2, master_weights=False, backend=name)
    ref_opt = AdamW(two_groups(twins, 0.1), lr=1e-2, master_weights=False, backend="torch")
    for _ in range(STEPS):
        set_grads(params)
        for p, t in zip(params, twins):
            assign_grad(t, p.grad.clone())
        opt.step()
        ref_opt.step()
    for p, t, s in zip(params, twins, start):
        assert "master" not in opt.state[p]
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert p.dtype == torch.bfloat16
        if p.numel() > 16:  # a 1-element bf16 param may step one ulp up and back down again: legit
            assert not torch.equal(p, s), "params did not move"
        diff = (p.float() - t.float()).abs()
        ulp = t.float().abs() * 2.0**-7 + 1e-30
        assert (diff <= ulp).all(), "more than one bf16 ulp from the torch reference"
        assert (diff > 0).float().mean().item() < 1e-2, "too many elements differ from the torch reference"


# ---- stochastic rounding ------------------------------------------------------------------------

def run_stochastic(name, device, seed, sizes=TINY_SIZES, steps=3):
    torch.manual_seed(1234)  # the same params and grads for every call
    params = make_params(sizes, torch.bfloat16, device)
    opt = AdamW(two_groups(params, 0.1), lr=1e-2, stochastic_rounding=True, seed=seed, backend=name)
    for _ in range(steps):
        set_grads(params)
        opt.step()
    return params, opt


def test_stochastic_rounding_is_reproducible(any_backend):
    name, device = any_backend
    a, opt_a = run_stochastic(name, device, seed=7)
    b, _ = run_stochastic(name, device, seed=7)
    c, _ = run_stochastic(name, device, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed, different bits"
    assert not torch.equal(a[0], c[0]), "another seed gave the same rounding"
    # the bf16 param is one of the two bf16 neighbours of the master value
    for p in a:
        master = opt_a.state[p]["master"]
        down = master.to(torch.bfloat16).float()
        err = (p.float() - master).abs()
        assert (err <= (down - master).abs() + master.abs() * 2.0**-7).all()


def test_stochastic_rounding_is_unbiased(any_backend):
    """With lr = 0 the step leaves the master unchanged and only rounds it: for a value a
    fraction f of a bf16 ulp above a bf16 number, about a fraction f of the elements round up,
    and the mean of the rounded values is the value."""
    name, device = any_backend
    n = 1 << 15
    fractions = [0.1, 0.25, 0.5, 0.7, 0.93]
    p = torch.zeros(len(fractions) * n, device=device, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW([p], lr=0.0, stochastic_rounding=True, seed=3, backend=name)
    p.grad = torch.randn_like(p)
    opt.step()  # creates the master copy
    base = torch.tensor([1.0, -3.0, 0.015625, 1000.0, -0.5])  # exact in bf16
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs())) - 7)  # bf16 keeps 8 significant bits
    values = (base + torch.tensor(fractions) * ulp * base.sign()).repeat_interleave(n)
    opt.state[p]["master"].copy_(values.to(device))
    p.grad = torch.randn_like(p)
    opt.step()
    rounded = p.detach().float().cpu().view(len(fractions), n)
    assert torch.equal(opt.state[p]["master"].cpu(), values), "lr = 0 changed the master"
    for i, f in enumerate(fractions):
        up = (rounded[i].abs() > base[i].abs()).float().mean().item()
        sigma = (f * (1 - f) / n) ** 0.5
        assert abs(up - f) < 6 * sigma, f"fraction {f}: {up:.4f} rounded up"
        assert ((rounded[i] == base[i]) | (rounded[i].abs() == base[i].abs() + ulp[i])).all()
        mean_err = (rounded[i].double().mean() - values[i * n].double()).abs().item()
        assert mean_err < 6 * sigma * ulp[i].item()


def test_stochastic_rounding_same_bits_on_every_backend(any_backend):
    """The rounding draws (seed, step, element index) bits: with lr = 0 (the value to round is
    the master itself) every backend writes the same bf16 params as the torch reference."""
    name, device = any_backend
    results = []
    for backend_name in (name, "torch"):
        torch.manual_seed(99)
        params = make_params(TINY_SIZES, torch.bfloat16, device)
        opt = AdamW(params, lr=0.0, stochastic_rounding=True, seed=11, backend=backend_name)
        set_grads(params)
        opt.step()
        for p in params:
            opt.state[p]["master"].add_(torch.rand_like(opt.state[p]["master"]) * 1e-2)
        set_grads(params)
        opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_stochastic_round_function():
    """The reference rounding on its own: exact bf16 values, infinities and NaN pass through; an
    inexact value goes to one of its two bf16 neighbours; the key depends on seed and step."""
    x = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -1.0e-3])
    idx = torch.arange(x.numel(), dtype=torch.int64)
    out = bf16_stochastic_round(x, idx, rng_key(0, 1))
    assert torch.equal(out[:5], x[:5].to(torch.bfloat16))
    assert torch.isnan(out[5])
    truncated = x[6:].view(torch.int32) & -65536  # drop the low 16 bits: towards zero
    down = truncated.view(torch.float32)
    up = (truncated + 65536).view(torch.float32)
    got = out[6:].float()
    assert ((got == down) | (got == up)).all()
    assert rng_key(0, 1) != rng_key(0, 2) and rng_key(0, 1) != rng_key(1, 1)


def test_cuda_and_triton_agree_bitwise():
    """Same math with explicit fma and IEEE sqrt/div on both: the same bits, master or not,
    stochastic rounding included. (Without a GPU: the CUDA simulator against the interpreter.)"""
    from conftest import kernel_device

    devices = {kernel_device(name) for name in ("cuda", "triton")}
    if len(devices) != 1:
        pytest.skip(f"the cuda and triton backends run on different devices here: {devices}")
    device = devices.pop()
    sizes = FULL_SIZES if device.type == "cuda" else TINY_SIZES
    for master_weights in (True, False):
        runs = []
        for name in ("cuda", "triton"):
            torch.manual_seed(5)
            params = make_params(sizes, torch.bfloat16, device)
            opt = AdamW(two_groups(params, 0.1), lr=1e-3, stochastic_rounding=True, seed=1,
                        master_weights=master_weights, backend=name)
            for _ in range(3):
                set_grads(params)
                opt.step()
            runs.append((params, opt))
        (pa, oa), (pb, ob) = runs
        for a, b in zip(pa, pb):
            assert torch.equal(a, b)
            for key in oa.state[a]:
                assert torch.equal(oa.state[a][key], ob.state[b][key]), key


# ---- state_dict ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(any_backend, dtype):
    name, device = any_backend
    params = make_params(TINY_SIZES, dtype, device)
    kwargs = dict(lr=1e-3, stochastic_rounding=dtype == torch.bfloat16, backend=name)
    opt = AdamW(two_groups(params, 0.1), seed=21, **kwargs)
    for lr in LRS[:3]:
        set_lr(opt, lr)
        set_grads(params)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    fresh = [p.detach().clone().requires_grad_(True) for p in params]
    other = AdamW(two_groups(fresh, 0.5), seed=999, **kwargs)  # hyperparameters and seed come from the state
    other.load_state_dict(saved)
    for p, q in zip(params, fresh):
        for key, value in opt.state[p].items():
            assert other.state[q][key].dtype == value.dtype, key
            assert torch.equal(other.state[q][key].cpu(), value.cpu()), key
    assert other.param_groups[0]["weight_decay"] == 0.1 and other.param_groups[0]["seed"] == 21
    for lr in LRS[3:]:
        set_lr(opt, lr)
        set_lr(other, lr)
        set_grads(params)
        for p, q in zip(params, fresh):
            q.grad = p.grad.clone()
        opt.step()
        other.step()
    for p, q in zip(params, fresh):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key].cpu(), other.state[q][key].cpu()), key


def test_loads_a_torch_adamw_state_dict():
    """A torch.optim.AdamW checkpoint (no master copies) loads and training continues the same."""
    params = make_params([1023, 37], torch.float32, "cpu")
    refs = fp32_copies(params)
    ref_opt = torch.optim.AdamW(refs, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(3):
        set_grads(refs)
        ref_opt.step()
    with torch.no_grad():
        for p, r in zip(params, refs):
            p.copy_(r)
    opt = AdamW(params, backend="torch")
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for _ in range(2):
        set_grads(params, refs)
        opt.step()
        ref_opt.step()
    for p, r in zip(params, refs):
        assert torch.equal(p, r)


def test_load_state_dict_rejects_mismatched_shapes():
    a = torch.randn(5, requires_grad=True)
    opt = AdamW([a], backend="torch")
    a.grad = torch.randn(5)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    b = torch.randn(6, requires_grad=True)
    with pytest.raises(ValueError, match="exp_avg.*shape"):
        AdamW([b], backend="torch").load_state_dict(state)
    with pytest.raises(ValueError, match="1 params"):
        AdamW([b, torch.randn(2, requires_grad=True)], backend="torch").load_state_dict(state)


# ---- skipped params, many groups, odd layouts ---------------------------------------------------

def test_grad_none_is_skipped(any_backend):
    """A param without a gradient is left alone and its step count does not advance, as in torch."""
    name, device = any_backend
    params = make_params([37, 1023, 5], torch.float32, device)
    refs = fp32_copies(params)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, backend=name)
    ref_opt = torch.optim.AdamW(refs, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    untouched = params[1].detach().clone()
    for step in range(4):
        set_grads(params, refs)
        if step < 2:  # params[1] gets its first gradient at step 3: two different bias corrections
            params[1].grad = None
            refs[1].grad = None
        opt.step()
        ref_opt.step()
        if step < 2:
            assert torch.equal(params[1], untouched) and len(opt.state[params[1]]) == 0
    assert opt.state[params[0]]["step"].item() == 4 and opt.state[params[1]]["step"].item() == 2
    for p, r in zip(params, refs):
        torch.testing.assert_close(p, r, **FP32_TOL)


def test_many_groups_and_mixed_dtypes(any_backend):
    """40 groups (more hyperparameter rows than one CUDA launch takes), fp32 / bf16 / fp16
    params, fp32 and low-precision grads in one optimizer, an unaligned param and gradient:
    the kernels agree with the torch backend."""
    name, device = any_backend
    torch.manual_seed(42)
    groups, twins_groups = [], []
    for i in range(40):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        if i == 7:  # a param at a 4-byte offset: not 16-byte aligned (scalar path)
            p = torch.nn.Parameter(torch.randn(1 + 301, device=device)[1:])
            assert p.data_ptr() % 16 != 0
        else:
            p = torch.randn(17 * i + 1, device=device).to(dtype).requires_grad_(True)
        t = p.detach().clone().requires_grad_(True)
        groups.append({"params": [p], "lr": 1e-3 * (i + 1), "weight_decay": 0.01 * (i % 4)})
        twins_groups.append({"params": [t], "lr": 1e-3 * (i + 1), "weight_decay": 0.01 * (i % 4)})
    opt = AdamW(groups, backend=name)
    ref = AdamW(twins_groups, backend="torch")
    for step in range(3):
        for i, (g, tg) in enumerate(zip(groups, twins_groups)):
            p, t = g["params"][0], tg["params"][0]
            grad_dtype = torch.float32 if i % 2 else p.dtype
            grad = torch.randn(p.numel() + 1, device=device).to(grad_dtype)
            assign_grad(p, grad[1:] if i == 9 else grad[:-1])  # i == 9: an unaligned gradient view
            assign_grad(t, p.grad.clone())
        opt.step()
        ref.step()
    for g, tg in zip(groups, twins_groups):
        p, t = g["params"][0], tg["params"][0]
        if p.dtype == torch.float32:
            torch.testing.assert_close(p, t, **FP32_TOL)
        else:
            torch.testing.assert_close(opt.state[p]["master"], ref.state[t]["master"], **FP32_TOL)
            assert torch.equal(p, opt.state[p]["master"].to(p.dtype))


def test_optim_is_exported():
    assert pyllmc.optim.AdamW is AdamW
    assert isinstance(AdamW([torch.zeros(1, requires_grad=True)]), torch.optim.Optimizer)


# ---- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=0.9), "betas must be a pair"),
    (dict(eps=-1e-8), "eps must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(backend="numpy"), "unknown backend"),
])
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_rejects_bad_group_hyperparameters():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW([{"params": [torch.zeros(3, requires_grad=True)], "lr": -1e-3}])


def test_rejects_bad_params():
    with pytest.raises(ValueError, match="dtype float32, bfloat16 or float16"):
        AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="contiguous"):
        AdamW([torch.nn.Parameter(torch.zeros(4, 6).t())])
    with pytest.raises(ValueError, match="stochastic_rounding .* bfloat16"):
        AdamW([torch.zeros(3, dtype=torch.float16, requires_grad=True)], stochastic_rounding=True)
    with pytest.raises(ValueError, match="one device"):
        AdamW([torch.zeros(3, requires_grad=True), torch.zeros(3, device="meta", requires_grad=True)])
    opt = AdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.zeros(3, device="meta", requires_grad=True)]})


def test_rejects_bad_grads():
    p = torch.zeros(4, requires_grad=True)
    opt = AdamW([p], backend="torch")
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assign_grad(p, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="float32 or its param's dtype"):
        opt.step()
    assign_grad(p, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 or its param's dtype"):
        opt.step()


def test_backend_for_wrong_device():
    """The cuda backend with params on a device it cannot take: a clear error."""
    from conftest import expect_cuda_backend_device_error

    def step_on(device):
        p = torch.zeros(4, requires_grad=True, device=device)
        p.grad = torch.ones(4, device=device)
        AdamW([p], backend="cuda").step()

    expect_cuda_backend_device_error(step_on)


# ---- CUDA graphs: capturable ---------------------------------------------------------------------

@pytest.fixture
def torch_capturable_on_cpu(monkeypatch):
    """torch.optim.AdamW(capturable=True) refuses CPU tensors only by a device check; its math
    runs on any device, so the reference runs on the CPU too when there is no GPU."""
    import torch.optim.adam as adam_module

    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices",
                        lambda *args, **kwargs: ["cuda", "cpu"])


@pytest.fixture
def host_sync_spy(monkeypatch):
    """Pretends the current stream is capturing a CUDA graph and records every Tensor.item() and
    pin_memory() call (each waits for the device or allocates pinned memory: both forbidden then)."""
    calls = []
    item, pin_memory = torch.Tensor.item, torch.Tensor.pin_memory

    def spy_item(self):
        calls.append("item")
        return item(self)

    def spy_pin_memory(self, *args, **kwargs):
        calls.append("pin_memory")
        return pin_memory(self, *args, **kwargs)

    def start_capture():
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        monkeypatch.setattr(torch.Tensor, "item", spy_item)
        monkeypatch.setattr(torch.Tensor, "pin_memory", spy_pin_memory)

    return start_capture, calls


def test_step_refuses_graph_capture_unless_capturable(any_backend, host_sync_spy):
    """A default AdamW passes lr and the bias corrections by value: captured, every replay would
    repeat the captured step. It says so before touching the device."""
    name, device = any_backend
    params = make_params([77, 4096], torch.float32, device)
    opt = AdamW(params, lr=1e-3, backend=name)
    set_grads(params)
    opt.step()
    before = [p.detach().clone() for p in params]
    start_capture, calls = host_sync_spy
    start_capture()
    set_grads(params)
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.step()
    assert calls == [], f"host syncs before the error: {calls}"
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "the refused step changed the params"


def run_capturable(name, device, dtype, lrs, master_weights=True, stochastic_rounding=False):
    """Params after each step of AdamW(capturable=True) whose device lr tensor is set to lrs[i]
    before step i (in place, as one would between graph replays)."""
    torch.manual_seed(11)
    params = make_params(TINY_SIZES, dtype, device)
    lr = torch.tensor(lrs[0], device=device)
    opt = AdamW(two_groups(params, 0.1), lr=lr, capturable=True, master_weights=master_weights,
                stochastic_rounding=stochastic_rounding, seed=3, backend=name)
    history = []
    for value in lrs:
        lr.fill_(value)
        set_grads(params)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def test_capturable_follows_the_device_lr_like_torch(any_backend, torch_capturable_on_cpu):
    """The lr read from the device tensor at each step: changing it between two steps changes the
    update exactly as in torch.optim.AdamW(capturable=True) (bitwise on the torch backend, which is
    its update op for op; within float32 rounding on the kernels, which fold the same values
    differently), and the step counts live on the device."""
    name, device = any_backend
    lrs = [1e-2, 3e-2, 0.0, 5e-3]
    torch.manual_seed(11)
    params = make_params(TINY_SIZES, torch.float32, device)
    refs = fp32_copies(params)
    lr, ref_lr = torch.tensor(lrs[0], device=device), torch.tensor(lrs[0], device=device)
    opt = AdamW(two_groups(params, 0.1), lr=lr, capturable=True, backend=name)
    ref_opt = torch.optim.AdamW(two_groups(refs, 0.1), lr=ref_lr, betas=(0.9, 0.95), eps=1e-8, capturable=True,
                                foreach=False)
    history = []
    for step, value in enumerate(lrs):
        lr.fill_(value)
        ref_lr.fill_(value)
        set_grads(params, refs)
        opt.step()
        ref_opt.step()
        history.append([p.detach().clone() for p in params])
        for got, want in zip(params, refs):
            if name == "torch":
                assert torch.equal(got, want), f"step {step}"
            else:
                torch.testing.assert_close(got.detach(), want.detach(), **FP32_TOL, msg=f"step {step}")
    for a, b in zip(history[1], history[2]):
        assert torch.equal(a, b), "a step at lr = 0 changed a param: the lr tensor was not read"
    assert not torch.equal(history[3][0], history[2][0])
    for p in params:
        step = opt.state[p]["step"]
        assert step.device == p.device and step.item() == len(lrs)


def test_capturable_steps_without_host_syncs(any_backend, host_sync_spy):
    """After one warm-up step (which builds the device tables), a capturable step neither reads
    the device nor copies from the host, whatever the lr tensor holds."""
    name, device = any_backend
    params = make_params(TINY_SIZES, torch.bfloat16, device)
    lr = torch.tensor(1e-3, device=device)
    opt = AdamW(two_groups(params, 0.1), lr=lr, capturable=True, stochastic_rounding=True, backend=name)
    set_grads(params)
    opt.step()
    start_capture, calls = host_sync_spy
    start_capture()
    before = [p.detach().clone() for p in params]
    lr.fill_(2e-3)
    opt.step()  # the same gradient tensors: the warm-up's tables are reused
    assert calls == [], f"host syncs during a captured step: {calls}"
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_capturable_kernels_agree_bitwise(torch_capturable_on_cpu):
    """The cuda and triton kernels read the same device rows and do the same math: the same bits,
    stochastic rounding included."""
    from conftest import kernel_device

    devices = {kernel_device(name) for name in ("cuda", "triton")}
    if len(devices) != 1:
        pytest.skip(f"the cuda and triton backends run on different devices here: {devices}")
    device = devices.pop()
    runs = [run_capturable(name, device, torch.bfloat16, [1e-3, 4e-3, 2e-3], stochastic_rounding=True)[0]
            for name in ("cuda", "triton")]
    for step, (a, b) in enumerate(zip(*runs)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {step}"


def test_capturable_rejects_bad_settings():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="whole optimizer"):
        AdamW([{"params": [p], "capturable": False}], capturable=True)
    with pytest.raises(ValueError, match="one float32 value"):
        AdamW([p], lr=torch.tensor([1e-3, 2e-3]), capturable=True)
