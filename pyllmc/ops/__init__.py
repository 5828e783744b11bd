"""The public op API: every non-matmul op of GPT-2 training, forward and backward.

Each op checks its inputs (ValueError naming the argument), picks a backend
("cuda" | "triton" | "torch", see pyllmc.backend) and runs as an autograd op.
"""

from .gelu import gelu

__all__ = ["gelu"]
