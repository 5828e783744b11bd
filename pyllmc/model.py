"""GPT-2 built from pyllmc.ops (every non-matmul op) and torch matmuls (F.linear).

    idx (B, T) -> wte[idx] + wpe[0..T) -> L x Block -> ln_f -> lm_head (tied to wte) -> logits

    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

The residual add and the LayerNorm that follows it are one op, ops.fused_residual_layernorm
(as in llm.c): inside a block the add of the attention branch is fused with ln_2, and the
add of the MLP branch with the *next* block's ln_1 (or ln_f after the last block). So a
block receives the residual stream together with its already normalised copy, and is told
which LayerNorm comes after it. That block, the trunk loop, the loss head (forward), KV-cache
generation, the optimizer groups and the FLOPs / MFU estimates are pyllmc.lm's, shared with
pyllmc.llama's Llama; this module holds what is GPT-2's own.

Module and parameter names match Hugging Face's GPT2LMHeadModel (transformer.wte,
transformer.h.0.attn.c_attn, ...), but the projections are nn.Linear, whose weight is
(out, in); HF's Conv1D stores (in, out). Reading and writing HF's files (and the transposes)
is pyllmc.hf's work, llm.c's files pyllmc.llmc's; GPT.from_pretrained / save_pretrained
hand over to pyllmc.hf.

Vocabulary padding: wte (and the tied lm_head) has padded_vocab_size rows (50304 for GPT-2,
a multiple of 128 that the kernels and the matmuls like). Only the first vocab_size columns
of the logits are returned or reach the loss. The padded rows are initialised to ZERO (llm.c
initialises them randomly; they never matter either way): they then never change in
training, because no token id selects them and their logit columns get zero gradient, so
checkpoints stay clean and exports to HF can simply drop them.

The presets "tiny" and "tiny-4" are pyllmc's own small configurations for CPU tests and
smoke runs; all others are GPT-2's sizes (and llm.c's dNN names for them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from pyllmc import ops
# shared with pyllmc.llama; KVCache, PEAK_BF16_FLOPS and peak_bf16_flops are also re-exported from here
from pyllmc.lm import PEAK_BF16_FLOPS, CausalLM, KVCache, PreNormBlock, cached_attention, peak_bf16_flops  # noqa: F401
from pyllmc.ops.attention import split_heads

GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256


def pad_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """The next multiple of `multiple` (50257 -> 50304, as in llm.c)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (wpe rows)
    vocab_size: int = GPT2_VOCAB_SIZE  # real vocabulary: logits and loss columns
    padded_vocab_size: int = 50304  # wte rows, lm_head columns (>= vocab_size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int; got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"GPTConfig.padded_vocab_size ({self.padded_vocab_size}) must be >= "
                             f"vocab_size ({self.vocab_size})")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        """Heads of keys and values (pyllmc.lm's KV cache): GPT-2 gives every query head its own."""
        return self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named size (see PRESETS); keyword overrides replace single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**asdict(PRESETS[name]), **overrides})


def _gpt2_size(n_layer: int, n_head: int, n_embd: int, block_size: int = 1024) -> GPTConfig:
    return GPTConfig(block_size=block_size, vocab_size=GPT2_VOCAB_SIZE, padded_vocab_size=50304,
                     n_layer=n_layer, n_head=n_head, n_embd=n_embd)


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's GPT-2 sizes (Hugging Face names)
    "gpt2": _gpt2_size(12, 12, 768),  # 124M
    "gpt2-medium": _gpt2_size(24, 16, 1024),  # 350M
    "gpt2-large": _gpt2_size(36, 20, 1280),  # 774M
    "gpt2-xl": _gpt2_size(48, 25, 1600),  # 1558M
    # llm.c's depth descriptors (train_gpt2.cu's table)
    "d6": _gpt2_size(6, 6, 384),
    "d12": _gpt2_size(12, 12, 768),
    "d24": _gpt2_size(24, 16, 1024),
    "d36": _gpt2_size(36, 20, 1280),
    "d48": _gpt2_size(48, 25, 1600),
    # pyllmc's own tiny configurations for CPU tests and smoke runs (not GPT-2 sizes)
    "tiny": _gpt2_size(2, 2, 128, block_size=256),
    "tiny-4": _gpt2_size(4, 4, 256, block_size=256),
}


