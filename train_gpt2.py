"""
Train GPT-2 with pyllmc's hand-written kernels.

    python train_gpt2.py                     # the demo: a short run on tiny Shakespeare, samples as it learns
    python train_gpt2.py --help              # every option
    torchrun --standalone --nproc_per_node 8 train_gpt2.py ...   # data-parallel on 8 GPUs
    bash dev/run_gpt2_124M.sh                # GPT-2 124M on FineWeb-Edu 10B (llm.c's recipe)

With no arguments it trains on tiny Shakespeare (downloaded on first use and prepared as token
shards in the user cache, pyllmc.corpus; a local copy: $PYLLMC_DATA_DIR or --corpus FILE), or,
offline, saying so, on the docstrings and comments of the Python standard library that runs it,
a model that suits the machine: GPT-2 124M on a GPU (a short run); on a CPU the 2-layer "tiny"
preset with GPT-2's BPE trimmed to the corpus's 4,096 commonest tokens (the classifier over
GPT-2's 50,257 ids is most of a small model's work), for a schedule (DEMO_CPU) measured to end
with real words well inside 3 minutes on 2 cores, with samples as it learns. --input_bin /
--input_val_bin train on any llm.c token shards (uint16 or uint32; --vocab_size for a vocabulary
that is not GPT-2's); the tokenizer their manifest declares decodes the samples (audio ones are
written as .wav files) and is recorded in the checkpoints.

Decisions (see the design notes):
  * Precision. bfloat16 training keeps the model's parameters (and so its activations and
    gradients) in bfloat16, and pyllmc's fused AdamW keeps a float32 master copy of every
    parameter inside the optimizer state (master_weights=True), as llm.c does: half the
    parameter/gradient memory and bandwidth of float32 parameters under autocast, with no
    loss of update precision. float32 (the default on CPU) keeps everything in float32.
    The loss runs as llm.c's fused classifier (inplace_backward=True): the logits' storage
    receives their gradient during the forward, so no second (B, T, V) buffer is needed.
  * Data parallelism. Gradients are all-reduced ONCE per optimizer step, after the last
    micro step, as one flat buffer (sum, then divide by the world size): simpler than a DDP
    wrapper with no_sync, and the same with NCCL (GPU) and gloo (CPU). Every rank starts from
    rank 0's parameters and applies the same update, so the replicas stay identical.
    --zero_stage 1 shards the optimizer state (ZeRO-1): the parameters are partitioned
    across ranks (greedy by size), each rank's AdamW holds state for its own part only and
    steps it, and each parameter is then broadcast from the rank that owns it.
  * Determinism. Sampling during training draws from its own generator (and runs inside
    torch.random.fork_rng), so it never moves the training RNG; the data loaders' positions
    and every RNG state go into the checkpoints. A resumed run therefore continues the loss
    curve exactly (bitwise on a CPU with the same backend), with the settings its checkpoint recorded:
    --resume 1 --output_dir OUT alone continues OUT's run; a flag that shapes training given with
    another value is refused unless --resume_override names it (RESUME_LOCAL, RESUME_FREE below).
  * Checkpoints (pyllmc.checkpoint): written atomically (temp file, fsync, rename, fsync of
    the directory), each with a checksum of all its bytes that every load verifies; the last
    --keep_checkpoints are kept; --resume 1 continues from the newest one that loads and
    verifies, skipping (with a warning) a newer file that is damaged. llm.c model files get a
    sha256 sidecar (model_<step>.bin.sha256), and token shards are checked against the sha256
    their manifest records (--verify_shards).

The output directory (--output_dir) receives main.jsonl (one JSON object per step, eval,
sample and event; dev/plot.py draws it), the checkpoints ckpt_<step>.pt, and, when asked,
llm.c-format model files (model_<step>.bin) and Hugging Face directories (hf_<step>/).
"""

import argparse
import collections
import dataclasses
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Triton runs kernels on CPU tensors only in its interpreter, which must be on before any kernel
# is defined; without a GPU switch it on now, so that --backend triton works on a CPU (it
# changes nothing else: the torch backend and the CUDA extension do not read it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyllmc  # noqa: E402
from pyllmc import checkpoint, corpus, diagnostics, ops, precision  # noqa: E402
from pyllmc import tokenizer as tokenizers  # noqa: E402
from pyllmc.data import DistributedDataLoader, ShardFormatError, declared_tokenizer  # noqa: E402
from pyllmc.distributed import GradientBuckets, ShardedParameters  # noqa: E402
from pyllmc.model import GPT, PRESETS, GPTConfig, pad_vocab_size  # noqa: E402

REPO = Path(__file__).resolve().parent
PRESET_HELP = "gpt2, gpt2-medium, gpt2-large, gpt2-xl, d6, d12, d24, d36, d48, tiny, tiny-4"
OUTLIER_WINDOW = 128  # steps in the running mean/std of the loss and the grad norm
OUTLIER_ZSCORE = 5.0  # z-scores above this are logged as outliers
MAX_CONSECUTIVE_SKIPS = 20  # abort when this many updates in a row are skipped (non-finite)
# The CPU demo (--model auto on a CPU): the settings a flag left unset takes, chosen by measurement
# (README, "Run it") to end with real words and the corpus's lines well inside 3 minutes on 2 cores.
# 4,096 ids: enough whole words that samples spell fewer of them in bytes (on the stdlib corpus, 69% of
# the words in 6 samples were words of the corpus, against 59% with 2,048 ids; 800 steps each), few
# enough that each is seen often in 800K tokens, and the classifier stays cheap (8,192 ids and 150
# steps left the samples at unigram soup). lr 1.2e-3 with 60 warmup steps: on the stdlib corpus val loss
# 4.49 (2e-3: 4.48; 3e-3 with 30 warmup steps: 4.82, a loss spike at step 100), and the only setting of
# the three whose update/weight ratios stay under pyllmc.diagnostics' warning limit (10^-1.5) throughout
DEMO_TRIM_VOCAB = 4096  # GPT-2's BPE trimmed to the corpus's commonest tokens (pyllmc.tokenizer)
DEMO_CPU = dict(batch_size=8, sequence_length=128, num_iterations=800, learning_rate=1.2e-3, warmup_iters=60,
                learning_rate_decay_frac=0.1, weight_decay=0.1, sample_every=200, sample_length=128)
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


class ConfigError(Exception):
    """A setting that cannot work; raised before training with what to change."""


