"""The one table of numerical tolerances, and the two ways tests compare results.

1. Elementwise ops (one rounding from float32 to the output dtype):
   |kernel - reference| <= atol + rtol * |reference|, reference computed in float64.
2. Composite ops (reductions, matmuls: the error grows with the size), flash-attention's
   criterion: the kernel's max error against the float64 reference is at most
   2x PyTorch's own max error in the same dtype, plus a small epsilon.
"""

import torch

# dtype -> (rtol, atol) for elementwise results
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
