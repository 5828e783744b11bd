"""Llama 2 built from pyllmc.ops and torch matmuls (F.linear), llama2.c's model in nanoGPT's clothes.

    idx (B, T) -> wte[idx] -> L x Block -> ln_f -> lm_head (tied to wte, or not) -> logits

    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))       ln_1, ln_2, ln_f: RMSNorm
    attn:   q, k, v = x @ c_attn^T (one matmul, [q | k | v]); q, k rotated by RoPE; causal attention
            of H query heads over H_kv key/value heads (GQA; H_kv = H is plain multi-head); c_proj
    mlp:    c_proj(silu(x @ w1^T) * (x @ w3^T)), w1 and w3 one matmul c_fc = [w1 | w3] (SwiGLU)

No biases, no position embeddings, no dropout. The block, the trunk loop (each residual add fused
with the RMSNorm after it, ops.fused_residual_rmsnorm), the loss head (forward), KV-cache generation,
the optimizer groups and FLOPs / MFU are pyllmc.lm's, shared with GPT-2 (pyllmc.model).

Names. The modules follow nanoGPT's names so the two models read alike; Meta / llama2.c and
Hugging Face call them:

    pyllmc                       llama2.c (model.py)            Hugging Face LlamaForCausalLM
    transformer.wte              tok_embeddings                 model.embed_tokens
    transformer.h.i.ln_1         layers.i.attention_norm        model.layers.i.input_layernorm
    transformer.h.i.attn.c_attn  layers.i.attention.wq|wk|wv    model.layers.i.self_attn.q_proj|k_proj|v_proj
    transformer.h.i.attn.c_proj  layers.i.attention.wo          model.layers.i.self_attn.o_proj
    transformer.h.i.ln_2         layers.i.ffn_norm              model.layers.i.post_attention_layernorm
    transformer.h.i.mlp.c_fc     layers.i.feed_forward.w1|w3    model.layers.i.mlp.gate_proj|up_proj
    transformer.h.i.mlp.c_proj   layers.i.feed_forward.w2       model.layers.i.mlp.down_proj
    transformer.ln_f             norm                           model.norm
    lm_head                      output                         lm_head

c_attn's rows are [wq (H D) | wk (H_kv D) | wv (H_kv D)], c_fc's [w1 (hidden) | w3 (hidden)].

RoPE layout: "rotate halves" (Hugging Face's): within a head of D dims, dim i < D/2 is rotated with
dim i + D/2 by the angle pos * theta^(-2i/D). Meta's checkpoints and llama2.c rotate ADJACENT pairs
(2i, 2i + 1) instead; the two are the same model up to a permutation of the rows of wq and wk within
each head, which pyllmc.llama2c applies on export and undoes on import (Hugging Face's files are
already in the halves layout). The cos / sin tables (block_size, D/2), float32, are computed once
per device and kept off the state dict and out of .to(dtype) (bf16 angles would be too coarse).

Hidden size of the MLP (llama2.c's and Meta's rule): hidden = 4 dim; hidden = int(2 hidden / 3);
times ffn_dim_multiplier if set; rounded up to a multiple of multiple_of. A config may also give
hidden_dim outright (files record it: llama2.c's header, Hugging Face's intermediate_size).

Vocabulary: no padding (Llama 2's 32000 and the TinyStories 512 are multiples of 128 already);
padded_vocab_size = vocab_size for the shared loss head.

Presets: llama2.c's TinyStories models ("stories260K", "stories15M", "stories42M", "stories110M", their
sizes from llama2.c's README and doc/stories260K.md, all with tied embeddings as llama2.c trains them)
and "llama-tiny", pyllmc's own small size for CPU tests and demos.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from pyllmc import ops
from pyllmc.lm import CausalLM, PreNormBlock, Probe, cached_attention


@dataclass
class LlamaConfig:
    dim: int = 288  # model width C
    n_layer: int = 6
    n_head: int = 6  # query heads H
    n_kv_head: Optional[int] = None  # key/value heads H_kv (divides H); None: = n_head
    vocab_size: int = 32000
    block_size: int = 256  # max sequence length (rows of the RoPE tables)
    multiple_of: int = 32  # the MLP's hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # the MLP's hidden size outright; None: the rule above
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # lm_head shares wte's matrix

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("dim", "n_layer", "n_head", "n_kv_head", "vocab_size", "block_size", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int; got {value!r}")
        if self.hidden_dim is not None and (isinstance(self.hidden_dim, bool) or not isinstance(self.hidden_dim, int)
                                            or self.hidden_dim <= 0):
            raise ValueError(f"LlamaConfig.hidden_dim must be a positive int or None; got {self.hidden_dim!r}")
        if self.dim % self.n_head:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: the head dim dim / n_head = {self.head_dim} must be even (RoPE rotates "
                             f"pairs of dims)")
        for name in ("norm_eps", "rope_theta"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0; got {getattr(self, name)!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"LlamaConfig.ffn_dim_multiplier must be > 0 or None; got {self.ffn_dim_multiplier!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size  # no padding (see the module's doc)

    @property
    def ffn_hidden_dim(self) -> int:
        """The MLP's hidden size: hidden_dim if given, else llama2.c's rule (the module's doc)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = 4 * self.dim
        hidden = int(2 * hidden / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A named size (see PRESETS); keyword overrides replace single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**asdict(PRESETS[name]), **overrides})


