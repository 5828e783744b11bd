"""The training dtype: what --dtype auto means on each device.

bfloat16 is native from compute capability 8.0 on (Ampere: A100, RTX 30xx, H100...): the tensor cores
multiply it and the kernels' bf16 loads, stores and conversions are single instructions. Below 8.0 (T4,
V100, Pascal) the CUDA toolkit emulates bfloat16 in software (slow) and some kernels are not built for
it, so auto picks float32 there and says so; a CPU trains in float32 (the design notes).

    name, note = training_dtype("auto", "cuda")   # ("bfloat16", None) on an H100; ("float32", "...") on a T4
"""

from __future__ import annotations

import torch

BF16_MIN_CAPABILITY = (8, 0)  # the first compute capability with native bfloat16 (Ampere)
DTYPES = ("bfloat16", "float32")


def training_dtype(requested: str, device) -> tuple[str, str | None]:
    """(the dtype name a run trains in, a one-line note to print or None) for --dtype `requested`
    ("auto", "bfloat16" or "float32") on `device`. auto: bfloat16 on a CUDA GPU of compute capability
    8.0 or more, float32 on an older GPU (with a note saying why) and on a CPU. An explicit dtype is kept;
    bfloat16 on an older GPU gets a note."""
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"dtype {requested!r}: expected auto, {' or '.join(DTYPES)}")
    device = torch.device(device)
    if device.type != "cuda":
        return ("float32" if requested == "auto" else requested), None
    capability = tuple(torch.cuda.get_device_capability(device))
    native = capability >= BF16_MIN_CAPABILITY
    have = f"compute capability {capability[0]}.{capability[1]}"
    need = f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}"
    if requested == "auto":
        if native:
            return "bfloat16", None
        return "float32", (f"--dtype auto: float32, because this GPU ({have}) has no native bfloat16 (it needs "
                           f"{need} or newer, e.g. A100, H100); --dtype bfloat16 forces it (emulated, slow)")
    if requested == "bfloat16" and not native:
        return requested, (f"note: --dtype bfloat16 on a GPU of {have}: bfloat16 is native only from {need} on, here "
                           f"it is emulated (slow) and some kernels do not support it; --dtype float32 avoids it")
    return requested, None
