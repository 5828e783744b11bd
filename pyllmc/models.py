"""The model families the trainer builds, by name: GPT-2 (pyllmc.model) and Llama 2 (pyllmc.llama).

    model = models.from_preset("llama-tiny", seed=1337, vocab_size=4096)   # a new model at random
    model = models.from_checkpoint(state)                                 # a training checkpoint's
    models.family_of(model)                                               # "gpt2" | "llama"

Presets share one namespace (GPT-2's "tiny", "d12", ...; Llama's "llama-tiny", "stories15M", ...), so
`--model NAME` picks the family. A training checkpoint records its family beside its config
(`model_family`; checkpoints written before Llama existed hold GPT-2 and say nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pyllmc import llama, model as gpt

FAMILIES = {"gpt2": (gpt.GPT, gpt.GPTConfig, gpt.PRESETS), "llama": (llama.Llama, llama.LlamaConfig, llama.PRESETS)}
PRESETS = {name: family for family, (_, _, presets) in FAMILIES.items() for name in presets}
PRESET_HELP = ", ".join(PRESETS)
assert len(PRESETS) == sum(len(p) for _, _, p in FAMILIES.values()), "preset names must not repeat across families"


def family_of(model_or_config) -> str:
    """"gpt2" or "llama" for a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    for family, (_, config_class, _) in FAMILIES.items():
        if isinstance(config, config_class):
            return family
    raise ValueError(f"not a pyllmc model or config: {type(model_or_config).__name__}")


def from_preset(name: str, seed: Optional[int] = None, vocab_size: Optional[int] = None):
    """A new model of preset `name` initialised from `seed`; vocab_size replaces the preset's token ids
    (GPT-2 pads its embedding to a multiple of 128, as llm.c does; Llama does not pad). ValueError for an
    unknown name or a bad size."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESET_HELP}")
    family = PRESETS[name]
    model_class, config_class, _ = FAMILIES[family]
    overrides = {}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
        if family == "gpt2":
            overrides["padded_vocab_size"] = gpt.pad_vocab_size(vocab_size)
    return model_class(config_class.from_preset(name, **overrides), seed=seed)


def config_state(model) -> dict:
    """What a checkpoint records of the model's shape: {"model_family", "model_config"}."""
    return {"model_family": family_of(model), "model_config": dataclasses.asdict(model.config)}


def from_checkpoint(state: dict):
    """The model of a training checkpoint's state (pyllmc.checkpoint), with its weights."""
    family = state.get("model_family", "gpt2")
    if family not in FAMILIES:
        raise ValueError(f"the checkpoint's model_family {family!r} is not one of {sorted(FAMILIES)}")
    model_class, config_class, _ = FAMILIES[family]
    # every weight comes from the state (load_state_dict is strict): no random init to pay for first
    model = model_class.empty(config_class(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def from_pretrained(directory: str):
    """A Hugging Face directory (config.json + safetensors) of either family, by its config's model_type."""
    import json
    from pathlib import Path

    config = Path(directory) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type == "llama":
        return llama.Llama.from_pretrained(directory)
    return gpt.GPT.from_pretrained(directory)  # GPT-2's, or its error naming what the directory lacks