PRESETS: dict[str, LlamaConfig] = {
    # llama2.c's TinyStories models (vocab 32000 = Llama 2's tokenizer; 512 = llama2.c's custom tok512)
    "stories260K": LlamaConfig(dim=64, n_layer=5, n_head=8, n_kv_head=4, vocab_size=512, block_size=512,
                               multiple_of=4),  # hidden 172
    "stories15M": LlamaConfig(dim=288, n_layer=6, n_head=6, vocab_size=32000, block_size=256),  # hidden 768
    "stories42M": LlamaConfig(dim=512, n_layer=8, n_head=8, vocab_size=32000, block_size=1024),  # hidden 1376
    "stories110M": LlamaConfig(dim=768, n_layer=12, n_head=12, vocab_size=32000, block_size=1024),  # hidden 2048
    # pyllmc's own small size for CPU tests and demos (head dim 32: every attention backend takes it)
    "llama-tiny": LlamaConfig(dim=128, n_layer=4, n_head=4, n_kv_head=2, vocab_size=512, block_size=256),
}


# ---- modules ----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a weight (no bias), run by ops.rmsnorm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm(x, (C,), self.weight, self.eps)
        return ops.rmsnorm(x, self.weight, eps=self.eps)  # x's shape

    def add_and_norm(self, residual: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, RMSNorm(residual + x)) in one op."""
        x = x.to(residual.dtype)  # under autocast the matmul branch comes back in bf16 (see GPT's LayerNorm)
        # h = residual + x;  return h, F.rms_norm(h, (C,), self.weight, self.eps)
        return ops.fused_residual_rmsnorm(residual, x, self.weight, eps=self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.dim, qkv_width, bias=False)  # [wq | wk | wv]
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)  # wo
        self.rotated_qk = Probe()  # q and k as the attention reads them, after RoPE (the diagnostics' hook)

    def forward(self, x: torch.Tensor, cache=None, *, rope: tuple[torch.Tensor, torch.Tensor],
                start: int = 0) -> torch.Tensor:
        """x (B, T, C) at positions [start, start + T); rope = (cos, sin) tables (block_size, D/2)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, H + 2 * H_kv, D)
        q, k, v = qkv.split([H, H_kv, H_kv], dim=2)  # (B, T, H | H_kv | H_kv, D) views, last dim contiguous
        cos, sin = rope
        q = ops.rope(q, cos, sin, start=start)  # (B, T, H, D)
        k = ops.rope(k, cos, sin, start=start)  # (B, T, H_kv, D)
        q, k = self.rotated_qk(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H | H_kv, T, D), no copies
        if cache is None:
            # F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            y = ops.attention(q, k, v)  # (B, H, T, D): query head h reads kv head h // (H / H_kv)
        else:
            y = cached_attention(q, k, v, cache, attend=ops.attention)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.c_fc = nn.Linear(config.dim, 2 * hidden, bias=False)  # [w1 | w3]
        self.c_proj = nn.Linear(hidden, config.dim, bias=False)  # w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # h = F.silu(x @ w1^T) * (x @ w3^T): one matmul, then the kernel reads both halves in place
        h = ops.swiglu_packed(self.c_fc(x))  # (B, T, hidden)
        return self.c_proj(h)  # (B, T, C)


