"""GPT-2 built from pyllmc.ops (every non-matmul op) and torch matmuls (F.linear).

    idx (B, T) -> wte[idx] + wpe[0..T) -> L x Block -> ln_f -> lm_head (tied to wte) -> logits

    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

The residual add and the LayerNorm that follows it are one op, ops.fused_residual_layernorm
(as in llm.c): inside a block the add of the attention branch is fused with ln_2, and the
add of the MLP branch with the *next* block's ln_1 (or ln_f after the last block). So a
block receives the residual stream together with its already normalised copy, and is told
which LayerNorm comes after it.

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


# ---- peak throughput for MFU ----------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of
# torch.cuda.get_device_name(). Looked up in order, case-insensitively, so the more specific
# names come first ("H100 PCIe" before "H100", "A100" before "A10").
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200 NVL": 835e12,
    "H200": 989e12,  # also GH200
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10G": 70e12,  # AWS's figure for its A10G
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,  # with float32 accumulation
    "RTX 3090": 71e12,  # with float32 accumulation
    "RTX A6000": 155e12,
}


def peak_bf16_flops(device_name: Optional[str]) -> Optional[float]:
    """The dense bf16 peak FLOP/s of the GPU named `device_name`, or None if unknown."""
    if not device_name:
        return None
    lowered = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in lowered:
            return flops
    return None


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


class KVCache:
    """Keys and values of one layer for incremental decoding: (B, H, block_size, D) each."""

    def __init__(self, batch: int, n_head: int, block_size: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, n_head, block_size, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0  # positions [0, length) are filled


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
            y = self._cached_attention(q, k, v, cache).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    @staticmethod
    def _cached_attention(q, k, v, cache: KVCache) -> torch.Tensor:
        """Append k, v at positions [length, length + T) and attend over the whole cache.

        Inference only (no grad). The prefill (empty cache) is ordinary causal attention, run
        by ops.attention; later steps attend from a few new queries to the cache, in plain
        torch math: for one query that is a matrix-vector product, not worth a kernel.
        """
        T = q.size(2)
        start, end = cache.length, cache.length + T
        cache.k[:, :, start:end] = k
        cache.v[:, :, start:end] = v
        cache.length = end
        if start == 0:
            return ops.attention(q, k, v)  # F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys, values = cache.k[:, :, :end], cache.v[:, :, :end]  # (B, H, S, D)
        scale = 1.0 / math.sqrt(q.size(-1))
        scores = (q.float() @ keys.float().transpose(-2, -1)) * scale  # (B, H, T, S)
        if T > 1:  # query i sits at position start + i and sees keys 0 .. start + i
            query_pos = torch.arange(start, end, device=q.device)[:, None]
            key_pos = torch.arange(end, device=q.device)[None, :]
            scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        return (scores.softmax(dim=-1) @ values.float()).to(q.dtype)  # (B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.gelu(self.c_fc(x))  # (B, T, 4C): F.gelu(c_fc(x), approximate="tanh")
        return self.c_proj(h)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, residual: torch.Tensor, normed: torch.Tensor, next_ln: LayerNorm,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """residual: the stream x (B, T, C); normed: ln_1(x), computed by the caller.

        Returns (x', next_ln(x')) with x' the block's output stream.
        """
        # x = x + attn(ln_1(x));  normed = ln_2(x)
        residual, normed = self.ln_2.add_and_norm(residual, self.attn(normed, cache))  # (B, T, C) each
        # x = x + mlp(ln_2(x));  return x, next_ln(x)
        return next_ln.add_and_norm(residual, self.mlp(normed))


# ---- the model --------------------------------------------------------------------------------

class GPT(nn.Module):
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

    @classmethod
    def empty(cls, config: GPTConfig, device="cpu") -> "GPT":
        """A model with uninitialised parameters, for loaders that overwrite every weight
        (pyllmc.hf, pyllmc.llmc): skips the random init, which costs seconds for the large sizes."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.tie_weights()
        return model

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

    def _check_idx(self, idx: torch.Tensor, what: str = "idx", *, check_length: bool = True) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"{what} must be a (B, T) tensor of token ids; got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must have dtype int64 (or int32); got {idx.dtype}")
        if check_length and idx.size(1) > self.config.block_size:
            raise ValueError(f"{what} has sequence length {idx.size(1)} > block_size {self.config.block_size}")

    def _embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = idx.size(1)
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)

    def _trunk(self, x: torch.Tensor, caches: Optional[list] = None) -> torch.Tensor:
        """Embeddings (B, T, C) -> ln_f of the last block's output (B, T, C)."""
        # for block in h: x = block(x);  return ln_f(x)
        # Each block ends in the add that the next LayerNorm (ln_f after the last) is fused with.
        blocks = self.transformer.h
        residual, normed = x, blocks[0].ln_1(x)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            residual, normed = block(residual, normed, next_ln, None if caches is None else caches[i])
        return normed

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                return_logits: bool = True, inplace_backward: bool = False, loss_scale: float = 1.0):
        """idx (B, T) token ids -> (logits (B, T, vocab_size) or None, loss or None).

        logits is the vocab_size-column view of the padded (B, T, padded_vocab_size) logits.
        loss: loss_scale times the mean cross-entropy over positions whose target is not -1
        (when targets given); gradient accumulation passes loss_scale = 1 / grad_accum_steps.
        inplace_backward=True is the fused-classifier training path: ops.cross_entropy
        writes the (scaled) loss gradient into the logits buffer during the forward, so the
        (B, T, Vp) activation is not kept twice and backward() adds no pass over it; logits
        are then not returned.
        """
        self._check_idx(idx)
        B, T = idx.shape
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(f"targets must have idx's shape {(B, T)}; got {tuple(targets.shape)}")
        if inplace_backward and targets is None:
            raise ValueError("inplace_backward=True needs targets (it computes the loss gradient)")

        x = self._trunk(self._embed(idx))  # (B, T, C)
        logits_padded = self.lm_head(x)  # (B, T, Vp)
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        loss = None
        if targets is not None:
            # loss = F.cross_entropy(logits.reshape(-1, V), targets.view(-1), ignore_index=-1) * loss_scale
            # with logits = logits_padded[..., :V] (but 0, not NaN, when every target is -1).
            # inplace_backward=True: when a gradient is needed, the kernel overwrites logits_padded with
            # d(loss)/d(logits_padded), loss_scale included and zero in the padded columns, so backward()
            # only hands that buffer on. The padded logits go in whole (num_classes=V): their gradient is
            # one (B*T, Vp) buffer, no slice backward.
            loss = ops.cross_entropy(logits_padded.view(B * T, Vp), targets.reshape(B * T), ignore_index=-1,
                                     num_classes=V, inplace_backward=inplace_backward, loss_scale=loss_scale)
        if inplace_backward or not return_logits:
            return None, loss
        return logits_padded[..., :V], loss

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def _prefill(self, idx: torch.Tensor):
        """Fresh KV caches filled with idx (B, T); returns (caches, last logits (B, V))."""
        c = self.config
        param = self.transformer.wte.weight
        caches = [KVCache(idx.size(0), c.n_head, c.block_size, c.head_dim, param.device, param.dtype)
                  for _ in range(c.n_layer)]
        x = self._trunk(self._embed(idx), caches)
        return caches, self.lm_head(x[:, -1])[:, : c.vocab_size]

    @torch.no_grad()
    def _decode_step(self, tokens: torch.Tensor, caches: list) -> torch.Tensor:
        """tokens (B, t) at positions caches[0].length onwards -> logits of the last (B, V)."""
        x = self._trunk(self._embed(tokens, start=caches[0].length), caches)
        return self.lm_head(x[:, -1])[:, : self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample max_new_tokens tokens after idx (B, T0); returns (B, T0 + max_new_tokens).

        Incremental decoding with a KV cache: one prefill of the prompt, then one position per
        token. The model sees at most block_size tokens: once the context outgrows it, the
        context is cropped to its last block_size tokens and prefilled again (the absolute
        position embeddings of every kept token change, so the cache cannot slide).
        temperature 0 (or top_k=1) is greedy decoding.
        """
        self._check_idx(idx, check_length=False)  # longer prompts are cropped to block_size
        if idx.size(1) == 0:
            raise ValueError("idx must hold at least one token to condition on")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
        was_training = self.training
        self.eval()
        try:
            block_size = self.config.block_size
            caches, logits = self._prefill(idx[:, -block_size:])
            for step in range(max_new_tokens):
                next_token = self._sample(logits, temperature, top_k, generator)  # (B, 1)
                idx = torch.cat([idx, next_token], dim=1)
                if step == max_new_tokens - 1:
                    break
                if caches[0].length < block_size:
                    logits = self._decode_step(next_token, caches)
                else:
                    caches, logits = self._prefill(idx[:, -block_size:])
            return idx
        finally:
            self.train(was_training)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
        logits = logits.float()
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)

    # ---- optimizer, counts, MFU -------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             eps: float = 1e-8, **kwargs):
        """pyllmc.optim.AdamW with weight decay on the matrices (dim >= 2: every Linear weight and
        the embeddings) and none on biases and LayerNorm parameters."""
        from pyllmc.optim import AdamW

        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **kwargs)

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

    def estimate_flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs (forward + backward) per token, PaLM appendix B / nanoGPT:

            6 N + 12 L H Q T      (H Q = n_embd)

        6 N for the matmuls with the N non-embedding parameters (2 N forward, 4 N backward);
        12 L C T for attention's QK^T and AV over the full T x T scores (no causal halving, as
        in PaLM and nanoGPT). T = seq_len, default block_size.
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        return 6 * self.num_parameters(non_embedding=True) + 12 * c.n_layer * c.n_embd * T

    def estimate_mfu(self, tokens_per_second: float, device_name: Optional[str] = None,
                     seq_len: Optional[int] = None) -> Optional[float]:
        """Model FLOPs utilisation against the GPU's dense bf16 peak; None for an unknown GPU.

        device_name defaults to torch.cuda.get_device_name() of the current device.
        """
        if device_name is None and torch.cuda.is_available():
            device_name = torch.cuda.get_device_name()
        peak = peak_bf16_flops(device_name)
        if peak is None:
            return None
        return self.estimate_flops_per_token(seq_len) * tokens_per_second / peak

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
