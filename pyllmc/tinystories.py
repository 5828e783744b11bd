"""TinyStories as llm.c token shards of a sentencepiece vocabulary trained on it: llama2.c's recipe.

The code of dev/data/tinystories.py (main() here; `python -m pyllmc.tinystories` from an installed copy).
Three steps, as llama2.c's tinystories.py (download, train_vocab, pretokenize):

  1. The stories. By default the canonical archive, TinyStories_all_data.tar.gz from the dataset's
     Hugging Face repository (TINYSTORIES_URL, the address llama2.c downloads; 50 JSON files
     data00.json .. data49.json, each a list of {"story": ...}), is downloaded into pyllmc's user cache
     and unpacked there. --input takes a local copy instead: that archive, a folder of its JSON files
     (or of .txt files), one .json file, or a .txt file of stories separated by lines
     "<|endoftext|>" (TinyStoriesV2-GPT4-train.txt) or, without that marker, by blank lines.
     The JSON files are read in sorted name order; each story is stripped of surrounding whitespace.
  2. The tokenizer: a BPE vocabulary of --vocab_size ids trained with sentencepiece on the stories of
     the first --vocab_files input files (default 10, llama2.c's choice: a fifth of TinyStories, more
     than enough text for 4,096 pieces; with one .txt file, all of it), with llama2.c's options
     (pyllmc.sentencepiece_tokenizer); or a given one (--tokenizer tok4096.model). Written beside the
     shards as tok<N>.model and as llama2.c's tok<N>.bin (run.c's tokenizer.bin).
     Default 4,096 ids: llama2.c's example of a custom vocabulary: whole common words as single tokens,
     with a classifier 8x smaller than over Llama 2's 32,000 ids (the classifier is most of a small
     model's work). --vocab_size 512 is what llama2.c's smallest model (stories260K) uses.
  3. The shards: every story becomes BOS followed by its tokens (as llama2.c's pretokenize stores it);
     the stories are concatenated in order and cut into shards of --shard_size tokens (a story may run on
     into the next shard), uint16, shard 0 the validation split:
        tinystories_val_000000.bin, tinystories_train_000001.bin, ...
     and tinystories_manifest.json: each shard's token count, sha256 and largest id, and the tokenizer's
     spec (pyllmc.data.declared_tokenizer), so the trainer refuses shards of another tokenizer.
     Shard size: 10M tokens for the full dataset (about fifty shards); for --input, by default about a
     tenth of the input (its characters counted, four per token), so that small inputs still make a
     validation shard and several training shards.

Where: pyllmc's user cache (pyllmc.corpus.cache_dir), never the source tree:
    <cache>/data/tinystories/TinyStories_all_data.tar.gz, TinyStories_all_data/   the download, unpacked
    <cache>/data/tinystories/tok4096/            the shards, tok4096.model, tok4096.bin, the manifest
    <cache>/data/tinystories-<input name>-<12 hex digits>/tok4096/     the same for --input
(a given .tar.gz is unpacked into <cache>/data/tinystories-<name>-<hash>/json/); --output_dir chooses the
shards' folder. A finished folder is reused when the same command runs again (its shards checked
against the manifest's sha256); other settings or input in that folder need --overwrite.

    python dev/data/tinystories.py                                   # download, vocabulary of 4,096, shards
    python dev/data/tinystories.py --vocab_size 512
    python dev/data/tinystories.py --input TinyStories_all_data.tar.gz
    python dev/data/tinystories.py --input stories.txt --vocab_size 1024 --output_dir data/stories
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from pyllmc.corpus import data_cache_dir
from pyllmc.data import ShardFormatError, shard_digest, write_shard_entry
from pyllmc.fineweb import produce_shards, shard_name
from pyllmc.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer, write_llama2c_tokenizer

TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
ARCHIVE_NAME = "TinyStories_all_data.tar.gz"
PREFIX = "tinystories"
MANIFEST_FORMAT = 1
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_VOCAB_FILES = 10  # llama2.c trains its vocabularies on the first 10 of the 50 JSON files
FULL_SHARD_SIZE = 10**7
LOCAL_SHARDS, CHARS_PER_TOKEN, MIN_SHARD = 10, 4, 1000
EOT_MARKER = "<|endoftext|>"
ENCODE_BATCH = 1024  # stories per call of sentencepiece's threaded encoder
DOWNLOAD_TIMEOUT_S = 60


class TinyStoriesError(ValueError):
    """The input cannot be read as stories, or the settings do not fit it; the message says why."""


# ---------------------------------------------------------------------------------------------
# the stories


def download(folder: Path | None = None, say=print) -> Path:
    """The TinyStories archive in `folder` (default <cache>/data/tinystories), downloaded on first use
    to a temporary name and renamed when complete, then unpacked beside it; returns the folder of JSON
    files. OSError (urllib.error.URLError) when it cannot be fetched."""
    folder = Path(folder) if folder is not None else data_cache_dir() / "tinystories"
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / ARCHIVE_NAME
    if not archive.is_file():
        say(f"downloading {TINYSTORIES_URL} to {archive}")
        part = archive.with_name(archive.name + ".part")
        with urllib.request.urlopen(TINYSTORIES_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if done >= next_report:
                    say(f"  {done / 2**20:,.0f} MiB" + (f" of {total / 2**20:,.0f} MiB" if total else ""))
                    next_report += 100 << 20
        part.replace(archive)
    return unpack(archive, folder / archive.name.removesuffix(".tar.gz"), say)


def unpack(archive: Path, folder: Path, say=print) -> Path:
    """The .json members of a .tar.gz, by their base names, into `folder` (skipped when a previous unpack
    finished: a marker file records it); returns the folder."""
    done = folder / ".unpacked"
    if done.is_file():
        return folder
    say(f"unpacking {archive} into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with tarfile.open(archive, "r|gz") as tar:  # streamed: one pass over the archive
            for member in tar:
                name = Path(member.name).name
                if not (member.isfile() and name.endswith(".json")) or name.startswith("."):
                    continue
                with tar.extractfile(member) as src, open(folder / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TinyStoriesError(f"cannot unpack {archive} ({type(e).__name__}: {e}): a damaged or partial "
                               f"download? Delete it and run again") from e
    if not count:
        raise TinyStoriesError(f"{archive} holds no .json files: not the TinyStories archive")
    done.write_text(f"{count} files\n")
    return folder


def input_files(path: Path) -> list[Path]:
    """The files of the input, in order: a folder's .json files (else its .txt files), sorted by path."""
    if path.is_dir():
        for suffix in (".json", ".txt"):
            found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith("."))
            if found:
                return found
        raise TinyStoriesError(f"no .json or .txt files in folder {path}")
    if not path.is_file():
        raise TinyStoriesError(f"input {path} does not exist")
    if path.suffix not in (".json", ".txt"):
        raise TinyStoriesError(f"{path}: unsupported input (expected TinyStories' .tar.gz, a folder of its .json "
                               f"files, a .json file or a .txt file of stories)")
    return [path]


