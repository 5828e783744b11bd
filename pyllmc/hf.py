"""Hugging Face's GPT-2 files: the model directory that transformers.GPT2LMHeadModel reads and writes.

The directory reading and writing (_read_weights, _download_from_hub, write_pretrained) is shared
with pyllmc.hf_llama, Hugging Face's Llama files.

Directory:
    config.json           GPT2Config's fields: n_positions, n_embd, n_layer, n_head, vocab_size, ...
    model.safetensors     the weights (safetensors: a JSON header, then raw little-endian tensors)
  or pytorch_model.bin    the weights as a torch.save pickle (older repos)
  or sharded: model.safetensors.index.json (pytorch_model.bin.index.json) whose "weight_map" maps
                          each tensor name to one of the shard files beside it

State dict: GPT2LMHeadModel's keys, which are also the names of pyllmc's GPT parameters:
    transformer.wte.weight (V, C)   transformer.wpe.weight (maxT, C)
    transformer.h.{i}.ln_1.weight, .bias (C)
    transformer.h.{i}.attn.c_attn.weight (C, 3C), .bias (3C)
    transformer.h.{i}.attn.c_proj.weight (C, C), .bias (C)
    transformer.h.{i}.ln_2.weight, .bias (C)
    transformer.h.{i}.mlp.c_fc.weight (C, 4C), .bias (4C)
    transformer.h.{i}.mlp.c_proj.weight (4C, C), .bias (C)
    transformer.ln_f.weight, .bias (C)
    lm_head.weight (V, C)           tied to wte: on load it must equal wte and is skipped; on save
                                    it is left out (transformers ties it again)
  GPT2Model's files have the same keys without "transformer."; old files also hold the causal mask
  buffers h.{i}.attn.bias / .masked_bias, which are skipped.

Conv1D: HF's four projection weights (c_attn, c_proj, c_fc, mlp.c_proj) are Conv1D layers, stored
(in, out) as listed above; pyllmc's are nn.Linear, (out, in). They are transposed on load and on
save. wte has V = vocab_size rows in the file and padded_vocab_size (a multiple of 128) in pyllmc:
the padded rows are zero after a load and dropped on save.

Reading: model.safetensors (or its index) first, then pytorch_model.bin (or its index). An index
may name only files of its own directory. pytorch_model.bin is a pickle, and unpickling can run
code: it is read with torch.load(weights_only=True), so a file that asks the unpickler for anything
but tensors and plain data is refused (ValueError), never run. Writing: config.json and
model.safetensors (pytorch_model.bin when the safetensors package is missing).

Only plain GPT-2 loads: model_type "gpt2", tanh GELU (gelu_new / gelu_pytorch_tanh),
layer_norm_epsilon 1e-5, n_inner 4C, attention scaled by 1/sqrt(D) only, tied embeddings; any other
value is a ValueError naming the field. A name that is not a local directory is fetched from the
Hub with huggingface_hub ("gpt2" ... "gpt2-xl" are openai-community's repos), safetensors preferred.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import torch

from pyllmc.model import EOT_TOKEN, GPT, GPT2_VOCAB_SIZE, GPTConfig, pad_vocab_size

# HF's Conv1D layers store (in, out): these weights are transposed on load and save.
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HUB_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


# ---- reading ------------------------------------------------------------------------------------

def from_pretrained(name_or_dir: str) -> GPT:
    """GPT-2 weights from a local Hugging Face directory (config.json + model.safetensors or
    pytorch_model.bin, also sharded with an index) or a Hub name ("gpt2", "gpt2-medium",
    "gpt2-large", "gpt2-xl", or "owner/repo"), downloaded with huggingface_hub."""
    directory = name_or_dir if os.path.isdir(name_or_dir) else _download_from_hub(name_or_dir)
    with open(os.path.join(directory, "config.json")) as f:
        config = _config_from_hf(json.load(f), directory)
    state = _read_weights(directory)
    model = GPT.empty(config)
    load_hf_state_dict(model, state, source=directory)
    return model


@torch.no_grad()
def load_hf_state_dict(model: GPT, state: dict, source: str = "state dict") -> None:
    """Copy a GPT2LMHeadModel / GPT2Model state dict (Conv1D layout) into `model`."""
    ours = dict(model.named_parameters())
    seen = set()
    wte_rows = None
    for key, tensor in state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        if name == "lm_head.weight":
            wte = state.get("transformer.wte.weight", state.get("wte.weight"))
            if wte is not None and not torch.equal(tensor, wte):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; pyllmc's GPT ties them")
            continue
        if name not in ours:
            raise ValueError(f"{source}: unexpected parameter {key!r} for GPT-2")
        target = ours[name]
        if name.endswith(_CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            wte_rows = tensor.size(0)
            if tensor.size(0) > target.size(0) or tensor.size(1) != target.size(1):
                raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected at most "
                                 f"{tuple(target.shape)}")
            target.zero_()  # padded rows stay zero
            target[: tensor.size(0)].copy_(tensor)
        else:
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)} "
                                 f"(after transposing Conv1D weights), expected {tuple(target.shape)}")
            target.copy_(tensor)
        seen.add(name)
    missing = sorted(set(ours) - seen)
    if missing:
        raise ValueError(f"{source}: missing parameters {missing}")
    if wte_rows is not None and wte_rows != model.config.vocab_size:
        raise ValueError(f"{source}: wte has {wte_rows} rows but vocab_size is {model.config.vocab_size}")


def _config_from_hf(hf: dict, source: str) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}; only 'gpt2' is supported")
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r} (pyllmc uses tanh GELU)")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']}")
    for flag, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("tie_word_embeddings", True), ("add_cross_attention", False)):
        if hf.get(flag, expected) != expected:
            unsupported.append(f"{flag}={hf[flag]}")
    if unsupported:
        raise ValueError(f"{source}: GPT-2 variant not supported by pyllmc: {', '.join(unsupported)}")
    vocab = hf.get("vocab_size", GPT2_VOCAB_SIZE)
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=vocab,
                     padded_vocab_size=pad_vocab_size(vocab), n_layer=hf["n_layer"], n_head=hf["n_head"],
                     n_embd=hf["n_embd"])


def _read_weights(directory: str) -> dict:
    """The state dict in `directory`: one weights file, or the shards its index names."""
    def load_file(filename):
        path = os.path.join(directory, filename)
        if filename.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file as load_safetensors
            except ImportError as err:
                raise ImportError(f"{path} needs the safetensors package (pip install safetensors)") from err
            return load_safetensors(path)
        try:  # weights_only: a pickle that names anything but tensors and plain data is refused, never run
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            blocked = re.search(r"GLOBAL (\S+)", str(err))
            raise ValueError(f"{path}: refused: a model file holds tensors only, and this one asks the unpickler "
                             f"for more ({blocked.group(1) if blocked else err}); loading it could run code") from None

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(directory, single)):
            return load_file(single)
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            outside = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s or s in ("", ".", "..")]
            if outside:  # an index names files of its own directory, never a path to elsewhere
                raise ValueError(f"{os.path.join(directory, index)}: weight_map names {outside[:3]}, not files of "
                                 f"{directory}")
            state = {}
            for shard in shards:
                state.update(load_file(shard))
            return state
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded index) found")


def _download_from_hub(name: str) -> str:
    """The local snapshot directory of Hub repo `name`; a clear error when offline."""
    if os.path.exists(name):
        raise ValueError(f"{name!r} exists but is not a directory; pass a Hugging Face model directory")
    repo_id = _HUB_NAMES.get(name, name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError(f"{name!r} is not a local directory, and downloading it from the Hugging Face Hub "
                          f"needs huggingface_hub (pip install huggingface_hub)") from err
    try:
        directory = snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors",
                                                               "model.safetensors.index.json"])
        if not any(f.endswith(".safetensors") for f in os.listdir(directory)):  # an older repo
            directory = snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model*.bin",
                                                                   "pytorch_model.bin.index.json"])
        return directory
    except Exception as err:
        raise OSError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
                      f"Offline? Pass a local directory with config.json and model.safetensors instead.") from err


# ---- writing ------------------------------------------------------------------------------------

def save_pretrained(model: GPT, directory: str) -> None:
    """Write config.json and model.safetensors (pytorch_model.bin without safetensors) that
    transformers.GPT2LMHeadModel.from_pretrained(directory) loads."""
    write_pretrained(directory, hf_config(model), hf_state_dict(model))


def write_pretrained(directory: str, config: dict, state: dict) -> None:
    """config.json and model.safetensors (pytorch_model.bin without safetensors) in `directory`; the
    tensors of `state` must not share memory (safetensors refuses views of one buffer)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def hf_state_dict(model: GPT) -> dict:
    """`model`'s weights in GPT2LMHeadModel's layout (Conv1D weights (in, out), wte without the
    padded rows, lm_head left out: transformers ties it to wte on load), on the CPU."""
    state = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if name.endswith(_CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[: model.config.vocab_size]
        state[name] = tensor.contiguous().cpu()
    return state


def hf_config(model: GPT) -> dict:
    """GPT2Config fields describing `model`. Dropouts are 0: pyllmc's GPT has none."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "use_cache": True,
        "torch_dtype": str(model.transformer.wte.weight.dtype).replace("torch.", ""),
    }