class Block(PreNormBlock):
    """x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)): forward is pyllmc.lm.PreNormBlock's."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)


# ---- the model --------------------------------------------------------------------------------

class Llama(CausalLM):
    def __init__(self, config: LlamaConfig, *, seed: Optional[int] = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.dim),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope_by_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # not a buffer: see the doc
        self.tie_weights()
        self.init_weights(seed)

    def tie_weights(self) -> None:
        """With tie_embeddings, lm_head shares wte's (vocab_size, C) matrix (llama2.c's models do)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """llama2.c's initialisation, GPT-2's: Linear and Embedding weights ~ N(0, 0.02), the two
        projections into the residual stream (attn.c_proj = wo, mlp.c_proj = w2) ~ N(0, 0.02 / sqrt(2 L));
        RMSNorm weights 1. (llama2.c's model.py scales wo and w3; w2 is the one that writes into the
        residual stream, as GPT-2's mlp.c_proj.) With a seed the draws come from a private CPU
        generator in parameter order, as GPT.init_weights."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():  # a tied lm_head.weight is listed once, as wte
            if param.is_meta:
                continue
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape)
                values.normal_(0.0, residual_std if name.endswith("c_proj.weight") else std, generator=generator)
                param.copy_(values)

    # ---- forward --------------------------------------------------------------------------

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (block_size, head_dim / 2) float32 on `device`, computed once per device."""
        key = str(torch.device(device))
        if key not in self._rope_by_device:
            c = self.config
            self._rope_by_device[key] = ops.rope_tables(c.block_size, c.head_dim, c.rope_theta, device=device)
        return self._rope_by_device[key]

    def _hidden(self, idx: torch.Tensor, caches: Optional[list] = None, start: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions [start, start + T) -> ln_f of the last block's output (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C); no position embedding: RoPE in every attention
        return self._trunk(x, caches, rope=self.rope_tables(idx.device), start=start)

    # forward (the loss head), generate, configure_optimizers, estimate_flops_per_token and
    # estimate_mfu are pyllmc.lm.CausalLM's.

    # ---- counts ---------------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters of the model, a tied wte / lm_head matrix counted once (15,191,712 for
        stories15M). non_embedding=True leaves out wte when it is untied (a lookup, no matmul);
        tied, it is also the classifier's weight and stays in, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    # ---- Hugging Face files (pyllmc.hf_llama) -------------------------------------------------------

    @staticmethod
    def from_pretrained(name_or_dir: str) -> "Llama":
        """Llama from a Hugging Face LlamaForCausalLM directory or Hub name: pyllmc.hf_llama.from_pretrained."""
        from pyllmc import hf_llama  # imported here: pyllmc.hf_llama builds on this module

        return hf_llama.from_pretrained(name_or_dir)

    def save_pretrained(self, directory: str) -> None:
        """A directory transformers.LlamaForCausalLM.from_pretrained loads: pyllmc.hf_llama.save_pretrained."""
        from pyllmc import hf_llama

        hf_llama.save_pretrained(self, directory)