def split_stories(text: str) -> list[str]:
    """Stories of a text file: separated by lines "<|endoftext|>" when the text has them, else by blank lines."""
    parts = text.split(EOT_MARKER) if EOT_MARKER in text else re.split(r"\n[ \t\r]*\n", text)
    return [p.strip() for p in parts if p.strip()]


def file_stories(path: Path) -> list[str]:
    """The stories of one input file, each stripped (llama2.c strips them before encoding)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TinyStoriesError(f"cannot read {path} as UTF-8 text ({type(e).__name__}: {e})") from e
    if path.suffix == ".txt":
        return split_stories(text)
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise TinyStoriesError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise TinyStoriesError(f"{path}: expected a JSON list of stories (objects with a \"story\"), "
                               f"got a {type(rows).__name__}")
    stories = []
    for i, row in enumerate(rows):
        story = row.get("story") if isinstance(row, dict) else row
        if not isinstance(story, str):
            raise TinyStoriesError(f"{path}: item {i} is not a story (expected an object with a string "
                                   f"\"story\", or a string), got {str(row)[:80]!r}")
        if story.strip():
            stories.append(story.strip())
    return stories


def iter_stories(files):
    for path in files:
        yield from file_stories(path)


# ---------------------------------------------------------------------------------------------
# the shards


def _manifest_text(manifest: dict) -> str:
    shards = ",\n".join("  " + json.dumps(s) for s in manifest["shards"])
    return (f'{{\n "config": {json.dumps(manifest["config"])},\n "complete": {json.dumps(manifest["complete"])},\n'
            f' "tokenizer": {json.dumps(manifest["tokenizer"])},\n "shards": [\n{shards}\n ]\n}}\n')


def _save_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(_manifest_text(manifest))
    tmp.replace(path)


def _finished(out: Path, config: dict) -> dict | None:
    """The manifest of a finished run with this config whose shards are all intact, else None;
    TinyStoriesError when the folder holds another run's shards."""
    path = out / f"{PREFIX}_manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        recorded = manifest["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != config:
        raise TinyStoriesError(f"{out} holds shards made with other settings or input (see {path}): pass "
                               f"--overwrite to replace them, or choose another --output_dir")
    if not manifest.get("complete"):
        return None
    for entry in manifest["shards"]:
        try:
            if shard_digest(out / entry["file"]) != (entry["sha256"], entry["max_token_id"]):
                return None
        except (ShardFormatError, OSError, KeyError):
            return None
    return manifest


