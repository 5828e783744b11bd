"""llm.c token shards and the distributed data loader.

Shard formats (interoperable with llm.c's dev/data scripts and its C loader):
    header: 256 int32 little-endian = (magic, version, token count, 0, ...)
    body:   token count token ids
      magic 20240520, version 1: uint16 ids (GPT-2's 50,257 fit)
      magic 20240801, version 7: uint32 ids (llm.c's Llama-3 shards; any vocabulary past 65,536)
Both are read and written here with the same validation (read_shard, write_shard(dtype=...)).
Files are named like `fineweb_val_000000.bin`, `fineweb_train_000001.bin`; shard 0 is the
validation split. A shard carries no vocabulary size: max_token_id() / the loader's
check_token_ids(vocab_size) find an id the model cannot embed (ValueError naming the shard and
the position), and the manifest a data script writes may declare the tokenizer (below).

The loader walks a list of shards in windows of world_size*B*T+1 tokens (one "global batch"
plus the one extra token that the last target needs). Rank r takes tokens
[r*B*T, (r+1)*B*T + 1) of each window, so the ranks see disjoint, adjacent slices of the same
stretch of text, as in llm.c. A shard's tail that cannot fill a whole window is skipped.

    loader = DistributedDataLoader("data/fineweb_train_*.bin", B=8, T=1024, rank, world_size)
    x, y = loader.next_batch()          # (B, T) int64 each, y[:, t] = x[:, t+1]
    state = loader.state_dict()         # save with the checkpoint ...
    loader.load_state_dict(state)       # ... and resume exactly where it was

Checksums. The data scripts (dev/data/fineweb.py, tinyshakespeare.py) record each shard's sha256
in a manifest beside the shards, `<prefix>_manifest.json` ({"shards": [{"file", "tokens",
"sha256", ...}, ...]}). The loader reads the manifests in its shards' folders and checks a shard
that one lists the first time it opens it in a run (about 0.8 s per GB with hashlib's sha256),
before any of its tokens are used; a mismatch is a ShardFormatError naming the shard. Shards no
manifest lists (llm.c's own, hand-made ones) are used as they are. verify=False skips the check.

Tokenizer. A manifest may declare what its shards' ids mean: {"tokenizer": {"name": ..., ...}},
the spec of a pyllmc.tokenizer tokenizer (pyllmc.tokenizer.from_spec rebuilds it), so that samples
print (or, for audio, are written) in the right form. declared_tokenizer(files) reads it; shards
without a declaration are GPT-2's when they are uint16 (llm.c's default), else undeclared.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_MAGIC = 20240520  # version 1: uint16 tokens
SHARD_VERSION = 1
TOKEN_BYTES = 2  # version 1 stores uint16 tokens
SHARD_MAGIC_U32 = 20240801  # llm.c's second kind: version 7, uint32 tokens
SHARD_VERSION_U32 = 7
# (magic, version) -> the token dtype of the body; the two kinds llm.c writes and reads
SHARD_KINDS = {(SHARD_MAGIC, SHARD_VERSION): np.dtype("<u2"), (SHARD_MAGIC_U32, SHARD_VERSION_U32): np.dtype("<u4")}
_KIND_OF_DTYPE = {"uint16": (SHARD_MAGIC, SHARD_VERSION), "uint32": (SHARD_MAGIC_U32, SHARD_VERSION_U32)}
MANIFEST_SUFFIX = "_manifest.json"  # <prefix>_manifest.json beside the shards records their sha256
_SCAN_CHUNK = 1 << 24  # tokens per chunk when a shard is scanned for its largest id


class ShardFormatError(ValueError):
    """A file is not a valid llm.c token shard; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------
# shards


def write_shard(path, tokens, dtype: str = "uint16") -> str:
    """Write `tokens` (any integer sequence) as an llm.c shard; returns the file's sha256 (hex),
    computed from the bytes as they are written, for the manifest.

    dtype "uint16": version 1 (magic 20240520), ids in [0, 65536); "uint32": version 7 (magic
    20240801, llm.c's Llama-3 shards), ids in [0, 2**32).

    Atomic: written to a temporary file beside `path`, then renamed over it, so a reader (or a
    resumed data script) never sees a half-written shard."""
    path = Path(path)
    if dtype not in _KIND_OF_DTYPE:
        raise ValueError(f"shard dtype for {path} must be one of {sorted(_KIND_OF_DTYPE)}, got {dtype!r}")
    magic, version = _KIND_OF_DTYPE[dtype]
    token_dtype = SHARD_KINDS[(magic, version)]
    limit = 1 << (8 * token_dtype.itemsize)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens for {path} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens for {path} must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= limit):
        hint = " (write uint32 shards: dtype='uint32')" if dtype == "uint16" and arr.min() >= 0 else ""
        raise ValueError(
            f"tokens for {path} must be in [0, {limit}) to fit {dtype} shards, got range "
            f"[{arr.min()}, {arr.max()}]{hint}"
        )
    if arr.size >= 2**31:
        raise ValueError(f"{arr.size} tokens for {path}: the header's int32 count allows < 2**31")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, arr.size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in (header.tobytes(), arr.astype(token_dtype, copy=False).tobytes()):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest.hexdigest()


