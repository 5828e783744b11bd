"""train_gpt2.py's settings: from the command line to the values a run trains with.

Three sources, in this order of precedence, give each flag its value:
  1. the command line (`given`: the flags it sets; parsed once, parse_command_line);
  2. with --resume 1, the settings the run's checkpoint recorded (continue_run; which flags may
     change in a resumed run: RESUME_LOCAL, RESUME_FREE, RESUME_FIXED below);
  3. the defaults: the parser's, or, for the CPU demo (--model auto on a CPU), DEMO_CPU's, made the
     parser's defaults with set_defaults (cpu_demo_defaults).
check() then fails, before anything is built, on every setting that cannot work, raising
ConfigError with what to change, and returns the numbers the run derives from them (the batch
and its gradient accumulation, the dtype, the kernels' backend).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import pyllmc
from pyllmc import checkpoint, precision


class ConfigError(Exception):
    """A setting that cannot work; raised before training with what to change."""


# The CPU demo (--model auto on a CPU): the defaults of the flags left unset, chosen by measurement to end
# with real words within 3 minutes on 2 cores (the measurements: docs/training.md, "the CPU demo measured").
DEMO_TRIM_VOCAB = 4096  # GPT-2's BPE trimmed to the corpus's commonest tokens (pyllmc.tokenizer)
DEMO_CPU = dict(batch_size=8, sequence_length=128, num_iterations=800, learning_rate=1.2e-3, warmup_iters=60,
                learning_rate_decay_frac=0.1, weight_decay=0.1, sample_every=200, sample_length=128)
DEFAULT_NUM_ITERATIONS = 10  # --num_iterations -1 outside the CPU demo

# --resume 1 continues a run with the settings its checkpoint recorded (pyllmc.checkpoint.resume_settings):
# every flag not given takes the recorded value, and a flag given with another value is refused unless
# --resume_override names it. Except:
#   RESUME_LOCAL: this invocation's own, never taken from the record: where the run is (output_dir), that it
#     resumes, when this invocation stops (stop_at_step: a time-limited job's, not the run's), and the machine
#     that runs it (device; backend and compile choose kernels for it that compute the same function).
#   RESUME_FREE: taken from the record when not given, but a new value needs no override: they shape nothing
#     the training computes (what is logged, evaluated, sampled, checked or exported, and how often; samples
#     draw from their own generator and evaluation reads only the validation loader).
#   RESUME_FIXED: the saved state depends on them (the data loaders' positions count B x T tokens; the weights
#     come from the checkpoint, whatever --model says): no override; a new run can start from the weights
#     (--model CKPT with another --output_dir).
# Every other flag (schedule, batch, data, tokenizer, seed, dtype, optimizer, ZeRO...) shapes the training.
RESUME_LOCAL = ("output_dir", "resume", "resume_override", "stop_at_step", "device", "backend", "compile")
RESUME_FREE = ("val_loss_every", "val_max_steps", "hellaswag", "hellaswag_path", "hellaswag_max_examples",
               "sample_every", "sample_length", "sample_top_k", "checkpoint_every", "keep_checkpoints",
               "write_llmc", "write_hf", "log_every", "diagnostics_every", "verify_shards")
RESUME_FIXED = ("batch_size", "sequence_length", "model", "vocab_size")

_UNSET = object()


def parse_command_line(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, frozenset]:
    """(args, given): the options, and the names of those the command line sets; the others hold the
    parser's defaults (which the CPU demo's, or a resumed run's recorded settings, replace later)."""
    # argparse fills in a default only where the namespace has no attribute yet: what is still _UNSET
    # after the parse was not on the command line
    unset = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    parsed = vars(parser.parse_args(argv, namespace=unset))
    given = frozenset(k for k, v in parsed.items() if v is not _UNSET)
    return with_defaults(parser, parsed, given), given


def with_defaults(parser: argparse.ArgumentParser, args, given) -> argparse.Namespace:
    """The given flags' values, and the parser's (current) default for every other one."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return argparse.Namespace(**{k: v if k in given else parser.get_default(k) for k, v in values.items()})


def cpu_demo_defaults(parser: argparse.ArgumentParser, args, given) -> argparse.Namespace:
    """The CPU demo: DEMO_CPU's values become the defaults of the flags the command line left unset."""
    parser.set_defaults(**DEMO_CPU)
    return with_defaults(parser, args, given)


def model_spec_for(model: str, device) -> str:
    """--model auto: gpt2 on a GPU, tiny on a CPU."""
    return model if model != "auto" else ("gpt2" if torch.device(device).type == "cuda" else "tiny")


def run_settings(args, **resolved) -> dict:
    """The flags as a checkpoint records them: `resolved` decides what "auto" left open (the model, the
    dtype, the corpus), and paths are absolute, so that a resume from another directory reads the same files."""
    settings = {**vars(args), **resolved}
    for key in ("input_bin", "input_val_bin", "hellaswag_path", "corpus", "hellaswag", "model"):
        value = settings.get(key)
        if isinstance(value, str) and value and (key in ("input_bin", "input_val_bin", "hellaswag_path")
                                                 or Path(value).expanduser().exists()):
            settings[key] = os.path.abspath(os.path.expanduser(value))
    return settings


