"""Small text corpora for a first run, found or fetched at run time and cached as llm.c token shards.

    prepared = prepare()                       # tiny Shakespeare, or offline the standard library's text
    prepared.train, prepared.val               # paths of the train / val shards
    prepared.tokenizer, prepared.description   # the tokenizer the shards declare; what they hold, from where
    prepare("stdlib", trim_vocab=4096)         # GPT-2 BPE trimmed to the corpus's 4,096 commonest tokens

The corpora:
  * tinyshakespeare: Karpathy's char-rnn text (1.1 MB, 40,000 lines), downloaded on first use from its
    canonical address, checked against its known sha256, and kept in the cache; a local copy serves as
    well (a file given to prepare(), or tinyshakespeare.txt / tiny_shakespeare.txt / input.txt, or prepared
    tiny_shakespeare_{train,val}.bin shards, in $PYLLMC_DATA_DIR). Tokenized as llm.c's script does:
    sections cut at blank lines, each one document (EOT + tokens); the first 32,768 tokens are val.
  * stdlib: the English docstrings and comments of the Python standard library that runs this code
    (about 2.8 MB of text, 0.7M GPT-2 tokens for CPython 3.11), extracted with `ast` in a fixed order, so
    every machine with the same Python builds the same shards; one document per module; every 20th
    module (in path order) is val. Every machine has it: it is the corpus of a machine offline.
  * a text file of your own: sections at blank lines, like tiny Shakespeare; val is its first 10% of
    tokens (32,768 at most).
prepare("auto") takes tiny Shakespeare when it can be found or downloaded, else, saying so, stdlib.

The extraction recipe (stdlib_documents): every .py file under sysconfig's "stdlib" path, outside
test/, tests/, idle_test/, site-packages/, dist-packages/, in sorted order of its relative path; per
file, the cleaned docstrings (ast.get_docstring) of the module, classes and functions, and the blocks
of whole-line comments (consecutive lines at one indentation, '#'s and one space stripped; lines
inside multi-line string literals, known from the ast, are not comments; a shebang or coding line
is dropped), kept when they have at least 3 words and are at least 75% letters and spaces; in line
order, joined by blank lines. Files that do not parse are skipped.

The cache (cache_dir(): $PYLLMC_CACHE_DIR, else $XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc), never
the source tree or site-packages:
    <cache>/data/tinyshakespeare.txt                               the download
    <cache>/data/tinyshakespeare-<sha256 of the text, 12>/gpt2/    tiny_shakespeare_{val,train}.bin + manifest
    <cache>/data/tinyshakespeare-<...>/gpt2-trimmed-4096/          the same text in the trimmed tokenizer
    <cache>/data/stdlib-cpython-3.11.7-<recipe hash, 12>/gpt2/     stdlib_{val,train}.bin + manifest
    <cache>/data/hellaswag/hellaswag_val.jsonl                     dev/data/hellaswag.py's download (hellaswag_path())
The stdlib key is the Python implementation and version plus a hash of the extraction recipe (its
source code and parameters), so 3.11 and 3.12, or an old and a new recipe, never share shards. Each
folder is written whole under a temporary name and renamed into place, so a run killed mid-way leaves
no half-made cache; its manifest records the shards' sha256 and largest token id (checked, and taken
instead of a scan, by the loader: pyllmc.data), the tokenizer, and where the text came from.
write_tinyshakespeare(folder) writes the same shards into a folder of your choice (dev/data/tinyshakespeare.py
--output_dir).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from pyllmc._toolchain import user_cache_dir
from pyllmc.data import MANIFEST_SUFFIX, read_shard, shard_info, write_shard_entry
from pyllmc.tokenizer import EOT_TOKEN, GPT2Tokenizer, Tokenizer, TrimmedGPT2Tokenizer, get_encoding

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_NAMES = ("tinyshakespeare.txt", "tiny_shakespeare.txt", "input.txt")  # a local copy, in PYLLMC_DATA_DIR
VAL_TOKENS = 32768  # tiny Shakespeare's val split, as llm.c's script makes it
DOWNLOAD_TIMEOUT_S = 20

STDLIB_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
STDLIB_MIN_WORDS = 3
STDLIB_MIN_LETTER_FRACTION = 0.75
STDLIB_VAL_EVERY = 20  # every 20th module is val


class CorpusUnavailable(RuntimeError):
    """A corpus could not be found or fetched; the message says why and what to do."""


class Offline(CorpusUnavailable):
    """The download failed (no network, or not the file expected)."""


def cache_dir() -> Path:
    """pyllmc's user cache: $PYLLMC_CACHE_DIR, else $XDG_CACHE_HOME/pyllmc, else ~/.cache/pyllmc."""
    return user_cache_dir()