def read_shard_header(path) -> int:
    """Validate a shard's header against its file size; return its token count."""
    return shard_info(path)[0]


def shard_info(path) -> tuple[int, np.dtype]:
    """Validate a shard's header against its file size; return (token count, token dtype)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardFormatError(f"cannot read token shard {path}: {e}") from e
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(
            f"token shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header"
        )
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, ntok = (int(v) for v in header[:3])
    if magic not in (SHARD_MAGIC, SHARD_MAGIC_U32):
        raise ShardFormatError(
            f"{path} is not an llm.c token shard: magic number {magic}, expected {SHARD_MAGIC} (uint16 tokens) "
            f"or {SHARD_MAGIC_U32} (uint32 tokens)"
        )
    token_dtype = SHARD_KINDS.get((magic, version))
    if token_dtype is None:
        expected_version = SHARD_VERSION if magic == SHARD_MAGIC else SHARD_VERSION_U32
        raise ShardFormatError(
            f"token shard {path} has magic {magic} with version {version}; supported: magic {SHARD_MAGIC} "
            f"version {SHARD_VERSION} (uint16 tokens) and magic {SHARD_MAGIC_U32} version {SHARD_VERSION_U32} "
            f"(uint32 tokens), so version {expected_version} for this magic"
        )
    if ntok < 0:
        raise ShardFormatError(f"token shard {path} has a negative token count {ntok} in its header")
    expected = HEADER_BYTES + token_dtype.itemsize * ntok
    if size < expected:
        raise ShardFormatError(
            f"token shard {path} is truncated: its header says {ntok} tokens ({expected} bytes "
            f"in all) but the file has {size} bytes"
        )
    if size > expected:
        raise ShardFormatError(
            f"token shard {path} is longer than its header says: {ntok} tokens ({expected} bytes "
            f"in all) but the file has {size} bytes"
        )
    return ntok, token_dtype


def read_shard(path) -> np.ndarray:
    """The tokens of an llm.c shard as a read-only uint16 or uint32 array (memory-mapped), validated."""
    ntok, token_dtype = shard_info(path)
    if ntok == 0:
        return np.zeros(0, dtype=token_dtype)
    return np.memmap(path, dtype=token_dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def max_token_id(path) -> int:
    """The largest token id in a shard (-1 when it is empty), read in chunks (numpy's max runs at
    memory speed: about 0.1 s per GB from the page cache)."""
    tokens = read_shard(path)
    best = -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        best = max(best, int(tokens[start:start + _SCAN_CHUNK].max()))
    return best


def check_token_ids(path, vocab_size: int) -> None:
    """ShardFormatError (a ValueError) naming the shard and the position of its first token id
    >= vocab_size; nothing when every id fits."""
    tokens = read_shard(path)
    if tokens.dtype.itemsize == 2 and vocab_size >= 1 << 16:
        return  # every uint16 id fits
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        bad = np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            position = start + int(bad[0])
            raise ShardFormatError(
                f"token shard {path} holds token id {int(chunk[bad[0]])} at position {position} (of "
                f"{len(tokens)}), but the vocabulary has {vocab_size} ids (0..{vocab_size - 1}); the shard's "
                f"largest id is {max_token_id(path)}"
            )


# ----------------------------------------------------------------------------------------
# checksums


def file_sha256(path, chunk_bytes: int = 8 << 20) -> str:
    """The sha256 (hex) of a file, read in chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def recorded_checksums(files) -> dict[str, tuple[str, Path]]:
    """{file: (sha256, manifest)} for each of `files` that a manifest (*_manifest.json) in its folder
    lists with a sha256; files no manifest lists are left out."""
    folders: dict[Path, list[str]] = {}
    for f in files:
        folders.setdefault(Path(f).resolve().parent, []).append(f)
    found = {}
    for folder, members in folders.items():
        listed: dict[str, tuple[str, Path]] = {}
        for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
            try:
                entries = json.loads(manifest.read_text())["shards"]
                records = [(e["file"], str(e["sha256"]).lower()) for e in entries
                           if isinstance(e, dict) and "sha256" in e]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ShardFormatError(f"shard manifest {manifest} is unreadable ({type(e).__name__}: {e}): "
                                       f"make the shards again, or move the manifest away") from e
            for name, sha in records:
                if name in listed and listed[name][0] != sha:
                    raise ShardFormatError(f"shard manifests {listed[name][1]} and {manifest} record different "
                                           f"sha256 for {name}")
                listed[name] = (sha, manifest)
        for f in members:
            if Path(f).name in listed:
                found[f] = listed[Path(f).name]
    return found


