"""The model compiles as one graph: torch.compile(fullgraph=True) on every CPU-runnable backend.

The ops trace into Dynamo's graph (their backend choice is a guarded module global and their
checks read only shapes, dtypes and devices); the kernels run inside torch.library custom ops.
The aot_eager backend keeps the same aten ops as eager, so its results must be bitwise eager's;
one test runs Inductor itself (the default backend, what train_gpt2.py --compile 1 uses).
"""

import importlib

import pytest
import torch

import pyllmc
from pyllmc.model import GPT, GPTConfig

CONFIG = GPTConfig(block_size=16, vocab_size=100, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend_name(request):
    if request.param != "torch":
        from conftest import kernel_device

        if kernel_device(request.param).type != "cpu":
            pytest.skip("these tests run the model on CPU tensors")
    return request.param


def batch():
    return torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))


def run(model, x, y):
    """Training forward + backward (the fused classifier), then inference logits."""
    _, loss = model(x, y, return_logits=False, inplace_backward=True, loss_scale=0.5)
    loss.backward()
    logits, _ = model(x)
    return loss.detach(), logits.detach()


def test_no_graph_breaks(backend_name):
    model = GPT(CONFIG, seed=0)
    x, y = batch()
    with pyllmc.backend(backend_name):
        for kwargs in (dict(targets=y, return_logits=False, inplace_backward=True), {}):
            explanation = torch._dynamo.explain(model)(x, **kwargs)
            assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
            assert explanation.graph_count == 1


def test_fullgraph_compile_equals_eager(backend_name):
    x, y = batch()
    results = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        model = GPT(CONFIG, seed=0)
        callable_model = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        with pyllmc.backend(backend_name):
            loss, logits = run(callable_model, x, y)
        results[mode] = (loss, logits, [p.grad for p in model.parameters()])
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results["eager"], results["compiled"]
    assert torch.equal(loss_a, loss_b) and torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_switching_backend_recompiles(monkeypatch):
    """A model compiled under one backend runs the other after `with pyllmc.backend(...)` changes."""
    from conftest import kernel_device

    kernel_device("triton")
    gelu = importlib.import_module("pyllmc.ops.gelu")
    ran = []
    real = gelu._forward
    monkeypatch.setattr(gelu, "_forward", lambda x, backend: ran.append(backend) or real(x, backend))
    torch._dynamo.reset()
    model = torch.compile(GPT(CONFIG, seed=0), fullgraph=True, backend="aot_eager")
    x, _ = batch()
    with torch.no_grad():
        with pyllmc.backend("triton"):
            model(x)
        assert ran and set(ran) == {"triton"}
        ran.clear()
        with pyllmc.backend("torch"):  # the torch backend's GELU is F.gelu: no pyllmc kernel runs
            model(x)
        assert ran == []
        with pyllmc.backend("triton"):
            model(x)
        assert ran and set(ran) == {"triton"}


def test_inductor_compile_matches_eager():
    """Inductor (the default torch.compile backend) fuses the glue around the ops; the result
    matches eager to float32 rounding."""
    torch._dynamo.reset()
    x, y = batch()
    eager, compiled = GPT(CONFIG, seed=0), GPT(CONFIG, seed=0)
    with pyllmc.backend("torch"):
        want = run(eager, x, y)
        got = run(torch.compile(compiled, fullgraph=True), x, y)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_a_new_loss_scale_recompiles_cleanly():
    """A second value of a float argument makes torch.compile trace it as a symbol: the op's
    checks and the fused kernel take it (the trainer's eval passes 1.0 after training's 1/steps)."""
    torch._dynamo.reset()
    model = GPT(CONFIG, seed=0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = batch()
    with pyllmc.backend("torch"):
        losses = [compiled(x, y, return_logits=False, inplace_backward=True, loss_scale=s)[1].detach()
                  for s in (0.5, 0.25)]
        with torch.no_grad():
            _, plain = compiled(x, y, return_logits=False)
    torch.testing.assert_close(losses[0], 2 * losses[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(plain, 2 * losses[0], rtol=1e-6, atol=0)
