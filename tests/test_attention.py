"""ops.attention on each kernel backend against plain-math causal attention in float64.

Criterion (flash-attention's): for out, dq, dk and dv, the kernel's max error against the
float64 plain-math result is at most 2x the error of the same plain math run in the
kernel's dtype, plus a small epsilon (pyllmc.testing: the case and the criterion).
"""

import math
import re

import pytest
import torch

import pyllmc
from pyllmc import ops
from pyllmc.ops.attention import SUPPORTED_HEAD_DIMS, attention_reference, backends_for_head_dim, supports_head_dim
from pyllmc.testing import AttentionCase, assert_flash_close, assert_ok
from conftest import expect_cuda_backend_device_error, interpreted, simulated

# (B, H, T, D): T = 1, odd T, T just under a power of two, every head dim of GPT-2 sizes
SHAPES = [(1, 1, 1, 64), (2, 3, 17, 64), (1, 2, 113, 64), (2, 12, 256, 64), (1, 4, 1023, 64),
          (1, 2, 128, 128), (1, 2, 250, 32), (1, 2, 40, 16)]
GPT2_SHAPE = (4, 12, 1024, 64)  # GPT-2 124M at T = 1024, GPU only
# under the CPU interpreter these run with H = 1: heads are independent programs of the grid,
# and the interpreter runs programs one after another
CPU_ONE_HEAD = {(2, 12, 256, 64), (1, 4, 1023, 64)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_qkv(shape, device, dtype, requires_grad=True):
    return [torch.randn(shape, device=device).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def skip_unsupported(name, device, shape, dtype):
    if interpreted(name, device) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes tl.dot wrong on bfloat16: bf16 runs on the GPU only")
    if not supports_head_dim(name, shape[3], dtype):
        pytest.skip(f"backend {name!r} does not take D={shape[3]} in {dtype}")


def check_against_reference(name, q, k, v, dout, what=""):
    """ops.attention on `name` with these operands (leaves, any strides) and upstream gradient;
    out, dq, dk, dv by pyllmc.testing's attention criterion."""
    out = ops.attention(q, k, v, backend=name)
    out.backward(dout)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    case = AttentionCase({"q": q, "k": k, "v": v}, {"out": dout})
    assert_ok(case.compare({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}), f"attention{what}: ")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_reference(kernel_backend, shape, dtype):
    name, device = kernel_backend
    skip_unsupported(name, device, shape, dtype)
    if device.type == "cpu" and shape in CPU_ONE_HEAD:
        if interpreted(name, device) and shape[2] > 512 and dtype != torch.float32:
            pytest.skip("long sequence under the interpreter: float32 here, every dtype on the GPU")
        if simulated(name, device) and shape[2] > 512 and dtype == torch.float32:
            pytest.skip("the float32 path (one warp per query, a shuffle reduction per key) takes ~25 s at "
                        "T = 1023 on the simulator: float32 runs at T <= 256 here, every T on the GPU")
        shape = (shape[0], 1) + shape[2:]
    q, k, v = random_qkv(shape, device, dtype)
    dout = torch.randn(shape, device=device).to(dtype)
    check_against_reference(name, q, k, v, dout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_gpt2_size(kernel_backend, on_gpu_only, dtype):
    name, device = kernel_backend
    skip_unsupported(name, device, GPT2_SHAPE, dtype)
    q, k, v = random_qkv(GPT2_SHAPE, device, dtype)
    dout = torch.randn(GPT2_SHAPE, device=device).to(dtype)
    check_against_reference(name, q, k, v, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_lse(kernel_backend, dtype):
    """The forward op's lse is log sum_j exp(q_i k_j / sqrt(D)) over j <= i (natural log)."""
    name, device = kernel_backend
    shape = (2, 2, 77, 64)
    q, k, v = random_qkv(shape, device, dtype, requires_grad=False)
    _, lse = torch.ops.pyllmc.attention_forward(q, k, v, name)
    T = shape[2]
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(shape[3])
    future = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    want = torch.logsumexp(scores.masked_fill(future, float("-inf")), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == shape[:3]
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


def test_attention_strided_qkv(kernel_backend):
    """GPT-2 splits one (B, T, 3C) qkv tensor into strided (B, H, T, D) views."""
    name, device = kernel_backend
    B, T, H, D = 2, 45, 3, 64
    dtype = torch.float16 if interpreted(name, device) else torch.bfloat16
    qkv = torch.randn(B, T, 3 * H * D, device=device).to(dtype).requires_grad_(True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    dout = torch.randn(B, H, T, D, device=device).to(dtype)
    out = ops.attention(q, k, v, backend=name)
    out.backward(dout)
    assert out.is_contiguous()

    views = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.detach().split(H * D, dim=2))
    case = AttentionCase(dict(zip(("q", "k", "v"), views)), {"out": dout})
    truth, same = case.reference(), case.reference(dtype)
    assert_flash_close(out.detach(), truth["out"], same["out"], "attention out (strided)")

    def stacked(results):  # (dq, dk, dv) -> d(qkv), in qkv's layout
        return torch.cat([results[g].transpose(1, 2).reshape(B, T, H * D) for g in ("dq", "dk", "dv")], dim=2)

    assert_flash_close(qkv.grad, stacked(truth), stacked(same), "attention d(qkv) (strided)")


def _packed_reference(qkv, H, dy, dtype):
    """(y (B, T, C), d(qkv)) by plain-math attention in `dtype` on the views of qkv."""
    B, T, C3 = qkv.shape
    D = C3 // (3 * H)
    leaf = qkv.detach().to(dtype).requires_grad_(True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in leaf.split(C3 // 3, dim=2))
    y = attention_reference(q, k, v, compute_dtype=dtype).transpose(1, 2).reshape(B, T, C3 // 3)
    y.backward(dy.to(dtype))
    return y.detach(), leaf.grad


@pytest.mark.parametrize("backend_name", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, D", [(2, 37, 3, 64), (1, 130, 2, 128), (1, 1, 1, 64), (2, 20, 2, 32)])
def test_qkv_attention_matches_reference(kernel_backend, backend_name, dtype, B, T, H, D):
    """GPT-2's packed layout: qkv (B, T, 3C) in, (B, T, C) out, the gradient of qkv in one buffer."""
    name, device = kernel_backend
    name = name if backend_name == "kernel" else "torch"
    skip_unsupported(name, device, (B, H, T, D), dtype)
    qkv = torch.randn(B, T, 3 * H * D, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(B, T, H * D, device=device).to(dtype)
    y = ops.qkv_attention(qkv, H, backend=name)
    y.backward(dy)
    assert y.shape == (B, T, H * D) and y.dtype == dtype and y.is_contiguous()
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    truth = _packed_reference(qkv, H, dy, torch.float64)
    same = _packed_reference(qkv, H, dy, dtype)
    assert_flash_close(y.detach(), truth[0], same[0], "qkv_attention y")
    assert_flash_close(qkv.grad, truth[1], same[1], "qkv_attention d(qkv)")


# ---- grouped-query attention (k, v with H_kv heads, H_kv dividing H) ----------------------------

# (B, H, H_kv, T, D, dtype): H_kv = H / 2, 2 and 1 (multi-query); odd T; one query tile (T < 64) and
# several (T = 130: the CUDA dK/dV kernel's double buffer crosses from one query head to the next
# mid-stream); D = 64, 128 and small (32: the CUDA float32 path; 16: Triton only). "16-bit" is
# bfloat16, or float16 under the Triton interpreter (its bf16 dots are wrong: DESIGN.md).
GQA_CASES = [(2, 4, 2, 37, 64, "fp32"), (1, 6, 1, 29, 32, "fp32"), (1, 2, 1, 20, 16, "fp32"),
             (1, 8, 4, 33, 64, "16-bit"), (1, 4, 1, 130, 64, "16-bit"), (1, 4, 2, 70, 128, "16-bit")]


def gqa_dtype(label, name, device):
    if label == "fp32":
        return torch.float32
    return torch.float16 if interpreted(name, device) else torch.bfloat16


def gqa_operands(B, H, H_kv, T, D, device, dtype, requires_grad=True):
    """q (B, H, T, D), k, v (B, H_kv, T, D), dout (B, H, T, D), all N(0, 1)."""
    q = torch.randn(B, H, T, D, device=device).to(dtype).requires_grad_(requires_grad)
    k, v = (torch.randn(B, H_kv, T, D, device=device).to(dtype).requires_grad_(requires_grad) for _ in range(2))
    return q, k, v, torch.randn(B, H, T, D, device=device).to(dtype)


@pytest.mark.parametrize("backend_name", ["kernel", "torch"])
@pytest.mark.parametrize("B, H, H_kv, T, D, dtype_label", GQA_CASES)
def test_gqa_matches_reference(kernel_backend, backend_name, B, H, H_kv, T, D, dtype_label):
    """out, dq and dk, dv (B, H_kv, T, D): the sums over each group's query heads, against plain math
    with K/V repeated per query head."""
    name, device = kernel_backend
    if backend_name == "torch":
        if name != "triton":
            pytest.skip("the torch backend runs once (with the triton parametrization)")
        name, device = "torch", torch.device("cpu")
    dtype = gqa_dtype(dtype_label, name, device)
    skip_unsupported(name, device, (B, H, T, D), dtype)
    q, k, v, dout = gqa_operands(B, H, H_kv, T, D, device, dtype)
    check_against_reference(name, q, k, v, dout, f" (GQA H={H} H_kv={H_kv})")
    assert k.grad.shape == v.grad.shape == (B, H_kv, T, D)


def test_gqa_one_kv_head_per_query_head_is_multi_head(kernel_backend):
    """H_kv = H through the GQA reference is the multi-head reference, and the group sum is a sum: a
    kv head shared by two query heads gets the sum of the dk, dv each query head alone would give."""
    name, device = kernel_backend
    B, H, T, D = 1, 2, 21, 64
    q, k, v, dout = gqa_operands(B, H, 1, T, D, device, torch.float32, requires_grad=False)
    out, lse = torch.ops.pyllmc.attention_forward(q, k, v, name)
    dq, dk, dv = torch.ops.pyllmc.attention_backward(dout, q, k, v, out, lse, name)
    k2, v2 = k.expand(B, H, T, D).contiguous(), v.expand(B, H, T, D).contiguous()
    out2, lse2 = torch.ops.pyllmc.attention_forward(q, k2, v2, name)
    dq2, dk2, dv2 = torch.ops.pyllmc.attention_backward(dout, q, k2, v2, out2, lse2, name)
    assert torch.equal(out, out2) and torch.equal(lse, lse2) and torch.equal(dq, dq2)
    torch.testing.assert_close(dk, dk2.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv2.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_gqa_backward_is_deterministic(kernel_backend):
    """dK/dV sum a group's query heads in a fixed order (no atomics): bitwise equal twice."""
    name, device = kernel_backend
    dtype = torch.float16 if interpreted(name, device) else torch.bfloat16
    B, H, H_kv, T, D = (1, 4, 2, 100, 64) if device.type == "cpu" else (4, 12, 4, 1024, 64)
    q, k, v, dout = gqa_operands(B, H, H_kv, T, D, device, dtype, requires_grad=False)
    out, lse = torch.ops.pyllmc.attention_forward(q, k, v, name)
    first = torch.ops.pyllmc.attention_backward(dout, q, k, v, out, lse, name)
    second = torch.ops.pyllmc.attention_backward(dout, q, k, v, out, lse, name)
    for label, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{label} differs between two identical GQA backward calls"
    assert first[1].shape == (B, H_kv, T, D)


def _packed_gqa_reference(qkv, H, H_kv, dy, dtype):
    """(y (B, T, C), d(qkv)) by plain-math attention in `dtype` on the [q | k | v] heads of qkv."""
    B, T, width = qkv.shape
    D = width // (H + 2 * H_kv)
    leaf = qkv.detach().to(dtype).requires_grad_(True)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in leaf.split((H * D, H_kv * D, H_kv * D), dim=2))
    y = attention_reference(q, k, v, compute_dtype=dtype).transpose(1, 2).reshape(B, T, H * D)
    y.backward(dy.to(dtype))
    return y.detach(), leaf.grad


@pytest.mark.parametrize("backend_name", ["kernel", "torch"])
@pytest.mark.parametrize("B, T, H, H_kv, D, dtype_label", [(2, 37, 4, 2, 64, "fp32"), (1, 70, 4, 1, 64, "16-bit"),
                                                           (1, 45, 6, 3, 32, "fp32")])
def test_qkv_attention_gqa(kernel_backend, backend_name, B, T, H, H_kv, D, dtype_label):
    """The packed layout with num_kv_heads: qkv (B, T, (H + 2 H_kv) D) = [q heads | k heads | v heads]
    in, (B, T, H D) out, the gradient of qkv in one buffer."""
    name, device = kernel_backend
    if backend_name == "torch":
        if name != "triton":
            pytest.skip("the torch backend runs once (with the triton parametrization)")
        name, device = "torch", torch.device("cpu")
    dtype = gqa_dtype(dtype_label, name, device)
    skip_unsupported(name, device, (B, H, T, D), dtype)
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(B, T, H * D, device=device).to(dtype)
    y = ops.qkv_attention(qkv, H, num_kv_heads=H_kv, backend=name)
    y.backward(dy)
    assert y.shape == (B, T, H * D) and y.dtype == dtype and y.is_contiguous()
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    truth = _packed_gqa_reference(qkv, H, H_kv, dy, torch.float64)
    same = _packed_gqa_reference(qkv, H, H_kv, dy, dtype)
    assert_flash_close(y.detach(), truth[0], same[0], "qkv_attention (GQA) y")
    assert_flash_close(qkv.grad, truth[1], same[1], "qkv_attention (GQA) d(qkv)")


def test_qkv_attention_default_kv_heads_is_multi_head():
    """num_kv_heads=None and num_kv_heads=num_heads are one layout (B, T, 3, H, D): the same views, the same bits."""
    from pyllmc.ops.attention import split_heads

    B, T, H, D = 2, 9, 3, 16
    qkv = torch.randn(B, T, 3 * H * D)
    for a, b in zip(split_heads(qkv, H), split_heads(qkv, H, H)):
        assert a.shape == b.shape == (B, H, T, D) and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
    wanted = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    assert all(torch.equal(got, want) for got, want in zip(split_heads(qkv, H), wanted))
    leaf = qkv.requires_grad_(True)
    y = ops.qkv_attention(leaf, H, backend="torch")
    y2 = ops.qkv_attention(leaf, H, num_kv_heads=H, backend="torch")
    assert torch.equal(y, y2)


def test_gqa_custom_op_registration(kernel_backend):
    """register_fake gives dk, dv k's and v's shape (B, H_kv, T, D), as the kernels do."""
    name, device = kernel_backend
    q, k, v, dout = gqa_operands(1, 2, 1, 9, 64, device, torch.float32)
    torch.library.opcheck(torch.ops.pyllmc.attention_forward.default, (q, k, v, name),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with torch.no_grad():
        out, lse = torch.ops.pyllmc.attention_forward(q, k, v, name)
    torch.library.opcheck(torch.ops.pyllmc.attention_backward.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, name),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
def test_gqa_rejects_bad_kv_shapes(backend_name):
    q = torch.randn(2, 4, 8, 64)
    kv = torch.randn(2, 2, 8, 64)
    with pytest.raises(ValueError, match=r"k must have q's shape .* with H_kv dividing H = 4 .*got \(2, 3, 8, 64\)"):
        ops.attention(q, torch.randn(2, 3, 8, 64), torch.randn(2, 3, 8, 64), backend=backend_name)
    for bad in ((1, 2, 8, 64), (2, 2, 9, 64), (2, 2, 8, 32)):  # B, T, D differ from q's
        with pytest.raises(ValueError, match=rf"k must have q's shape .*got {re.escape(str(bad))}"):
            ops.attention(q, torch.randn(bad), torch.randn(bad), backend=backend_name)
    with pytest.raises(ValueError, match=r"v must have q's shape"):
        ops.attention(q, kv, torch.randn(2, 2, 8, 32), backend=backend_name)
    with pytest.raises(ValueError, match=r"v must have k's shape \(B, H_kv, T, D\) = \(2, 2, 8, 64\); "
                                         r"got \(2, 1, 8, 64\)"):
        ops.attention(q, kv, torch.randn(2, 1, 8, 64), backend=backend_name)
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        ops.attention(q, torch.randn(2, 0, 8, 64), torch.randn(2, 0, 8, 64), backend=backend_name)


def test_qkv_attention_rejects_bad_kv_heads():
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int dividing num_heads=4; got 3"):
        ops.qkv_attention(torch.randn(1, 4, 10 * 16), 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int dividing num_heads=4; got 0"):
        ops.qkv_attention(torch.randn(1, 4, 10 * 16), 4, num_kv_heads=0)
    with pytest.raises(ValueError, match=r"qkv's last dim must be \(num_heads \+ 2 \* num_kv_heads\) \* D; "
                                         r"got 100 for num_heads=4, num_kv_heads=2"):
        ops.qkv_attention(torch.randn(1, 4, 100), 4, num_kv_heads=2)


def test_cuda_launchers_check_kv_heads():
    """The raw launchers refuse an H_kv that does not divide H before any launch, whatever the caller
    (checked on the simulator's build of csrc/, the same launcher code as pyllmc._C)."""
    from pyllmc import cuda_sim

    if not cuda_sim.enabled():
        pytest.skip("the CUDA simulator is off here")
    module = cuda_sim.load()
    p = 256  # any non-null address: the checks run first
    for bad in (3, 0):
        with pytest.raises(ValueError, match=rf"attention_forward: H_kv .* must be positive and divide H = 4, "
                                             rf"got {bad}"):
            module.attention_forward(out=p, lse=p, q=p, k=p, v=p, strides=[1024, 256, 32] * 4, B=1, H=4, T=8, D=32,
                                     dtype=0, stream=0, H_kv=bad)
        with pytest.raises(ValueError, match=rf"attention_backward: H_kv .* must be positive and divide H = 4"):
            module.attention_backward(dq=p, dk=p, dv=p, delta=p, dout=p, out=p, lse=p, q=p, k=p, v=p,
                                      strides=[1024, 256, 32] * 8, B=1, H=4, T=8, D=32, dtype=0, stream=0, H_kv=bad)


def test_qkv_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="qkv must be 3-D"):
        ops.qkv_attention(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="qkv's last dim must be 3 \\* num_heads \\* D"):
        ops.qkv_attention(torch.randn(1, 4, 100), 3)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.qkv_attention(torch.randn(1, 4, 96), 0)


def test_attention_odd_strides(kernel_backend):
    """Strides the tensor-core kernels cannot take in place (not multiples of 8 elements): the
    cuda backend copies those operands first; the answer is the same."""
    name, device = kernel_backend
    dtype = torch.float16 if interpreted(name, device) else torch.bfloat16
    B, H, T, D = 1, 2, 29, 64
    # position stride D + 3; each operand a leaf view of its own buffer
    q, k, v = (torch.randn(B, H, T, D + 3, device=device).to(dtype)[..., :D].detach().requires_grad_(True)
               for _ in range(3))
    assert q.stride(2) % 8 != 0
    check_against_reference(name, q, k, v, torch.randn(B, H, T, D, device=device).to(dtype), " (odd strides)")


def test_attention_noncontiguous_grad_output(kernel_backend):
    """Autograd may hand the backward a strided gradient."""
    name, device = kernel_backend
    shape = (1, 2, 33, 32) if name == "triton" else (1, 2, 33, 64)
    q, k, v = random_qkv(shape, device, torch.float32)
    dout = torch.randn(shape[0], shape[1], shape[3], shape[2], device=device).transpose(2, 3)
    assert not dout.is_contiguous()
    check_against_reference(name, q, k, v, dout, " (strided dout)")


def test_attention_backward_is_deterministic(kernel_backend):
    name, device = kernel_backend
    dtype = torch.float16 if interpreted(name, device) else torch.bfloat16
    shape = (1, 2, 100, 64) if device.type == "cpu" else (4, 12, 1024, 64)
    q, k, v = random_qkv(shape, device, dtype, requires_grad=False)
    dout = torch.randn(shape, device=device).to(dtype)
    out, lse = torch.ops.pyllmc.attention_forward(q, k, v, name)
    first = torch.ops.pyllmc.attention_backward(dout, q, k, v, out, lse, name)
    second = torch.ops.pyllmc.attention_backward(dout, q, k, v, out, lse, name)
    for label, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{label} differs between two identical backward calls"
    out2, lse2 = torch.ops.pyllmc.attention_forward(q, k, v, name)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_attention_gpu_tiles_under_interpreter(monkeypatch, head_dim, capability):
    """On the CPU the kernels run with small interpreter tiles; run them once with the GPU's
    tile table too, so its tile shapes (diagonal sub-steps, tails) are checked here as well."""
    if torch.cuda.is_available() or not pyllmc.available_backends()["triton"].available:
        pytest.skip("CPU-interpreter check (on a GPU every test runs with the GPU tiles)")
    from pyllmc.kernels import attention as kernels

    monkeypatch.setattr(kernels, "block_config",
                        lambda kernel, d, dtype, device, t: kernels.gpu_block_config(kernel, d, dtype, capability))
    shape = (1, 1, 300, head_dim)
    q, k, v = random_qkv(shape, "cpu", torch.float16)
    check_against_reference("triton", q, k, v, torch.randn(shape).half(), " (GPU tiles)")


def test_attention_empty_sequence(kernel_backend):
    name, device = kernel_backend
    q, k, v = random_qkv((2, 3, 0, 64), device, torch.float32)
    out = ops.attention(q, k, v, backend=name)
    out.sum().backward()
    assert out.shape == (2, 3, 0, 64) and q.grad.shape == q.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_torch_backend_is_the_reference(dtype):
    shape = (2, 3, 37, 24)  # the torch backend takes any head dim
    q, k, v = random_qkv(shape, "cpu", dtype)
    dout = torch.randn(shape).to(dtype)
    check_against_reference("torch", q, k, v, dout)


def test_supported_head_dims_table():
    assert SUPPORTED_HEAD_DIMS["torch"] is None
    assert backends_for_head_dim(64, torch.bfloat16) == ["cuda", "triton", "torch"]
    assert backends_for_head_dim(32, torch.bfloat16) == ["triton", "torch"]
    assert backends_for_head_dim(32, torch.float32) == ["cuda", "triton", "torch"]
    assert backends_for_head_dim(48, torch.float32) == ["torch"]


# ---- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
def test_attention_rejects_mismatched_shapes(backend_name):
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        ops.attention(q, torch.randn(1, 2, 9, 64), q, backend=backend_name)
    with pytest.raises(ValueError, match=r"v must have q's shape"):
        ops.attention(q, q, torch.randn(1, 3, 8, 64), backend=backend_name)


@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
def test_attention_rejects_3d(backend_name):
    x = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="q must be 4-D"):
        ops.attention(x, x, x, backend=backend_name)


@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_attention_rejects_dtype(backend_name, dtype):
    x = torch.zeros(1, 1, 4, 64, dtype=dtype)
    with pytest.raises(ValueError, match="q must have dtype float32, bfloat16, float16"):
        ops.attention(x, x, x, backend=backend_name)


def test_attention_rejects_mixed_dtypes_and_devices():
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match="k has dtype torch.float16 but q has torch.float32"):
        ops.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        ops.attention(q, q, torch.empty(1, 1, 4, 64, device="meta"))


def test_attention_rejects_non_tensor():
    with pytest.raises(ValueError, match="k must be a torch.Tensor"):
        ops.attention(torch.randn(1, 1, 4, 64), [1.0], torch.randn(1, 1, 4, 64))


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_attention_rejects_unsupported_head_dim(backend_name):
    status = pyllmc.available_backends()[backend_name]
    if not status.available:
        pytest.skip(f"backend {backend_name!r} unavailable: {status.reason}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 1, 4, 48, device=device)
    with pytest.raises(ValueError, match=rf"head dim D=48 is not supported by backend '{backend_name}'.*"
                                         r"backends that take D=48: torch$"):
        ops.attention(x, x, x, backend=backend_name)
    if backend_name == "cuda":
        y = torch.randn(1, 1, 4, 32, device=device, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="D=32 is not supported by backend 'cuda'.*take D=32: triton, torch"):
            ops.attention(y, y, y, backend="cuda")


def test_attention_wrong_device_for_backend():
    def attend_on(device):
        x = torch.randn(1, 1, 4, 64, device=device)
        ops.attention(x, x, x, backend="cuda")

    expect_cuda_backend_device_error(attend_on)
    if pyllmc.available_backends()["triton"].available:
        m = torch.empty(1, 1, 4, 64, device="meta")
        with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
            ops.attention(m, m, m, backend="triton")


# ---- torch.library / torch.compile ------------------------------------------------------

def test_attention_custom_op_registration(kernel_backend):
    """register_fake and the autograd formula agree with the real kernels (torch's checker)."""
    name, device = kernel_backend
    q, k, v = random_qkv((1, 2, 19, 64), device, torch.float32)
    torch.library.opcheck(torch.ops.pyllmc.attention_forward.default, (q, k, v, name),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    dout = torch.randn(1, 2, 19, 64, device=device)
    with torch.no_grad():
        out, lse = torch.ops.pyllmc.attention_forward(q, k, v, name)
    torch.library.opcheck(torch.ops.pyllmc.attention_backward.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, name),
                          test_utils=("test_schema", "test_faketensor"))


def test_attention_under_torch_compile(kernel_backend):
    name, device = kernel_backend
    shape = (1, 2, 21, 64)
    q, k, v = random_qkv(shape, device, torch.float32)
    dout = torch.randn(shape, device=device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(a, b, c):
        return ops.attention(a * 2.0, b, c, backend=name) + 1.0

    out = f(q, k, v)
    out.backward(dout)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = attention_reference(q2 * 2.0, k2, v2, compute_dtype=torch.float64)
    want.backward(dout.double())
    torch.testing.assert_close(out.detach().double() - 1.0, want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# ---- GPU compilation without a GPU ------------------------------------------------------

_COMPILE_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyllmc.kernels import attention as A

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"fwd": A.attention_forward_kernel, "dkdv": A.attention_dkdv_kernel, "dq": A.attention_dq_kernel}

def compile_for(kernel, elem, constexprs, arch, warps, stages):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("lse_ptr", "delta_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + elem
        elif name in ("qk_scale_log2", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    consts = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})

for arch, elems in ((80, ("bf16",)),):
    for elem in elems:
        dtype = DTYPES[elem]
        for name, kernel in KERNELS.items():
            bm, bn, warps, stages = A.gpu_block_config(name, 64, dtype, (arch // 10, 0))
            compile_for(kernel, elem, dict(HEAD_DIM=64, BLOCK_M=bm, BLOCK_N=bn, IEEE=elem == "fp32"),
                        arch, warps, stages)
    compile_for(A.attention_delta_kernel, "bf16", dict(HEAD_DIM=64, BLOCK_M=64), arch, 4, 1)
print("compiled")
"""


def test_attention_kernels_compile_for_gpu():
    """The interpreter accepts code the GPU compiler rejects (a non-constexpr global, a dot
    below the 16 x 16 minimum, mismatched dot dtypes): compile the kernels for sm_80 (the
    A100's mma.sync tiles) ahead of time (D=64), which needs no GPU. sm_90 (the H100/H200's
    wgmma tiles, bf16 and fp32) is built at GPT-2's real launch specialization, with its spills
    checked, by tests/test_triton_gpu_compile.py. On a GPU machine the other tests compile them."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: every other test compiles the kernels for it")
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")  # real JIT functions, not interpreted ones
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