def declared_tokenizer(files) -> tuple[dict | None, Path | None]:
    """(spec, manifest) of the tokenizer that the manifests beside `files` declare for them (a dict
    for pyllmc.tokenizer.from_spec), or (None, None) when none lists them with a declaration.
    ShardFormatError when the shards are declared differently (or some are and others are not)."""
    folders: dict[Path, list[str]] = {}
    for f in files:
        folders.setdefault(Path(f).resolve().parent, []).append(f)
    per_file: dict[str, tuple[dict | None, Path | None]] = {os.fspath(f): (None, None) for f in files}
    for folder, members in folders.items():
        names = {Path(f).name: os.fspath(f) for f in members}
        for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
            try:
                content = json.loads(manifest.read_text())
                listed = {e["file"] for e in content["shards"] if isinstance(e, dict)}
                spec = content.get("tokenizer")
                if spec is None and isinstance(content.get("config"), dict):  # older manifests: a name
                    name = content["config"].get("tokenizer")
                    spec = {"name": name} if isinstance(name, str) else None
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ShardFormatError(f"shard manifest {manifest} is unreadable ({type(e).__name__}: {e}): "
                                       f"make the shards again, or move the manifest away") from e
            if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name"), str)):
                raise ShardFormatError(f"shard manifest {manifest} declares a malformed tokenizer {spec!r} "
                                       f"(expected an object with a \"name\")")
            for name in listed & names.keys():
                if spec is not None:
                    per_file[names[name]] = (spec, manifest)
    declared = {json.dumps(spec, sort_keys=True): (spec, manifest) for spec, manifest in per_file.values()}
    if len(declared) > 1:
        described = "; ".join(f"{f}: {spec['name'] if spec else 'none'}"
                              f"{f' (in {manifest})' if manifest else ''}"
                              for f, (spec, manifest) in list(per_file.items())[:4])
        raise ShardFormatError(f"the token shards are not of one tokenizer ({described}): train on shards "
                               f"that share a tokenizer")
    return next(iter(declared.values())) if declared else (None, None)


def verify_shard(path, expected: str, manifest) -> None:
    """ShardFormatError unless the file's sha256 is `expected` (as `manifest` records it)."""
    actual = file_sha256(path)
    if actual != expected:
        raise ShardFormatError(
            f"token shard {path} is damaged: its sha256 is {actual}, but {manifest} records {expected}. "
            f"Make it again (rerun the data script with the same arguments: dev/data/fineweb.py remakes "
            f"damaged shards), or skip the check (DistributedDataLoader(verify=False), train_gpt2.py "
            f"--verify_shards 0)"
        )


# ----------------------------------------------------------------------------------------
# loader


def _resolve_files(files_or_pattern) -> list[str]:
    if isinstance(files_or_pattern, (str, os.PathLike)):
        pattern = os.fspath(files_or_pattern)
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no token shards match {pattern!r}")
        return files
    files = sorted(os.fspath(f) for f in files_or_pattern)
    if not files:
        raise FileNotFoundError("no token shards given (empty file list)")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"token shard(s) not found: {', '.join(missing)}")
    return files


