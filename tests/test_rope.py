"""ops.rope (rotary position embedding, "rotate halves") and ops.rope_tables on each backend against
PyTorch autograd of rope_reference in float64."""

import math

import pytest
import torch

import pyllmc
from pyllmc import ops
from pyllmc import testing
from pyllmc.ops.rope import rope_backward_op, rope_reference
from pyllmc.testing import RopeCase, assert_elementwise_close, assert_ok, compare_exact
from conftest import cuda_extension_modules, expect_cuda_backend_device_error, kernel_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, T, H, D) and what each takes on the CUDA kernels (V: elements per 128-bit vector, half = D / 2):
#   (1, 1, 1, 2): one pair; (2, 37, 3, 6): half = 3, one pair per slot (scalar path)
#   (1, 37, 3, 64): half = 32, vectors (4 fp32 / 8 bf16 per slot); Llama 2 110M's head dim
#   (2, 5, 2, 128): Llama 2 7B's head dim; (1, 3, 5, 16): half = 8, one bf16 vector per head half
#   (1, 4, 3, 12): half = 6, not a multiple of V (scalar) though the rows are 16-byte aligned in fp32
# "packed": x is the k heads of a (B, T, 3H, D) qkv buffer (position stride 3 H D), read in place.
SHAPES = [(1, 1, 1, 2), (2, 37, 3, 6), (1, 37, 3, 64), (2, 5, 2, 128), (1, 3, 5, 16), (1, 4, 3, 12)]
LAYOUTS = ["contiguous", "packed"]


@pytest.fixture(params=["cuda", "triton", "torch"])
def any_backend(request):
    """(backend name, device) for the two kernel backends and the torch backend itself."""
    if request.param == "torch":
        return "torch", torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return request.param, kernel_device(request.param)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_torch(any_backend, shape, dtype, layout):
    name, device = any_backend
    case = testing.rope_case(shape, dtype, device, layout=layout)
    if layout == "packed":
        assert case.inputs["x"].stride(1) == 3 * shape[2] * shape[3]
    got = case.run(name)
    assert got["y"].dtype == dtype and got["y"].shape == shape and got["y"].is_contiguous()
    assert got["dx"].shape == shape
    case.check(got)  # y and dx, elementwise against float64 autograd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [1, 100, 4093])
def test_rope_start_offsets(any_backend, start, dtype):
    """Positions start..start+T-1 (KV-cache decoding): right against the reference, and the same bits as
    the tables sliced at start."""
    name, device = any_backend
    case = testing.rope_case((2, 5, 3, 64), dtype, device, start=start)
    got = case.run(name)
    case.check(got)
    x, cos, sin = (case.inputs[k] for k in ("x", "cos", "sin"))
    sliced = ops.rope(x, cos[start:].contiguous(), sin[start:].contiguous(), backend=name)
    assert torch.equal(got["y"], sliced)


def test_rope_decoding_one_position_gives_the_prefill_bits(any_backend):
    """Rotating the token at position p alone (T = 1, start = p) gives the bits of the whole sequence's
    row p: a KV cache filled token by token equals one filled at once."""
    name, device = any_backend
    T = 19
    cos, sin = ops.rope_tables(T, 64, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, T, 3, 64, device=device).to(dtype)
        full = ops.rope(x, cos, sin, backend=name)
        for p in (0, 1, 7, T - 1):
            one = ops.rope(x[:, p:p + 1], cos, sin, start=p, backend=name)
            assert torch.equal(one, full[:, p:p + 1]), (dtype, p)


