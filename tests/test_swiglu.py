"""ops.swiglu, ops.swiglu_packed and ops.relu2 on each kernel backend against PyTorch autograd
(F.silu(a) * b, F.relu(x).square()) in float64."""

import pytest
import torch
import torch.nn.functional as F

import pyllmc
from pyllmc import ops
from pyllmc import testing
from pyllmc.ops.swiglu import _matrix
from pyllmc.testing import SwigluCase, assert_elementwise_close
from conftest import expect_cuda_backend_device_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The output's shape (..., H) and what each takes on the CUDA kernels (V: elements per 128-bit vector):
#   (1,), (37,): one row, shorter than a vector / vectors and a short slot; scalar halves when packed
#   (3, 1029): contiguous a, b fold into one row of 3087 (vectors + a short slot); the halves of a
#              packed (3, 2058) are unaligned (H odd): one element per slot, row by row
#   (5, 2, 64): halves at row stride 128, aligned: vectors row by row (one 64-bit division per slot)
SHAPES = [(1,), (37,), (3, 1029), (5, 2, 64)]
LAYOUTS = ["two", "views", "packed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_torch(kernel_backend, shape, dtype, layout):
    name, device = kernel_backend
    case = testing.swiglu_case(shape, dtype, device, layout=layout)
    got = case.run(name)
    assert got["y"].dtype == dtype and got["y"].shape == shape and got["y"].is_contiguous()
    if layout == "packed":
        assert got["dx"].shape == (*shape[:-1], 2 * shape[-1]) and got["dx"].is_contiguous()
    case.check(got)  # y and every gradient, elementwise against float64 autograd


def test_swiglu_empty(kernel_backend):
    name, device = kernel_backend
    for layout in LAYOUTS:
        for shape in [(0,), (4, 0), (0, 8)]:
            case = testing.swiglu_case(shape, torch.float32, device, layout=layout)
            got = case.run(name)
            assert all(t.numel() == 0 for t in got.values()) and got["y"].shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_large_inputs_stay_finite(kernel_backend, dtype):
    """silu(a) = a sigmoid(a) at |a| = 100 (exp(100) overflows float32) and beyond: finite and
    right, forward and both gradients (silu(-100) = -3.7e-42, a float32 denormal; silu'(100) = 1)."""
    name, device = kernel_backend
    a = torch.tensor([-1e4, -100.0, -88.0, -30.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 30.0, 88.0, 100.0, 1e4])
    a = a.to(device=device, dtype=dtype)
    b = torch.linspace(-2.0, 2.0, a.numel(), device=device).to(dtype)
    case = SwigluCase({"a": a, "b": b}, {"y": torch.ones_like(a)})
    got = case.run(name)
    for key, t in got.items():
        assert t.isfinite().all(), f"{key}: {t}"
    case.check(got)
    assert got["da"][-3] == b[-3] and got["da"][-2] == b[-2]  # silu'(a) = 1 to float32's precision
    assert got["db"][1] == 0.0 or got["db"][1].abs() < 1e-40


def test_relu2_large_inputs_and_zero(kernel_backend):
    name, device = kernel_backend
    x = torch.tensor([-1e4, -100.0, -1.0, 0.0, 1e-30, 1.0, 100.0, 1e4], device=device, requires_grad=True)
    y = ops.relu2(x, backend=name)
    y.backward(torch.ones_like(x))
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1e4, 1e8], device=device))
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 0.0, 0.0, 2e-30, 2.0, 200.0, 2e4], device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (37,), (3, 1029)])
def test_relu2_matches_torch(kernel_backend, shape, dtype):
    name, device = kernel_backend
    case = testing.relu2_case(shape, dtype, device)
    got = case.run(name)
    assert got["y"].dtype == dtype and got["y"].shape == shape
    case.check(got)


def test_torch_backend_is_pytorch():
    a, b = torch.randn(2, 100)
    torch.testing.assert_close(ops.swiglu(a, b, backend="torch"), F.silu(a) * b, rtol=0, atol=0)
    x = torch.randn(3, 2, 100)
    torch.testing.assert_close(ops.swiglu_packed(x, backend="torch"), F.silu(x[..., :50]) * x[..., 50:], rtol=0,
                               atol=0)
    torch.testing.assert_close(ops.relu2(a, backend="torch"), F.relu(a) ** 2, rtol=0, atol=0)


def test_swiglu_strided_operands(kernel_backend):
    """Views the kernels cannot read in place (a transpose, a broadcast, rows that do not collapse
    into one stride) are copied first; a strided gradient is read right; the halves of a packed
    tensor are read where they are."""
    name, device = kernel_backend
    base = torch.randn(40, 6, device=device)
    a = base.t().requires_grad_(True)                       # (6, 40), transposed
    b = torch.randn(1, 40, device=device).expand(6, 40)     # broadcast rows
    dout = torch.randn(40, 6, device=device).t()            # a transposed gradient
    case = SwigluCase({"a": a.detach(), "b": b}, {"y": dout})
    case.check(case.run(name))
    packed = torch.randn(4, 5, 2 * 16, device=device)[:, 1:4]  # (4, 3, 32): leading dims do not collapse
    halves = packed.chunk(2, dim=-1)
    case = SwigluCase({"a": halves[0], "b": halves[1]}, {"y": torch.randn(4, 3, 16, device=device)})
    case.check(case.run(name))
    x = torch.randn(7, 2 * 24, device=device)
    for half in x.chunk(2, dim=-1):  # read in place: the (rows, H) view the kernels get is the half itself
        assert _matrix(half, 24).data_ptr() == half.data_ptr() and _matrix(half, 24).stride() == (48, 1)


