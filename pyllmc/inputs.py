"""What a train_gpt2.py run starts from: its token shards, the tokenizer that says what their ids
mean, and the model's first weights; each found, built and checked against the others here,
before training, with a ConfigError that says what to change.

  find_data       the training / validation shards: --input_bin / --input_val_bin, or the
                  built-in --corpus prepared in the user cache (pyllmc.corpus) by rank 0; and the
                  tokenizer: the corpus's, or what the shards' manifest declares, or --tokenizer.
  starting_point  where the weights come from: the checkpoint --resume 1 continues, or --model.
  starting_model  the model: resumed from a checkpoint, a preset at random (the tokenizer's ids,
                  or --vocab_size), or weights from a checkpoint, an llm.c file or a Hugging Face
                  directory; with the tokenizer its weights were trained with, when recorded.
  check_model     the model against the settings and the tokenizer.
  make_loaders    the data loaders, and check_data: every id of the shards fits the model, the
                  model's ids the tokenizer, HellaSwag can be encoded, samples have somewhere to go.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pyllmc import checkpoint, corpus, models
from pyllmc import tokenizer as tokenizers
from pyllmc.data import DistributedDataLoader, ShardFormatError, declared_tokenizer, shard_info
from pyllmc.model import GPT
from pyllmc.settings import DEMO_TRIM_VOCAB, ConfigError

PRESET_HELP = models.PRESET_HELP


# -----------------------------------------------------------------------------
# data and its tokenizer

@dataclass
class Data:
    train_pattern: str               # --input_bin, or the corpus's train shard
    val_pattern: str                 # "" for no validation
    tokenizer: tokenizers.Tokenizer
    tokenizer_source: str            # where the tokenizer choice came from (printed)
    prepared: Optional[corpus.Prepared]  # the built-in corpus, when training on it
    corpus_name: str                 # --corpus with "auto" decided (what the checkpoint records)

    def describe(self) -> str:
        return self.prepared.description if self.prepared is not None else f"--input_bin {self.train_pattern}"


def find_data(args, process, weights_tokenizer: Optional[dict], say) -> Data:
    """The run's shards and tokenizer. weights_tokenizer: the spec the starting weights recorded (a resume,
    --model CKPT), which a built-in corpus is tokenized with under --tokenizer auto."""
    master, ddp = process.master, process.ddp
    cpu_demo = args.model == "auto" and process.device_type == "cpu"
    prepared = None
    if args.input_bin:
        train_pattern, val_pattern = args.input_bin, args.input_val_bin
    else:  # the --corpus, prepared in the user cache by rank 0; the other ranks share its result
        box = [None, None]
        if master:
            try:
                box[0] = prepare_corpus(args, corpus_tokenizer(args, cpu_demo, weights_tokenizer), say)
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
    corpus_name = prepared.corpus if prepared is not None and args.corpus == "auto" else args.corpus
    return Data(train_pattern, val_pattern, tokenizer, tokenizer_source, prepared, corpus_name)


def corpus_tokenizer(args, cpu_demo: bool, recorded: Optional[dict] = None) -> Optional[int]:
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


def prepare_corpus(args, trim_vocab: Optional[int], say) -> corpus.Prepared:
    """The built-in corpus's shards (pyllmc.corpus: the user cache), or ConfigError saying what to do."""
    try:
        return corpus.prepare(args.corpus, trim_vocab=trim_vocab, say=say)
    except corpus.CorpusUnavailable as err:
        raise ConfigError(f"{err}\n  Or pass your own shards with --input_bin/--input_val_bin.") from err
    except ValueError as err:  # e.g. a trimmed vocabulary that cannot be made
        raise ConfigError(f"--corpus {args.corpus}: {err}") from err


def shard_tokenizer(args, files: list) -> tuple[tokenizers.Tokenizer, str]:
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
    if all(shard_info(f)[1].itemsize == 2 for f in files):
        return tokenizers.GPT2Tokenizer(), "no manifest declares one: GPT-2 for uint16 shards"
    return tokenizers.TokenIds(), "no manifest declares one: samples are shown as token ids"


def check_files_exist(pattern: str, flag: str) -> None:
    if not glob.glob(pattern):
        raise ConfigError(f"no file matches {flag} {pattern!r}: check the path, or prepare the data first "
                          f"(e.g. python dev/data/tinyshakespeare.py, python dev/data/fineweb.py)")


