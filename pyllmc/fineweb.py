"""FineWeb-Edu (or FineWeb, or local text files) as llm.c token shards of GPT-2 tokens.

The code of dev/data/fineweb.py, which is main() from the source tree; `python -m pyllmc.fineweb`
runs it from an installed copy. Here in the package so that the tests import it as users do and the
tokenising workers can import their function under any start method.

Every document becomes EOT followed by its GPT-2 tokens; the documents are concatenated in
order and cut into shards of exactly --shard_size tokens (the last one may be shorter), a
document running on into the next shard where a cut falls inside it. Shard 0 is the
validation split, the rest training:
    <output_dir>/fineweb_val_000000.bin, fineweb_train_000001.bin, fineweb_train_000002.bin ...
A run needs a validation shard and at least one training shard: input that makes fewer is an error
that says which --shard_size would do. At the end the script prints the train_gpt2.py flags that read
exactly the shards it wrote.

Shard size: 100M tokens (llm.c's) for FineWeb; for --input files, by default about a tenth of the
input, so that small inputs make a validation shard and several training shards: the documents'
characters are counted first (reading is cheap next to tokenising), the tokens estimated at 4
characters per token (GPT-2 on English prose: 4.2-4.5), and a tenth of that rounded down to two
significant digits (at most 100M; input too small for shards of 1,000 tokens is refused).

Where: FineWeb, from dev/data/fineweb.py, goes to dev/data/edu_fineweb10B (llm.c's place;
dev/run_gpt2_124M.sh reads it there), from `python -m pyllmc.fineweb` (an installed copy, no source
tree) to <cache>/data/edu_fineweb10B; --input files by default to pyllmc's user cache, never the
source tree ($PYLLMC_CACHE_DIR, else $XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc;
pyllmc.corpus.cache_dir):
    <cache>/data/fineweb-<first input's name>-<12 hex digits of the input's names and sizes>/
--output_dir chooses another place.
Tokenisation runs in --num_workers processes (documents are handed out in chunks of
--chunksize, results come back in order, so the output does not depend on the worker count).

Sources:
  * default: HuggingFaceFW/fineweb-edu, sample-10BT (--version 100B for sample-100BT,
    --type classic for HuggingFaceFW/fineweb), through the `datasets` library
    (pip install datasets; it downloads and caches the parquet files first);
  * --input PATH [PATH ...]: local files, or folders searched recursively for them:
    .parquet (needs pyarrow), .jsonl, .csv (one document per row, column --text_column,
    default "text"), .txt (one document per file); in the order given, a folder's files
    sorted by path.

Resuming: after each shard is written (atomically: a temporary file renamed into place) the
manifest <prefix>_manifest.json records, for every shard, its token count, its sha256 (computed
as it is written), its largest token id (max_token_id, which the training loader takes instead
of reading the shard at start-up) and where in the document stream it starts and ends. Rerunning
the same command skips every shard whose file is present, has a valid header, the recorded token
count and the recorded sha256; it restarts tokenising at the recorded start of the first shard
that is missing or broken, writes it, and jumps ahead past shards that are fine. So an
interrupted run continues where it stopped, and a deleted or damaged shard is recreated
identically (a manifest from before sha256 or max_token_id were recorded gets them added for the
shards that are valid). A rerun with different settings or different input refuses to mix
shards; pass --overwrite (or use another --output_dir) to start over. The training loader
(pyllmc.data) checks each shard against the manifest's sha256 once per run.

    python dev/data/fineweb.py                                  # FineWeb-Edu 10B, 100M-token shards
    python -m pyllmc.fineweb --input docs.csv                   # the same from an installed pyllmc
    python dev/data/fineweb.py --input docs.csv --output_dir data/docs     # prints the training flags:
    python train_gpt2.py --input_bin 'data/docs/fineweb_train_*.bin' --input_val_bin 'data/docs/fineweb_val_*.bin'
"""

import argparse
import csv
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from pyllmc.corpus import data_cache_dir
from pyllmc.data import MAX_TOKEN_ID, ShardFormatError, read_shard_header, shard_digest, write_shard_entry
from pyllmc.tokenizer import encode_document, get_encoding

MANIFEST_FORMAT = 1
INPUT_SUFFIXES = (".parquet", ".jsonl", ".csv", ".txt")
HF_DATASETS = {"edu": "HuggingFaceFW/fineweb-edu", "classic": "HuggingFaceFW/fineweb"}
FINEWEB_SHARD_SIZE = 10**8  # llm.c's 100M tokens per shard
LOCAL_SHARDS = 10  # --input without --shard_size: shards of about a tenth of the input ...
CHARS_PER_TOKEN = 4  # ... its tokens estimated from its characters (GPT-2 on English prose: 4.2-4.5)
MIN_LOCAL_SHARD = 1000  # ... and refused when that is less than this many tokens