def test_rope_convention_rotates_halves(any_backend):
    """The pair (x[j], x[j + D/2]) is turned by p theta^(-2j/D) (Hugging Face's layout), not (x[2j], x[2j+1])
    (Meta's): x = e_0 at position p -> cos(p) e_0 + sin(p) e_{D/2}; position 0 is the identity, bitwise."""
    name, device = any_backend
    D, T = 8, 6
    cos, sin = ops.rope_tables(T, D, device=device)
    x = torch.zeros(1, T, 1, D, device=device)
    x[..., 0] = 1.0
    x[..., 1] = 2.0  # pair 1: turned by p * theta^(-2/8) = p / 10
    y = ops.rope(x, cos, sin, backend=name)
    p = torch.arange(T, dtype=torch.float64)
    want = torch.zeros(1, T, 1, D, dtype=torch.float64)
    want[0, :, 0, 0], want[0, :, 0, D // 2] = p.cos(), p.sin()
    want[0, :, 0, 1], want[0, :, 0, D // 2 + 1] = 2 * (p / 10).cos(), 2 * (p / 10).sin()
    torch.testing.assert_close(y.double().cpu(), want, rtol=0, atol=1e-6)
    x = torch.randn(2, T, 3, D, device=device)
    assert torch.equal(ops.rope(x, cos, sin, backend=name)[:, 0], x[:, 0])


def test_rope_backward_inverts_the_forward(any_backend):
    """The backward kernel is the inverse rotation: applied to the forward's output it gives x back
    (to float32 rounding), and the rotation keeps each pair's norm."""
    name, device = any_backend
    x = torch.randn(2, 9, 3, 64, device=device)
    cos, sin = ops.rope_tables(9, 64, device=device)
    y = ops.rope(x, cos, sin, backend=name)
    if name == "torch":
        back = torch.autograd.grad(rope_reference(x.requires_grad_(True), cos, sin), x, y)[0]
    else:
        back = rope_backward_op(y, cos, sin, 0, name)
    torch.testing.assert_close(back, x.detach(), rtol=0, atol=2e-6)
    pair_norms = lambda t: t[..., :32].square() + t[..., 32:].square()  # noqa: E731
    torch.testing.assert_close(pair_norms(y), pair_norms(x.detach()), rtol=1e-5, atol=1e-6)


def test_rope_matches_hugging_face_formula():
    """The torch backend is HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin with the tables
    repeated over both halves."""
    x = torch.randn(2, 11, 4, 32)
    cos, sin = ops.rope_tables(11, 32, theta=500000.0)

    def rotate_half(t):
        return torch.cat([-t[..., 16:], t[..., :16]], dim=-1)

    c = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    s = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    torch.testing.assert_close(ops.rope(x, cos, sin, backend="torch"), x * c + rotate_half(x) * s, rtol=0, atol=0)


def test_rope_tables():
    cos, sin = ops.rope_tables(4096, 128)
    assert cos.shape == sin.shape == (4096, 64) and cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos[0], torch.ones(64)) and torch.equal(sin[0], torch.zeros(64))
    # computed in float64, then rounded: exact to float32 even where the angle is large (p = 4095, i = 0)
    for p, i in ((4095, 0), (4095, 1), (1000, 63), (3, 17)):
        angle = p * 10000.0 ** (-2 * i / 128)
        assert cos[p, i].item() == torch.tensor(math.cos(angle), dtype=torch.float32).item()
        assert sin[p, i].item() == torch.tensor(math.sin(angle), dtype=torch.float32).item()
    cos, sin = ops.rope_tables(3, 4, theta=2.0)
    torch.testing.assert_close(sin[2], torch.tensor([math.sin(2.0), math.sin(2.0 * 2.0 ** -0.5)]), rtol=0, atol=1e-7)
    assert ops.rope_tables(0, 8)[0].shape == (0, 4)
    for bad, match in (((4, 7), "D must be a positive even int"), ((4, 0), "D must be a positive even int"),
                       ((-1, 8), "T must be an int >= 0"), ((4.0, 8), "T must be an int >= 0")):
        with pytest.raises(ValueError, match=match):
            ops.rope_tables(*bad)
    with pytest.raises(ValueError, match="theta must be a positive finite number"):
        ops.rope_tables(4, 8, theta=0.0)


def test_rope_empty(any_backend):
    name, device = any_backend
    cos, sin = ops.rope_tables(5, 8, device=device)
    for shape in [(0, 5, 2, 8), (2, 0, 2, 8), (2, 5, 0, 8)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = ops.rope(x, cos, sin, backend=name)
        assert y.shape == shape
        y.backward(torch.randn(shape, device=device))
        assert x.grad.shape == shape


def test_rope_strided_views(any_backend):
    """q and k as views of one packed qkv projection are read in place and their gradients land in
    their slices of qkv's gradient (v's slice stays zero); a transposed (B, H, T, D) tensor viewed as
    (B, T, H, D), an odd element offset (unaligned), a table at an unaligned address, and an upstream
    gradient whose last dim is not contiguous are all right."""
    name, device = any_backend
    B, T, H, D = 2, 7, 3, 64
    cos, sin = ops.rope_tables(T, D, device=device)
    qkv = torch.randn(B, T, 3 * H * D, device=device, requires_grad=True)
    heads = qkv.view(B, T, 3 * H, D)
    q, k = heads[:, :, :H], heads[:, :, H:2 * H]
    dq, dk = torch.randn(B, T, H, D, device=device), torch.randn(B, T, H, D, device=device)
    yq, yk = ops.rope(q, cos, sin, backend=name), ops.rope(k, cos, sin, backend=name)
    torch.autograd.backward([yq, yk], [dq, dk])
    ref = qkv.detach().view(B, T, 3 * H, D).double().requires_grad_(True)
    torch.autograd.backward([rope_reference(ref[:, :, :H], cos, sin), rope_reference(ref[:, :, H:2 * H], cos, sin)],
                            [dq.double(), dk.double()])
    assert_elementwise_close(yq, rope_reference(q.detach().double(), cos, sin), "q")
    assert_elementwise_close(qkv.grad, ref.grad.view(B, T, -1), "dqkv")
    assert torch.equal(qkv.grad.view(B, T, 3 * H, D)[:, :, 2 * H:], torch.zeros(B, T, H, D, device=device))

    bhtd = torch.randn(B, H, T, D, device=device)
    case = RopeCase({"x": bhtd.transpose(1, 2), "cos": cos, "sin": sin}, {"y": torch.randn(B, T, H, D, device=device)})
    case.check(case.run(name))
    odd = torch.randn(B, T, H, D + 1, device=device)[..., 1:]  # rows start at an odd element
    # tables at a 4-byte, not 16-byte, aligned address
    cos_odd = torch.empty(T * D // 2 + 1, device=device)[1:].view(T, D // 2).copy_(cos)
    sin_odd = torch.empty(T * D // 2 + 1, device=device)[1:].view(T, D // 2).copy_(sin)
    case = RopeCase({"x": odd, "cos": cos_odd, "sin": sin}, {"y": torch.randn(B, T, H, D, device=device)})
    case.check(case.run(name))
    shifted = torch.empty(B * T * H * D + 1, device=device)[1:].view(B, T, H, D).normal_()  # strides aligned, base not
    case = RopeCase({"x": shifted, "cos": cos, "sin": sin}, {"y": torch.randn(B, T, H, D, device=device)})
    case.check(case.run(name))
    case = RopeCase({"x": bhtd.transpose(1, 2), "cos": cos, "sin": sin_odd},
                    {"y": torch.randn(B, T, D, H, device=device).transpose(-1, -2)})  # dy: last dim strided
    case.check(case.run(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_deterministic(any_backend, dtype):
    name, device = any_backend
    case = testing.rope_case((2, 37, 3, 64), dtype, device, layout="packed", start=3)
    first, second = case.run(name), case.run(name)
    assert_ok([compare_exact(key, first[key], second[key]) for key in first])


@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
def test_bad_inputs_are_clear_errors(backend_name):
    x = torch.randn(2, 5, 3, 8)
    cos, sin = ops.rope_tables(6, 8)
    cases = [
        ((torch.randn(2, 5, 3, 7), cos, sin), {}, r"x's last dim D must be even and > 0 .*got shape \(2, 5, 3, 7\)"),
        ((torch.randn(2, 5, 3, 0), cos, sin), {}, r"x's last dim D must be even and > 0"),
        ((torch.randn(5, 3, 8), cos, sin), {}, r"x must be 4-D; got shape \(5, 3, 8\)"),
        ((x.double(), cos, sin), {}, "x must have dtype float32, bfloat16, float16; got float64"),
        ((x.int(), cos, sin), {}, "x must have dtype float32, bfloat16, float16; got int32"),
        (("x", cos, sin), {}, "x must be a torch.Tensor"),
        ((torch.randn(2, 5, 3, 16)[..., ::2], cos, sin), {}, "x must have stride 1 along its last dim"),
        ((x, cos.double(), sin), {}, "cos must have dtype float32; got float64"),
        ((x, cos, sin.bfloat16()), {}, "sin must have dtype float32; got bfloat16"),
        ((x, cos[:, :3].contiguous(), sin), {}, r"cos must have shape \(T_max, D // 2\) = \(T_max, 4\) .*got \(6, 3\)"),
        ((x, cos, sin[:5]), {}, r"sin must have cos's shape \(6, 4\); got \(5, 4\)"),
        ((x, cos.flatten(), sin), {}, r"cos must be 2-D"),
        ((x, cos.t().contiguous().t(), sin), {}, "cos must be contiguous"),
        ((x, cos[:4], sin[:4]), {}, r"cos and sin have 4 rows, fewer than start \+ T = 0 \+ 5"),
        ((x, cos, sin), {"start": 2}, r"cos and sin have 6 rows, fewer than start \+ T = 2 \+ 5"),
        ((x, cos, sin), {"start": -1}, "start must be >= 0; got -1"),
        ((x, cos, sin), {"start": 1.0}, "start must be an int; got float"),
        ((x, cos, sin), {"start": True}, "start must be an int; got bool"),
        ((x, cos, sin.to("meta")), {}, "sin is on meta but x is on cpu"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.rope(*args, **kwargs, backend=backend_name)


def test_cuda_launchers_refuse_out_of_bounds_calls():
    """The CUDA launchers re-check what would make a kernel read or write out of bounds, for callers that
    skip the ops layer."""
    modules = cuda_extension_modules()
    if not modules:
        pytest.skip("no build of the CUDA launchers here")
    x = torch.randn(2, 5, 3, 8)
    out = torch.empty_like(x)
    cos, sin = ops.rope_tables(5, 8)
    good = dict(out=out.data_ptr(), inp=x.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), B=2, T=5, H=3, D=8,
                out_stride_b=120, out_stride_t=24, out_stride_h=8, inp_stride_b=120, inp_stride_t=24, inp_stride_h=8,
                start=0, table_rows=5, dtype=0, stream=0)
    for ext in modules:
        if not hasattr(ext, "rope_forward"):
            continue  # a pyllmc._C built before csrc/rope.cu existed (the simulator is always rebuilt)
        for bad, match in (({"start": 1}, "positions start..start\\+T-1 must be rows"),
                           ({"table_rows": 4}, "positions start..start\\+T-1 must be rows"),
                           ({"start": -1}, "positions start..start\\+T-1 must be rows"),
                           ({"D": 7}, "D must be even"),
                           ({"out_stride_h": 4}, "out's head stride must be >= D"),
                           ({"out_stride_t": 16}, "out's T stride overlaps its heads"),
                           ({"inp_stride_t": -24}, "strides must be >= 0")):
            with pytest.raises(ValueError, match=match):
                ext.rope_forward(**{**good, **bad})
        if "_C_sim" in ext.__name__:  # and the good call runs (the real build's would need CUDA pointers)
            ext.rope_forward(**good)
            assert_elementwise_close(out, rope_reference(x.double(), cos, sin), "launcher")


def test_wrong_device_for_backend():
    def call(device):
        cos, sin = ops.rope_tables(4, 8)
        return ops.rope(torch.randn(1, 4, 2, 8, device=device), cos.to(device), sin.to(device), backend="cuda")

    expect_cuda_backend_device_error(call)
    if pyllmc.available_backends()["triton"].available:
        with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
            ops.rope(torch.empty(1, 4, 2, 8, device="meta"), torch.empty(4, 4, device="meta"),
                     torch.empty(4, 4, device="meta"), backend="triton")


def test_custom_op_registration(kernel_backend):
    """register_fake and the autograd formula agree with the real kernels (torch's checker)."""
    name, device = kernel_backend
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    x = torch.randn(2, 5, 9, 8, device=device)[:, :, 3:6].requires_grad_(True)
    cos, sin = ops.rope_tables(7, 8, device=device)
    torch.library.opcheck(torch.ops.pyllmc.rope_forward.default, (x, cos, sin, 2, name), test_utils=checks)


def test_under_torch_compile(kernel_backend):
    name, device = kernel_backend
    qkv = torch.randn(2, 6, 3 * 2 * 16, device=device, requires_grad=True)
    cos, sin = ops.rope_tables(8, 16, device=device)
    dout = torch.randn(2, 6, 2, 16, device=device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(t):
        heads = t.view(2, 6, 6, 16)
        return ops.rope(heads[:, :, :2], cos, sin, start=1, backend=name) * ops.rope(heads[:, :, 2:4], cos, sin,
                                                                                    start=1, backend=name)

    f(qkv).backward(dout)
    ref = qkv.detach().double().requires_grad_(True)
    heads = ref.view(2, 6, 6, 16)
    (rope_reference(heads[:, :, :2], cos, sin, 1) * rope_reference(heads[:, :, 2:4], cos, sin, 1)).backward(
        dout.double())
    torch.testing.assert_close(qkv.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
