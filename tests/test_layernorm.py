"""ops.layernorm and ops.fused_residual_layernorm on each kernel backend against PyTorch
autograd of F.layer_norm in float64 (bf16 / fp16 via the flash criterion: at most 2x
PyTorch's own error in the same dtype)."""

import pytest
import torch
import torch.nn.functional as F

import pyllmc
from pyllmc import ops
from pyllmc import testing
from pyllmc.testing import LayerNormCase, assert_elementwise_close, assert_ok
from conftest import expect_cuda_backend_device_error, interpreted

GPT2_C = (768, 1024, 1280, 1600)
# 1, 17: not a multiple of the 128-bit vector width (scalar path); 760, 1128: whole vectors,
# but a warp's last chunk is partly past C
ODD_C = (1, 17, 760, 1128)
ROWS = (1, 37, 199)


def run_case(backend, shape, dtype, device, *, fused=False, eps=1e-5):
    """(case, its results on `backend`): pyllmc.testing's layernorm case (fused: with a residual),
    forward and every gradient. case.check(results) compares all of them with float64 autograd:
    h elementwise (one rounding of residual + x), the rest bounded by 2x PyTorch's own error in
    `dtype` (+ the table's epsilon)."""
    case = testing.layernorm_case(shape, dtype, device, fused=fused, eps=eps)
    got = case.run(backend)
    for name in case.outputs:
        assert got[name].shape == shape and got[name].device == case.device, name
    return case, got


def leaf_inputs(case, *names):
    """The case's inputs `names` as leaves that require grad, for the tests that call the ops themselves."""
    return [case.inputs[name].requires_grad_(True) for name in names]


SHAPE_CASES = [(rows, C) for C in GPT2_C + ODD_C for rows in ROWS]
# Under the interpreter (every program a Python step) the 199-row cases run for these C only.
INTERPRETER_C_AT_MANY_ROWS = (17, 768, 1128)


def skip_slow_under_interpreter(name, device, rows, C):
    if interpreted(name, device) and rows == ROWS[-1] and C not in INTERPRETER_C_AT_MANY_ROWS:
        pytest.skip(f"{rows} rows x C={C}: on the GPU only (the interpreter covers {INTERPRETER_C_AT_MANY_ROWS})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,C", SHAPE_CASES)
