"""ops.rmsnorm and ops.fused_residual_rmsnorm on each kernel backend against PyTorch autograd of
F.rms_norm in float64 (bf16 / fp16 via the flash criterion: at most 2x PyTorch's own error in the
same dtype), with and without a weight."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import pyllmc
from pyllmc import ops
from pyllmc import testing
from pyllmc.testing import RMSNormCase, assert_elementwise_close, assert_ok
from conftest import expect_cuda_backend_device_error

# (rows, C). 768: Llama-sized rows in whole 128-bit vectors (one warp per row); 1128: whole vectors,
# the warp's last chunk partly past C; 17: not a multiple of the vector width (scalar path); 64 and 128:
# QK-norm's head dims (CUDA: a group of C / W lanes per row, several rows per warp); 5: scalar groups
# of 8 lanes; 1: one lane per row.
SHAPES = [(37, 768), (7, 1128), (5, 17), (45, 64), (19, 128), (33, 5), (3, 1)]


def run_case(backend, shape, dtype, device, *, fused=False, weight=True, eps=1e-6):
    """(case, its results on `backend`): pyllmc.testing's rmsnorm case, forward and every gradient."""
    case = testing.rmsnorm_case(shape, dtype, device, fused=fused, weight=weight, eps=eps)
    got = case.run(backend)
    for name in case.outputs:
        assert got[name].shape == shape and got[name].device == case.device, name
    return case, got


def leaf_inputs(case, *names):
    return [case.inputs[name].requires_grad_(True) for name in names]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows,C", SHAPES)
