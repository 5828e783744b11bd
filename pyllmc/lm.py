"""What pyllmc's causal language models share: GPT-2 (pyllmc.model) and Llama 2 (pyllmc.llama).

Both are a stack of pre-norm blocks between a token embedding and a classifier:

    idx (B, T) -> embed -> L x Block -> ln_f -> lm_head -> logits (B, T, Vp) -> cross-entropy

    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

and differ in the parts: LayerNorm vs RMSNorm, learned positions vs RoPE, GELU MLP vs SwiGLU,
MHA vs GQA. This module holds the parts that are the same code for both:

- PreNormBlock: the block above, with each residual add fused into the norm that follows it
  (norm.add_and_norm(residual, x) -> (residual + x, norm(residual + x)), one op as in llm.c).
- CausalLM: the model skeleton over `transformer.{wte, h, ln_f}` and `lm_head`: the trunk loop,
  forward's loss head (the fused classifier), the KV-cache prefill / decode / sampling loop,
  optimizer groups, FLOPs per token and MFU. A subclass supplies its config, its modules,
  `_hidden` (embeddings + trunk) and `num_parameters`.
- KVCache and cached_attention: incremental decoding, with grouped keys/values (GQA: H_kv heads of
  keys and values, each shared by H / H_kv query heads; GPT-2 is the case H_kv = H).
- the bf16 peak FLOP/s table for MFU.

A config must provide block_size, vocab_size, padded_vocab_size (rows of wte / lm_head, >= vocab_size),
n_layer, n_head, n_kv_head and head_dim.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from pyllmc import ops

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


# ---- incremental decoding -------------------------------------------------------------------------

class KVCache:
    """Keys and values of one layer for incremental decoding: (B, H_kv, block_size, D) each."""

    def __init__(self, batch: int, n_kv_head: int, block_size: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, n_kv_head, block_size, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0  # positions [0, length) are filled


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                     attend: Callable = ops.attention) -> torch.Tensor:
    """Append k, v (B, H_kv, T, D) at positions [length, length + T) and attend from q (B, H, T, D)
    over the whole cache -> (B, H, T, D).

    Inference only (no grad). The prefill (empty cache) is ordinary causal attention, run by
    `attend` (ops.attention, or a GQA-aware wrapper); later steps attend from a few new queries to
    the cache, in plain torch math: for one query that is a matrix-vector product, not worth a
    kernel. Query head h reads key/value head h // (H / H_kv), as in Hugging Face's repeat_kv and
    llama2.c's run.c.
    """
    B, H, T, D = q.shape
    H_kv = k.size(1)
    start, end = cache.length, cache.length + T
    cache.k[:, :, start:end] = k
    cache.v[:, :, start:end] = v
    cache.length = end
    if start == 0:
        return attend(q, k, v)  # F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    keys, values = cache.k[:, :, :end], cache.v[:, :, :end]  # (B, H_kv, S, D)
    scale = 1.0 / math.sqrt(D)
    if H_kv == H:
        scores = (q.float() @ keys.float().transpose(-2, -1)) * scale  # (B, H, T, S)
    else:  # the G = H / H_kv query heads of a group side by side against their shared keys
        group_q = q.float().reshape(B, H_kv, (H // H_kv) * T, D)  # (B, H_kv, G T, D)
        scores = ((group_q @ keys.float().transpose(-2, -1)) * scale).view(B, H, T, end)  # (B, H, T, S)
    if T > 1:  # query i sits at position start + i and sees keys 0 .. start + i
        query_pos = torch.arange(start, end, device=q.device)[:, None]
        key_pos = torch.arange(end, device=q.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = scores.softmax(dim=-1)  # (B, H, T, S)
    if H_kv == H:
        return (probs @ values.float()).to(q.dtype)  # (B, H, T, D)
    y = probs.reshape(B, H_kv, (H // H_kv) * T, end) @ values.float()  # (B, H_kv, G T, D)
    return y.view(B, H, T, D).to(q.dtype)


# ---- the block ----------------------------------------------------------------------------------

class PreNormBlock(nn.Module):
    """x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)).

    A subclass creates self.ln_1, self.attn, self.ln_2, self.mlp. The norms have
    `add_and_norm(residual, x) -> (residual + x, norm(residual + x))` (one fused op): inside the
    block the add of the attention branch is fused with ln_2, and the add of the MLP branch with the
    *next* block's ln_1 (or ln_f after the last block). So a block receives the residual stream
    together with its already normalised copy, and is told which norm comes after it.
    """

    def forward(self, residual: torch.Tensor, normed: torch.Tensor, next_ln: nn.Module,
                cache: Optional[KVCache] = None, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """residual: the stream x (B, T, C); normed: ln_1(x), computed by the caller.
        attn_kwargs go to self.attn (Llama's RoPE tables and start position).

        Returns (x', next_ln(x')) with x' the block's output stream.
        """
        # x = x + attn(ln_1(x));  normed = ln_2(x)
        residual, normed = self.ln_2.add_and_norm(residual, self.attn(normed, cache, **attn_kwargs))  # (B, T, C) each
        # x = x + mlp(ln_2(x));  return x, next_ln(x)
        return next_ln.add_and_norm(residual, self.mlp(normed))


class Probe(nn.Module):
    """Returns its inputs unchanged: a place for hooks to see tensors that pass no other module
    (a Llama's q and k after RoPE, for the diagnostics). No parameters, no work."""

    def forward(self, *tensors):
        return tensors if len(tensors) != 1 else tensors[0]


# ---- the model skeleton -------------------------------------------------------------------------------

class CausalLM(nn.Module):
    """The parts of GPT and Llama that are the same code. See the module's doc for what a subclass
    provides: self.config, self.transformer (wte, h, ln_f), self.lm_head (padded_vocab_size rows),
    `_hidden(idx, caches=None, start=0)` and `num_parameters(non_embedding=False)`."""

    def __init__(self):
        super().__init__()
        # The loss head's input, ln_f of the last block (B, T, C), passes through this identity on every
        # loss path: hooks on it see what lm_head reads even where lm_head's module is never called (the
        # chunked loss takes its weight). No parameters: the state dict is unchanged.
        self.head_input = nn.Identity()

    @classmethod
    def empty(cls, config, device="cpu"):
        """A model with uninitialised parameters, for loaders that overwrite every weight
        (pyllmc.hf, pyllmc.llmc, pyllmc.llama2c): skips the random init, which costs seconds for
        the large sizes."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.tie_weights()
        return model

    def _hidden(self, idx: torch.Tensor, caches: Optional[list] = None, start: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions [start, start + T) -> ln_f of the last block's output (B, T, C)."""
        raise NotImplementedError

    def _trunk(self, x: torch.Tensor, caches: Optional[list] = None, **attn_kwargs) -> torch.Tensor:
        """Embeddings (B, T, C) -> ln_f of the last block's output (B, T, C)."""
        # for block in h: x = block(x);  return ln_f(x)
        # Each block ends in the add that the next norm (ln_f after the last) is fused with.
        blocks = self.transformer.h
        residual, normed = x, blocks[0].ln_1(x)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            residual, normed = block(residual, normed, next_ln, None if caches is None else caches[i],
                                     **attn_kwargs)
        return normed

    # ---- forward --------------------------------------------------------------------------

    def _check_idx(self, idx: torch.Tensor, what: str = "idx", *, check_length: bool = True) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"{what} must be a (B, T) tensor of token ids; got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must have dtype int64 (or int32); got {idx.dtype}")
        if check_length and idx.size(1) > self.config.block_size:
            raise ValueError(f"{what} has sequence length {idx.size(1)} > block_size {self.config.block_size}")

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                return_logits: bool = True, inplace_backward: bool = False, loss_scale: float = 1.0,
                chunked_loss: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab_size) or None, loss or None).

        logits is the vocab_size-column view of the padded (B, T, padded_vocab_size) logits.
        loss: loss_scale times the mean cross-entropy over positions whose target is not -1
        (when targets given); gradient accumulation passes loss_scale = 1 / grad_accum_steps.
        inplace_backward=True is the fused-classifier training path: ops.cross_entropy
        writes the (scaled) loss gradient into the logits buffer during the forward, so the
        (B, T, Vp) activation is not kept twice and backward() adds no pass over it; logits
        are then not returned.
        chunked_loss=True (with targets, return_logits=False): the classifier matmul and the loss by
        chunks of rows (ops.linear_cross_entropy), so the (B, T, Vp) logits never exist; the gradients
        of the classifier's weight and of the hidden states are computed in the forward. The
        trainer's path: GPT-2 124M at B = 64 keeps 0.4 GB for its loss head instead of 6.6 GB.
        """
        self._check_idx(idx)
        B, T = idx.shape
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(f"targets must have idx's shape {(B, T)}; got {tuple(targets.shape)}")
        if inplace_backward and targets is None:
            raise ValueError("inplace_backward=True needs targets (it computes the loss gradient)")
        if chunked_loss and (targets is None or return_logits or inplace_backward):
            raise ValueError("chunked_loss=True needs targets and return_logits=False (it never makes the logits), "
                             "and is a path of its own (not with inplace_backward)")

        x = self.head_input(self._hidden(idx))  # (B, T, C)
        V = self.config.vocab_size
        if chunked_loss:
            # the same loss as below, with logits = x @ lm_head.weight.T made chunk by chunk
            loss = ops.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1,
                                            bias=self.lm_head.bias, num_classes=V, loss_scale=loss_scale)
            return None, loss
        logits_padded = self.lm_head(x)  # (B, T, Vp)
        Vp = self.config.padded_vocab_size
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
        caches = [KVCache(idx.size(0), c.n_kv_head, c.block_size, c.head_dim, param.device, param.dtype)
                  for _ in range(c.n_layer)]
        x = self._hidden(idx, caches)
        return caches, self.lm_head(x[:, -1])[:, : c.vocab_size]

    @torch.no_grad()
    def _decode_step(self, tokens: torch.Tensor, caches: list) -> torch.Tensor:
        """tokens (B, t) at positions caches[0].length onwards -> logits of the last (B, V)."""
        x = self._hidden(tokens, caches, start=caches[0].length)
        return self.lm_head(x[:, -1])[:, : self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample max_new_tokens tokens after idx (B, T0); returns (B, T0 + max_new_tokens).

        Incremental decoding with a KV cache: one prefill of the prompt, then one position per
        token. The model sees at most block_size tokens: once the context outgrows it, the
        context is cropped to its last block_size tokens and prefilled again (every kept token
        moves to a new position: GPT-2's position embeddings change, and so do the RoPE angles
        the cached keys were rotated by, so the cache cannot slide).
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
        the embeddings) and none on the vectors (biases, norm weights)."""
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
        raise NotImplementedError

    def estimate_flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs (forward + backward) per token, PaLM appendix B / nanoGPT:

            6 N + 12 L H Q T

        6 N for the matmuls with the N non-embedding parameters (2 N forward, 4 N backward);
        12 L H Q T for attention's QK^T and AV over the full T x T scores (no causal halving, as
        in PaLM and nanoGPT), H query heads of Q dims each (GQA shares keys and values, not the
        score work). T = seq_len, default block_size.
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        return 6 * self.num_parameters(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T

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