def test_layernorm_matches_torch(kernel_backend, rows, C, dtype):
    name, device = kernel_backend
    skip_slow_under_interpreter(name, device, rows, C)
    case, got = run_case(name, (rows, C), dtype, device)
    case.check(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,C", SHAPE_CASES)
def test_fused_residual_layernorm_matches_torch(kernel_backend, rows, C, dtype):
    name, device = kernel_backend
    skip_slow_under_interpreter(name, device, rows, C)
    case, got = run_case(name, (rows, C), dtype, device, fused=True)
    case.check(got)


@pytest.mark.parametrize("shape", [(37, 768), (5, 17), (3, 1600)])
@pytest.mark.parametrize("fused", [False, True])
def test_float16(kernel_backend, shape, fused):
    name, device = kernel_backend
    case, got = run_case(name, shape, torch.float16, device, fused=fused)
    case.check(got)


@pytest.mark.parametrize("fused", [False, True])
def test_3d_input_and_eps(kernel_backend, fused):
    """(B, T, C) input, leading dims flattened into rows; a non-default eps."""
    name, device = kernel_backend
    case, got = run_case(name, (2, 7, 768), torch.float32, device, fused=fused, eps=1e-3)
    assert got["y"].shape == (2, 7, 768)
    case.check(got)


@pytest.mark.parametrize("C", [4099, 8192])
@pytest.mark.parametrize("fused", [False, True])
def test_large_C(kernel_backend, C, fused):
    """Rows too wide for the CUDA kernels' registers (scalar 4099, bf16 vectors 8192)."""
    name, device = kernel_backend
    case, got = run_case(name, (3, C), torch.bfloat16, device, fused=fused)
    case.check(got)


@pytest.mark.parametrize("fused", [False, True])
def test_many_rows_many_blocks(kernel_backend, fused):
    """Enough rows that the backward's partial sums span many blocks / programs."""
    name, device = kernel_backend
    rows = 2053 if device.type == "cuda" else 1031
    case, got = run_case(name, (rows, 64), torch.float32, device, fused=fused)
    case.check(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_saved_mean_and_rstd(kernel_backend, dtype, fused):
    """The forward ops' mean and rstd (float32, (rows,)), on data with a large mean: a
    one-pass E[x^2] - mean^2 variance would lose most digits here."""
    name, device = kernel_backend
    B, T, C = 3, 5, 760
    x = (100 + torch.randn(B, T, C, device=device)).to(dtype)
    weight = torch.randn(C, device=device).to(dtype)
    bias = torch.randn(C, device=device).to(dtype)
    eps = 1e-5
    if fused:
        residual = torch.randn(B, T, C, device=device).to(dtype)
        h, y, mean, rstd = torch.ops.pyllmc.fused_residual_layernorm_forward(residual, x, weight, bias, eps, name)
        normalized = h  # the stats are those of the stored h
        assert_elementwise_close(h, residual.double() + x.double(), "h")
    else:
        y, mean, rstd = torch.ops.pyllmc.layernorm_forward(x, weight, bias, eps, name)
        normalized = x
    rows = normalized.double().cpu().reshape(-1, C)
    mean_ref = rows.mean(dim=1)
    rstd_ref = 1 / torch.sqrt(rows.var(dim=1, unbiased=False) + eps)
    assert mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (B * T,)
    # float32 sums of 760 values near 100: ~1e-6 relative; E[x^2] - mean^2 would be off by ~1e-3
    torch.testing.assert_close(mean.double().cpu(), mean_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(rstd.double().cpu(), rstd_ref, rtol=1e-4, atol=0)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("fused", [False, True])
def test_deterministic(kernel_backend, fused):
    """Forward and backward twice from the same inputs: bitwise equal results."""
    name, device = kernel_backend
    shape = (4096, 768) if device.type == "cuda" else (199, 768)
    case = testing.layernorm_case(shape, torch.bfloat16, device, fused=fused)
    first, second = case.run(name), case.run(name)
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical runs"


def test_zero_rows(kernel_backend):
    name, device = kernel_backend
    x, weight, bias = leaf_inputs(testing.layernorm_case((0, 96), torch.float32, device), "x", "weight", "bias")
    y = ops.layernorm(x, weight, bias, backend=name)
    assert y.shape == (0, 96)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_partial_requires_grad(kernel_backend):
    """Only weight needs a gradient; then only x: each gradient still right."""
    name, device = kernel_backend
    case = testing.layernorm_case((37, 768), torch.float32, device)
    (weight,) = leaf_inputs(case, "weight")
    x, bias, dy = case.inputs["x"], case.inputs["bias"], case.grad_outputs["y"]
    ops.layernorm(x, weight, bias, backend=name).backward(dy)
    assert x.grad is None and bias.grad is None
    assert_ok(case.compare({"dweight": weight.grad}))

    weight.grad = None
    weight.requires_grad_(False)
    x.requires_grad_(True)
    ops.layernorm(x, weight, bias, backend=name).backward(dy)
    assert weight.grad is None
    assert_ok(case.compare({"dx": x.grad}))


def test_fused_only_one_output_used(kernel_backend):
    """Autograd hands a zero gradient for the unused output: y alone, then h alone."""
    name, device = kernel_backend
    case = testing.layernorm_case((37, 1024), torch.float32, device, fused=True)
    residual, x, weight, bias = leaf_inputs(case, "residual", "x", "weight", "bias")
    dy, dh = case.grad_outputs["y"], case.grad_outputs["h"]
    _, y = ops.fused_residual_layernorm(residual, x, weight, bias, backend=name)
    y.backward(dy)
    y_alone = LayerNormCase(case.inputs, {"h": torch.zeros_like(dh), "y": dy})
    assert_ok(y_alone.compare({"dx": x.grad, "dresidual": residual.grad}))

    for t in (residual, x, weight, bias):
        t.grad = None
    h, _ = ops.fused_residual_layernorm(residual, x, weight, bias, backend=name)
    h.backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(residual.grad, dh)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_noncontiguous_grad_output(kernel_backend):
    name, device = kernel_backend
    case = testing.layernorm_case((24, 40), torch.float32, device)
    case.grad_outputs["y"] = torch.randn(40, 24, device=device).t()  # transposed view, not contiguous
    x, weight, bias = leaf_inputs(case, "x", "weight", "bias")
    ops.layernorm(x, weight, bias, backend=name).backward(case.grad_outputs["y"])
    case.check({"dx": x.grad, "dweight": weight.grad, "dbias": bias.grad})


def test_unaligned_views(kernel_backend):
    """Contiguous views starting 4 bytes past an aligned address (the vector path's worry)."""
    name, device = kernel_backend
    rows, C = 9, 256
    x = torch.randn(1 + rows * C, device=device)[1:].view(rows, C).requires_grad_(True)
    residual = torch.randn(1 + rows * C, device=device)[1:].view(rows, C)
    weight = torch.randn(1 + C, device=device)[1:]
    bias = torch.randn(1 + C, device=device)[1:]
    dy, dh = torch.randn(rows, C, device=device), torch.randn(rows, C, device=device)
    assert x.data_ptr() % 16 != 0
    h, y = ops.fused_residual_layernorm(residual, x, weight, bias, backend=name)
    torch.autograd.backward([h, y], [dh, dy])
    case = LayerNormCase(dict(x=x, weight=weight, bias=bias, residual=residual), dict(h=dh, y=dy))
    case.check({"y": y.detach(), "dx": x.grad})


def test_torch_backend_is_pytorch():
    x, weight, bias = torch.randn(5, 33), torch.randn(33), torch.randn(33)
    residual = torch.randn(5, 33)
    torch.testing.assert_close(ops.layernorm(x, weight, bias, backend="torch"),
                               F.layer_norm(x, (33,), weight, bias, 1e-5), rtol=0, atol=0)
    h, y = ops.fused_residual_layernorm(residual, x, weight, bias, backend="torch")
    torch.testing.assert_close(h, residual + x, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(residual + x, (33,), weight, bias, 1e-5), rtol=0, atol=0)


# ---- bad inputs --------------------------------------------------------------------------

BACKENDS = ["cuda", "triton", "torch"]


def good(C=8, dtype=torch.float32):
    return torch.randn(4, C, dtype=dtype), torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case,match", [
    ("weight_shape", r"weight must have shape \(C,\) = \(8,\)"),
    ("bias_shape", r"bias must have shape \(C,\) = \(8,\)"),
    ("weight_2d", "weight must be 1-D"),
    ("weight_dtype", "weight has dtype torch.bfloat16 but x has torch.float32"),
    ("bias_dtype", "bias has dtype torch.float16 but x has torch.float32"),
    ("x_dtype", "x must have dtype float32, bfloat16, float16"),
    ("x_scalar", "x must have at least 1 dims"),
    ("x_empty_C", "x must have a last dim C >= 1"),
    ("wrong_device", "weight is on meta but x is on cpu"),
    ("eps", "eps must be a finite float >= 0"),
    ("not_tensor", "weight must be a torch.Tensor"),
])
def test_rejects_bad_input(backend_name, fused, case, match):
    x, weight, bias = good()
    eps = 1e-5
    if case == "weight_shape":
        weight = torch.randn(9)
    elif case == "bias_shape":
        bias = torch.randn(7)
    elif case == "weight_2d":
        weight = torch.randn(1, 8)
    elif case == "weight_dtype":
        weight = weight.bfloat16()
    elif case == "bias_dtype":
        bias = bias.half()
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
    elif case == "not_tensor":
        weight = [1.0] * 8
    with pytest.raises(ValueError, match=match):
        if fused:
            residual = torch.randn(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x
            ops.fused_residual_layernorm(residual, x, weight, bias, eps, backend=backend_name)
        else:
            ops.layernorm(x, weight, bias, eps, backend=backend_name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case,match", [
    ("shape", r"residual must have x's shape \(4, 8\)"),
    ("dtype", "residual has dtype torch.bfloat16 but x has torch.float32"),
    ("device", "residual is on meta but x is on cpu"),
])
def test_fused_rejects_bad_residual(backend_name, case, match):
    x, weight, bias = good()
    residual = {"shape": torch.randn(4, 1), "dtype": torch.randn(4, 8).bfloat16(),
                "device": torch.empty(4, 8, device="meta")}[case]
    with pytest.raises(ValueError, match=match):
        ops.fused_residual_layernorm(residual, x, weight, bias, backend=backend_name)


def test_wrong_device_for_backend():
    """Tensors on a device the cuda backend cannot take: a clear error; meta tensors can never
    run on triton."""
    x, weight, bias = good()
    expect_cuda_backend_device_error(lambda device: ops.layernorm(*(t.to(device) for t in (x, weight, bias)),
                                                                  backend="cuda"))
    if pyllmc.available_backends()["triton"].available:
        meta = [t.to("meta") for t in (x, weight, bias)]
        with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
            ops.layernorm(*meta, backend="triton")


# ---- torch.library / torch.compile ---------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")


def test_custom_op_registration(kernel_backend):
    """register_fake and the autograd registration agree with the real kernels (torch's checker)."""
    name, device = kernel_backend
    case = testing.layernorm_case((37, 40), torch.float32, device, fused=True)
    residual, x, weight, bias = leaf_inputs(case, "residual", "x", "weight", "bias")
    dy, dh = case.grad_outputs["y"], case.grad_outputs["h"]
    torch.library.opcheck(torch.ops.pyllmc.layernorm_forward.default, (x, weight, bias, 1e-5, name),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.pyllmc.fused_residual_layernorm_forward.default,
                          (residual, x, weight, bias, 1e-5, name), test_utils=OPCHECK_UTILS)
    _, mean, rstd = torch.ops.pyllmc.layernorm_forward(x.detach(), weight.detach(), bias.detach(), 1e-5, name)
    plain = [t.detach() for t in (x, weight)]
    torch.library.opcheck(torch.ops.pyllmc.layernorm_backward.default, (dy, *plain, mean, rstd, name),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.pyllmc.fused_residual_layernorm_backward.default,
                          (dh, dy, *plain, mean, rstd, name), test_utils=OPCHECK_UTILS)


def test_under_torch_compile(kernel_backend):
    name, device = kernel_backend
    case = testing.layernorm_case((2, 5, 768), torch.float32, device, fused=True)
    residual, x, weight, bias = leaf_inputs(case, "residual", "x", "weight", "bias")
    dy, dh = case.grad_outputs["y"], case.grad_outputs["h"]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def block(r, t, w, b):
        h, y = ops.fused_residual_layernorm(r, t, w, b, backend=name)
        return h, ops.layernorm(y * 2.0, w, b, backend=name)

    h, z = block(residual, x, weight, bias)
    torch.autograd.backward([h, z], [dh, dy])

    leaves = [t.detach().double().requires_grad_(True) for t in (residual, x, weight, bias)]
    r64, x64, w64, b64 = leaves
    h64 = r64 + x64
    z64 = F.layer_norm(2.0 * F.layer_norm(h64, (768,), w64, b64, 1e-5), (768,), w64, b64, 1e-5)
    torch.autograd.backward([h64, z64], [dh.double(), dy.double()])
    torch.testing.assert_close(h.double(), h64.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.double(), z64.detach(), rtol=1e-4, atol=1e-4)
    for got, leaf in zip((residual, x, weight, bias), leaves):
        torch.testing.assert_close(got.grad.double(), leaf.grad, rtol=1e-4, atol=1e-4)
