"""Hugging Face's Llama files: the model directory that transformers.LlamaForCausalLM reads and writes.

A module of its own beside pyllmc.hf (GPT-2): the two share the directory plumbing (config.json,
model.safetensors or pytorch_model.bin, sharded indexes, the Hub download, the refusal of pickles
that ask for code), which is imported from pyllmc.hf, but nothing of the layout: GPT-2's Conv1D
transposes and padded vocabulary on one side, Llama's split projections and GQA on the other.

State dict (LlamaForCausalLM; LlamaModel's files have the same keys without "model."):
    model.embed_tokens.weight (V, C)
    model.layers.{i}.input_layernorm.weight (C)
    model.layers.{i}.self_attn.q_proj.weight (H D, C)  .k_proj.weight (H_kv D, C)  .v_proj.weight (H_kv D, C)
    model.layers.{i}.self_attn.o_proj.weight (C, H D)
    model.layers.{i}.post_attention_layernorm.weight (C)
    model.layers.{i}.mlp.gate_proj.weight (hidden, C)  .up_proj.weight (hidden, C)  .down_proj.weight (C, hidden)
    model.norm.weight (C)
    lm_head.weight (V, C)    absent or equal to embed_tokens when tie_word_embeddings
All nn.Linear (out, in), as pyllmc's. q/k/v are concatenated into pyllmc's c_attn = [q | k | v] and
gate/up into c_fc = [w1 | w3] on load, and split again on save. Hugging Face's q_proj / k_proj rows
are already in the rotate-halves RoPE layout that pyllmc uses (its conversion script permuted Meta's
adjacent-pair weights once), so no permutation here. Old files' rotary_emb.inv_freq buffers are skipped.

Only plain Llama loads: model_type "llama", hidden_act "silu", no attention or MLP biases, head_dim =
hidden_size / num_attention_heads, default RoPE (no scaling); any other value is a ValueError naming
the field.
"""

from __future__ import annotations

import json
import os

import torch

from pyllmc.hf import _download_from_hub, _read_weights, write_pretrained
from pyllmc.llama import Llama, LlamaConfig


# ---- reading ------------------------------------------------------------------------------------

def from_pretrained(name_or_dir: str) -> Llama:
    """Llama weights from a local Hugging Face directory (config.json + model.safetensors or
    pytorch_model.bin, also sharded with an index) or a Hub name "owner/repo" (huggingface_hub)."""
    directory = name_or_dir if os.path.isdir(name_or_dir) else _download_from_hub(name_or_dir)
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_hf(json.load(f), directory)
    model = Llama.empty(config)
    load_hf_state_dict(model, _read_weights(directory), source=directory)
    return model