def test_rmsnorm_matches_torch(kernel_backend, rows, C, fused, dtype):
    name, device = kernel_backend
    case, got = run_case(name, (rows, C), dtype, device, fused=fused)
    assert set(got) == {"y", "dx", "dweight"} | ({"h", "dresidual"} if fused else set())
    case.check(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows,C", [(37, 768), (5, 17), (45, 64), (3, 4099)])
def test_without_weight(kernel_backend, rows, C, fused, dtype):
    """nanochat's RMSNorm (no gain): y and the input gradients only; 4099: the CUDA generic kernels."""
    name, device = kernel_backend
    case, got = run_case(name, (rows, C), dtype, device, fused=fused, weight=False)
    assert "dweight" not in got
    case.check(got)


@pytest.mark.parametrize("shape", [(37, 768), (5, 17), (29, 64)])
@pytest.mark.parametrize("fused", [False, True])
def test_float16(kernel_backend, shape, fused):
    name, device = kernel_backend
    case, got = run_case(name, shape, torch.float16, device, fused=fused)
    case.check(got)


def test_qk_norm_shape(kernel_backend):
    """QK-norm: (B, T, H, D) normalized over the head dim D = 64 without a weight; leading dims
    flattened into rows; nanochat's eps for float32 (F.rms_norm's default)."""
    name, device = kernel_backend
    eps = torch.finfo(torch.float32).eps
    case, got = run_case(name, (2, 7, 3, 64), torch.bfloat16, device, weight=False, eps=eps)
    assert got["y"].shape == (2, 7, 3, 64)
    case.check(got)


@pytest.mark.parametrize("fused", [False, True])
def test_3d_input_and_eps(kernel_backend, fused):
    """(B, T, C) input; Llama 2's eps 1e-5, and a large eps that visibly changes the result."""
    name, device = kernel_backend
    for eps in (1e-5, 0.5):
        case, got = run_case(name, (2, 7, 768), torch.float32, device, fused=fused, eps=eps)
        case.check(got)


@pytest.mark.parametrize("C", [4099, 8200])
@pytest.mark.parametrize("fused", [False, True])
def test_large_C(kernel_backend, C, fused):
    """Rows too wide for the CUDA kernels' registers (scalar 4099, bf16 vectors 8200)."""
    name, device = kernel_backend
    case, got = run_case(name, (3, C), torch.bfloat16, device, fused=fused)
    case.check(got)


@pytest.mark.parametrize("C", [64, 96])
def test_many_rows_many_blocks(kernel_backend, C):
    """Enough rows that the backward's partial sums span many blocks / programs, and the CUDA blocks'
    groups of lanes (C = 64 fp32: 16 lanes, two rows per warp) end part-way through a warp."""
    name, device = kernel_backend
    rows = 2053 if device.type == "cuda" else 1031
    case, got = run_case(name, (rows, C), torch.float32, device, fused=True)
    case.check(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_saved_rstd(kernel_backend, dtype, fused):
    """The forward ops' rstd: float32, (rows,), 1 / sqrt(mean(x^2) + eps) of the normalized tensor."""
    name, device = kernel_backend
    B, T, C = 3, 5, 760
    x = (3 + torch.randn(B, T, C, device=device)).to(dtype)
    weight = torch.randn(C, device=device).to(dtype)
    eps = 1e-6
    if fused:
        residual = torch.randn(B, T, C, device=device).to(dtype)
        h, y, rstd = torch.ops.pyllmc.fused_residual_rmsnorm_forward(residual, x, weight, eps, name)
        normalized = h  # the stats are those of the stored h
        assert_elementwise_close(h, residual.double() + x.double(), "h")
    else:
        y, rstd = torch.ops.pyllmc.rmsnorm_forward(x, weight, eps, name)
        normalized = x
    rows = normalized.double().cpu().reshape(-1, C)
    rstd_ref = 1 / torch.sqrt(rows.square().mean(dim=1) + eps)
    assert rstd.dtype == torch.float32 and rstd.shape == (B * T,)
    torch.testing.assert_close(rstd.double().cpu(), rstd_ref, rtol=1e-5, atol=0)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("weight", [True, False])
def test_deterministic(kernel_backend, weight):
    """Forward and backward twice from the same inputs: bitwise equal results."""
    name, device = kernel_backend
    shape = (4096, 768) if device.type == "cuda" else (199, 768)
    case = testing.rmsnorm_case(shape, torch.bfloat16, device, fused=True, weight=weight)
    first, second = case.run(name), case.run(name)
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical runs"


def test_zero_rows(kernel_backend):
    name, device = kernel_backend
    x, weight = leaf_inputs(testing.rmsnorm_case((0, 96), torch.float32, device), "x", "weight")
    y = ops.rmsnorm(x, weight, backend=name)
    assert y.shape == (0, 96)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    h, y = ops.fused_residual_rmsnorm(torch.zeros_like(x), x.detach(), backend=name)
    assert h.shape == y.shape == (0, 96)


def test_partial_requires_grad(kernel_backend):
    """Only weight needs a gradient; then only x: each gradient still right."""
    name, device = kernel_backend
    case = testing.rmsnorm_case((37, 768), torch.float32, device)
    (weight,) = leaf_inputs(case, "weight")
    x, dy = case.inputs["x"], case.grad_outputs["y"]
    ops.rmsnorm(x, weight, backend=name).backward(dy)
    assert x.grad is None
    assert_ok(case.compare({"dweight": weight.grad}))

    weight.grad = None
    weight.requires_grad_(False)
    x.requires_grad_(True)
    ops.rmsnorm(x, weight, backend=name).backward(dy)
    assert weight.grad is None
    assert_ok(case.compare({"dx": x.grad}))


def test_fused_only_one_output_used(kernel_backend):
    """Autograd hands a zero gradient for the unused output: y alone, then h alone."""
    name, device = kernel_backend
    case = testing.rmsnorm_case((37, 1024), torch.float32, device, fused=True)
    residual, x, weight = leaf_inputs(case, "residual", "x", "weight")
    dy, dh = case.grad_outputs["y"], case.grad_outputs["h"]
    _, y = ops.fused_residual_rmsnorm(residual, x, weight, backend=name)
    y.backward(dy)
    y_alone = RMSNormCase(case.inputs, {"h": torch.zeros_like(dh), "y": dy})
    assert_ok(y_alone.compare({"dx": x.grad, "dresidual": residual.grad, "dweight": weight.grad}))

    for t in (residual, x, weight):
        t.grad = None
    h, _ = ops.fused_residual_rmsnorm(residual, x, weight, backend=name)
    h.backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(residual.grad, dh)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_noncontiguous_grad_output(kernel_backend):
    name, device = kernel_backend
    case = testing.rmsnorm_case((24, 40), torch.float32, device)
    case.grad_outputs["y"] = torch.randn(40, 24, device=device).t()  # transposed view, not contiguous
    x, weight = leaf_inputs(case, "x", "weight")
    ops.rmsnorm(x, weight, backend=name).backward(case.grad_outputs["y"])
    case.check({"dx": x.grad, "dweight": weight.grad})


def test_unaligned_views(kernel_backend):
    """Contiguous views starting 4 bytes past an aligned address (the vector path's worry)."""
    name, device = kernel_backend
    rows, C = 9, 256
    x = torch.randn(1 + rows * C, device=device)[1:].view(rows, C).requires_grad_(True)
    residual = torch.randn(1 + rows * C, device=device)[1:].view(rows, C)
    weight = torch.randn(1 + C, device=device)[1:].requires_grad_(True)
    dy, dh = torch.randn(rows, C, device=device), torch.randn(rows, C, device=device)
    assert x.data_ptr() % 16 != 0
    h, y = ops.fused_residual_rmsnorm(residual, x, weight, backend=name)
    torch.autograd.backward([h, y], [dh, dy])
    case = RMSNormCase(dict(x=x, weight=weight, residual=residual), dict(h=dh, y=dy))
    case.check({"h": h.detach(), "y": y.detach(), "dx": x.grad, "dweight": weight.grad})


def test_torch_backend_is_pytorch():
    x, weight, residual = torch.randn(5, 33), torch.randn(33), torch.randn(5, 33)
    for w in (weight, None):
        torch.testing.assert_close(ops.rmsnorm(x, w, backend="torch"), F.rms_norm(x, (33,), w, 1e-6),
                                   rtol=0, atol=0)
        h, y = ops.fused_residual_rmsnorm(residual, x, w, backend="torch")
        torch.testing.assert_close(h, residual + x, rtol=0, atol=0)
        torch.testing.assert_close(y, F.rms_norm(residual + x, (33,), w, 1e-6), rtol=0, atol=0)


def test_default_eps_is_documented_one():
    for fn in (ops.rmsnorm, ops.fused_residual_rmsnorm):
        assert inspect.signature(fn).parameters["eps"].default == 1e-6
        assert inspect.signature(fn).parameters["weight"].default is None


# ---- bad inputs --------------------------------------------------------------------------

BACKENDS = ["cuda", "triton", "torch"]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case,match", [
    ("weight_shape", r"weight must have shape \(C,\) = \(8,\)"),
    ("weight_2d", "weight must be 1-D"),
    ("weight_dtype", "weight has dtype torch.bfloat16 but x has torch.float32"),
    ("x_dtype", "x must have dtype float32, bfloat16, float16"),
    ("x_scalar", "x must have at least 1 dims"),
    ("x_empty_C", "x must have a last dim C >= 1"),
    ("wrong_device", "weight is on meta but x is on cpu"),
    ("eps", "eps must be a finite float >= 0"),
    ("eps_nan", "eps must be a finite float >= 0"),
    ("not_tensor", "weight must be a torch.Tensor"),
])
def test_rejects_bad_input(backend_name, fused, case, match):
    x, weight = torch.randn(4, 8), torch.randn(8)
    eps = 1e-6
    if case == "weight_shape":
        weight = torch.randn(9)
    elif case == "weight_2d":
        weight = torch.randn(1, 8)
    elif case == "weight_dtype":
        weight = weight.bfloat16()
    elif case == "x_dtype":
        x = x.double()
    elif case == "x_scalar":
        x = torch.tensor(1.0)
    elif case == "x_empty_C":
        x = torch.randn(4, 0)
    elif case == "wrong_device":
        weight = torch.empty(8, device="meta")
    elif case == "eps":
        eps = -1.0
    elif case == "eps_nan":
        eps = float("nan")
    elif case == "not_tensor":
        weight = [1.0] * 8
    with pytest.raises(ValueError, match=match):
        if fused:
            residual = torch.randn(x.shape, dtype=x.dtype)
            ops.fused_residual_rmsnorm(residual, x, weight, eps, backend=backend_name)
        else:
            ops.rmsnorm(x, weight, eps, backend=backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case,match", [
    ("shape", r"residual must have x's shape \(4, 8\)"),
    ("dtype", "residual has dtype torch.bfloat16 but x has torch.float32"),
    ("device", "residual is on meta but x is on cpu"),
])
def test_fused_rejects_bad_residual(backend_name, case, match):
    x = torch.randn(4, 8)
    residual = {"shape": torch.randn(4, 1), "dtype": torch.randn(4, 8).bfloat16(),
                "device": torch.empty(4, 8, device="meta")}[case]
    with pytest.raises(ValueError, match=match):
        ops.fused_residual_rmsnorm(residual, x, backend=backend_name)


