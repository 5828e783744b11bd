"""The training step moves no byte it does not need: one optimizer step of a small GPT-2 under
torch.profiler (dev/profile_step.py), and nothing outside the ops touches the logits or copies.

How copies are told apart: the profiler nests every aten op under the pyllmc custom op that
ran it (pyllmc::...); what runs there is the op's own work (the Triton interpreter's copy-back
of kernel arguments, the torch backend's math). What runs outside any pyllmc op is the
model's glue (views, matmuls, autograd's bookkeeping): it must not copy, nor touch an
(N, V)-sized tensor other than in the lm_head matmuls.
"""

import importlib

import pytest
import torch
import torch.distributed as dist

import profile_step  # dev/profile_step.py (pytest puts dev/ on sys.path)
from conftest import kernel_device


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cuda"])
def test_one_step_moves_nothing_outside_the_ops(backend_name, monkeypatch):
    if backend_name != "torch":
        kernel_device(backend_name)  # skips where the backend cannot run
        if torch.cuda.is_available():
            pytest.skip("the CPU profile reads CPU tensors; on a GPU the same structure is the GPU check's")
    ce = importlib.import_module("pyllmc.ops.cross_entropy")

    upstream = []  # every upstream gradient the fused classifier's backward was handed
    original = ce._scale_grad

    def spy(dlogits, dloss, V, backend):
        upstream.append(float(dloss))
        return original(dlogits, dloss, V, backend)

    monkeypatch.setattr(ce, "_scale_grad", spy)
    report = profile_step.profile_step(backend_name)
    assert not report.logits_ops, "glue ops touching the (N, V) logits:\n" + "\n".join(map(str, report.logits_ops))
    assert not report.copies, "glue copies:\n" + "\n".join(map(str, report.copies))
    # the 1 / grad_accum_steps scale is baked into the fused kernel: the backward gets dloss = 1 (no pass)
    assert upstream and all(d == 1.0 for d in upstream), upstream


def test_the_analysis_sees_what_the_model_did_before():
    """The analysis flags the glue of the old model: a column slice of the padded logits (its
    backward allocates and copies) and stacked attention gradients."""
    N, V, Vp = 8, 10, 16
    w = torch.randn(N, Vp, requires_grad=True)
    qkv = torch.randn(2, 3, 6, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                profile_memory=True) as prof:
        logits = (w * 1.0)[:, :V]
        q, k, v = qkv.view(2, 3, 3, 2).unbind(2)
        (logits.sum() + (q * k * v).sum()).backward()
    report = profile_step.analyse(prof.events(), {N * V, N * Vp}, 4 * N * V)
    names = {f.op for f in report.copies}
    assert "aten::slice_backward" in names and ("aten::stack" in names or "aten::cat" in names), names
    assert any(f.op == "aten::slice_backward" for f in report.logits_ops)


def test_gradient_buckets_reduce_once_per_step_during_the_backward(tmp_path):
    """GradientBuckets (one process, gloo): gradients are views of the buckets, each bucket is
    all-reduced once, on the last micro step only, and the result is the accumulated gradient."""
    from pyllmc.distributed import GradientBuckets, ShardedParameters

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            layers = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Linear(50, 30))
            params = list(layers.parameters())
            buckets = GradientBuckets(params, world_size=1, bucket_bytes=50 * 40 * 4)  # a few buckets
            assert len(buckets.buckets) > 1
            x = [torch.randn(4, 40) for _ in range(3)]
            for micro, xi in enumerate(x):
                if micro == len(x) - 1:
                    buckets.arm()
                layers(xi).square().sum().backward()
                assert len(calls) == (len(buckets.buckets) if micro == len(x) - 1 else 0)
            buckets.finish()
        finally:
            dist.all_reduce = real
        assert sum(calls) == sum(p.numel() for p in params)
        reference = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Linear(50, 30))
        reference.load_state_dict(layers.state_dict())
        for xi in x:
            reference(xi).square().sum().backward()
        for p, r in zip(params, reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)
        # ZeRO-1's exchange: the parameters become views of one buffer, exchanged in one collective
        sharded = ShardedParameters(params, [0] * len(params), rank=0, world_size=1)
        assert all(p.data_ptr() >= sharded.flat.data_ptr() for p in params)
        before = [p.detach().clone() for p in params]
        sharded.exchange()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    finally:
        dist.destroy_process_group()