def config_from_hf(hf: dict, source: str = "config") -> LlamaConfig:
    """LlamaConfig from a LlamaConfig's dict (config.json); unsupported variants are a ValueError."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}; only 'llama' is supported")
    dim, n_head = hf["hidden_size"], hf["num_attention_heads"]
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (pyllmc uses SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            unsupported.append(f"{flag}={hf[flag]}")
    if hf.get("head_dim") not in (None, dim // n_head):
        unsupported.append(f"head_dim={hf['head_dim']} (pyllmc's is hidden_size / num_attention_heads = "
                           f"{dim // n_head})")
    rope = hf.get("rope_parameters") or {}  # transformers 5.x; 4.x: rope_theta and rope_scaling
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
        unsupported.append(f"RoPE scaling {scaling or rope} (pyllmc takes default RoPE)")
    if unsupported:
        raise ValueError(f"{source}: Llama variant not supported by pyllmc: {', '.join(unsupported)}")
    return LlamaConfig(dim=dim, n_layer=hf["num_hidden_layers"], n_head=n_head,
                       n_kv_head=hf.get("num_key_value_heads") or n_head, vocab_size=hf["vocab_size"],
                       block_size=hf.get("max_position_embeddings", 2048), hidden_dim=hf["intermediate_size"],
                       norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _layer_keys(i: int) -> dict[str, tuple[str, ...]]:
    """pyllmc's parameter of layer i -> the Hugging Face tensors concatenated into it (row order)."""
    a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
    return {
        f"transformer.h.{i}.ln_1.weight": (f"model.layers.{i}.input_layernorm.weight",),
        f"transformer.h.{i}.attn.c_attn.weight": (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"),
        f"transformer.h.{i}.attn.c_proj.weight": (f"{a}.o_proj.weight",),
        f"transformer.h.{i}.ln_2.weight": (f"model.layers.{i}.post_attention_layernorm.weight",),
        f"transformer.h.{i}.mlp.c_fc.weight": (f"{m}.gate_proj.weight", f"{m}.up_proj.weight"),
        f"transformer.h.{i}.mlp.c_proj.weight": (f"{m}.down_proj.weight",),
    }


def _key_map(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
    keys = {"transformer.wte.weight": ("model.embed_tokens.weight",)}
    for i in range(config.n_layer):
        keys.update(_layer_keys(i))
    keys["transformer.ln_f.weight"] = ("model.norm.weight",)
    if not config.tie_embeddings:
        keys["lm_head.weight"] = ("lm_head.weight",)
    return keys


@torch.no_grad()
def load_hf_state_dict(model: Llama, state: dict, source: str = "state dict") -> None:
    """Copy a LlamaForCausalLM / LlamaModel state dict into `model`."""
    state = {(k if k.startswith(("model.", "lm_head.")) else f"model.{k}"): v for k, v in state.items()
             if not k.endswith("rotary_emb.inv_freq")}  # old files keep RoPE's frequencies as a buffer
    ours = dict(model.named_parameters())
    used = set()
    for name, hf_keys in _key_map(model.config).items():
        missing = [k for k in hf_keys if k not in state]
        if missing:
            raise ValueError(f"{source}: missing {missing}")
        tensor = torch.cat([state[k] for k in hf_keys], dim=0) if len(hf_keys) > 1 else state[hf_keys[0]]
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise ValueError(f"{source}: {' + '.join(hf_keys)} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(ours[name].shape)} for {name}")
        ours[name].copy_(tensor)
        used.update(hf_keys)
    if model.config.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise ValueError(f"{source}: lm_head.weight differs from embed_tokens but tie_word_embeddings is true")
        used.add("lm_head.weight")
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors for Llama: {unexpected[:5]}")


# ---- writing ------------------------------------------------------------------------------------

def save_pretrained(model: Llama, directory: str) -> None:
    """Write config.json and model.safetensors that transformers.LlamaForCausalLM.from_pretrained loads."""
    write_pretrained(directory, hf_config(model), hf_state_dict(model))


@torch.no_grad()
def hf_state_dict(model: Llama) -> dict:
    """`model`'s weights in LlamaForCausalLM's layout, on the CPU, each tensor its own copy (lm_head
    left out when tied: transformers ties it again on load)."""
    c = model.config
    ours = dict(model.named_parameters())
    split_rows = {"transformer.h.{}.attn.c_attn.weight": [c.n_head * c.head_dim, c.n_kv_head * c.head_dim,
                                                         c.n_kv_head * c.head_dim],
                  "transformer.h.{}.mlp.c_fc.weight": [c.ffn_hidden_dim, c.ffn_hidden_dim]}
    state = {}
    for name, hf_keys in _key_map(c).items():
        tensor = ours[name].detach().cpu()
        pieces = tensor.split(split_rows[_layer_pattern(name)], dim=0) if len(hf_keys) > 1 else (tensor,)
        for key, piece in zip(hf_keys, pieces):
            state[key] = piece.clone()  # no shared storage: safetensors refuses views of one buffer
    return state


def _layer_pattern(name: str) -> str:
    parts = name.split(".")  # transformer.h.{i}.attn.c_attn.weight
    parts[2] = "{}"
    return ".".join(parts)


def hf_config(model: Llama) -> dict:
    """LlamaConfig fields describing `model` (rope_theta twice: transformers 4.x reads the top-level
    key, 5.x rope_parameters)."""
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_hidden_dim,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(model.transformer.wte.weight.dtype).replace("torch.", ""),
    }
