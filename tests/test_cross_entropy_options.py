"""ops.cross_entropy's Liger-Kernel options (reduction, label_smoothing, lse_square_scale = z-loss,
softcap, return_z_loss) on every backend and both paths (two kernels; inplace_backward=True, the fused
classifier), against PyTorch: F.cross_entropy with reduction / label_smoothing, and, where PyTorch has
no option (z-loss, soft-cap), the same math by autograd in float64 (pyllmc.testing.CrossEntropyCase).

Small sizes throughout (N = 13, V = 37 / 131, a few padding columns): the Triton interpreter and the
CUDA simulator run every program one after another."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyllmc import ops
from pyllmc.testing import assert_ok, cross_entropy_case

from conftest import cuda_extension_modules, kernel_device

DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["cuda", "triton", "torch"]

# each option alone, then all of them at once (with the per-row reduction)
OPTIONS = {
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(lse_square_scale=1e-2),
    "softcap": dict(softcap=3.0),
    "all": dict(reduction="none", label_smoothing=0.2, lse_square_scale=1e-3, softcap=2.5),
}


def backend_device(name):
    return name, (torch.device("cpu") if name == "torch" else kernel_device(name))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_option_matches_pytorch(backend_name, option, inplace_backward, dtype):
    """Loss and dlogits (and the zero gradient of the padding columns) by pyllmc.testing's criteria;
    a random upstream gradient ((N,) for reduction "none"), every 7th row ignored, V = 37 of W = 40."""
    name, device = backend_device(backend_name)
    V = 131 if option == "all" else 37
    case = cross_entropy_case((13, V), dtype, device, padded_vocab=V + 3, inplace_backward=inplace_backward,
                              whole_buffer=option == "softcap", **OPTIONS[option])
    results = case.run(name)
    assert_ok(case.compare(results), f"{name} {option} inplace={inplace_backward} {dtype}: ")
    if option in ("none", "all"):
        assert results["loss"].shape == (13,)
        assert (results["loss"][::7] == 0).all()  # ignored rows: loss 0


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_none_with_an_all_ones_upstream(backend_name, inplace_backward):
    """reduction "none" with loss.sum(): the fused path's in-place gradient is used as written (the
    scale kernel skips rows whose factor is 1) and equals F.cross_entropy's."""
    name, device = backend_device(backend_name)
    case = cross_entropy_case((13, 37), torch.float32, device, inplace_backward=inplace_backward, reduction="none",
                              label_smoothing=0.05, dloss=1.0)
    assert_ok(case.compare(case.run(name)), f"{name}: ")


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_label_smoothing_is_pytorchs(backend_name, inplace_backward):
    """Directly against F.cross_entropy(label_smoothing=...), the sum and mean, ignoring an index
    inside the vocabulary."""
    name, device = backend_device(backend_name)
    x = torch.randn(13, 37, dtype=torch.float64) * 2
    t = torch.randint(0, 37, (13,))
    t[::4] = 5
    for reduction in ("mean", "sum"):
        want = F.cross_entropy(x, t, ignore_index=5, label_smoothing=0.3, reduction=reduction)
        logits = (x.float().to(device) * 1.0).requires_grad_(True)
        h = logits * 1.0
        got = ops.cross_entropy(h, t.to(device), 5, inplace_backward=inplace_backward, reduction=reduction,
                                label_smoothing=0.3, backend=name)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert math.isclose(got.item(), want.item(), rel_tol=1e-5), (reduction, got.item(), want.item())


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_return_z_loss(backend_name, reduction, inplace_backward):
    """(loss, z_loss): z_loss = zs * logsumexp(capped logits)^2 over the valid rows, reduced and scaled
    like the loss; no gradient of its own; loss - z_loss is the cross-entropy without the z-loss."""
    name, device = backend_device(backend_name)
    zs, cap, scale = 1e-2, 4.0, 0.5
    x = torch.randn(13, 37, dtype=torch.float64) * 3
    t = torch.randint(0, 37, (13,))
    t[::5] = -1
    valid = t != -1
    z = cap * torch.tanh(x / cap)
    rows = torch.where(valid, zs * torch.logsumexp(z, 1) ** 2, 0.0)
    ce_rows = F.cross_entropy(z, t, ignore_index=-1, reduction="none")
    want_z = rows * scale if reduction == "none" else rows.sum() / valid.sum() * scale
    want_ce = ce_rows * scale if reduction == "none" else ce_rows.sum() / valid.sum() * scale
    logits = x.float().to(device).requires_grad_(True)
    loss, z_loss = ops.cross_entropy(logits * 1.0, t.to(device), inplace_backward=inplace_backward,
                                     loss_scale=scale, reduction=reduction, lse_square_scale=zs, softcap=cap,
                                     return_z_loss=True, backend=name)
    assert not z_loss.requires_grad and z_loss.dtype == torch.float32
    torch.testing.assert_close(z_loss.cpu().double(), want_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((loss - z_loss).detach().cpu().double(), want_ce, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    assert logits.grad is not None and logits.grad.isfinite().all()


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_all_rows_ignored_with_options(backend_name, inplace_backward):
    name, device = backend_device(backend_name)
    opts = dict(label_smoothing=0.1, lse_square_scale=1e-2, softcap=5.0)
    for reduction in ("mean", "sum", "none"):
        logits = (torch.randn(5, 37) * 50).to(device).requires_grad_(True)
        loss = ops.cross_entropy(logits * 1.0, torch.full((5,), -1, device=device), reduction=reduction,
                                 inplace_backward=inplace_backward, backend=name, **opts)
        loss.sum().backward()
        assert (loss == 0).all() and (logits.grad == 0).all(), reduction


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_softcap_bounds_the_logits(backend_name):
    """Huge logits: the capped loss is that of logits in [-c, c], finite, with a finite gradient
    (tanh' underflows to 0 far out; the uncapped loss would be ~1e4)."""
    name, device = backend_device(backend_name)
    x = torch.randn(13, 37, dtype=torch.float64) * 1e4
    t = torch.randint(0, 37, (13,))
    want = F.cross_entropy(10.0 * torch.tanh(x / 10.0), t)
    logits = x.float().to(device).requires_grad_(True)
    loss = ops.cross_entropy(logits * 1.0, t.to(device), softcap=10.0, backend=name)
    loss.backward()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
    assert logits.grad.isfinite().all()


BAD_OPTIONS = [
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=float("nan")), "label_smoothing"),
    (dict(label_smoothing="0.1"), "label_smoothing"),
    (dict(lse_square_scale=-1e-4), "lse_square_scale"),
    (dict(lse_square_scale=float("inf")), "lse_square_scale"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=-30.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=True), "softcap"),
    (dict(reduction="avg"), "reduction"),
    (dict(reduction=None), "reduction"),
]


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("bad,argument", BAD_OPTIONS, ids=[f"{k}={v!r}" for b, _ in BAD_OPTIONS for k, v in b.items()])
def test_bad_options_raise_naming_the_argument(bad, argument, inplace_backward):
    logits = torch.randn(4, 10, requires_grad=True)
    before = logits.detach().clone()
    with pytest.raises(ValueError, match=argument):
        ops.cross_entropy(logits * 1.0, torch.zeros(4, dtype=torch.long), inplace_backward=inplace_backward,
                          backend="torch", **bad)
    with pytest.raises(ValueError, match=argument):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3), torch.zeros(4, dtype=torch.long),
                                 backend="torch", **bad)
    assert torch.equal(logits.detach(), before)