def local_shard_size(files) -> int:
    """About a tenth of the input's tokens (its characters / 4), two significant digits, at most
    FULL_SHARD_SIZE; TinyStoriesError when that is under MIN_SHARD tokens."""
    chars = sum(len(s) for s in iter_stories(files))
    size = min(FULL_SHARD_SIZE, chars // CHARS_PER_TOKEN // LOCAL_SHARDS)
    size -= size % 10 ** max(0, len(str(size)) - 2)
    if size < MIN_SHARD:
        need = MIN_SHARD * CHARS_PER_TOKEN * LOCAL_SHARDS
        raise TinyStoriesError(f"the input holds {chars:,} characters of stories, too few for a validation shard "
                               f"and training shards of {MIN_SHARD:,} tokens (about {need:,} characters); give "
                               f"more stories, or choose the tokens per shard with --shard_size")
    return size


def tokenized(files, tok: SentencePieceTokenizer, num_threads: int, counts: dict | None = None):
    """Each story's tokens, BOS first, as uint16 arrays, in order (counts["stories"] counts them)."""
    batch = []
    counts = {} if counts is None else counts
    counts["stories"] = 0

    def flush():
        counts["stories"] += len(batch)
        for ids in tok.encode_batch(batch, num_threads=num_threads):
            yield np.asarray([tok.bos] + ids, dtype=np.uint16)
        batch.clear()

    for story in iter_stories(files):
        batch.append(story)
        if len(batch) == ENCODE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def prepare(files: list[Path], out: Path, vocab_size: int | None = DEFAULT_VOCAB_SIZE, tokenizer_path=None,
            vocab_files: int = DEFAULT_VOCAB_FILES, shard_size: int | None = None, num_threads: int = 0,
            overwrite: bool = False, source: dict | None = None, say=print) -> dict:
    """Steps 2 and 3 of the module's docstring on the stories of `files` into folder `out`; returns the
    manifest (a finished identical run's, when there is one)."""
    if tokenizer_path is None and (vocab_size is None or vocab_size < 1):
        raise TinyStoriesError("give a vocab_size to train a tokenizer, or a tokenizer .model file")
    if vocab_files < 1:
        raise TinyStoriesError(f"vocab_files must be at least 1, got {vocab_files}")
    if shard_size is not None and shard_size < 1:
        raise TinyStoriesError(f"shard_size must be positive, got {shard_size}")
    given = SentencePieceTokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    if given is not None and given.vocab_size > 1 << 16:
        raise TinyStoriesError(f"tokenizer {tokenizer_path} has {given.vocab_size:,} ids: the shards hold uint16 ids "
                               f"(at most 65,536)")
    if given is not None and given.bos < 0:
        raise TinyStoriesError(f"tokenizer {tokenizer_path} has no BOS piece, which separates the stories")
    shard_size = shard_size or local_shard_size(files)
    source = source or {"files": [[p.name, p.stat().st_size] for p in files]}
    config = {"format": MANIFEST_FORMAT, "source": source, "shard_size": shard_size, "document": "BOS + tokens",
              "tokenizer": ({"given": given.fingerprint} if given is not None
                            else {"train": vocab_size, "vocab_files": vocab_files})}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / f"{PREFIX}_manifest.json"
    if overwrite and manifest_path.exists():
        manifest_path.unlink()
    found = _finished(out, config)
    if found is not None:
        say(f"already prepared in {out} (its {len(found['shards'])} shards match {manifest_path.name})")
        return found

    if given is None:
        train_on = files[:vocab_files]
        say(f"training a {vocab_size:,}-id sentencepiece BPE vocabulary on the stories of {len(train_on)} file(s)")
        try:
            tok = train_tokenizer(iter_stories(train_on), vocab_size, num_threads=num_threads or None)
        except ValueError as e:
            raise TinyStoriesError(str(e)) from e
    else:
        tok = given
    model_path = tok.save(out / f"tok{tok.vocab_size}.model")
    bin_path = write_llama2c_tokenizer(tok, out / f"tok{tok.vocab_size}.bin")
    say(f"tokenizer {tok.describe()}: {model_path}, llama2.c's {bin_path.name}")
    for old in out.glob(f"{PREFIX}_*.bin"):  # shards of an unfinished or replaced run
        old.unlink()

    manifest = {"config": config, "complete": False, "tokenizer": tok.spec(), "shards": []}
    counts: dict = {}
    stream = tokenized(files, tok, num_threads, counts)
    for index, (tokens, _) in enumerate(produce_shards(stream, [0, 0], shard_size, 0)):
        manifest["shards"].append(write_shard_entry(out / shard_name(PREFIX, index), tokens))
        _save_manifest(manifest_path, manifest)
    total = sum(s["tokens"] for s in manifest["shards"])
    if len(manifest["shards"]) < 2:
        raise TinyStoriesError(f"the stories made {total:,} tokens, {len(manifest['shards'])} shard(s) of "
                               f"--shard_size {shard_size:,}: training needs a validation shard (shard 0) and a "
                               f"training shard; pass --shard_size {max(1, total // 2):,} or less, or more stories")
    manifest["complete"] = True
    _save_manifest(manifest_path, manifest)
    say(f"{len(manifest['shards'])} shards, {total:,} tokens of {counts['stories']:,} stories in {out} "
        f"(shard 0 = val; {total / counts['stories']:,.1f} tokens per story, BOS included)")
    return manifest


def default_output_dir(input_path: Path | None, vocab_label: str) -> Path:
    if input_path is None:
        return data_cache_dir() / "tinystories" / vocab_label
    stat = input_path.stat()
    digest = hashlib.sha256(json.dumps([str(input_path.resolve()), stat.st_size]).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", input_path.name.split(".")[0])[:40] or "input"
    return data_cache_dir() / f"tinystories-{stem}-{digest}" / vocab_label


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="local TinyStories: the .tar.gz, a folder of its .json files, a "
                                                   ".json or a .txt file (default: download the archive)")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"ids of the vocabulary to train (default {DEFAULT_VOCAB_SIZE}; llama2.c also uses 512)")
    parser.add_argument("--tokenizer", type=Path, help="use this sentencepiece .model instead of training one")
    parser.add_argument("--vocab_files", type=int, default=DEFAULT_VOCAB_FILES,
                        help=f"train the vocabulary on the first N input files (default {DEFAULT_VOCAB_FILES}, "
                             f"llama2.c's)")
    parser.add_argument("--shard_size", type=int, default=None,
                        help=f"tokens per shard (default {FULL_SHARD_SIZE:,} for the download; about a tenth "
                             f"of --input)")
    parser.add_argument("--output_dir", type=Path, help="where the shards go (default: pyllmc's user cache)")
    parser.add_argument("--num_threads", type=int, default=0,
                        help="threads for training and encoding (0: every core)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    args = parser.parse_args(argv)
    if args.num_threads < 0:
        parser.error("--num_threads must be >= 0")
    label = f"tok{args.vocab_size}" if args.tokenizer is None else f"tok-{args.tokenizer.stem}"
    try:
        if args.input is None:
            try:
                folder = download()
            except (urllib.error.URLError, OSError) as e:
                sys.exit(f"could not download TinyStories from {TINYSTORIES_URL} ({getattr(e, 'reason', e)}).\n"
                         f"  Offline? Give a local copy with --input (the .tar.gz, its .json files, or a .txt file)")
            files, source = input_files(folder), {"dataset": TINYSTORIES_URL}
            shard_size = args.shard_size or FULL_SHARD_SIZE
        else:
            path = args.input
            if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
                path = unpack(path, default_output_dir(path, "json"))
            files, source, shard_size = input_files(path), None, args.shard_size
        out = args.output_dir or default_output_dir(args.input, label)
        manifest = prepare(files, out, args.vocab_size, args.tokenizer, args.vocab_files, shard_size,
                           args.num_threads, args.overwrite, source)
    except (TinyStoriesError, ValueError) as e:
        sys.exit(f"error: {e}")
    vocab = manifest["tokenizer"]["vocab_size"]
    train, val = (shlex.quote(str(out / f"{PREFIX}_{split}_*.bin")) for split in ("train", "val"))
    print(f"train on them: --input_bin {train} --input_val_bin {val} (vocabulary: {vocab} ids, "
          f"{out / f'tok{vocab}.model'}; llama2.c's run.c reads {out / f'tok{vocab}.bin'})")
    return manifest


if __name__ == "__main__":
    main()
