"""What one training step holds in memory, from the model's shapes alone.

    account = step_memory(config, B=16, T=1024, dtype=torch.bfloat16)
    print(account.table())            # GiB per part; account.peak_bytes ~ torch.cuda.max_memory_allocated()

The parts live at the same time at the start of the backward of the last micro step: the
parameters, their gradients (accumulated across micro steps), AdamW's state (m and v in
float32, plus the float32 master copy of low-precision parameters), every activation the
forward saved for the backward, and the (B, T, Vp) logits, which the fused classifier turns
into their own gradient in place (there is no second logits-sized buffer).

Saved activations per layer, in elements per token, as pyllmc's GPT-2 saves them:
    ln_1 output (c_attn's input) C, qkv 3C (attention's input), attention output C (c_proj's
    input; attention also keeps it for its backward), the residual stream after the attention C
    (the fused residual LayerNorm), ln_2 output C, c_fc output 4C (GELU's input), GELU output 4C
    (c_proj's input), the residual stream after the MLP C (the next fused LayerNorm)
  = 16 C, plus float32 per token: LayerNorm's mean and rstd (2 x 2) and attention's lse (H).
Outside the layers: the embeddings' sum C (ln_1 of block 0), ln_f's output C (lm_head's input).
Small tensors (biases, the (B, T) ids, LayerNorm weights) are left out: well under 1%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass
class StepMemory:
    params: int       # bytes
    grads: int
    optimizer: int    # AdamW's m, v (and master copy)
    activations: int  # saved for the backward, without the logits
    logits: int

    @property
    def peak_bytes(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits

    def table(self) -> str:
        rows = [("parameters", self.params), ("gradients", self.grads), ("AdamW state", self.optimizer),
                ("activations", self.activations), ("logits (+ their gradient, in place)", self.logits),
                ("peak", self.peak_bytes)]
        return "\n".join(f"{name:38s} {value / GIB:8.2f} GiB" for name, value in rows)


def num_parameters(config) -> int:
    """Parameters of pyllmc's GPT-2 (wte tied to lm_head, padded vocabulary included)."""
    C, L = config.n_embd, config.n_layer
    per_layer = (2 * 2 * C  # ln_1, ln_2 weight and bias
                 + 3 * C * C + 3 * C  # c_attn
                 + C * C + C  # attn.c_proj
                 + 4 * C * C + 4 * C  # c_fc
                 + 4 * C * C + C)  # mlp.c_proj
    return config.padded_vocab_size * C + config.block_size * C + L * per_layer + 2 * C


def activation_elements(config, B: int, T: int) -> tuple[int, int]:
    """(elements in the activation dtype, float32 elements) saved for the backward, logits excluded."""
    C, L, H = config.n_embd, config.n_layer, config.n_head
    tokens = B * T
    return tokens * (16 * C * L + 2 * C), tokens * L * (4 + H) + tokens * 2  # + ln_1 of block 0's stats


def step_memory(config, B: int, T: int, dtype: torch.dtype = torch.bfloat16, master_weights: bool = True,
                grad_dtype: torch.dtype | None = None) -> StepMemory:
    """The bytes of one training step of GPT `config` at batch B x T with parameters in `dtype`."""
    P = num_parameters(config)
    size = torch.tensor([], dtype=dtype).element_size()
    grad_size = torch.tensor([], dtype=grad_dtype or dtype).element_size()
    master = 4 * P if (master_weights and dtype != torch.float32) else 0
    act, act_fp32 = activation_elements(config, B, T)
    return StepMemory(params=P * size, grads=P * grad_size, optimizer=8 * P + master,
                      activations=act * size + act_fp32 * 4, logits=B * T * config.padded_vocab_size * size)