def test_wrong_device_for_backend():
    x, weight = torch.randn(4, 8), torch.randn(8)
    expect_cuda_backend_device_error(lambda device: ops.rmsnorm(x.to(device), weight.to(device), backend="cuda"))
    if pyllmc.available_backends()["triton"].available:
        with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
            ops.rmsnorm(x.to("meta"), backend="triton")


# ---- torch.library / torch.compile ---------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")


@pytest.mark.parametrize("weight", [True, False])
def test_custom_op_registration(kernel_backend, weight):
    """register_fake and the autograd registration agree with the real kernels (torch's checker)."""
    name, device = kernel_backend
    case = testing.rmsnorm_case((37, 40), torch.float32, device, fused=True, weight=weight)
    residual, x = leaf_inputs(case, "residual", "x")
    w = leaf_inputs(case, "weight")[0] if weight else None
    dy, dh = case.grad_outputs["y"], case.grad_outputs["h"]
    torch.library.opcheck(torch.ops.pyllmc.rmsnorm_forward.default, (x, w, 1e-6, name), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.pyllmc.fused_residual_rmsnorm_forward.default, (residual, x, w, 1e-6, name),
                          test_utils=OPCHECK_UTILS)
    plain_w = w.detach() if weight else None
    _, rstd = torch.ops.pyllmc.rmsnorm_forward(x.detach(), plain_w, 1e-6, name)
    torch.library.opcheck(torch.ops.pyllmc.rmsnorm_backward.default, (dy, x.detach(), plain_w, rstd, name),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.pyllmc.fused_residual_rmsnorm_backward.default,
                          (dh, dy, x.detach(), plain_w, rstd, name), test_utils=OPCHECK_UTILS)