def continue_run(args, given, state: dict, path, device, say) -> argparse.Namespace:
    """--resume 1: args with the settings the checkpoint's run recorded (see RESUME_LOCAL above).
    ConfigError when the command line gives another value without --resume_override."""
    override = [name.strip().lstrip("-") for name in args.resume_override.split(",") if name.strip()]
    try:
        current = run_settings(args, model=model_spec_for(args.model, device),
                               dtype=precision.training_dtype(args.dtype, device)[0])
        recorded = checkpoint.recorded_settings(state)
        if recorded and "loss_head" not in recorded:  # a run from before --loss_head used the fused classifier
            recorded = {**recorded, "loss_head": "fused"}
        settings, _, overridden = checkpoint.resume_settings(
            recorded, current, given, local=RESUME_LOCAL, free=RESUME_FREE,
            fixed=RESUME_FIXED, override=override, where=str(path))
    except ValueError as err:  # a conflict, a bad --resume_override or --dtype
        raise ConfigError(str(err)) from None
    for name, (recorded, new) in overridden.items():
        say(f"--resume_override: --{name} {new} (the run had {recorded})")
    return argparse.Namespace(**settings)


def demo_settings_not_applied(args, given, device_type: str, resumed: bool):
    """With a preset --model on a CPU (a new run), the one line that says which of the CPU demo's settings
    (it applies only with --model auto) this run does not get, for the flags left unset; None otherwise."""
    from pyllmc.models import PRESETS

    if device_type != "cpu" or "model" not in given or args.model not in PRESETS or resumed:
        return None
    differences = [f"{key} {getattr(args, key) if key != 'num_iterations' else DEFAULT_NUM_ITERATIONS} "
                   f"(the demo's {value})"
                   for key, value in DEMO_CPU.items() if key not in given and getattr(args, key) != value]
    if "tokenizer" not in given and not args.input_bin:
        differences.append(f"tokenizer gpt2, 50,257 ids (the demo's gpt2-trimmed, {DEMO_TRIM_VOCAB:,} ids)")
    if not differences:
        return None
    return (f"note: --model {args.model} is not the CPU demo (--model auto), so these keep their plain defaults: "
            f"{', '.join(differences)}; pass them to change them")


@dataclass
class Plan:
    """What a run derives from its checked settings."""
    batch_size: int          # B: sequences per rank per micro step
    sequence_length: int     # T
    grad_accum_steps: int    # micro steps per optimizer step
    total_batch_size: int    # tokens per optimizer step: B * T * world_size * grad_accum_steps
    dtype_name: str          # "bfloat16" or "float32" (parameters and activations)
    dtype: torch.dtype
    backend: str             # the kernels' backend "auto" resolved on this device


def resolve(args, given, process, say) -> tuple[argparse.Namespace, Plan, Optional[tuple[dict, Path]]]:
    """The settings this run trains with, checked: (args, the Plan derived from them, the (checkpoint
    state, path) that --resume 1 continues, or None). `process` is pyllmc.distributed's Process."""
    if args.resume_override and not args.resume:
        raise ConfigError("--resume_override changes a resumed run's settings: it needs --resume 1")
    resume = checkpoint.load_latest(args.output_dir) if args.resume and args.output_dir else None
    if args.resume and args.output_dir and resume is None:
        say(f"--resume 1: no checkpoint in {args.output_dir}, starting from step 0")
    if resume is not None:
        args = continue_run(args, given, *resume, process.device, say)
    note = demo_settings_not_applied(args, given, process.device_type, resumed=resume is not None)
    if note:
        say(note)
    return args, check(args, process.world_size, process.ddp, process.device, say), resume


def check(args, world_size: int, ddp: bool, device, say) -> Plan:
    """Every setting that cannot work fails here, before anything is built (ConfigError with what to
    change); `say` prints the notes about settings that work but do less than asked."""
    B, T = args.batch_size, args.sequence_length
    if B < 1 or T < 1:
        raise ConfigError(f"--batch_size and --sequence_length must be positive (got {B}, {T})")
    tokens_per_micro_step = B * T * world_size
    total_batch_size = tokens_per_micro_step if args.total_batch_size == -1 else args.total_batch_size
    if total_batch_size <= 0 or total_batch_size % tokens_per_micro_step != 0:
        multiple = max(1, round(total_batch_size / tokens_per_micro_step)) * tokens_per_micro_step
        raise ConfigError(
            f"--total_batch_size {total_batch_size} is not a multiple of batch_size * sequence_length * world_size "
            f"= {B} * {T} * {world_size} = {tokens_per_micro_step}: use e.g. --total_batch_size {multiple}, "
            f"or change --batch_size / --sequence_length / the number of processes")
    if args.output_dir == "" and (args.resume or args.checkpoint_every > 0 or args.write_llmc or args.write_hf):
        raise ConfigError("--resume, --checkpoint_every, --write_llmc and --write_hf need --output_dir")
    if args.diagnostics_every < 0:
        raise ConfigError(f"--diagnostics_every must be >= 0 (0: off); got {args.diagnostics_every}")
    if args.zero_stage == 1 and not ddp:
        say("note: --zero_stage 1 has no effect in a single process")
    dtype_name, dtype_note = precision.training_dtype(args.dtype, device)  # auto: bfloat16 where it is native
    if dtype_note:
        say(dtype_note)
    # The ops' own resolver: the same availability and device rules every op call applies.
    try:
        backend = pyllmc.backends.resolve(None if args.backend == "auto" else args.backend, torch.device(device))
    except (ValueError, pyllmc.BackendUnavailableError) as err:
        raise ConfigError(f"--backend {args.backend}: {err}; use another --device or --backend") from None
    if args.num_iterations == -1:
        args.num_iterations = DEFAULT_NUM_ITERATIONS
    return Plan(batch_size=B, sequence_length=T, grad_accum_steps=total_batch_size // tokens_per_micro_step,
                total_batch_size=total_batch_size, dtype_name=dtype_name,
                dtype={"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name], backend=backend)
