"""Every op on strided inputs: transposed, sliced and expanded (broadcast) views.

Each op must give, for a view, the answer it gives for a contiguous copy of that view, bitwise
(the kernels are deterministic: a view is either read in place by the same arithmetic or copied
first), and PyTorch's answer within the usual tolerances (pyllmc.testing's cases). Gradients come
back in each input's shape (the views are the autograd leaves). What each op does with a layout
(strides in the kernel, or one named copy) is written in its module's docstring and docs/ops.md.
"""

import pytest
import torch

from pyllmc import ops
from pyllmc import testing
from pyllmc.ops import _common
from pyllmc.testing import AttentionCase, CrossEntropyCase, GeluCase, LayerNormCase, Relu2Case, RMSNormCase


def _view(layout: str, shape, dtype, device, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Random values of `shape` in the named layout (a view of a bigger or reordered buffer)."""
    *lead, n = shape

    def draw(s):
        return (scale * torch.randn(s, device=device) + shift).to(dtype)

    if layout == "transposed":     # last two dims swapped: dense in memory, last dim strided
        return draw((*lead[:-1], n, lead[-1])).transpose(-1, -2) if lead else draw((n,))
    if layout == "row slice":      # the first n columns of wider rows: row stride > n, last dim contiguous
        return draw((*lead, n + 5))[..., :n]
    if layout == "step slice":     # every other element of the last dim: gaps
        return draw((*lead, 2 * n))[..., ::2]
    if layout == "expanded":       # one row broadcast over the leading dims: stride 0
        return draw((n,)).expand(*lead, n)
    raise ValueError(layout)


LAYOUTS = ["transposed", "row slice", "step slice", "expanded"]


def check_layout(case, contiguous_case, name: str, layout: str) -> None:
    """case (strided inputs) against the same op on contiguous copies, bitwise, and against PyTorch."""
    got = case.run(name)
    want = contiguous_case.run(name)
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{key} ({layout}): shape {tuple(got[key].shape)}"
        assert torch.equal(got[key], value), f"{key} ({layout}): differs from the op on a contiguous copy"
    case.check(got)


def _contiguous(inputs: dict) -> dict:
    return {k: v.contiguous() for k, v in inputs.items()}


@pytest.mark.parametrize("layout", LAYOUTS + ["permuted"])
def test_gelu_layouts(kernel_backend, layout):
    name, device = kernel_backend
    if layout == "permuted":  # dense in memory in another dim order: read in place
        x = (3 * torch.randn(5, 7, 9, device=device)).permute(2, 0, 1)
    else:
        x = _view(layout, (13, 37), torch.float32, device, scale=3.0)
    assert not x.is_contiguous()
    dy = torch.randn(x.shape, device=device)
    check_layout(GeluCase({"x": x}, {"y": dy}), GeluCase({"x": x.contiguous()}, {"y": dy}), name, layout)


def test_gelu_dense_views_keep_their_layout(kernel_backend):
    """A transposed x is computed in place over its memory: y and dx have x's strides, as F.gelu's
    do; a view with gaps is copied once, so y is contiguous."""
    name, device = kernel_backend
    x = torch.randn(24, 16, device=device).t().requires_grad_(True)
    assert _common.dense_in_storage(x) and not x.is_contiguous()
    y = ops.gelu(x, backend=name)
    assert y.stride() == x.stride()
    y.backward(torch.randn(16, 24, device=device))
    assert x.grad.shape == x.shape
    gappy = torch.randn(16, 48, device=device)[:, ::2]
    assert not _common.dense_in_storage(gappy)
    assert ops.gelu(gappy, backend=name).is_contiguous()


def test_gelu_custom_op_on_a_transposed_input(kernel_backend):
    """The custom op's fake (torch.compile's view) gives the strides the kernel's output has."""
    name, device = kernel_backend
    x = torch.randn(5, 37, device=device).t().requires_grad_(True)
    torch.library.opcheck(torch.ops.pyllmc.gelu_forward.default, (x, name),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layernorm_layouts(kernel_backend, layout, fused):
    name, device = kernel_backend
    shape, C = (3, 11, 40), 40
    dtype = torch.float32
    inputs = {"x": _view(layout, shape, dtype, device, scale=2.0, shift=0.5),
              # weight and bias strided too: every other element of a longer vector
              "weight": _view("step slice", (C,), dtype, device, scale=0.5, shift=1.0),
              "bias": _view("step slice", (C,), dtype, device, scale=0.5)}
    grads = {"y": torch.randn(shape, device=device)}
    if fused:
        inputs["residual"] = _view("transposed" if layout != "transposed" else "row slice", shape, dtype, device)
        grads["h"] = torch.randn(shape, device=device)
    assert not inputs["x"].is_contiguous()
    check_layout(LayerNormCase(inputs, grads), LayerNormCase(_contiguous(inputs), grads), name, layout)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rmsnorm_layouts(kernel_backend, layout, fused):
    """Each non-contiguous input copied once, as LayerNorm's."""
    name, device = kernel_backend
    shape, C = (3, 11, 40), 40
    dtype = torch.float32
    inputs = {"x": _view(layout, shape, dtype, device, scale=2.0, shift=0.5),
              "weight": _view("step slice", (C,), dtype, device, scale=0.5, shift=1.0)}
    grads = {"y": torch.randn(shape, device=device)}
    if fused:
        inputs["residual"] = _view("transposed" if layout != "transposed" else "row slice", shape, dtype, device)
        grads["h"] = torch.randn(shape, device=device)
    check_layout(RMSNormCase(inputs, grads), RMSNormCase(_contiguous(inputs), grads), name, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relu2_layouts(kernel_backend, layout):
    name, device = kernel_backend
    x = _view(layout, (13, 37), torch.float32, device)
    dy = torch.randn(x.shape, device=device)
    check_layout(Relu2Case({"x": x}, {"y": dy}), Relu2Case({"x": x.contiguous()}, {"y": dy}), name, layout)


ATTENTION_LAYOUTS = ["transposed", "row slice", "step slice", "expanded", "grouped kv"]


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_attention_layouts(kernel_backend, layout):
    """q, k, v (B, H, T, D) views: D strided (transposed, step slice), a row stride (row slice),
    k, v shared by the heads (expanded: stride 0 along H), and grouped-query k, v (B, 1, T, D) as
    row slices of a packed buffer."""
    name, device = kernel_backend
    B, H, T, D = 1, 2, 19, 32
    if layout == "transposed":
        q, k, v = (torch.randn(B, H, D, T, device=device).transpose(-1, -2) for _ in range(3))
    elif layout == "row slice":
        q, k, v = (torch.randn(B, H, T, D + 8, device=device)[..., :D] for _ in range(3))
    elif layout == "step slice":
        q, k, v = (torch.randn(B, H, T, 2 * D, device=device)[..., ::2] for _ in range(3))
    elif layout == "expanded":
        q = torch.randn(B, H, T, D, device=device)
        k, v = (torch.randn(B, 1, T, D, device=device).expand(B, H, T, D) for _ in range(2))
    else:
        q = torch.randn(B, H, T, D, device=device)
        k, v = torch.randn(B, 1, T, 2 * D, device=device).split(D, dim=3)  # (B, H_kv = 1, T, D) each
    dout = torch.randn(B, H, T, D, device=device)
    inputs = {"q": q, "k": k, "v": v}
    check_layout(AttentionCase(inputs, {"out": dout}), AttentionCase(_contiguous(inputs), {"out": dout}),
                 name, layout)


def test_qkv_attention_strided_last_dim(kernel_backend):
    """qkv whose last dim has stride > 1 (a transposed buffer) is copied once; same answer as its copy."""
    name, device = kernel_backend
    B, T, H, D = 1, 13, 2, 32
    base = torch.randn(B, 3 * H * D, T, device=device)
    results = []
    for qkv in (base.transpose(1, 2), base.transpose(1, 2).contiguous()):
        leaf = qkv.detach().requires_grad_(True)
        y = ops.qkv_attention(leaf, H, backend=name)
        dy = torch.randn_like(y) if not results else results[0][2]
        y.backward(dy)
        assert leaf.grad.shape == leaf.shape
        results.append((y.detach(), leaf.grad, dy))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    y_ref = ops.qkv_attention(base.transpose(1, 2), H, backend="torch")
    testing.assert_elementwise_close(results[0][0], y_ref.detach(), "qkv_attention y (strided last dim)")


@pytest.mark.parametrize("layout", ["row step", "row slice"])
def test_cross_entropy_layouts(kernel_backend, layout):
    """logits rows spaced apart (every other row; the first V columns of wider rows) are read in
    place with their row stride; targets strided (every other element) too."""
    name, device = kernel_backend
    N, V = 9, 37
    if layout == "row step":
        storage = 2.0 * torch.randn(2 * N, V, device=device)
        logits = storage[::2]
    else:
        storage = 2.0 * torch.randn(N, V + 11, device=device)
        logits = storage[:, :V]
    targets = torch.randint(0, V, (2 * N,), device=device)[::2]
    targets[::4] = -1
    dloss = torch.randn((), device=device)
    results = []
    for lg, tg in ((logits, targets), (logits.contiguous(), targets.contiguous())):
        leaf = lg.detach().requires_grad_(True)
        loss = ops.cross_entropy(leaf * 1.0, tg, backend=name)
        loss.backward(dloss)
        assert leaf.grad.shape == lg.shape
        results.append({"loss": loss.detach(), "dlogits": leaf.grad})
    for key in ("loss", "dlogits"):
        assert torch.equal(results[0][key], results[1][key]), key
    testing.assert_ok(CrossEntropyCase(logits.contiguous(), targets.contiguous(), dloss).compare(results[0]))


@pytest.mark.parametrize("layout", ["transposed", "overlapping"])
def test_cross_entropy_copies_what_it_cannot_read_in_place(kernel_backend, layout):
    """Column-major logits (a transposed view) and overlapping rows are copied once on the default path,
    bitwise as on a contiguous copy; the fused path (inplace_backward) refuses them: its gradient would
    land in the copy."""
    name, device = kernel_backend
    N, V = 9, 37
    if layout == "transposed":
        logits = 2.0 * torch.randn(V, N, device=device).t()  # (N, V), column-major
    else:
        logits = (2.0 * torch.randn(N + V, device=device)).as_strided((N, V), (1, 1))  # row i starts at i
    targets = torch.randint(0, V, (N,), device=device)
    dloss = torch.randn((), device=device)
    results = []
    for lg in (logits, logits.contiguous()):
        leaf = lg.detach().requires_grad_(True)
        loss = ops.cross_entropy(leaf, targets, backend=name)
        loss.backward(dloss)
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    if layout == "transposed":  # overlapping rows share elements: their gradients add up, unlike a copy's
        assert torch.equal(results[0][1], results[1][1])
    # the fused path's logits are an intermediate result (a matmul's output): here a strided view of one
    base = (2.0 * torch.randn(V * N + V, device=device)).requires_grad_(True) * 1.0
    strided = base[:V * N].view(V, N).t() if layout == "transposed" else base.as_strided((N, V), (1, 1))
    with pytest.raises(ValueError, match="stride 1 along the vocabulary|rows must not overlap"):
        ops.cross_entropy(strided, targets, inplace_backward=True, backend=name)


def test_dense_in_storage():
    t = torch.randn(4, 6)
    assert _common.dense_in_storage(t) and _common.dense_in_storage(t.t())
    assert _common.dense_in_storage(t.view(2, 2, 6).permute(2, 0, 1))
    assert _common.dense_in_storage(t[:1]) and _common.dense_in_storage(torch.empty(0, 3).t())
    assert not _common.dense_in_storage(t[:, :3]) and not _common.dense_in_storage(t[:, ::2])
    assert not _common.dense_in_storage(t[:1].expand(4, 6))
    row = torch.randn(6).as_strided((1, 6), (7, 1))
    assert _common.same_layout(row, torch.randn(1, 6))  # size-1 dims' strides do not matter
    assert not _common.same_layout(t, t.t().contiguous().t())