# -----------------------------------------------------------------------------
# command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="Train GPT-2 with pyllmc's kernels (run with no arguments for a short demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--input_bin", type=str, default="",
                   help="training token shards (llm.c format: uint16 or uint32 ids), a file or glob pattern; empty: "
                        "the --corpus, prepared on first use in the user cache")
    g.add_argument("--input_val_bin", type=str, default="",
                   help="validation token shards, a file or glob pattern; empty: the --corpus's val split when "
                        "training on it, else no validation")
    g.add_argument("--corpus", type=str, default="auto",
                   help="without --input_bin: auto (tiny Shakespeare, downloaded or from $PYLLMC_DATA_DIR; offline, "
                        "the docstrings and comments of this Python's standard library), tinyshakespeare, stdlib, "
                        "or a text file of your own (cut into documents at blank lines)")
    g.add_argument("--tokenizer", type=str, default="auto",
                   help="what the token ids mean (samples are decoded with it, checkpoints record it): auto: what "
                        "the shards' manifest declares, else gpt2 for uint16 shards and ids (no decoder) for uint32; "
                        "for the --corpus: gpt2, or gpt2-trimmed (GPT-2 trimmed to the corpus's commonest "
                        f"--vocab_size tokens, {DEMO_TRIM_VOCAB:,} by default: the CPU demo's); a name (gpt2, ids, "
                        "mulaw) for shards that declare none")
    g.add_argument("--verify_shards", type=int, default=1,
                   help="1: check each shard that a *_manifest.json beside it lists (the dev/data scripts write "
                        "one) against its recorded sha256, once per run, when first opened (about 0.8 s per GB); "
                        "0: skip (shards without a manifest are never checked)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="auto",
                   help=f"what to train: a preset initialised at random ({PRESET_HELP}); a path to start from: a "
                        "pyllmc checkpoint (.pt), an llm.c model file (.bin) or a Hugging Face / save_pretrained "
                        "directory; hf:NAME for GPT.from_pretrained(NAME); auto: gpt2 on a GPU, tiny on a CPU")
    g.add_argument("--vocab_size", type=int, default=-1,
                   help="token ids of a model trained from scratch (wte / lm_head padded to a multiple of 128, as "
                        "in llm.c); -1: the tokenizer's (50257 for GPT-2); a pretrained model keeps its own")
    g.add_argument("--backend", type=str, default="auto", choices=["auto", "cuda", "triton", "torch"],
                   help="which kernels run the ops: cuda (pyllmc._C), triton, torch (PyTorch reference), "
                        "auto: the fastest that works on the device")
    g.add_argument("--dtype", type=str, default="auto", choices=["auto", "bfloat16", "float32"],
                   help="parameter/activation dtype; bfloat16 keeps float32 master weights in the optimizer; "
                        "auto: bfloat16 on a GPU, float32 on a CPU")
    g.add_argument("--compile", type=int, default=0,
                   help="1: torch.compile the model's forward + backward as one graph (fullgraph); the optimizer "
                        "step and the clip stay eager")
    g = parser.add_argument_group("batch and schedule")
    g.add_argument("--batch_size", "-b", type=int, default=4, help="micro batch size B (sequences per rank per micro step)")
    g.add_argument("--sequence_length", "-t", type=int, default=64, help="sequence length T (<= the model's block_size)")
    g.add_argument("--total_batch_size", type=int, default=-1,
                   help="tokens per optimizer step; must be a multiple of B*T*world_size, the quotient is the number "
                        "of gradient-accumulation micro steps; -1: B*T*world_size (no accumulation)")
    g.add_argument("--num_iterations", "-n", type=int, default=-1,
                   help="optimizer steps to train; -1: the CPU demo's (DEMO_CPU) with --model auto on a CPU, else 10")
    g.add_argument("--learning_rate", "-l", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warmup steps from 0 to the peak learning rate")
    g.add_argument("--learning_rate_decay_frac", type=float, default=1.0,
                   help="cosine decay after warmup, down to learning_rate * this at the last step (1.0: constant)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (on matrices only)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the model initialisation and of the samples")
    g.add_argument("--zero_stage", type=int, default=0, choices=[0, 1],
                   help="1: ZeRO-1, shard the optimizer state across data-parallel ranks")
    g.add_argument("--stop_at_step", type=int, default=0,
                   help="end this run after this step, with a checkpoint, as if interrupted (for time-limited jobs: "
                        "continue later with --resume 1); 0: run to --num_iterations")
    g = parser.add_argument_group("evaluation and samples")
    g.add_argument("--val_loss_every", type=int, default=0,
                   help="validation loss (and HellaSwag) every this many steps, at step 0 and at the end; "
                        "0: only at the end")
    g.add_argument("--val_max_steps", type=int, default=20, help="batches per validation; 0: no validation")
    g.add_argument("--hellaswag", type=str, default="0",
                   help="HellaSwag accuracy at each validation: 1 reads --hellaswag_path, a path reads that file, 0: off")
    g.add_argument("--hellaswag_path", type=str, default="",
                   help="HellaSwag jsonl (python dev/data/hellaswag.py writes it); empty: "
                        "dev/data/hellaswag/hellaswag_val.jsonl, or hellaswag_val*.jsonl in $PYLLMC_DATA_DIR")
    g.add_argument("--hellaswag_max_examples", type=int, default=-1, help="score only the first N examples; -1: all")
    g.add_argument("--sample_every", type=int, default=0,
                   help="print a sample every this many steps and at the end; 0: only at the end; -1: never")
    g.add_argument("--sample_length", type=int, default=64, help="tokens per sample")
    g.add_argument("--sample_top_k", type=int, default=50, help="sample from the top k tokens (0: all)")
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=str, default="",
                   help="where main.jsonl and the checkpoints go; empty: write nothing")
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="checkpoint every this many steps and at the end (needs --output_dir); 0: only at the end; "
                        "-1: never")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="keep the newest K checkpoints (0: all)")
    g.add_argument("--resume", type=int, default=0,
                   help="1: continue from the newest valid checkpoint in --output_dir (starts fresh when there is "
                        "none), with the settings the run recorded there: a flag that shapes training given with "
                        "another value is refused (see --resume_override); output, logging and evaluation flags "
                        "may change")
    g.add_argument("--resume_override", type=str, default="",
                   help="with --resume 1: flags (names without --, comma-separated, e.g. num_iterations,learning_rate) "
                        "whose value on this command line replaces the one the run recorded, on purpose")
    g.add_argument("--write_llmc", type=int, default=0, help="1: with each checkpoint, also the model in llm.c's format")
    g.add_argument("--write_hf", type=int, default=0, help="1: with each checkpoint, also a Hugging Face directory")
    g.add_argument("--log_every", type=int, default=1, help="print a step line every this many steps (the log gets all)")
    g.add_argument("--diagnostics_every", type=int, default=0,
                   help="every this many steps, per-layer activation, gradient and update-ratio statistics "
                        "(pyllmc.diagnostics) as one \"diagnostics\" record in main.jsonl, with a warning for each "
                        "rule of thumb broken; python dev/plot.py OUT/main.jsonl --diagnostics draws them; 0: off")
    g.add_argument("--device", type=str, default="", help="cuda, cuda:N or cpu; empty: cuda when available")
    return parser