# ---- modules ----------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm over the last dim with weight and bias, run by ops.layernorm."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm(x, (C,), self.weight, self.bias, self.eps)
        return ops.layernorm(x, self.weight, self.bias, eps=self.eps)  # x's shape

    def add_and_norm(self, residual: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, LayerNorm(residual + x)) in one op."""
        # Under autocast the matmul branch comes back in bf16 while the residual stream stays
        # float32: the fused op takes one dtype. (A no-op when the model runs in one dtype.)
        x = x.to(residual.dtype)
        # h = residual + x;  return h, F.layer_norm(h, (C,), self.weight, self.bias, self.eps)
        return ops.fused_residual_layernorm(residual, x, self.weight, self.bias, eps=self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        qkv = self.c_attn(x)  # (B, T, 3C)
        if cache is None:
            # q, k, v = qkv.split(C, dim=2), each .view(B, T, H, D).transpose(1, 2)  (B, H, T, D)
            # y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            # The kernels read q, k, v in place and write y with the heads side by side: no copies,
            # and the backward's dq, dk, dv land in one (B, T, 3C) buffer, qkv's gradient.
            y = ops.qkv_attention(qkv, H)  # (B, T, C)
        else:
            # (B, T, 3, H, D) -> three (B, H, T, D) strided views (row stride 3C), no copy
            q, k, v = split_heads(qkv, H)
            y = cached_attention(q, k, v, cache).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.gelu(self.c_fc(x))  # (B, T, 4C): F.gelu(c_fc(x), approximate="tanh")
        return self.c_proj(h)  # (B, T, C)


class Block(PreNormBlock):
    """x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)): forward (with the fused residual norms) is
    pyllmc.lm.PreNormBlock's."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config)


# ---- the model --------------------------------------------------------------------------------

class GPT(CausalLM):
    def __init__(self, config: GPTConfig, *, seed: Optional[int] = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.init_weights(seed)

    def tie_weights(self) -> None:
        """lm_head shares wte's (padded_vocab_size, C) matrix, as in GPT-2."""
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """GPT-2's initialisation.

        Linear and Embedding weights ~ N(0, 0.02), the two residual projections (attn.c_proj,
        mlp.c_proj) ~ N(0, 0.02 / sqrt(2 n_layer)) so the residual stream's variance does not
        grow with depth; biases 0; LayerNorm weight 1, bias 0; padded wte rows 0.
        With a seed the draws come from a private CPU generator in parameter order, so the
        same seed gives the same model on any device and leaves the global RNG alone.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        V = self.config.vocab_size
        for name, param in self.named_parameters():  # tied lm_head.weight is listed once, as wte
            if param.is_meta:
                continue
            if name.endswith(".bias"):
                param.zero_()
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                param.fill_(1.0)
            else:
                std_here = residual_std if name.endswith("c_proj.weight") else std
                rows = V if name == "transformer.wte.weight" else param.size(0)
                values = torch.empty((rows,) + tuple(param.shape[1:]))
                values.normal_(0.0, std_here, generator=generator)
                param.zero_()
                param[:rows].copy_(values)

    # ---- forward --------------------------------------------------------------------------

    def _embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = idx.size(1)
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)

    def _hidden(self, idx: torch.Tensor, caches: Optional[list] = None, start: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions [start, start + T) -> ln_f of the last block's output (B, T, C)."""
        return self._trunk(self._embed(idx, start), caches)

    # forward (the loss head), generate, configure_optimizers, estimate_flops_per_token and
    # estimate_mfu are pyllmc.lm.CausalLM's.

    # ---- counts ---------------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters of the model, the tied wte / lm_head matrix counted once and without its
        padded rows (which never affect the output): 124,439,808 for GPT-2 small.
        non_embedding=True leaves out the position embeddings (as nanoGPT does: the token
        embedding is also the output layer's weight, so it stays in)."""
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ---- Hugging Face files (pyllmc.hf) ------------------------------------------------------------

    @staticmethod
    def from_pretrained(name_or_dir: str) -> "GPT":
        """GPT-2 from a Hugging Face model directory or Hub name ("gpt2", ...): pyllmc.hf.from_pretrained."""
        from pyllmc import hf  # imported here: pyllmc.hf builds on this module

        return hf.from_pretrained(name_or_dir)

    def save_pretrained(self, directory: str) -> None:
        """A directory transformers.GPT2LMHeadModel.from_pretrained loads: pyllmc.hf.save_pretrained."""
        from pyllmc import hf

        hf.save_pretrained(self, directory)