# ----------------------------------------------------------------------------------------
# documents


def list_input_files(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
            if not found:
                sys.exit(f"no {'/'.join(INPUT_SUFFIXES)} files in folder {path}")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                sys.exit(f"{path}: unsupported file type (expected one of {', '.join(INPUT_SUFFIXES)})")
            files.append(path)
        else:
            sys.exit(f"input {path} does not exist")
    return files


def _raise_csv_field_limit():
    # documents are far longer than the csv module's default 128 KiB field limit
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 2


def iter_file_texts(path: Path, column: str):
    """The documents of one local file, in order."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    row = json.loads(line)
                    if column not in row:
                        sys.exit(f"{path}:{line_number}: no field {column!r} (use --text_column)")
                    yield row[column]
    elif path.suffix == ".csv":
        _raise_csv_field_limit()
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                sys.exit(f"{path}: no column {column!r} among {reader.fieldnames} (use --text_column)")
            for row in reader:
                yield row[column]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit("reading .parquet files needs pyarrow: pip install pyarrow")
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=1024):
            yield from batch.column(0).to_pylist()


def open_documents(args, start_doc: int):
    """The document texts from document number start_doc on."""
    if args.input:
        texts = itertools.chain.from_iterable(iter_file_texts(p, args.text_column) for p in args.input_files)
        return itertools.islice(texts, start_doc, None)  # reading is cheap next to tokenising
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("downloading FineWeb needs the datasets library: pip install datasets "
                 "(or pass local files with --input)")
    ds = load_dataset(HF_DATASETS[args.type], name=f"sample-{args.version}T", split="train")
    ds = ds.select_columns([args.text_column])  # skip decoding the metadata columns
    if start_doc:
        ds = ds.select(range(start_doc, len(ds)))

    def texts():
        for batch in ds.iter(batch_size=1024):
            yield from batch[args.text_column]

    return texts()


def local_shard_size(args) -> int:
    """--input without --shard_size: about a tenth of the input's tokens (estimated from its characters),
    rounded down to two significant digits, at most FINEWEB_SHARD_SIZE; SystemExit when the input is too
    small for shards of MIN_LOCAL_SHARD tokens."""
    enough = LOCAL_SHARDS * FINEWEB_SHARD_SIZE * CHARS_PER_TOKEN  # past this the size is the cap: stop counting
    chars = 0
    for text in itertools.chain.from_iterable(iter_file_texts(p, args.text_column) for p in args.input_files):
        chars += len(text)
        if chars >= enough:
            break
    estimate = chars // CHARS_PER_TOKEN
    size = min(FINEWEB_SHARD_SIZE, estimate // LOCAL_SHARDS)
    size -= size % 10 ** max(0, len(str(size)) - 2)
    if size < MIN_LOCAL_SHARD:
        need = MIN_LOCAL_SHARD * LOCAL_SHARDS * CHARS_PER_TOKEN
        sys.exit(f"the input holds {chars:,} characters, about {estimate:,} tokens: too little for a validation shard "
                 f"and training shards of {MIN_LOCAL_SHARD:,} tokens or more (about {need:,} characters); give more "
                 f"documents, or choose the tokens per shard with --shard_size (shard 0 is validation, the rest "
                 f"training: at least two shards)")
    return size


def default_output_dir(args, download_dir: Path | None = None) -> Path:
    """FineWeb: <download_dir>/<edu_fineweb|fineweb><version> (dev/data/fineweb.py passes dev/data, llm.c's
    place), in the user cache's data folder without one; --input files: the user cache, a folder named
    after the first input and a hash of the inputs' names and sizes."""
    if not args.input:
        parent = data_cache_dir() if download_dir is None else Path(download_dir)
        return parent / f"{'edu_fineweb' if args.type == 'edu' else 'fineweb'}{args.version}"
    digest = hashlib.sha256(json.dumps(source_description(args)).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", args.input_files[0].stem)[:40] or "input"
    return data_cache_dir() / f"{args.prefix}-{stem}-{digest}"


def source_description(args) -> dict:
    """What the shards are made from; a rerun must match it to reuse shards."""
    if args.input:
        return {"files": [[p.name, p.stat().st_size] for p in args.input_files]}
    return {"dataset": HF_DATASETS[args.type], "name": f"sample-{args.version}T"}


# ----------------------------------------------------------------------------------------
# tokenising into shards


def tokenize_document(text: str) -> np.ndarray:
    return np.asarray(encode_document(text), dtype=np.uint16)


class Progress:
    """A tqdm bar per shard when tqdm is installed, else a line every 10%."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.done, self.next_print = desc, total, 0, total // 10
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tokens", desc=desc, unit_scale=True)
        except ImportError:
            self.bar = None

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_print:
            print(f"{self.desc}: {self.done:,}/{self.total:,} tokens", flush=True)
            self.next_print += max(1, self.total // 10)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def produce_shards(token_arrays, start, shard_size: int, first_index: int):
    """Cut a stream of per-document token arrays into shards.

    token_arrays: the documents from number start[0] on; the first is used from token start[1].
    Yields (tokens, end) per shard, end = [document, token offset] where the next shard
    starts; the last shard may be shorter than shard_size. The yielded array is reused: the
    consumer must write it before asking for the next."""
    buf = np.empty(shard_size, dtype=np.uint16)
    fill, doc = 0, start[0]
    progress = Progress(f"shard {first_index}", shard_size)
    try:
        for doc, tokens in enumerate(token_arrays, start=start[0]):
            pos = start[1] if doc == start[0] else 0
            while pos < len(tokens):
                take = min(shard_size - fill, len(tokens) - pos)
                buf[fill : fill + take] = tokens[pos : pos + take]
                fill, pos = fill + take, pos + take
                progress.update(take)
                if fill == shard_size:
                    progress.close()
                    end = [doc, pos] if pos < len(tokens) else [doc + 1, 0]
                    yield buf, end
                    first_index += 1
                    fill, progress = 0, Progress(f"shard {first_index}", shard_size)
    finally:  # also when the consumer stops early
        progress.close()
    if fill:
        yield buf[:fill], [doc + 1, 0]


class _NoPool:
    """Stands in for a Pool with --num_workers 0: tokenises in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, iterable, chunksize=1):
        return map(fn, iterable)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


# the fields of a manifest entry that describe the bytes written (the others say where the shard's
# tokens come from in the document stream, and must come out the same on a rerun)
WRITTEN_FIELDS = ("sha256", MAX_TOKEN_ID)


def shard_is_valid(path: Path, entry: dict) -> bool:
    """The shard file is there, with a valid header, the manifest's token count and, when the
    manifest records one, its sha256 (one read of the file; an entry without the sha256 or the
    max_token_id, from an older manifest, gets them added here)."""
    try:
        if read_shard_header(path) != entry["tokens"]:
            return False
    except ShardFormatError:
        return False
    digest, top = shard_digest(path)
    if entry.setdefault("sha256", digest) != digest:
        return False
    entry.setdefault(MAX_TOKEN_ID, top)
    return True


def save_manifest(path: Path, manifest: dict) -> None:
    # one shard per line, so the file reads as a table
    shards = ",\n".join("  " + json.dumps(s) for s in manifest["shards"])
    text = (f'{{\n "config": {json.dumps(manifest["config"])},\n "complete": {json.dumps(manifest["complete"])},\n'
            f' "shards": [\n{shards}\n ]\n}}\n')
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(args) -> None:
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": MANIFEST_FORMAT, "source": source_description(args), "text_column": args.text_column,
              "shard_size": args.shard_size, "tokenizer": "gpt2", "document": "EOT + tokens"}
    manifest_path = out / f"{args.prefix}_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest is not None and manifest["config"] != config:
        if not args.overwrite:
            sys.exit(f"{out} holds shards made with other settings or input (see {manifest_path}): "
                     f"pass --overwrite to replace them, or choose another --output_dir")
        manifest = None
    if manifest is None:
        manifest = {"config": config, "complete": False, "shards": []}
    # per shard: file, tokens, start, end ([document, token offset]), sha256, max_token_id
    shards = manifest["shards"]
    unrecorded = sum(any(k not in entry for k in WRITTEN_FIELDS) for entry in shards)

    def done(j):
        return j < len(shards) and shard_is_valid(out / shards[j]["file"], shards[j])

    get_encoding()  # load once here; forked workers inherit it
    j = 0
    while True:
        while done(j):
            j += 1
        if j == len(shards) and manifest["complete"]:
            break
        start = shards[j]["start"] if j < len(shards) else (shards[-1]["end"] if shards else [0, 0])
        print(f"writing from shard {j} on (document {start[0]:,}, token {start[1]:,})", flush=True)
        # a fresh pool per stretch of missing shards: leaving a stretch early must also stop
        # the tokenising of the documents after it
        with mp.Pool(args.num_workers) if args.num_workers > 0 else _NoPool() as pool:
            documents = open_documents(args, start[0])
            arrays = pool.imap(tokenize_document, documents, chunksize=args.chunksize)
            for tokens, end in produce_shards(arrays, start, args.shard_size, j):
                entry = {"file": shard_name(args.prefix, j), "tokens": len(tokens), "start": start, "end": end}
                recorded = ({k: v for k, v in shards[j].items() if k not in WRITTEN_FIELDS} if j < len(shards)
                            else entry)
                if recorded != entry:
                    sys.exit(f"shard {j} comes out different from the manifest's record ({entry} vs "
                             f"{shards[j]}): the input changed; pass --overwrite to start over")
                written = write_shard_entry(out / entry["file"], tokens)
                entry.update({k: written[k] for k in WRITTEN_FIELDS})
                if j < len(shards) and shards[j].get("sha256", entry["sha256"]) != entry["sha256"]:
                    sys.exit(f"shard {j} comes out with sha256 {entry['sha256']}, the manifest records "
                             f"{shards[j]['sha256']}: the input changed; pass --overwrite to start over")
                if j == len(shards):
                    shards.append(entry)
                shards[j].update({k: entry[k] for k in WRITTEN_FIELDS})
                save_manifest(manifest_path, manifest)
                j, start = j + 1, end
                if done(j):
                    break  # the next shard is already there: jump to the next one missing
            else:  # the documents ran out
                if j != len(shards):
                    sys.exit(f"the input ended after {j} shards but the manifest records {len(shards)}: "
                             f"the input changed; pass --overwrite to start over")
                if not shards:
                    sys.exit("the input holds no documents")
                manifest["complete"] = True
                save_manifest(manifest_path, manifest)
                break
    if unrecorded:  # shards skipped as valid got the sha256 / max_token_id an older manifest lacked
        save_manifest(manifest_path, manifest)
    total = sum(s["tokens"] for s in shards)
    if len(shards) < 2:
        sys.exit(f"the input made {total:,} tokens, one shard of --shard_size {args.shard_size:,}: training needs a "
                 f"validation shard (shard 0) and at least one training shard; pass --shard_size {total // 2:,} or "
                 f"less (with --overwrite), or more input")
    print(f"{len(shards)} shards, {total:,} tokens in {out} (shard 0 = val)")
    train, val = (shlex.quote(str(out / f"{args.prefix}_{split}_*.bin")) for split in ("train", "val"))
    print(f"train on them: python train_gpt2.py --input_bin {train} --input_val_bin {val}")