_UNSET = object()


def parse_command_line(argv=None):
    """(args, given): the options, and the names of those the command line sets; the others hold their
    defaults (which the CPU demo's, or a resumed run's recorded settings, replace later)."""
    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    # argparse fills in a default only where the namespace has no attribute yet: what is still _UNSET
    # after the parse was not on the command line
    parsed = vars(parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(defaults, _UNSET))))
    given = frozenset(k for k, v in parsed.items() if v is not _UNSET)
    return argparse.Namespace(**{k: v if k in given else defaults[k] for k, v in parsed.items()}), given


def parse_args(argv=None):
    return parse_command_line(argv)[0]


# -----------------------------------------------------------------------------
# the run's settings: what a checkpoint records, --resume 1 continues with, and the CPU demo changes

def run_settings(args, **resolved):
    """The flags as a checkpoint records them: `resolved` decides what "auto" left open (the model, the
    dtype, the corpus), and paths are absolute, so that a resume from another directory reads the same files."""
    settings = {**vars(args), **resolved}
    for key in ("input_bin", "input_val_bin", "hellaswag_path", "corpus", "hellaswag", "model"):
        value = settings.get(key)
        if isinstance(value, str) and value and (key in ("input_bin", "input_val_bin", "hellaswag_path")
                                                 or Path(value).expanduser().exists()):
            settings[key] = os.path.abspath(os.path.expanduser(value))
    return settings


def continue_run(args, given, state, path, device, say):
    """--resume 1: (args with the settings the checkpoint's run recorded, the names taken from it); see
    RESUME_LOCAL above. ConfigError when the command line gives another value without --resume_override."""
    override = [name.strip().lstrip("-") for name in args.resume_override.split(",") if name.strip()]
    try:
        current = run_settings(args, model=model_spec_for(args.model, device),
                               dtype=precision.training_dtype(args.dtype, device)[0])
        settings, inherited, overridden = checkpoint.resume_settings(
            checkpoint.recorded_settings(state), current, given, local=RESUME_LOCAL, free=RESUME_FREE,
            fixed=RESUME_FIXED, override=override, where=str(path))
    except ValueError as err:  # a conflict, a bad --resume_override or --dtype
        raise ConfigError(str(err)) from None
    for name, (recorded, new) in overridden.items():
        say(f"--resume_override: --{name} {new} (the run had {recorded})")
    return argparse.Namespace(**settings), inherited


def demo_settings_not_applied(args, given):
    """With a preset --model on a CPU, the one line that says which of the CPU demo's settings (it applies
    only with --model auto) this run does not get, for the flags left unset; None when there are none."""
    differences = [f"{key} {getattr(args, key) if key != 'num_iterations' else 10} (the demo's {value})"
                   for key, value in DEMO_CPU.items() if key not in given and getattr(args, key) != value]
    if "tokenizer" not in given and not args.input_bin:
        differences.append(f"tokenizer gpt2, 50,257 ids (the demo's gpt2-trimmed, {DEMO_TRIM_VOCAB:,} ids)")
    if not differences:
        return None
    return (f"note: --model {args.model} is not the CPU demo (--model auto), so these keep their plain defaults: "
            f"{', '.join(differences)}; pass them to change them")


# -----------------------------------------------------------------------------
# small helpers