def data_cache_dir() -> Path:
    return cache_dir() / "data"


def hellaswag_path() -> Path:
    """Where dev/data/hellaswag.py puts the HellaSwag validation set by default (and the trainer looks)."""
    return data_cache_dir() / "hellaswag" / "hellaswag_val.jsonl"


@dataclasses.dataclass
class Prepared:
    """Token shards ready for the loader, and what they are."""
    train: Path
    val: Path
    tokenizer: Tokenizer
    corpus: str  # "tinyshakespeare", "stdlib" or the text file's name
    description: str  # one line: what the text is and where it came from
    directory: Path
    made_now: bool  # False: found in the cache


# ---------------------------------------------------------------------------------------------
# the text


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_sections(text: str) -> np.ndarray:
    """llm.c's tinyshakespeare tokenization: the text cut at every blank line ("\\n\\n") into sections,
    each one document (EOT, then its GPT-2 tokens); every section but the last keeps its "\\n\\n"."""
    sections = text.split("\n\n")
    bodies = [s + "\n\n" if i < len(sections) - 1 else s for i, s in enumerate(sections)]
    encoded = get_encoding().encode_ordinary_batch(bodies)
    return np.concatenate([np.concatenate([[EOT_TOKEN], e]) for e in encoded]).astype(np.int64)


def _local_tinyshakespeare() -> Path | None:
    """A copy of the text, or prepared shards, in $PYLLMC_DATA_DIR (the folder), else None."""
    folder = os.environ.get("PYLLMC_DATA_DIR")
    if not folder:
        return None
    folder = Path(folder).expanduser()
    for name in TEXT_NAMES:
        if (folder / name).is_file():
            return folder / name
    if (folder / "tiny_shakespeare_train.bin").is_file() and (folder / "tiny_shakespeare_val.bin").is_file():
        return folder
    return None