def test_swiglu_packed_gradient_is_one_buffer(kernel_backend):
    """The packed op's gradient arrives as one contiguous (..., 2H) tensor: autograd copies nothing
    after the kernel (no cat of da and db), and it equals the two-tensor op's gradients side by side."""
    name, device = kernel_backend
    x = torch.randn(3, 2 * 40, device=device, requires_grad=True)
    dy = torch.randn(3, 40, device=device)
    ops.swiglu_packed(x, backend=name).backward(dy)
    a, b = (t.detach().requires_grad_(True) for t in x.detach().chunk(2, dim=-1))
    ops.swiglu(a, b, backend=name).backward(dy)
    assert torch.equal(x.grad, torch.cat([a.grad, b.grad], dim=-1))
    # autograd's graph: the packed op's node feeds x's gradient directly; the two-tensor op on chunk's
    # views goes through chunk's backward (a concatenation of da and db)
    node = ops.swiglu_packed(x, backend=name).grad_fn
    assert [type(n).__name__ for n, _ in node.next_functions] == ["AccumulateGrad"]
    node = ops.swiglu(*x.chunk(2, dim=-1), backend=name).grad_fn
    assert {type(n).__name__ for n, _ in node.next_functions if n is not None} == {"SplitBackward0"}


def test_swiglu_unaligned_views(kernel_backend):
    """Operands that start at an odd offset (not 16-byte aligned): one element per slot."""
    name, device = kernel_backend
    base = torch.randn(2 * 1027 + 1, device=device)
    case = SwigluCase({"a": base[1:1028], "b": base[1028:]}, {"y": torch.randn(1027, device=device)})
    case.check(case.run(name))
    x = torch.randn(1 + 1027, device=device)[1:]
    assert_elementwise_close(ops.relu2(x, backend=name), F.relu(x.double()).square(), "relu2 forward")


@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
def test_bad_inputs_are_clear_errors(backend_name):
    a = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"b must have a's shape \(4, 6\); got \(4, 5\)"):
        ops.swiglu(a, torch.randn(4, 5), backend=backend_name)
    with pytest.raises(ValueError, match="b has dtype torch.bfloat16 but a has torch.float32"):
        ops.swiglu(a, a.bfloat16(), backend=backend_name)
    with pytest.raises(ValueError, match="a must have dtype float32, bfloat16, float16; got float64"):
        ops.swiglu(a.double(), a.double(), backend=backend_name)
    with pytest.raises(ValueError, match="b must be a torch.Tensor"):
        ops.swiglu(a, 1.0, backend=backend_name)
    with pytest.raises(ValueError, match=r"x's last dim must be even \(the halves a \| b\); got shape \(4, 5\)"):
        ops.swiglu_packed(torch.randn(4, 5), backend=backend_name)
    with pytest.raises(ValueError, match="x must have stride 1 along its last dim"):
        ops.swiglu_packed(torch.randn(6, 4).t(), backend=backend_name)
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        ops.swiglu_packed(torch.tensor(1.0), backend=backend_name)
    with pytest.raises(ValueError, match="x must have dtype float32, bfloat16, float16; got int32"):
        ops.relu2(torch.zeros(4, dtype=torch.int32), backend=backend_name)


def test_wrong_device_for_backend():
    expect_cuda_backend_device_error(lambda device: ops.swiglu(torch.randn(4, device=device),
                                                               torch.randn(4, device=device), backend="cuda"))
    expect_cuda_backend_device_error(lambda device: ops.swiglu_packed(torch.randn(4, device=device), backend="cuda"))
    expect_cuda_backend_device_error(lambda device: ops.relu2(torch.randn(4, device=device), backend="cuda"))
    if pyllmc.available_backends()["triton"].available:
        with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
            ops.swiglu(torch.empty(4, device="meta"), torch.empty(4, device="meta"), backend="triton")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="b is on cpu but a is on cuda"):
            ops.swiglu(torch.randn(4, device="cuda"), torch.randn(4), backend="torch")


def test_custom_op_registration(kernel_backend):
    """register_fake and the autograd formulas agree with the real kernels (torch's checker)."""
    name, device = kernel_backend
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    a = torch.randn(37, 5, device=device, requires_grad=True)
    b = torch.randn(37, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyllmc.swiglu_forward.default, (a, b, name), test_utils=checks)
    x = torch.randn(37, 10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyllmc.swiglu_packed_forward.default, (x, name), test_utils=checks)
    torch.library.opcheck(torch.ops.pyllmc.relu2_forward.default, (a, name), test_utils=checks)


def test_under_torch_compile(kernel_backend):
    name, device = kernel_backend
    x = torch.randn(3, 2 * 515, device=device, requires_grad=True)
    dout = torch.randn(3, 515, device=device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(t):
        a, b = t.chunk(2, dim=-1)
        return (ops.swiglu_packed(t * 2.0, backend=name) + ops.swiglu(a, b, backend=name)
                + ops.relu2(t, backend=name)[:, :515])

    f(x).backward(dout)
    xr = x.detach().double().requires_grad_(True)
    ar, br = xr.chunk(2, dim=-1)
    (F.silu(2.0 * ar) * (2.0 * br) + F.silu(ar) * br + F.relu(xr).square()[:, :515]).backward(dout.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
