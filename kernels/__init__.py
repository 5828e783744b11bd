"""pyllmc.kernels: the Triton implementation of every pyllmc op, one module per op family.

Each module holds its @triton.jit kernels and thin launch functions over torch tensors,
named like the CUDA launchers (`gelu_forward`, `gelu_backward`, ...). Use pyllmc.ops,
which checks inputs and picks the backend; these launchers assume checked inputs.
"""