def main(argv=None, download_dir: Path | None = None):
    """The command line (dev/data/fineweb.py, python -m pyllmc.fineweb). download_dir: where FineWeb itself
    goes without --output_dir (dev/data/fineweb.py: dev/data; None: pyllmc's user cache)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", choices=sorted(HF_DATASETS), default="edu", help="FineWeb-Edu or classic FineWeb")
    parser.add_argument("--version", choices=["10B", "100B"], default="10B", help="sample-10BT or sample-100BT")
    parser.add_argument("--input", nargs="+", help="local files or folders to read instead of downloading")
    parser.add_argument("--text_column", default="text", help="column / field holding the text (default: text)")
    parser.add_argument("--output_dir", type=Path,
                        help="where the shards go (default: edu_fineweb10B etc. in dev/data from dev/data/fineweb.py, "
                             "else in pyllmc's user cache; with --input, the user cache: "
                             "<cache>/data/fineweb-<name>-<hash>)")
    parser.add_argument("--prefix", default="fineweb", help="shard file name prefix (default: fineweb)")
    parser.add_argument("--shard_size", type=int, default=None,
                        help="tokens per shard (default: 100M; with --input, about a tenth of the input)")
    parser.add_argument("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="tokenising processes (0: tokenise in this process)")
    parser.add_argument("--chunksize", type=int, default=16, help="documents handed to a worker at a time")
    parser.add_argument("--overwrite", action="store_true", help="discard shards made with other settings")
    args = parser.parse_args(argv)
    if (args.shard_size is not None and args.shard_size < 1) or args.chunksize < 1 or args.num_workers < 0:
        parser.error("--shard_size and --chunksize must be positive, --num_workers >= 0")
    args.input_files = list_input_files(args.input) if args.input else []
    if args.shard_size is None:
        args.shard_size = local_shard_size(args) if args.input else FINEWEB_SHARD_SIZE
    if args.output_dir is None:
        args.output_dir = default_output_dir(args, download_dir)
    run(args)


if __name__ == "__main__":
    main()