def hellaswag_file(args, legacy: Optional[Path] = None) -> Optional[Path]:
    """The HellaSwag jsonl --hellaswag asks for (None: off). --hellaswag 1 without --hellaswag_path looks in
    $PYLLMC_DATA_DIR, then where dev/data/hellaswag.py writes it (pyllmc.corpus.hellaswag_path(), the user
    cache), then at `legacy` (where that script wrote it before: dev/data/hellaswag/ in the checkout)."""
    if args.hellaswag in ("0", "", "false", "False"):
        return None
    if args.hellaswag not in ("1", "true", "True"):
        path = Path(args.hellaswag)
    elif args.hellaswag_path:
        path = Path(args.hellaswag_path)
    else:
        candidates = [corpus.hellaswag_path(), *([legacy] if legacy is not None else [])]
        if os.environ.get("PYLLMC_DATA_DIR"):
            candidates = sorted(Path(os.environ["PYLLMC_DATA_DIR"]).glob("hellaswag_val*.jsonl")) + candidates
        path = next((p for p in candidates if p.exists()), corpus.hellaswag_path())
    if not path.exists():
        raise ConfigError(f"HellaSwag file {path} not found: write it with python dev/data/hellaswag.py "
                          f"(--input a local copy when offline), pass --hellaswag PATH, or --hellaswag 0")
    return path


# -----------------------------------------------------------------------------
# the model

def is_training_checkpoint(spec: str) -> bool:
    """A --model that names a checkpoint of train_gpt2.py (not an llm.c .bin, not a directory)."""
    path = Path(spec)
    return not spec.startswith("hf:") and path.is_file() and path.suffix != ".bin"


def load_training_checkpoint(spec: str) -> dict:
    try:
        return checkpoint.load_checkpoint(spec)
    except ValueError as err:
        raise ConfigError(f"--model {spec}: {err}") from err


@dataclass
class Start:
    """Where the weights come from: the --model spec ("auto" decided) and, when they come from a training
    checkpoint (the resumed run's, or --model CKPT's), its state, loaded once."""
    spec: str
    state: Optional[dict] = None
    path: Optional[Path] = None   # the checkpoint's file
    resumed: bool = False         # --resume 1 continues the run of `state`

    @property
    def tokenizer(self) -> Optional[dict]:
        """The spec of the tokenizer the checkpoint's weights were trained with (None: unknown or none)."""
        return checkpoint.recorded_tokenizer(self.state) if self.state is not None else None


def starting_point(spec: str, resume: Optional[tuple[dict, Path]]) -> Start:
    """The weights' origin: the checkpoint --resume 1 found, else --model `spec` (loaded when a checkpoint)."""
    if resume is not None:
        return Start(spec, *resume, resumed=True)
    if is_training_checkpoint(spec):
        return Start(spec, load_training_checkpoint(spec), Path(spec))
    return Start(spec)


def starting_model(start: Start, args, tokenizer) -> tuple[torch.nn.Module, str, bool]:
    """(model on the CPU in float32, where it came from, whether it is a new model at random), checked
    against the settings and the tokenizer (check_model)."""
    if start.resumed:
        model = models.from_checkpoint(start.state)
        source, recorded, from_scratch = f"resumed from {start.path} (step {start.state['step']})", start.tokenizer, \
            False
    else:
        from_scratch = start.spec in models.PRESETS
        # a new model has the tokenizer's ids unless --vocab_size says otherwise
        vocab_size = (args.vocab_size if args.vocab_size > 0 else tokenizer.vocab_size) if from_scratch else None
        model, source, recorded = build_model(start.spec, args.seed, vocab_size, state=start.state)
    check_model(args, model.config, source, recorded, tokenizer)
    return model, source, from_scratch


def build_model(spec: str, seed: int, vocab_size: Optional[int] = None, state: Optional[dict] = None):
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
        model = models.from_pretrained(str(path))
        return model, f"weights from {path}", gpt2_if_its_vocabulary(model)
    if path.is_file() and path.suffix == ".bin":
        from pyllmc.llmc import read_model
        try:
            model = read_model(str(path))
        except ValueError as err:  # not an llm.c model file, or its sha256 sidecar disagrees
            raise ConfigError(f"--model {spec}: {err}") from err
        return model, f"weights from llm.c file {path}", gpt2_if_its_vocabulary(model)
    if path.is_file():  # a training checkpoint of train_gpt2.py
        state = state if state is not None else load_training_checkpoint(spec)
        model = models.from_checkpoint(state)
        return model, f"weights from checkpoint {path} (step {state['step']})", checkpoint.recorded_tokenizer(state)
    if spec not in models.PRESETS:
        raise ConfigError(f"--model {spec!r} is neither an existing path nor a preset ({PRESET_HELP})")
    try:
        model = models.from_preset(spec, seed=seed, vocab_size=vocab_size)
    except ValueError as err:  # a bad --vocab_size
        raise ConfigError(f"--vocab_size {vocab_size}: {err}") from err
    return model, f"preset {spec}, random init (seed {seed})", None


