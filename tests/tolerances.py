"""The one table of numerical tolerances, and the two ways tests compare results.

1. Elementwise ops (one rounding from float32 to the output dtype):
   |kernel - reference| <= atol + rtol * |reference|, reference computed in float64.
2. Composite ops (reductions, matmuls: the error grows with the size), flash-attention's
   criterion: the kernel's max error against the float64 reference is at most
   2x PyTorch's own max error in the same dtype, plus a small epsilon.
"""

import torch

# dtype -> (rtol, atol) for elementwise results
#
# float32, 1e-6 and 1e-6, and the GPU's fast math. The elementwise fp32 results checked with it are
# LayerNorm's h = residual + x (one IEEE add: correctly rounded everywhere, 0.5 ulp) and GELU.
# Under the interpreter GELU runs in numpy (exp, division correctly rounded or nearly); on the GPU
# Triton compiles tl.exp to ex2.approx.ftz.f32 of x * log2(e) and the division 1 / (1 + e) to
# div.full.f32 (tests/test_triton_gpu_compile.py), each documented to be off by at most 2 ulp,
# i.e. a relative error of 2 * 2^-23 = 2.4e-7 (ftz only flushes e < 2^-126 to 0, when |u| > 43.7
# and gelu(x) < 1e-36: absolute error below atol). GELU with e = exp(-2|u|), inv = 1 / (1 + e):
#   x >= 0: y = x * inv. Relative error <= err(inv) + 2 multiplies + e / (1 + e) * err(e)
#           <= (2 + 0.5) + 2 * 0.5 + 0.5 * 2 ulp, plus the fp32 rounding of u carried into e,
#           weighted by 2u * e^(-2u) <= 1/e: < 6 ulp = 7.2e-7 < rtol. y' has the same terms plus
#           sech^2 = 4 e inv^2 weighted by x * e-terms (< 1): < 8 ulp = 9.5e-7, and |y'| <= 1.13
#           so the bound is 1e-6 * (1 + 1 / 1.13) = 1.9e-6 relative (16 ulp).
#   x < 0:  |y| <= 0.17 and |y'| <= 1.13, so atol alone allows >= 5.9e-6 and 1.9e-6 relative (49
#           and 16 ulp); the error (two 2-ulp instructions, roundings, and 2|u| times u's rounding
#           where e is small, which is where |y| decays like e) stays below that.
# Checked numerically as well: emulating the GPU in numpy float32 with both instructions off by
# 2 ulp in either direction, over x in [-15, 15] (2M points) and 3M draws of 3 * N(0, 1), the
# worst error is 0.28 of this tolerance for y and 0.20 for y'. So 1e-6 holds on the GPU without
# round-to-nearest intrinsics; the interpreter and the CUDA kernel (expf, IEEE division) are closer.
ELEMENTWISE = {
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (2.0**-7, 1e-6),  # one bf16 ulp: "within bf16 rounding"
    torch.float16: (2.0**-10, 1e-6),  # one fp16 ulp
}

# dtype -> epsilon added to 2x PyTorch's own error, for composite ops
FLASH_EPS = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def assert_elementwise_close(actual: torch.Tensor, reference: torch.Tensor, name: str = "result") -> None:
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    rtol, atol = ELEMENTWISE[actual.dtype]
    a, r = actual.double().cpu(), reference.double().cpu()
    bad = (a - r).abs() > atol + rtol * r.abs()
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name} ({actual.dtype}): {int(bad.sum())} of {a.numel()} elements out of tolerance "
            f"(rtol={rtol}, atol={atol}); first at {i}: got {a[tuple(i)].item()!r}, want {r[tuple(i)].item()!r}")


def assert_flash_close(actual: torch.Tensor, reference: torch.Tensor, torch_same_dtype: torch.Tensor,
                       name: str = "result") -> None:
    """actual: the kernel's output; reference: float64 (or float32) truth; torch_same_dtype:
    PyTorch's own result computed in actual's dtype from the same inputs."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual.float()).all(), f"{name}: non-finite values"
    err = max_abs_err(actual, reference)
    torch_err = max_abs_err(torch_same_dtype, reference)
    bound = 2 * torch_err + FLASH_EPS[actual.dtype]
    assert err <= bound, (f"{name} ({actual.dtype}): max error {err:.3e} > 2 x torch's {torch_err:.3e} "
                          f"+ {FLASH_EPS[actual.dtype]:.0e}")