def test_kernel_launchers_check_options():
    """The raw launchers refuse options their math does not cover (the op layer checks first)."""
    from pyllmc.kernels import cross_entropy as kernels
    x, t = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    for bad, argument in [(dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
                          (dict(lse_square_scale=-1.0), "lse_square_scale"), (dict(softcap=-1.0), "softcap")]:
        with pytest.raises(ValueError, match=argument):
            kernels.cross_entropy_forward(x, t, -1, **bad)
    p = 256  # any non-null address: the checks run first
    forward = dict(loss=p, stats=p, n_valid=p, row_losses=p, logits=p, targets=p, ignore_index=-1, dtype=0, stream=0,
                   N=4, V=10, row_stride=10)
    # a build older than the options (a stale pyllmc._C beside the sources) cannot take them
    for ext in [m for m in cuda_extension_modules() if "label_smoothing" in (m.cross_entropy_forward.__doc__ or "")]:
        for bad, argument in [(dict(reduction=3), "reduction"), (dict(label_smoothing=1.0), "label_smoothing"),
                              (dict(lse_square_scale=-1.0), "lse_square_scale"), (dict(softcap=-2.0), "softcap")]:
            with pytest.raises(ValueError, match=argument):
                ext.cross_entropy_forward(**forward, **bad)


def test_linear_cross_entropy_refuses_reduction_none():
    with pytest.raises(ValueError, match="reduction='none' is not supported"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3), torch.zeros(4, dtype=torch.long),
                                 reduction="none", backend="torch")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_linear_cross_entropy_options_equal_cross_entropy(backend_name, reduction):
    """linear_cross_entropy (3 chunks, padded weight rows, loss_scale) with every option equals
    ops.cross_entropy of the same logits with the same options: loss and the three gradients."""
    name, device = backend_device(backend_name)
    N, C, W, V = 13, 8, 40, 37
    opts = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-2, softcap=3.0, loss_scale=0.5)
    hidden = torch.randn(N, C, dtype=torch.float64)
    weight = torch.randn(W, C, dtype=torch.float64) / C ** 0.5 * 3
    t = torch.randint(0, V, (N,))
    t[::6] = -1

    h1, w1 = (a.float().to(device).requires_grad_(True) for a in (hidden, weight))
    loss1 = ops.linear_cross_entropy(h1, w1, t.to(device), num_classes=V, chunk_rows=5, backend=name, **opts)
    loss1.backward(torch.tensor(1.5, device=device))

    h2, w2 = (a.float().to(device).requires_grad_(True) for a in (hidden, weight))
    loss2 = ops.cross_entropy(h2 @ w2.t(), t.to(device), num_classes=V, backend=name, **opts)
    loss2.backward(torch.tensor(1.5, device=device))

    torch.testing.assert_close(loss1, loss2, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the loss-only path
        loss3 = ops.linear_cross_entropy(h1, w1, t.to(device), num_classes=V, chunk_rows=5, backend=name, **opts)
    torch.testing.assert_close(loss3, loss2.detach(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_options_change_the_result(backend_name):
    """Each option moves both the loss and the gradient (a kernel that ignored one would pass the
    all-defaults tests; the comparisons above would catch it too, this says which)."""
    name, device = backend_device(backend_name)
    x = torch.randn(13, 37, device=device) * 3
    t = torch.randint(0, 37, (13,), device=device)

    def run(**opts):
        logits = x.clone().requires_grad_(True)
        loss = ops.cross_entropy(logits, t, backend=name, **opts)
        loss.backward()
        return loss.detach(), logits.grad

    base_loss, base_grad = run()
    for opts in (dict(label_smoothing=0.1), dict(lse_square_scale=1e-2), dict(softcap=3.0)):
        loss, grad = run(**opts)
        assert not torch.equal(loss, base_loss) and not torch.equal(grad, base_grad), opts