def download_tinyshakespeare() -> Path:
    """The text in the cache, downloaded on first use (checked against its sha256); CorpusUnavailable
    with the reason when it cannot be had."""
    path = data_cache_dir() / "tinyshakespeare.txt"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256:
        return path
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise Offline(f"could not download tiny Shakespeare from {TINYSHAKESPEARE_URL} ({reason})") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise Offline(f"the file downloaded from {TINYSHAKESPEARE_URL} is not tiny Shakespeare "
                                f"(sha256 {digest}, expected {TINYSHAKESPEARE_SHA256}; a proxy's page?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
    return path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files outside its tests and third-party folders, in sorted order of
    their path relative to the library's root."""
    root = stdlib_root() if root is None else Path(root)
    found = [p for p in root.rglob("*.py")
             if p.is_file() and not set(p.relative_to(root).parts[:-1]) & set(STDLIB_SKIP_DIRS)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


_WORD = re.compile(r"[A-Za-z]{2,}")
_COMMENT_MARK = re.compile(r"^#+ ?")


def _is_prose(text: str) -> bool:
    if len(_WORD.findall(text)) < STDLIB_MIN_WORDS:
        return False
    return sum(c.isalpha() or c == " " for c in text) >= STDLIB_MIN_LETTER_FRACTION * len(text)


def extract_english(source: bytes) -> str:
    """The docstrings and whole-line comment blocks of one Python file, in line order, joined by blank
    lines (the recipe in the module's docstring). SyntaxError when the file does not parse."""
    tree = ast.parse(source)
    pieces: list[tuple[int, str]] = []
    in_string: set[int] = set()  # lines 2.. of multi-line string literals: a '#' there is not a comment
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            doc = ast.get_docstring(node, clean=True)
            if doc and _is_prose(doc):
                pieces.append((node.body[0].lineno, doc))
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and (node.end_lineno or 0) > node.lineno:
            in_string.update(range(node.lineno + 1, node.end_lineno + 1))
    block: list[str] = []
    start = indent = last = -1

    def flush():
        text = "\n".join(block).strip("\n")
        if block and _is_prose(text):
            pieces.append((start, text))

    text = source.decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if not stripped.startswith("#") or number in in_string:
            continue
        if number <= 2 and (stripped.startswith("#!") or "coding" in stripped):
            continue
        column = len(line) - len(stripped)
        content = _COMMENT_MARK.sub("", stripped).rstrip()
        if block and column == indent and number == last + 1:
            block.append(content)
        else:
            flush()
            block, start, indent = [content], number, column
        last = number
    flush()
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(t for _, t in pieces)


def stdlib_documents(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(documents, their files relative to the root): one document per module with any English."""
    root = stdlib_root() if root is None else Path(root)
    documents, names = [], []
    for path in stdlib_files(root):
        try:
            text = extract_english(path.read_bytes())
        except (SyntaxError, ValueError, OSError):  # a file this Python cannot parse or read
            continue
        if text:
            documents.append(text)
            names.append(path.relative_to(root).as_posix())
    return documents, names


@functools.cache  # the source does not change within a process (and reading it takes a few ms)
def stdlib_recipe_hash() -> str:
    """A hash of the extraction recipe: its parameters and the source of the functions that apply it."""
    parts = [repr((STDLIB_SKIP_DIRS, STDLIB_MIN_WORDS, STDLIB_MIN_LETTER_FRACTION, STDLIB_VAL_EVERY,
                   _WORD.pattern, _COMMENT_MARK.pattern))]
    parts += [inspect.getsource(f) for f in (stdlib_files, _is_prose, extract_english, stdlib_documents,
                                             _stdlib_tokens)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def stdlib_key() -> str:
    """The cache folder of this Python's stdlib corpus: implementation, version, recipe."""
    v = sys.version_info
    return f"stdlib-{sys.implementation.name}-{v.major}.{v.minor}.{v.micro}-{stdlib_recipe_hash()}"


def _stdlib_tokens(documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(val, train) GPT-2 tokens: EOT + tokens per document; every STDLIB_VAL_EVERY-th document is val."""
    encoded = get_encoding().encode_ordinary_batch(documents)
    docs = [np.concatenate([[EOT_TOKEN], e]).astype(np.int64) for e in encoded]
    val = [d for i, d in enumerate(docs) if i % STDLIB_VAL_EVERY == 0]
    train = [d for i, d in enumerate(docs) if i % STDLIB_VAL_EVERY != 0]
    return np.concatenate(val), np.concatenate(train)


# ---------------------------------------------------------------------------------------------
# shards in the cache


def write_split(directory: Path, prefix: str, val, train, tokenizer: Tokenizer, config: dict,
                dtype: str = "uint16") -> tuple[Path, Path]:
    """<prefix>_val.bin, <prefix>_train.bin and <prefix>_manifest.json (each shard's token count, sha256
    and largest id (pyllmc.data.write_shard_entry), the tokenizer's spec, `config`) into `directory`,
    which is created; returns (train, val)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / f"{prefix}{MANIFEST_SUFFIX}"
    manifest_path.unlink(missing_ok=True)  # no stale checksums beside new shards, even after a crash
    shards = []
    for split, part in (("val", val), ("train", train)):
        shards.append(write_shard_entry(directory / f"{prefix}_{split}.bin", part, dtype=dtype))
    manifest = {"config": config, "tokenizer": tokenizer.spec(), "complete": True, "shards": shards}
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)
    return directory / f"{prefix}_train.bin", directory / f"{prefix}_val.bin"


def _cached(directory: Path, prefix: str) -> dict | None:
    """The manifest of a complete cache folder (shards present with their recorded sizes), else None."""
    try:
        manifest = json.loads((directory / f"{prefix}{MANIFEST_SUFFIX}").read_text())
        if not manifest.get("complete"):
            return None
        for entry in manifest["shards"]:
            if shard_info(directory / entry["file"])[0] != entry["tokens"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build(directory: Path, prefix: str, make: Callable[[Path], None]) -> bool:
    """Make `directory` (by make(tmp_dir)) unless a complete one is cached; True when it was made now.
    Written under a temporary name and renamed into place."""
    if _cached(directory, prefix) is not None:
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make(tmp)
        if directory.exists():  # an incomplete folder, or another process finished first
            if _cached(directory, prefix) is not None:
                return False
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _trimmed(gpt2_dir: Path, prefix: str, vocab_size: int, config: dict) -> tuple[Path, TrimmedGPT2Tokenizer, bool]:
    """The gpt2 shards in gpt2_dir re-tokenized with GPT-2 trimmed to the train split's vocab_size
    commonest tokens, in a sibling folder."""
    directory = gpt2_dir.parent / f"gpt2-trimmed-{vocab_size}"

    def make(tmp):
        val = np.asarray(read_shard(gpt2_dir / f"{prefix}_val.bin"), dtype=np.int64)
        train = np.asarray(read_shard(gpt2_dir / f"{prefix}_train.bin"), dtype=np.int64)
        tokenizer = TrimmedGPT2Tokenizer.fit(train, vocab_size)
        write_split(tmp, prefix, tokenizer.from_gpt2(val), tokenizer.from_gpt2(train), tokenizer,
                    {**config, "trimmed_from": "gpt2", "trim_vocab": vocab_size})

    made = _build(directory, prefix, make)
    spec = json.loads((directory / f"{prefix}{MANIFEST_SUFFIX}").read_text())["tokenizer"]
    return directory, TrimmedGPT2Tokenizer(spec["gpt2_ids"]), made


def _finish(directory: Path, prefix: str, made: bool, trim_vocab: int | None, config: dict, corpus: str,
            description: str) -> Prepared:
    tokenizer: Tokenizer = GPT2Tokenizer()
    if trim_vocab is not None:
        directory, tokenizer, made_trimmed = _trimmed(directory, prefix, trim_vocab, config)
        made = made or made_trimmed
    return Prepared(train=directory / f"{prefix}_train.bin", val=directory / f"{prefix}_val.bin",
                    tokenizer=tokenizer, corpus=corpus, description=description, directory=directory,
                    made_now=made)


def prepare_text(path, trim_vocab: int | None = None, shakespeare: bool | None = None) -> Prepared:
    """A text file as shards, cut into sections like tiny Shakespeare (which it is when its sha256 says
    so, or when shakespeare=True: then val is llm.c's 32,768 tokens)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusUnavailable(f"cannot read the text file {path} ({type(e).__name__}: {e})") from e
    digest = sha256_text(text)
    if shakespeare is None:
        shakespeare = digest == TINYSHAKESPEARE_SHA256
    name = "tinyshakespeare" if shakespeare else re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:40] or "text"
    prefix = "tiny_shakespeare" if shakespeare else "text"
    directory = data_cache_dir() / f"{name}-{digest[:12]}" / "gpt2"

    def make(tmp):
        tokens = tokenize_sections(text)
        n_val = VAL_TOKENS if shakespeare else min(VAL_TOKENS, len(tokens) // 10)
        if len(tokens) <= n_val or n_val <= 0:
            need = VAL_TOKENS + 1 if shakespeare else 10  # a val split of at least one token, and training
            raise CorpusUnavailable(f"the text {path} has only {len(tokens)} tokens: too few for a validation "
                                    f"split and training (at least {need})")
        write_split(tmp, prefix, tokens[:n_val], tokens[n_val:], GPT2Tokenizer(),
                    {"source": str(path), "text_sha256": digest, "document": "EOT + tokens per blank-line section",
                     "val_tokens": n_val})

    made = _build(directory, prefix, make)
    what = "tiny Shakespeare" if shakespeare else f"the text {path.name}"
    config = {"source": str(path), "text_sha256": digest}
    return _finish(directory, prefix, made, trim_vocab, config, name, f"{what}, from {path}")


def prepare_tinyshakespeare(trim_vocab: int | None = None) -> Prepared:
    """Tiny Shakespeare from $PYLLMC_DATA_DIR (text or prepared shards), the cache, or a download."""
    local = _local_tinyshakespeare()
    if local is not None and local.is_file():
        try:
            prepared = prepare_text(local, trim_vocab, shakespeare=True)
        except CorpusUnavailable as e:
            raise CorpusUnavailable(f"could not prepare tiny Shakespeare from {local} ($PYLLMC_DATA_DIR): {e}") from e
        prepared.description = f"tiny Shakespeare, from {local} ($PYLLMC_DATA_DIR)"
        return prepared
    if local is not None:  # a folder of prepared GPT-2 shards: used as they are (the trimmed ones derived)
        train, val = local / "tiny_shakespeare_train.bin", local / "tiny_shakespeare_val.bin"
        description = f"tiny Shakespeare, prepared shards in {local} ($PYLLMC_DATA_DIR)"
        if trim_vocab is None:
            return Prepared(train=train, val=val, tokenizer=GPT2Tokenizer(), corpus="tinyshakespeare",
                            description=description, directory=local, made_now=False)
        digest = hashlib.sha256(train.read_bytes() + val.read_bytes()).hexdigest()
        directory = data_cache_dir() / f"tinyshakespeare-shards-{digest[:12]}" / "gpt2"

        def copy(tmp):
            tmp.mkdir(parents=True)
            write_split(tmp, "tiny_shakespeare", read_shard(val), read_shard(train), GPT2Tokenizer(),
                        {"source": str(local)})

        made = _build(directory, "tiny_shakespeare", copy)
        return _finish(directory, "tiny_shakespeare", made, trim_vocab, {"source": str(local)},
                       "tinyshakespeare", description)
    cached = data_cache_dir() / "tinyshakespeare.txt"
    was_cached = cached.is_file()
    path = download_tinyshakespeare()
    prepared = prepare_text(path, trim_vocab, shakespeare=True)
    prepared.description = (f"tiny Shakespeare, {'cached' if was_cached else 'downloaded'} from "
                            f"{TINYSHAKESPEARE_URL} into {path}")
    return prepared


def write_tinyshakespeare(directory, source=None, trim_vocab: int | None = None) -> tuple[Path, Path]:
    """Tiny Shakespeare as tiny_shakespeare_{val,train}.bin + manifest in `directory` (a folder of your
    choice; prepare_tinyshakespeare keeps them in the cache): the text file `source`, or the download;
    val is llm.c's first 32,768 tokens; trim_vocab as in prepare(). Returns (train, val)."""
    source = Path(source) if source is not None else download_tinyshakespeare()
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusUnavailable(f"cannot read the text file {source} ({type(e).__name__}: {e})") from e
    tokens = tokenize_sections(text)
    if len(tokens) <= VAL_TOKENS:
        raise CorpusUnavailable(f"the text {source} has only {len(tokens)} tokens; the validation split alone "
                                f"takes {VAL_TOKENS}")
    val, train = tokens[:VAL_TOKENS], tokens[VAL_TOKENS:]
    tokenizer: Tokenizer = GPT2Tokenizer()
    config = {"source": str(source), "text_sha256": sha256_text(text), "val_tokens": VAL_TOKENS}
    if trim_vocab is not None:
        tokenizer = TrimmedGPT2Tokenizer.fit(train, trim_vocab)
        val, train = tokenizer.from_gpt2(val), tokenizer.from_gpt2(train)
        config["trim_vocab"] = trim_vocab
    return write_split(directory, "tiny_shakespeare", np.asarray(val), np.asarray(train), tokenizer, config)


def prepare_stdlib(trim_vocab: int | None = None) -> Prepared:
    """The docstrings and comments of this Python's standard library as shards (cached per Python
    version and recipe)."""
    root = stdlib_root()
    directory = data_cache_dir() / stdlib_key() / "gpt2"
    v = sys.version_info
    version = f"{sys.implementation.name} {v.major}.{v.minor}.{v.micro}"
    config = {"source": str(root), "python": version, "recipe": stdlib_recipe_hash()}

    def make(tmp):
        documents, names = stdlib_documents(root)
        if len(documents) < 2 * STDLIB_VAL_EVERY:
            raise CorpusUnavailable(f"the standard library at {root} has the Python source of only "
                                    f"{len(documents)} modules (a build without .py files?): give a text file "
                                    f"instead")
        val, train = _stdlib_tokens(documents)
        text_sha = hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()
        write_split(tmp, "stdlib", val, train, GPT2Tokenizer(),
                    {**config, "modules": len(documents), "characters": sum(map(len, documents)),
                     "text_sha256": text_sha, "val": f"every {STDLIB_VAL_EVERY}th module", "document": "EOT + tokens per module"})

    made = _build(directory, "stdlib", make)
    description = f"the docstrings and comments of the {version} standard library in {root}"
    return _finish(directory, "stdlib", made, trim_vocab, config, "stdlib", description)


def prepare(corpus: str = "auto", trim_vocab: int | None = None, say: Callable[[str], None] = print) -> Prepared:
    """Shards of `corpus`: "auto" (tiny Shakespeare, else, offline, stdlib, saying so in one line),
    "tinyshakespeare", "stdlib", or the path of a text file. trim_vocab: None for GPT-2's tokens, an int
    for GPT-2 trimmed to that many ids (TrimmedGPT2Tokenizer.fit on the train split)."""
    if corpus in ("auto", "tinyshakespeare"):
        try:
            return prepare_tinyshakespeare(trim_vocab)
        except Offline as e:
            if corpus == "tinyshakespeare":
                raise CorpusUnavailable(f"{e}. Offline? Put a copy of tinyshakespeare.txt in a folder and set "
                                        f"PYLLMC_DATA_DIR to it, or give the file itself (--corpus FILE)") from e
            v = sys.version_info
            say(f"offline: {e}; training on the docstrings and comments of the Python {v.major}.{v.minor}.{v.micro} "
                f"standard library instead")
            return prepare_stdlib(trim_vocab)
    if corpus == "stdlib":
        return prepare_stdlib(trim_vocab)
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise CorpusUnavailable(f"corpus {corpus!r} is neither auto, tinyshakespeare, stdlib nor an existing text file")
    return prepare_text(path, trim_vocab)


__all__ = ["CorpusUnavailable", "Offline", "Prepared", "cache_dir", "data_cache_dir", "hellaswag_path", "prepare",
           "prepare_stdlib", "prepare_text", "prepare_tinyshakespeare", "stdlib_documents", "stdlib_key", "extract_english",
           "tokenize_sections", "write_split", "write_tinyshakespeare"]
