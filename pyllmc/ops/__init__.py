"""The public op API: every non-matmul op of GPT-2 training, forward and backward.

Each op checks its inputs (ValueError naming the argument), picks a backend
("cuda" | "triton" | "torch", see pyllmc.backend) and runs as an autograd op.
"""

from .attention import attention, qkv_attention
from .cross_entropy import cross_entropy, deferred_target_checks
from .gelu import gelu
from .layernorm import fused_residual_layernorm, layernorm
from .linear_cross_entropy import linear_cross_entropy
from .rmsnorm import fused_residual_rmsnorm, rmsnorm
from .rope import rope, rope_tables
from .swiglu import relu2, swiglu, swiglu_packed

__all__ = ["gelu", "layernorm", "fused_residual_layernorm", "cross_entropy", "linear_cross_entropy",
           "deferred_target_checks", "attention",
           "qkv_attention", "rmsnorm", "fused_residual_rmsnorm", "swiglu", "swiglu_packed", "relu2",
           "rope", "rope_tables"]