def test_under_torch_compile(kernel_backend):
    name, device = kernel_backend
    case = testing.rmsnorm_case((2, 5, 768), torch.float32, device, fused=True)
    residual, x, weight = leaf_inputs(case, "residual", "x", "weight")
    dy, dh = case.grad_outputs["y"], case.grad_outputs["h"]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def block(r, t, w):
        h, y = ops.fused_residual_rmsnorm(r, t, w, 1e-5, backend=name)
        return h, ops.rmsnorm(y * 2.0, None, 1e-5, backend=name) * w

    h, z = block(residual, x, weight)
    torch.autograd.backward([h, z], [dh, dy])

    leaves = [t.detach().double().requires_grad_(True) for t in (residual, x, weight)]
    r64, x64, w64 = leaves
    h64 = r64 + x64
    z64 = F.rms_norm(2.0 * F.rms_norm(h64, (768,), w64, 1e-5), (768,), None, 1e-5) * w64
    torch.autograd.backward([h64, z64], [dh.double(), dy.double()])
    torch.testing.assert_close(h.double(), h64.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.double(), z64.detach(), rtol=1e-4, atol=1e-4)
    for got, leaf in zip((residual, x, weight), leaves):
        torch.testing.assert_close(got.grad.double(), leaf.grad, rtol=1e-4, atol=1e-4)