class DistributedDataLoader:
    """Batches (x, y) of shape (B, T) from llm.c token shards, split across ranks like llm.c.

    files_or_pattern: a glob pattern or a list of shard paths (sorted by name either way).
    seed: None walks the shards in name order every epoch (llm.c's default); an int shuffles
        the shard order with a permutation that depends only on (seed, epoch), identical on
        every rank.
    pin_memory: batches in pinned host memory, so that x.to("cuda", non_blocking=True) copies
        without making the CPU wait for the GPU (from pageable memory the copy is synchronous).
    verify: check each shard that a manifest in its folder lists against the sha256 recorded
        there, once, the first time this loader opens it (ShardFormatError on a mismatch).
    """

    def __init__(self, files_or_pattern, B: int, T: int, rank: int = 0, world_size: int = 1, seed=None,
                 pin_memory: bool = False, verify: bool = True):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.B, self.T = int(B), int(T)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = seed
        self.pin_memory = bool(pin_memory)
        self.files = _resolve_files(files_or_pattern)
        self.window = self.world_size * self.B * self.T + 1  # tokens one global batch reads
        infos = [shard_info(f) for f in self.files]
        self.shard_tokens = [n for n, _ in infos]
        self.token_dtypes = sorted({str(dtype.name) for _, dtype in infos})  # ["uint16"], ["uint32"] or both
        for f, n in zip(self.files, self.shard_tokens):
            if n < self.window:
                raise ValueError(
                    f"token shard {f} has {n} tokens, fewer than one global batch of "
                    f"world_size*B*T+1 = {self.world_size}*{self.B}*{self.T}+1 = {self.window}: "
                    f"use a smaller B or T (or fewer ranks), or bigger shards"
                )
        self.num_tokens = sum(self.shard_tokens)
        self.checksums = recorded_checksums(self.files) if verify else {}
        self._verified: set[str] = set()
        self.reset()

    def max_token_id(self) -> tuple[int, str]:
        """(the largest token id in this loader's shards, the shard that holds it): one read of every
        shard (numpy at memory speed)."""
        best, where = -1, self.files[0]
        for f in self.files:
            m = max_token_id(f)
            if m > best:
                best, where = m, f
        return best, where

    def check_token_ids(self, vocab_size: int) -> None:
        """ShardFormatError naming the first shard and position whose id is >= vocab_size."""
        for f in self.files:
            check_token_ids(f, vocab_size)

    # the shard order of one epoch: name order, or a (seed, epoch)-determined permutation
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.files)
        if self.seed is None:
            return np.arange(n)
        return np.random.default_rng([int(self.seed), int(epoch)]).permutation(n)

    def _load_shard(self) -> None:
        self._file_index = int(self._order(self.epoch)[self.shard_index])
        path = self.files[self._file_index]
        if path in self.checksums and path not in self._verified:  # once per shard and run
            verify_shard(path, *self.checksums[path])
            self._verified.add(path)
        self._tokens = read_shard(path)

    def reset(self) -> None:
        """Back to the first window of the first shard of epoch 0."""
        self.epoch = 0
        self.shard_index = 0  # position in this epoch's shard order
        self.position = 0  # start of the next global window in the current shard
        self._load_shard()

    @property
    def current_file(self) -> str:
        return self.files[self._file_index]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        BT = self.B * self.T
        start = self.position + self.rank * BT
        buf = torch.from_numpy(self._tokens[start : start + BT + 1].astype(np.int64))
        if self.pin_memory:
            buf = buf.pin_memory()
        x = buf[:-1].view(self.B, self.T)  # inputs
        y = buf[1:].view(self.B, self.T)  # targets
        self._advance()
        return x, y

    def _advance(self) -> None:
        # Move to the next window; when the shard cannot give another full one, go to the next
        # shard, and after the last shard of the epoch, to the next epoch.
        self.position += self.window - 1
        if self.position + self.window > len(self._tokens):
            self.position = 0
            self.shard_index += 1
            if self.shard_index == len(self.files):
                self.shard_index = 0
                self.epoch += 1
            self._load_shard()

    def state_dict(self) -> dict:
        """Where the loader is: the next next_batch() after load_state_dict() continues here."""
        return {
            "epoch": self.epoch,
            "shard_index": self.shard_index,
            "position": self.position,
            "file": os.path.basename(self.current_file),
            "seed": self.seed,
            "num_files": len(self.files),
            "B": self.B,
            "T": self.T,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "num_files": len(self.files), "B": self.B, "T": self.T,
                    "world_size": self.world_size}
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if k in state and state[k] != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"data loader state does not match this loader ({details}); "
                             f"an exact resume needs the same shards, seed, B, T and world_size")
        epoch, shard_index, position = int(state["epoch"]), int(state["shard_index"]), int(state["position"])
        if not 0 <= shard_index < len(self.files):
            raise ValueError(f"data loader state has shard_index {shard_index}, but there are {len(self.files)} shards")
        self.epoch, self.shard_index = epoch, shard_index
        self._load_shard()
        if "file" in state and state["file"] != os.path.basename(self.current_file):
            raise ValueError(f"data loader state was in shard {state['file']}, but shard {self.current_file} "
                             f"is at that place in the order now: the shard files changed")
        if position < 0 or position + self.window > len(self._tokens):
            raise ValueError(f"data loader state has position {position}, which leaves no full window "
                             f"in {self.current_file} ({len(self._tokens)} tokens)")
        self.position = position