def learning_rate_at(it, args):
    """Linear warmup to the peak, then cosine decay to peak * decay_frac at the last step (it is 0-based)."""
    max_lr, min_lr = args.learning_rate, args.learning_rate * args.learning_rate_decay_frac
    if it < args.warmup_iters:
        return max_lr * (it + 1) / args.warmup_iters
    decay_steps = max(1, args.num_iterations - args.warmup_iters)
    ratio = min(1.0, (it - args.warmup_iters) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def format_duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress(iterable, desc, enabled, total=None):
    """tqdm when it is installed, else a one-line counter (both on stderr)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return _simple_progress(iterable, desc, total if total is not None else len(iterable))
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _simple_progress(iterable, desc, total):
    for i, item in enumerate(iterable):
        print(f"\r{desc} {i + 1}/{total}", end="", file=sys.stderr, flush=True)
        yield item
    print("\r" + " " * (len(desc) + 24) + "\r", end="", file=sys.stderr, flush=True)


class OutlierDetector:
    """Running mean/std of the last `window` values; z-score of a new one (nan until warmed up)."""

    def __init__(self, window=OUTLIER_WINDOW, min_values=10):
        self.values = collections.deque(maxlen=window)
        self.min_values = min_values

    def update(self, x):
        z = float("nan")
        if len(self.values) >= self.min_values:
            mean = sum(self.values) / len(self.values)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / len(self.values))
            z = (x - mean) / std if std > 0 else float("nan")
        if math.isfinite(x):
            self.values.append(x)
        return z

    def state_dict(self):
        return {"values": list(self.values)}

    def load_state_dict(self, state):
        self.values.clear()
        self.values.extend(state["values"])


class JsonlLog:
    """main.jsonl: one JSON object per line, flushed at once (a crash loses nothing logged)."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and path.exists():
            # a resumed run continues the log: drop what the interrupted run logged after its checkpoint
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.file = open(path, "a")

    def write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


class NullLog:
    def write(self, **record):
        pass


# -----------------------------------------------------------------------------
# data

def corpus_tokenizer(args, cpu_demo, recorded=None):
    """The vocabulary the built-in corpus is prepared with: None for GPT-2's, an int for GPT-2 trimmed
    to that many ids (the CPU demo's, or --tokenizer gpt2-trimmed). recorded: the spec of the tokenizer
    the weights were trained with (a resume, --model CKPT), which --tokenizer auto takes."""
    if args.tokenizer == "auto" and recorded is not None and recorded.get("name") in ("gpt2", "gpt2-trimmed"):
        return len(recorded["gpt2_ids"]) if recorded["name"] == "gpt2-trimmed" else None
    if args.tokenizer == "gpt2" or (args.tokenizer == "auto" and not cpu_demo):
        return None
    if args.tokenizer in ("auto", "gpt2-trimmed"):
        return args.vocab_size if args.vocab_size > 0 else DEMO_TRIM_VOCAB
    raise ConfigError(f"--tokenizer {args.tokenizer}: the --corpus is tokenized with gpt2 or gpt2-trimmed")


def prepare_corpus(args, trim_vocab, say):
    """The built-in corpus's shards (pyllmc.corpus: the user cache), or ConfigError saying what to do."""
    try:
        return corpus.prepare(args.corpus, trim_vocab=trim_vocab, say=say)
    except corpus.CorpusUnavailable as err:
        raise ConfigError(f"{err}\n  Or pass your own shards with --input_bin/--input_val_bin.") from err
    except ValueError as err:  # e.g. a trimmed vocabulary that cannot be made
        raise ConfigError(f"--corpus {args.corpus}: {err}") from err


def shard_tokenizer(args, files):
    """(the tokenizer of --input_bin's shards, where that comes from): what their manifest declares,
    else --tokenizer, else GPT-2 for uint16 shards (llm.c's) and raw ids for uint32 ones."""
    try:
        spec, manifest = declared_tokenizer(files)
        chosen = None if args.tokenizer == "auto" else tokenizers.from_spec(args.tokenizer)
        declared = tokenizers.from_spec(spec) if spec is not None else None
    except ValueError as err:
        raise ConfigError(f"--tokenizer: {err}") from err
    if declared is not None:
        if chosen is not None and chosen.name != declared.name:
            raise ConfigError(f"--tokenizer {args.tokenizer}: the shards were made with {declared.describe()} "
                              f"(declared in {manifest}); their ids mean nothing to {chosen.describe()}")
        return declared, f"declared in {manifest}"
    if chosen is not None:
        return chosen, "--tokenizer"
    from pyllmc.data import shard_info
    if all(shard_info(f)[1].itemsize == 2 for f in files):
        return tokenizers.GPT2Tokenizer(), "no manifest declares one: GPT-2 for uint16 shards"
    return tokenizers.TokenIds(), "no manifest declares one: samples are shown as token ids"


def check_vocabulary(loaders, config, tokenizer, from_scratch):
    """Before training: every token id of the shards fits the model, and the model's ids the tokenizer."""
    V = config.vocab_size
    for loader, flag in loaders:
        if loader is None:
            continue
        top, where = loader.max_token_id()
        if top >= V:
            detail = f"token shard {where} holds token id {top}, past the model's {V} ids"
            try:
                loader.check_token_ids(V)  # the first offending id, with its shard and position
            except ShardFormatError as err:
                detail = str(err)
            fix = (f"train with --vocab_size {top + 1}" if from_scratch else
                   f"this model has {V} token ids: train a new one on them (a preset with --vocab_size {top + 1})")
            raise ConfigError(f"{flag}: {detail}: {fix}")
    if tokenizer.vocab_size is not None and tokenizer.vocab_size < V:
        raise ConfigError(f"the model has {V} token ids but the tokenizer {tokenizer.describe()} fewer: its samples "
                          f"could hold ids nothing decodes; use --vocab_size {tokenizer.vocab_size}")


def check_files_exist(pattern, flag):
    import glob
    if not glob.glob(pattern):
        raise ConfigError(f"no file matches {flag} {pattern!r}: check the path, or prepare the data first "
                          f"(e.g. python dev/data/tinyshakespeare.py, python dev/data/fineweb.py)")


def make_loader(pattern, B, T, rank, world_size, flag, pin_memory=False, verify=True):
    try:
        return DistributedDataLoader(pattern, B, T, rank=rank, world_size=world_size, pin_memory=pin_memory,
                                     verify=verify)
    except FileNotFoundError as err:
        raise ConfigError(f"{flag}: {err}") from err
    except ValueError as err:  # a shard smaller than one global batch, a malformed or damaged shard
        raise ConfigError(f"{flag}: {err}") from err


def hellaswag_file(args):
    if args.hellaswag in ("0", "", "false", "False"):
        return None
    if args.hellaswag not in ("1", "true", "True"):
        path = Path(args.hellaswag)
    elif args.hellaswag_path:
        path = Path(args.hellaswag_path)
    else:
        candidates = [REPO / "dev" / "data" / "hellaswag" / "hellaswag_val.jsonl"]
        if os.environ.get("PYLLMC_DATA_DIR"):
            candidates = sorted(Path(os.environ["PYLLMC_DATA_DIR"]).glob("hellaswag_val*.jsonl")) + candidates
        path = next((p for p in candidates if p.exists()), candidates[-1])
    if not path.exists():
        raise ConfigError(f"HellaSwag file {path} not found: write it with python dev/data/hellaswag.py "
                          f"(--input a local copy when offline), pass --hellaswag PATH, or --hellaswag 0")
    return path


# -----------------------------------------------------------------------------
# model

def model_spec_for(model, device):
    """--model auto: gpt2 on a GPU, tiny on a CPU."""
    return model if model != "auto" else ("gpt2" if torch.device(device).type == "cuda" else "tiny")


def is_training_checkpoint(spec):
    """A --model that names a checkpoint of this script (not an llm.c .bin, not a directory)."""
    path = Path(spec)
    return not spec.startswith("hf:") and path.is_file() and path.suffix != ".bin"


def load_training_checkpoint(spec):
    try:
        return checkpoint.load_checkpoint(spec)
    except ValueError as err:
        raise ConfigError(f"--model {spec}: {err}") from err


def build_model(spec, seed, vocab_size=None, state=None):
    """(model on the CPU in float32, a description of where it came from, the spec of the tokenizer
    its weights were trained with, None when unknown or new). vocab_size: a preset's token ids;
    state: the checkpoint `spec` names, when it is loaded already."""
    path = Path(spec)

    def gpt2_if_its_vocabulary(model):  # HF and llm.c files record no tokenizer
        return {"name": "gpt2"} if model.config.vocab_size == tokenizers.VOCAB_SIZE else None

    if spec.startswith("hf:"):
        model = GPT.from_pretrained(spec[3:])
        return model, f"pretrained {spec[3:]}", gpt2_if_its_vocabulary(model)
    if path.is_dir():
        model = GPT.from_pretrained(str(path))
        return model, f"weights from {path}", gpt2_if_its_vocabulary(model)
    if path.is_file() and path.suffix == ".bin":
        from pyllmc.llmc import read_model
        try:
            model = read_model(str(path))
        except ValueError as err:  # not an llm.c model file, or its sha256 sidecar disagrees
            raise ConfigError(f"--model {spec}: {err}") from err
        return model, f"weights from llm.c file {path}", gpt2_if_its_vocabulary(model)
    if path.is_file():  # a training checkpoint of this script
        state = state if state is not None else load_training_checkpoint(spec)
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
        return model, f"weights from checkpoint {path} (step {state['step']})", checkpoint.recorded_tokenizer(state)
    vocab = {} if vocab_size is None else dict(vocab_size=vocab_size, padded_vocab_size=pad_vocab_size(vocab_size))
    try:
        config = GPTConfig.from_preset(spec, **vocab)
    except ValueError as err:
        if spec in PRESETS:  # a bad --vocab_size
            raise ConfigError(f"--vocab_size {vocab_size}: {err}") from err
        raise ConfigError(f"--model {spec!r} is neither an existing path nor a preset ({PRESET_HELP})") from err
    return GPT(config, seed=seed), f"preset {spec}, random init (seed {seed})", None


def model_config_dict(model):
    return {f.name: getattr(model.config, f.name) for f in dataclasses.fields(GPTConfig)}


def partition_parameters(params, world_size):
    """ZeRO-1 ownership: greedy by size, largest first, onto the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owner = {}
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += params[i].numel()
    return [owner[i] for i in range(len(params))]


def gradient_norm(params):
    """Global L2 norm of the gradients, accumulated in float32 whatever their dtype."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    args, given = parse_command_line(argv)

    # ---- processes and device ----
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        rank, local_rank, world_size = 0, 0, 1
    if args.device:
        device = args.device
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and ddp:
        device = f"cuda:{local_rank}"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    master = rank == 0

    try:
        train(args, rank, world_size, device, device_type, ddp, master, given=given)
    except (ConfigError, ShardFormatError) as err:  # bad settings; a damaged shard met during the run
        print(f"train_gpt2.py: error: {err}", file=sys.stderr, flush=True)
        code = 2
    else:
        code = 0
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
    return code


def train(args, rank, world_size, device, device_type, ddp, master, given=frozenset()):
    def print0(*a, **k):
        if master:
            print(*a, **k, flush=True)

    # ---- --resume 1: the run goes on with the settings its newest checkpoint recorded ----
    if args.resume_override and not args.resume:
        raise ConfigError("--resume_override changes a resumed run's settings: it needs --resume 1")
    resume_state, inherited = None, set()
    if args.resume and args.output_dir:
        found = checkpoint.load_latest(args.output_dir)
        if found is None:
            print0(f"--resume 1: no checkpoint in {args.output_dir}, starting from step 0")
        else:
            resume_state, resume_path = found
            args, inherited = continue_run(args, given, resume_state, resume_path, device, print0)

    # ---- the CPU demo (--model auto on a CPU): DEMO_CPU's settings for every flag left unset ----
    cpu_demo = args.model == "auto" and device_type == "cpu"
    if cpu_demo:
        for key, value in DEMO_CPU.items():
            if key not in given and key not in inherited:
                setattr(args, key, value)
    elif device_type == "cpu" and "model" in given and args.model in PRESETS and resume_state is None:
        note = demo_settings_not_applied(args, given)
        if note:
            print0(note)

    # ---- settings that cannot work fail here, before anything is built ----
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
    grad_accum_steps = total_batch_size // tokens_per_micro_step
    if args.output_dir == "" and (args.resume or args.checkpoint_every > 0 or args.write_llmc or args.write_hf):
        raise ConfigError("--resume, --checkpoint_every, --write_llmc and --write_hf need --output_dir")
    if args.diagnostics_every < 0:
        raise ConfigError(f"--diagnostics_every must be >= 0 (0: off); got {args.diagnostics_every}")
    if args.zero_stage == 1 and not ddp:
        print0("note: --zero_stage 1 has no effect in a single process")
    dtype_name, dtype_note = precision.training_dtype(args.dtype, device)  # auto: bfloat16 where it is native
    if dtype_note:
        print0(dtype_note)
    ptdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    # The ops' own resolver: the same availability and device rules every op call applies.
    try:
        backend_name = pyllmc.backends.resolve(None if args.backend == "auto" else args.backend,
                                               torch.device(device))
    except (ValueError, pyllmc.BackendUnavailableError) as err:
        raise ConfigError(f"--backend {args.backend}: {err}; use another --device or --backend") from None

    # ---- data, and the tokenizer that says what its ids mean ----
    model_spec = model_spec_for(args.model, device)
    start_state = None  # a checkpoint to start from (--model CKPT): loaded once, here, for the tokenizer it records
    if resume_state is None and is_training_checkpoint(model_spec):
        start_state = load_training_checkpoint(model_spec)
    weights_state = resume_state if resume_state is not None else start_state
    weights_tokenizer = checkpoint.recorded_tokenizer(weights_state) if weights_state is not None else None
    prepared = None
    if args.input_bin:
        train_pattern, val_pattern = args.input_bin, args.input_val_bin
    else:  # the --corpus, prepared in the user cache by rank 0; the other ranks share its result
        box = [None, None]
        if master:
            try:
                box[0] = prepare_corpus(args, corpus_tokenizer(args, cpu_demo, weights_tokenizer), print0)
            except ConfigError as err:
                box[1] = str(err)
        if ddp:
            dist.broadcast_object_list(box, src=0)
        prepared, error = box
        if error:
            raise ConfigError(error)
        train_pattern, val_pattern = str(prepared.train), args.input_val_bin or str(prepared.val)
    check_files_exist(train_pattern, "--input_bin")
    if val_pattern:
        check_files_exist(val_pattern, "--input_val_bin")
    if prepared is not None:
        tokenizer, tokenizer_source = prepared.tokenizer, f"the corpus: {prepared.description}"
    else:
        tokenizer, tokenizer_source = shard_tokenizer(args, glob.glob(train_pattern) +
                                                     (glob.glob(val_pattern) if val_pattern else []))
    hellaswag_path = hellaswag_file(args)
    corpus_name = prepared.corpus if prepared is not None and args.corpus == "auto" else args.corpus

    # ---- model ----
    from_scratch = resume_state is None and model_spec in PRESETS
    if resume_state is not None:
        model = GPT(GPTConfig(**resume_state["model_config"]))
        model.load_state_dict(resume_state["model"])
        source = f"resumed from {resume_path} (step {resume_state['step']})"
        recorded = checkpoint.recorded_tokenizer(resume_state)
    else:  # a new model has the tokenizer's ids unless --vocab_size says otherwise
        vocab_size = (args.vocab_size if args.vocab_size > 0 else tokenizer.vocab_size) if from_scratch else None
        model, source, recorded = build_model(model_spec, args.seed, vocab_size, state=start_state)
    config = model.config
    if args.vocab_size > 0 and config.vocab_size != args.vocab_size:
        raise ConfigError(f"--vocab_size {args.vocab_size}: the model ({source}) has {config.vocab_size} token ids "
                          f"(--vocab_size sizes a new model)")
    if recorded is not None:  # resume, continue or decode only with the tokenizer the weights learned
        try:
            tokenizers.check_same(recorded, tokenizer, f"the model ({source})")
        except tokenizers.TokenizerMismatchError as err:
            raise ConfigError(str(err)) from None
    if T > config.block_size:
        raise ConfigError(f"--sequence_length {T} is longer than the model's block_size {config.block_size}: "
                          f"use --sequence_length {config.block_size} or less")
    num_iterations = args.num_iterations
    if num_iterations == -1:
        num_iterations = 10
    args.num_iterations = num_iterations
    stop_step = min(num_iterations, args.stop_at_step) if args.stop_at_step > 0 else num_iterations

    train_loader = make_loader(train_pattern, B, T, rank, world_size, "--input_bin", pin_memory=device_type == "cuda",
                               verify=bool(args.verify_shards))
    val_loader = None
    if val_pattern and args.val_max_steps > 0:
        val_loader = make_loader(val_pattern, B, T, rank, world_size, "--input_val_bin",
                                 verify=bool(args.verify_shards))
    # shards carry no vocabulary size: the largest id they hold must fit the model, the model's the tokenizer
    check_vocabulary([(train_loader, "--input_bin"), (val_loader, "--input_val_bin")], config, tokenizer, from_scratch)
    if hellaswag_path is not None:  # HellaSwag is text, encoded with the run's own tokenizer
        from pyllmc.hellaswag import check_tokenizer as check_hellaswag_tokenizer
        try:
            check_hellaswag_tokenizer(tokenizer, config.vocab_size)
        except ValueError as err:
            raise ConfigError(f"--hellaswag {args.hellaswag}: {err}") from None
    if tokenizer.modality != "text" and args.sample_every >= 0 and not args.output_dir:
        raise ConfigError(f"samples of {tokenizer.describe()} are written as files into --output_dir: give one "
                          f"(or --sample_every -1)")

    if resume_state is not None:
        saved = resume_state["args"]
        for key in ("batch_size", "sequence_length"):
            if saved[key] != getattr(args, key):
                raise ConfigError(f"the checkpoint was trained with --{key} {saved[key]}, this run has "
                                  f"{getattr(args, key)}: an exact resume needs the same value")
        if resume_state["world_size"] != world_size:
            raise ConfigError(f"the checkpoint was written by {resume_state['world_size']} processes, this run has "
                              f"{world_size}: resume with the same number of processes")
        if resume_state["zero_stage"] != args.zero_stage and world_size > 1:
            raise ConfigError(f"the checkpoint was written with --zero_stage {resume_state['zero_stage']}: "
                              f"resume with the same value")

    model.to(device=device, dtype=ptdtype)
    raw_model = model
    params = list(raw_model.parameters())
    if ddp:  # every replica starts from rank 0's parameters
        for p in params:
            dist.broadcast(p.data, src=0)

    # ---- optimizer (bf16 parameters -> float32 master weights inside AdamW) ----
    optimizer_kwargs = dict(master_weights=ptdtype != torch.float32, backend=backend_name)
    optimizer = raw_model.configure_optimizers(weight_decay=args.weight_decay, learning_rate=args.learning_rate,
                                               betas=(0.9, 0.95), eps=1e-8, **optimizer_kwargs)
    # gradients averaged over ranks by bucket, during the last backward of each step
    buckets = GradientBuckets(params, world_size) if ddp else None
    zero = ddp and args.zero_stage == 1
    if zero:
        owners = partition_parameters(params, world_size)
        sharded = ShardedParameters(params, owners, rank, world_size)  # one all-gather per step
        owner_of = {id(p): r for p, r in zip(params, owners)}
        groups = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if owner_of[id(p)] == rank]
            if mine:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
        optimizer = type(optimizer)(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                    **optimizer_kwargs) if groups else None

    if args.compile:  # the pyllmc ops trace into the graph: one graph per micro step, no breaks
        model = torch.compile(model, fullgraph=True)

    # ---- state from the checkpoint ----
    start_step = 0
    loss_outliers, norm_outliers = OutlierDetector(), OutlierDetector()
    if resume_state is not None:
        start_step = resume_state["step"]
        if optimizer is not None:
            saved_optimizer = resume_state["optimizer"][rank] if zero else resume_state["optimizer"]
            optimizer.load_state_dict(saved_optimizer)
        mine = resume_state["ranks"][rank]
        try:
            train_loader.load_state_dict(mine["train_loader"])
            if val_loader is not None and mine.get("val_loader") is not None:
                val_loader.load_state_dict(mine["val_loader"])
        except ValueError as err:  # other shards than the run's (an overridden --input_bin, say)
            raise ConfigError(f"--resume 1: {err}") from None
        loss_outliers.load_state_dict(resume_state["outliers"]["loss"])
        norm_outliers.load_state_dict(resume_state["outliers"]["norm"])
        checkpoint.set_rng_state(mine["rng"])
    if start_step >= stop_step:
        raise ConfigError(f"the checkpoint is at step {start_step}, already at or past the end "
                          f"({stop_step}): raise --num_iterations to train further")

    # ---- log ----
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and master:
        output_dir.mkdir(parents=True, exist_ok=True)
        log = JsonlLog(output_dir / "main.jsonl", resume_step=start_step if resume_state is not None else None)
    else:
        log = NullLog()
    data_text = prepared.description if prepared is not None else f"--input_bin {train_pattern}"
    log.write(type="config", step=start_step, args=vars(args), model_config=model_config_dict(raw_model),
              world_size=world_size, backend=backend_name, dtype=dtype_name, device=device, data=data_text,
              tokenizer=tokenizer.spec(), tokenizer_label=tokenizer.label, tokenizer_fingerprint=tokenizer.fingerprint)

    device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu"
    print0(f"model: {source} | {raw_model.num_parameters():,} parameters | {config.n_layer} layers, "
           f"{config.n_head} heads, {config.n_embd} channels, block {config.block_size}, vocab {config.vocab_size:,}"
           f"{f' (padded {config.padded_vocab_size:,})' if config.padded_vocab_size != config.vocab_size else ''}")
    print0(f"device: {device_name} x {world_size} | backend {backend_name} | {dtype_name}"
           f"{' + float32 master weights' if ptdtype != torch.float32 else ''}"
           f"{' | ZeRO-1' if zero else ''}{' | compiled (torch.compile, fullgraph)' if args.compile else ''}")
    if prepared is not None:
        print0(f"corpus: {prepared.description} | shards {'made now' if prepared.made_now else 'cached'} in "
               f"{prepared.directory}")
    print0(f"data: {len(train_loader.files)} train shard(s), {train_loader.num_tokens:,} tokens"
           f"{f' | {len(val_loader.files)} val shard(s)' if val_loader else ' | no validation'} | tokenizer "
           f"{tokenizer.describe()}{f' ({tokenizer_source})' if prepared is None else ''}")
    print0(f"batch: {B} x {T} x {world_size} rank(s) x {grad_accum_steps} micro steps = {total_batch_size:,} "
           f"tokens/step | {num_iterations} steps | lr {args.learning_rate:g}, warmup {args.warmup_iters}, "
           f"decay to x{args.learning_rate_decay_frac:g}")

    # ---- evaluation, samples, checkpoints ----
    results = {"val_loss": None, "hellaswag": None}

    def evaluate(step):
        if val_loader is not None:
            model.eval()
            val_loader.reset()
            total = torch.zeros((), device=device, dtype=torch.float32)
            with torch.no_grad():
                for _ in progress(range(args.val_max_steps), "val", master):
                    x, y = val_loader.next_batch()
                    _, loss = model(x.to(device), y.to(device), return_logits=False)
                    total += loss.float()
            total /= args.val_max_steps
            if ddp:
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                total /= world_size
            model.train()
            results["val_loss"] = total.item()
            print0(f"step {step:{width}d}/{num_iterations} | val loss {results['val_loss']:.4f}")
            log.write(type="val", step=step, val_loss=results["val_loss"])
        if hellaswag_path is not None:
            from pyllmc.hellaswag import evaluate as hellaswag_evaluate
            max_examples = None if args.hellaswag_max_examples < 0 else args.hellaswag_max_examples
            result = hellaswag_evaluate(raw_model, str(hellaswag_path), device=device, max_examples=max_examples,
                                        rank=rank, world_size=world_size, progress=master, tokenizer=tokenizer,
                                        vocab_size=config.vocab_size)
            results["hellaswag"] = result
            print0(f"step {step:{width}d}/{num_iterations} | HellaSwag acc_norm {result['acc_norm']:.4f} "
                   f"(acc {result['acc']:.4f}, n={result['n']})")
            log.write(type="hellaswag", step=step, **result)

    def sample(step):
        if not master:
            return
        devices = [torch.device(device)] if device_type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # belt and braces: the training RNG never moves
            generator = torch.Generator(device=device).manual_seed(args.seed + step)
            prompt = torch.full((1, 1), tokenizer.start_token, dtype=torch.long, device=device)
            top_k = args.sample_top_k if args.sample_top_k > 0 else None
            tokens = raw_model.generate(prompt, args.sample_length, temperature=1.0, top_k=top_k, generator=generator)
        ids = tokens[0, 1:].tolist()
        if tokenizer.modality == "text":
            text = tokenizer.decode(ids)
            print0(f"---- sample at step {step} ----\n{text}\n----")
            log.write(type="sample", step=step, text=text)
        else:  # audio: a file in the output directory (pyllmc.audio writes WAV)
            path = tokenizer.write_sample(ids, output_dir / f"sample_{step:08d}.wav")
            print0(f"step {step:{width}d}/{num_iterations} | sample: {len(ids):,} tokens written to {path}")
            log.write(type="sample", step=step, path=str(path), tokens=len(ids))

    def save(step):
        # every rank contributes its own data-loader position and RNG state (and, with ZeRO-1, its optimizer shard)
        mine = {
            "train_loader": train_loader.state_dict(),
            "val_loader": val_loader.state_dict() if val_loader is not None else None,
            "rng": checkpoint.rng_state(),
        }
        shard = optimizer.state_dict() if (zero and optimizer is not None) else None
        if ddp:
            gathered = [None] * world_size if master else None
            dist.gather_object((mine, shard), gathered, dst=0)
        else:
            gathered = [(mine, shard)]
        if master:
            state = {
                "model_config": model_config_dict(raw_model),
                "model": raw_model.state_dict(),
                "optimizer": [s for _, s in gathered] if zero else optimizer.state_dict(),
                "ranks": [m for m, _ in gathered],
                "outliers": {"loss": loss_outliers.state_dict(), "norm": norm_outliers.state_dict()},
                "args": vars(args),
                # what --resume 1 continues with: the flags, with "auto"s decided and paths absolute
                "settings": run_settings(args, model=model_spec, dtype=dtype_name, corpus=corpus_name),
                "world_size": world_size,
                "zero_stage": args.zero_stage,
                "tokens_seen": step * total_batch_size,
                "tokenizer": tokenizer.spec(),  # what the ids mean: a resume or decode with another is refused
            }
            path = checkpoint.save_checkpoint(output_dir, step, state, keep_last=args.keep_checkpoints)
            if args.write_llmc:  # atomic, with its sha256 in model_<step>.bin.sha256
                from pyllmc.llmc import write_model
                write_model(str(output_dir / f"model_{step:08d}.bin"), raw_model, dtype=dtype_name)
            if args.write_hf:
                raw_model.save_pretrained(str(output_dir / f"hf_{step:08d}"))
            prune_exports(output_dir, args.keep_checkpoints)
            print0(f"step {step:{width}d}/{num_iterations} | checkpoint {path}")
            log.write(type="checkpoint", step=step, path=str(path))
        if ddp:
            dist.barrier()

    def accumulate_gradients():
        """fwd + bwd of grad_accum_steps micro batches; with several ranks the gradients come out
        averaged over them (each bucket reduced while the last backward goes on). Returns the
        step's mean loss, a device scalar."""
        loss_accum = torch.zeros((), device=device, dtype=torch.float32)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if buckets is not None and micro_step == grad_accum_steps - 1:
                buckets.arm()
            # inplace_backward: the fused classifier writes dloss/dlogits over the logits during the
            # forward (llm.c's trick), so the (B, T, V) gradient needs no memory of its own; the
            # 1 / grad_accum_steps of the mean is baked into it (no extra pass in backward)
            forward = raw_model if health.capturing else model  # compiled graphs skip the diagnostics' hooks
            _, loss = forward(x, y, return_logits=False, inplace_backward=True, loss_scale=1.0 / grad_accum_steps)
            loss_accum += loss.detach()
            loss.backward()
        if buckets is not None:
            buckets.finish()
            dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)
            loss_accum /= world_size
        return loss_accum

    # ---- training ----
    width = len(str(num_iterations))
    checkpointing = output_dir is not None and args.checkpoint_every >= 0
    step_times, step_mfus = [], []
    skips_in_a_row = 0
    run_start = time.perf_counter()
    # every --diagnostics_every steps: hooks for that step only, one "diagnostics" record, warnings
    health = diagnostics.TrainingDiagnostics(raw_model, optimizer, every=args.diagnostics_every,
                                             loss_scale=1.0 / grad_accum_steps, rank=rank, zero=zero, log=log,
                                             print_fn=print0)
    model.train()
    with pyllmc.backend(backend_name):
        if start_step == 0 and args.val_loss_every > 0:
            evaluate(0)
        step = start_step
        last_sync = time.perf_counter()  # steps are timed from one host sync to the next
        while step < stop_step:
            lr = learning_rate_at(step, args)
            step += 1
            last_step = step == stop_step
            health.begin(step)

            # bad target ids are checked on the device and reported after the step's one sync
            with ops.deferred_target_checks():
                loss_accum = accumulate_gradients()
                norm = gradient_norm(params)
                health.before_update()  # a diagnostics step: gradient statistics (before the clip), weights copied
                loss_value, norm_value = loss_accum.item(), norm.item()  # the step's host sync
            # since the previous sync: the previous step's update, still queued then, and this fwd + bwd
            now = time.perf_counter()
            dt, last_sync = now - last_sync, now

            skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
            if skipped:  # a NaN/inf would poison the parameters and the optimizer's moments
                skips_in_a_row += 1
                print0(f"step {step:{width}d}/{num_iterations} | non-finite loss {loss_value} or grad norm "
                       f"{norm_value}: update skipped")
                if skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"{skips_in_a_row} updates in a row were skipped (non-finite loss or gradients): "
                                       "the run has diverged; lower --learning_rate or resume from an earlier checkpoint")
            else:
                skips_in_a_row = 0
                if args.grad_clip > 0 and norm_value > args.grad_clip:
                    clip_coef = args.grad_clip / (norm_value + 1e-6)
                    torch._foreach_mul_([p.grad for p in params if p.grad is not None], clip_coef)
                if optimizer is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                if zero:  # each parameter's new value comes from the rank that owns it
                    sharded.exchange()
            if buckets is not None:
                buckets.zero_grad()
            else:
                for p in params:
                    p.grad = None

            # ---- report the step ----
            tokens_per_second = total_batch_size / dt
            mfu = raw_model.estimate_mfu(tokens_per_second, device_name, seq_len=T) if device_type == "cuda" else None
            if step > start_step + 1 or stop_step == start_step + 1:  # the first step warms up (and compiles)
                step_times.append(dt)
                if mfu is not None:
                    step_mfus.append(mfu)
            eta = (stop_step - step) * (sum(step_times) / len(step_times) if step_times else dt)
            loss_z, norm_z = loss_outliers.update(loss_value), norm_outliers.update(norm_value)
            record = dict(type="train", step=step, loss=loss_value, lr=lr, norm=norm_value, dt_ms=dt * 1000,
                          tok_per_s=tokens_per_second, mfu=mfu, tokens=step * total_batch_size)
            if skipped:
                record["skipped"] = True
            if loss_z > OUTLIER_ZSCORE or norm_z > OUTLIER_ZSCORE:
                record.update(outlier=True, loss_z=loss_z, norm_z=norm_z)
                print0(f"step {step:{width}d}/{num_iterations} | outlier: loss z-score {loss_z:.1f}, "
                       f"grad norm z-score {norm_z:.1f} (window {OUTLIER_WINDOW})")
            log.write(**record)
            if step % args.log_every == 0 or last_step or step == start_step + 1:
                mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                print0(f"step {step:{width}d}/{num_iterations} | loss {loss_value:.4f} | lr {lr:.2e} | "
                       f"norm {norm_value:.2f} | dt {dt * 1000:.1f}ms | tok/s {tokens_per_second:,.0f} | "
                       f"MFU {mfu_text} | ETA {format_duration(eta)}")
            health.end(updated=not skipped, prefix=f"step {step:{width}d}/{num_iterations}")

            # ---- evaluate, sample, checkpoint (not counted in the next step's time) ----
            evaluating = last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0)
            sampling = args.sample_every >= 0 and (last_step or (args.sample_every > 0 and step % args.sample_every == 0))
            saving = checkpointing and (last_step or (args.checkpoint_every > 0 and step % args.checkpoint_every == 0))
            if evaluating:
                evaluate(step)
            if sampling:
                sample(step)
            if saving:
                save(step)
            if evaluating or sampling or saving:
                last_sync = time.perf_counter()

    # ---- summary ----
    elapsed = time.perf_counter() - run_start
    trained = step - start_step
    mean_dt = sum(step_times) / len(step_times) if step_times else float("nan")
    summary = dict(type="summary", step=step, steps_this_run=trained, tokens_seen=step * total_batch_size,
                   time_s=elapsed, train_time_s=sum(step_times), mean_tok_per_s=total_batch_size / mean_dt,
                   mean_mfu=sum(step_mfus) / len(step_mfus) if step_mfus else None,
                   final_val_loss=results["val_loss"],
                   hellaswag_acc_norm=results["hellaswag"]["acc_norm"] if results["hellaswag"] else None,
                   peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                    if torch.device(device).type == "cuda" else None))
    log.write(**summary)
    mfu_text = f"{100 * summary['mean_mfu']:.1f}%" if summary["mean_mfu"] is not None else "n/a"
    print0(f"done{' (stopped early: continue with --resume 1)' if stop_step < num_iterations else ''}: "
           f"step {step}/{num_iterations}, {trained} steps this run, {summary['tokens_seen']:,} tokens seen, "
           f"{format_duration(elapsed)}")
    val_text = f"final val loss {results['val_loss']:.4f}" if results["val_loss"] is not None else "no validation"
    memory_text = (f" | peak GPU memory {summary['peak_memory_gib']:.2f} GiB"
                   if summary["peak_memory_gib"] is not None else "")
    print0(f"  mean tok/s {summary['mean_tok_per_s']:,.0f} | mean MFU {mfu_text} | {val_text}{memory_text}")
    if results["hellaswag"]:
        print0(f"  HellaSwag acc_norm {results['hellaswag']['acc_norm']:.4f} (acc {results['hellaswag']['acc']:.4f}, "
               f"n={results['hellaswag']['n']})")


def prune_exports(output_dir, keep):
    """Keep the newest `keep` llm.c model files (with their .sha256) and HF directories, like the checkpoints."""
    if keep <= 0:
        return
    import shutil
    for pattern in ("model_*.bin", "hf_*"):
        for old in sorted(output_dir.glob(pattern))[:-keep]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
