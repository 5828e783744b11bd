"""ops.linear_cross_entropy (the classifier matmul + cross-entropy by chunks of rows) on each kernel
backend against PyTorch autograd of F.linear + F.cross_entropy in float64, and against the plain path
(the whole logits, ops.cross_entropy's fused classifier)."""

import pytest
import torch
import torch.nn.functional as F

from pyllmc import ops, testing
from pyllmc.ops.linear_cross_entropy import chunk_rows_for
from conftest import kernel_device


@pytest.fixture(params=["torch", "cuda", "triton"])
def backend(request):
    """(backend name, device): the torch backend on the GPU when there is one, else on the CPU."""
    if request.param == "torch":
        return "torch", torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return request.param, kernel_device(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 8, 5])
def test_against_pytorch(backend, dtype, chunk_rows):
    """Odd sizes, padded classes (131 of 136 rows of weight), a bias, ignored rows, loss_scale and an
    upstream gradient: one chunk (None: the default budget holds all 37 rows), and 5 or 8 chunks."""
    name, device = backend
    case = testing.linear_cross_entropy_case(37, 24, 136, dtype, device, num_classes=131, bias=True,
                                             loss_scale=0.5, chunk_rows=chunk_rows)
    case.check(case.run(name))


def test_leading_dims_and_no_bias(backend):
    """hidden (B, T, C) with targets (B, T), no bias: the same as the flattened call."""
    name, device = backend
    B, T, C, W = 3, 7, 16, 40
    hidden = torch.randn(B, T, C, device=device, requires_grad=True)
    weight = (torch.randn(W, C, device=device) / 4).requires_grad_(True)
    targets = torch.randint(0, W, (B, T), device=device)
    loss = ops.linear_cross_entropy(hidden, weight, targets, chunk_rows=4, backend=name)
    loss.backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(ref_h, ref_w).view(B * T, W), targets.view(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_plain_path(backend, dtype):
    """The chunked op against the model's plain path (logits = hidden @ weight.T whole, then the fused
    classifier in place) on the same inputs: fp32 equal to a few ulps, bf16 to a few bf16 roundings."""
    name, device = backend
    N, C, W, V = 45, 32, 72, 70
    hidden = torch.randn(N, C, device=device).to(dtype)
    weight = (torch.randn(W, C, device=device) / C ** 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    targets[::6] = -1

    def run(chunked):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunked:
            loss = ops.linear_cross_entropy(h, w, targets, num_classes=V, loss_scale=0.25, chunk_rows=8,
                                            backend=name)
        else:
            loss = ops.cross_entropy(h @ w.t(), targets, num_classes=V, inplace_backward=True, loss_scale=0.25,
                                     backend=name)
        loss.backward()
        return loss, h.grad, w.grad

    (loss_c, dh_c, dw_c), (loss_p, dh_p, dw_p) = run(True), run(False)
    rel = 1e-6 if dtype == torch.float32 else 2e-2
    assert abs(loss_c.item() - loss_p.item()) <= 1e-6 * abs(loss_p.item())
    for got, want in ((dh_c, dh_p), (dw_c, dw_p)):
        assert got.dtype == dtype
        assert (got.float() - want.float()).abs().max() <= rel * want.float().abs().max()


def test_every_row_ignored(backend):
    """No valid row: loss 0 and zero gradients (not NaN), as ops.cross_entropy."""
    name, device = backend
    hidden = torch.randn(9, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    loss = ops.linear_cross_entropy(hidden, weight, torch.full((9,), -1, device=device), chunk_rows=4, backend=name)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_no_grad_gives_the_same_loss(backend):
    """Without autograd the chunks only compute the loss (no gradient pass): the same number."""
    name, device = backend
    case = testing.linear_cross_entropy_case(29, 16, 50, torch.float32, device, num_classes=47, bias=True,
                                             chunk_rows=6)
    with_grad = case.run(name)["loss"]
    inputs = case.inputs
    with torch.no_grad():
        loss = ops.linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"],
                                        num_classes=47, chunk_rows=6, backend=name)
    torch.testing.assert_close(loss, with_grad, rtol=1e-6, atol=0)


def test_only_weight_requires_grad(backend):
    """A frozen trunk (hidden without grad): only dweight is computed, and correctly."""
    name, device = backend
    hidden = torch.randn(13, 8, device=device)
    weight = torch.randn(24, 8, device=device, requires_grad=True)
    targets = torch.randint(0, 24, (13,), device=device)
    ops.linear_cross_entropy(hidden, weight, targets, chunk_rows=5, backend=name).backward()
    ref_w = weight.detach().clone().requires_grad_(True)
    F.cross_entropy(hidden @ ref_w.t(), targets).backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, rtol=1e-5, atol=1e-7)


def test_bad_target_is_refused_now_or_at_the_block_end():
    hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
    bad = torch.tensor([0, 1, 2, 10, 3, -1])
    with pytest.raises(ValueError, match=r"targets\[3\] = 10"):
        ops.linear_cross_entropy(hidden, weight, bad, backend="torch")
    with pytest.raises(ValueError, match=r"targets\[3\] = 10"):
        with ops.deferred_target_checks():
            ops.linear_cross_entropy(hidden, weight, bad, backend="torch")


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=torch.randn(10, 5)), r"weight must have shape \(W, 4\)"),
    (dict(weight=torch.randn(10, 4, dtype=torch.float64)), "weight"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), "targets must have hidden's leading shape"),
    (dict(targets=torch.zeros(6)), "targets"),
    (dict(bias=torch.randn(9)), r"bias must have shape \(10,\)"),
    (dict(num_classes=11), r"num_classes must be an int in \[1, 10\]"),
    (dict(chunk_rows=0), "chunk_rows must be a positive int"),
    (dict(memory_budget=-5), "memory_budget must be a positive int"),
    (dict(chunk_rows=2, memory_budget=100), "not both"),
    (dict(loss_scale=float("inf")), "loss_scale must be a finite float"),
])
def test_bad_input(kwargs, message):
    args = dict(hidden=torch.randn(6, 4), weight=torch.randn(10, 4), targets=torch.zeros(6, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), backend="torch", **args)


def test_chunk_rows_rule():
    """Default: the chunk's logits fit in the hidden states' own bytes (GPT-2 124M: 65,536 rows of 768 in
    bf16 against 50,304 classes -> 1,000 rows a chunk); a budget or an explicit count overrides it."""
    assert chunk_rows_for(65536, 768, 50304, 2) == 1000
    assert chunk_rows_for(65536, 768, 50304, 2, memory_budget=2**30) == 2**30 // (50304 * 2)
    assert chunk_rows_for(100, 8, 50304, 4) == 1          # never below one row
    assert chunk_rows_for(100, 8, 16, 4, chunk_rows=500) == 100  # never above N


def test_custom_op_contract():
    """torch.library.opcheck: the op's fake (meta) shapes, its autograd registration and schema."""
    from pyllmc.ops.linear_cross_entropy import linear_cross_entropy_op

    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    targets = torch.randint(0, 18, (11,))
    torch.library.opcheck(linear_cross_entropy_op,
                          (hidden, weight, bias, targets, -1, 18, 0.5, 4, True, True, True, "torch"))


def test_compiles_as_one_graph():
    """torch.compile(fullgraph=True) keeps the chunk loop as one node: the same loss and gradients as eager."""
    hidden = torch.randn(2, 9, 8)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (2, 9))

    def loss_and_grads(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def step(h, w):
        return ops.linear_cross_entropy(h, w, targets, chunk_rows=5, loss_scale=0.5, backend="torch")

    eager = loss_and_grads(step)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