def check_model(args, config, source: str, recorded: Optional[dict], tokenizer) -> None:
    """The model against the settings: --vocab_size, the tokenizer its weights learned, the block size."""
    if args.vocab_size > 0 and config.vocab_size != args.vocab_size:
        raise ConfigError(f"--vocab_size {args.vocab_size}: the model ({source}) has {config.vocab_size} token ids "
                          f"(--vocab_size sizes a new model)")
    if recorded is not None:  # resume, continue or decode only with the tokenizer the weights learned
        try:
            tokenizers.check_same(recorded, tokenizer, f"the model ({source})")
        except tokenizers.TokenizerMismatchError as err:
            raise ConfigError(str(err)) from None
    if models.family_of(config) == "llama" and args.write_llmc:
        raise ConfigError("--write_llmc writes llm.c's GPT-2 files; a Llama's weights go to llama2.c's format with "
                          "python -m pyllmc.llama2c export CKPT.pt model.bin (or --write_hf 1)")
    if args.sequence_length > config.block_size:
        raise ConfigError(f"--sequence_length {args.sequence_length} is longer than the model's block_size "
                          f"{config.block_size}: use --sequence_length {config.block_size} or less")


# -----------------------------------------------------------------------------
# loaders, and the checks that need them

def make_loaders(data: Data, args, process):
    """(train loader, val loader or None: no validation shards, or --val_max_steps 0); `process` is
    pyllmc.distributed's Process (each rank reads its own part of every batch)."""
    B, T, verify = args.batch_size, args.sequence_length, bool(args.verify_shards)
    rank, world_size = process.rank, process.world_size
    train_loader = make_loader(data.train_pattern, B, T, rank, world_size, "--input_bin",
                               pin_memory=process.device_type == "cuda", verify=verify)
    val_loader = None
    if data.val_pattern and args.val_max_steps > 0:
        val_loader = make_loader(data.val_pattern, B, T, rank, world_size, "--input_val_bin", verify=verify)
    return train_loader, val_loader


def make_loader(pattern, B, T, rank, world_size, flag, pin_memory=False, verify=True) -> DistributedDataLoader:
    try:
        return DistributedDataLoader(pattern, B, T, rank=rank, world_size=world_size, pin_memory=pin_memory,
                                     verify=verify)
    except FileNotFoundError as err:
        raise ConfigError(f"{flag}: {err}") from err
    except ValueError as err:  # a shard smaller than one global batch, a malformed or damaged shard
        raise ConfigError(f"{flag}: {err}") from err


def check_data(args, loaders: list, config, tokenizer, from_scratch: bool,
               hellaswag_path: Optional[Path]) -> None:
    """Before training: the shards' ids against the model (check_vocabulary), HellaSwag against the
    tokenizer, and a place for samples that are files."""
    # shards carry no vocabulary size: the largest id they hold must fit the model, the model's the tokenizer
    check_vocabulary(loaders, config, tokenizer, from_scratch)
    if hellaswag_path is not None:  # HellaSwag is text, encoded with the run's own tokenizer
        from pyllmc.hellaswag import check_tokenizer as check_hellaswag_tokenizer
        try:
            check_hellaswag_tokenizer(tokenizer, config.vocab_size)
        except ValueError as err:
            raise ConfigError(f"--hellaswag {args.hellaswag}: {err}") from None
    if tokenizer.modality != "text" and args.sample_every >= 0 and not args.output_dir:
        raise ConfigError(f"samples of {tokenizer.describe()} are written as files into --output_dir: give one "
                          f"(or --sample_every -1)")


def check_vocabulary(loaders: list, config, tokenizer, from_scratch: bool) -> None:
    """Every token id of the shards fits the model, and the model's ids the tokenizer."""
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
