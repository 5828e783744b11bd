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
the position); the manifest a data script writes records each shard's largest id, so that the
loader need not read the shard for it, and may declare the tokenizer (below).

The loader walks a list of shards in windows of world_size*B*T+1 tokens (one "global batch"
plus the one extra token that the last target needs). Rank r takes tokens
[r*B*T, (r+1)*B*T + 1) of each window, so the ranks see disjoint, adjacent slices of the same
stretch of text, as in llm.c. A shard's tail that cannot fill a whole window is skipped.

    loader = DistributedDataLoader("data/fineweb_train_*.bin", B=8, T=1024, rank, world_size)
    x, y = loader.next_batch()          # (B, T) int64 each, y[:, t] = x[:, t+1]
    state = loader.state_dict()         # save with the checkpoint ...
    loader.load_state_dict(state)       # ... and resume exactly where it was

Manifests. The data scripts (dev/data/*.py, pyllmc.corpus) keep a manifest beside their shards,
`<prefix>_manifest.json`, with one entry per shard (write_shard_entry makes it as it writes the shard):
    {"shards": [{"file": "fineweb_train_000001.bin", "tokens": 100000000,
                 "sha256": "<hex digest of the whole file>", "max_token_id": 50256, ...}, ...], ...}
The loader reads the manifests in its shards' folders (recorded_shards):
  * sha256: a listed shard is checked the first time the loader opens it in a run (about 0.8 s per GB
    with hashlib's sha256), before any of its tokens are used; a mismatch is a ShardFormatError naming
    the shard. verify=False (train_gpt2.py --verify_shards 0) skips the check.
  * max_token_id: the shard's largest id (-1 when empty). The loader's max_token_id() and
    check_token_ids() take it from the manifest instead of reading the shard, so start-up reads no
    listed shard twice (the first one is read once, by its sha256 check). It is trusted because the
    check that verifies the sha256 also recomputes the largest id in the same pass: a shard whose bytes
    or whose recorded max id disagree with the manifest is refused when it is opened, before its tokens
    are used (ShardFormatError). With verify=False the recorded value is used unchecked, like the
    shard itself: it is the data script's own, computed from the tokens it wrote. The loader does not
    check the ids of its batches; downstream, ops.cross_entropy refuses a target id outside the model's
    vocabulary (ValueError naming it) and the embedding an input id past the padded vocabulary.
    Entries without the field (manifests from before it existed) or without a sha256 stay valid: such
    shards are scanned once at start-up, as shards no manifest lists are.
Shards no manifest lists (llm.c's own, hand-made ones) are used as they are, and scanned for their
largest id when asked.

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
from typing import NamedTuple

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
MAX_TOKEN_ID = "max_token_id"  # a manifest entry's field: the shard's largest token id (-1 when empty)
_HASH_CHUNK = 8 << 20  # bytes per read when a file is hashed: a multiple of HEADER_BYTES and of every token size
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


def write_shard_entry(path, tokens, dtype: str = "uint16") -> dict:
    """Write `tokens` as a shard (write_shard) and return its manifest entry: {"file": the file's name,
    "tokens": count, "sha256": of the bytes written, "max_token_id": the largest id, -1 when empty}.
    Every script that writes a manifest makes its entries here, so they all record the same fields."""
    arr = np.asarray(tokens)
    digest = write_shard(path, arr, dtype=dtype)
    return {"file": Path(path).name, "tokens": int(arr.size), "sha256": digest,
            MAX_TOKEN_ID: int(arr.max()) if arr.size else -1}


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


def _read_chunks(path, chunk_bytes: int = _HASH_CHUNK):
    """A file's bytes as successive memoryviews of one reused buffer, each chunk_bytes long but the
    last (the loop tops a short read up, so chunk boundaries never split a token)."""
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = 0
            while n < chunk_bytes and (got := f.readinto(view[n:])):
                n += got
            if n == 0:
                return
            yield view[:n]
            if n < chunk_bytes:
                return


def file_sha256(path, chunk_bytes: int = _HASH_CHUNK) -> str:
    """The sha256 (hex) of a file, read in chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    for chunk in _read_chunks(path, chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def shard_digest(path) -> tuple[str, int]:
    """(sha256 of the file, largest token id or -1 when empty) of a shard, from one read of it: the
    max rides along with the hash at memory speed (about 0.1 s per GB against sha256's 0.8)."""
    _, token_dtype = shard_info(path)
    digest = hashlib.sha256()
    best, offset = -1, 0
    for chunk in _read_chunks(path, _HASH_CHUNK):
        digest.update(chunk)
        body = chunk[max(0, HEADER_BYTES - offset):]  # the tokens in this chunk (the first holds the header)
        if len(body):
            best = max(best, int(np.frombuffer(body, dtype=token_dtype).max()))
        offset += len(chunk)
    return digest.hexdigest(), best


class ShardRecord(NamedTuple):
    """What a manifest records of one shard."""
    sha256: str
    max_token_id: int | None  # None: the entry does not record it (manifests from before the field)
    manifest: Path


def _manifest_error(manifest, e: Exception) -> ShardFormatError:
    return ShardFormatError(f"shard manifest {manifest} is unreadable ({type(e).__name__}: {e}): "
                            f"make the shards again, or move the manifest away")


def _recorded_max(manifest: Path, name: str, entry: dict) -> int | None:
    value = entry.get(MAX_TOKEN_ID)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < 1 << 32:
        raise ShardFormatError(f"shard manifest {manifest} records {MAX_TOKEN_ID} {value!r} for {name}: expected "
                               f"an integer in [-1, 2**32) (the shard's largest token id, -1 when it is empty)")
    return value


def recorded_shards(files) -> dict[str, ShardRecord]:
    """{file: ShardRecord} for each of `files` that a manifest (*_manifest.json) in its folder lists
    with a sha256; files no manifest lists are left out. A max_token_id counts only beside a sha256,
    which is what vouches for it. ShardFormatError on an unreadable manifest, a malformed
    max_token_id, or two manifests that record different values for one file."""
    folders: dict[Path, list[str]] = {}
    for f in files:
        folders.setdefault(Path(f).resolve().parent, []).append(f)
    found = {}
    for folder, members in folders.items():
        listed: dict[str, ShardRecord] = {}
        for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
            try:
                entries = [e for e in json.loads(manifest.read_text())["shards"]
                           if isinstance(e, dict) and "sha256" in e]
                records = [(e["file"], str(e["sha256"]).lower(), e) for e in entries]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise _manifest_error(manifest, e) from e
            for name, sha, entry in records:
                top = _recorded_max(manifest, name, entry)
                if name in listed:
                    earlier = listed[name]
                    if earlier.sha256 != sha:
                        raise ShardFormatError(f"shard manifests {earlier.manifest} and {manifest} record different "
                                               f"sha256 for {name}")
                    if None not in (earlier.max_token_id, top) and earlier.max_token_id != top:
                        raise ShardFormatError(f"shard manifests {earlier.manifest} and {manifest} record different "
                                               f"{MAX_TOKEN_ID} for {name}")
                    if top is None:
                        continue  # keep the record that has the max id
                listed[name] = ShardRecord(sha, top, manifest)
        for f in members:
            if Path(f).name in listed:
                found[f] = listed[Path(f).name]
    return found


def recorded_checksums(files) -> dict[str, tuple[str, Path]]:
    """{file: (sha256, manifest)} for each of `files` that a manifest in its folder lists with a sha256
    (recorded_shards without the max ids)."""
    return {f: (r.sha256, r.manifest) for f, r in recorded_shards(files).items()}


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
                raise _manifest_error(manifest, e) from e
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


def verify_shard(path, expected: str, manifest, max_token_id: int | None = None) -> None:
    """ShardFormatError unless the file's sha256 is `expected` (as `manifest` records it) and, when
    max_token_id is given, its largest token id is that (both from one read of the file)."""
    if max_token_id is None:
        actual, actual_max = file_sha256(path), None
    else:
        actual, actual_max = shard_digest(path)
    if actual != expected:
        raise ShardFormatError(
            f"token shard {path} is damaged: its sha256 is {actual}, but {manifest} records {expected}. "
            f"Make it again (rerun the data script with the same arguments: dev/data/fineweb.py remakes "
            f"damaged shards), or skip the check (DistributedDataLoader(verify=False), train_gpt2.py "
            f"--verify_shards 0)"
        )
    if actual_max != max_token_id:
        raise ShardFormatError(
            f"token shard {path} matches the sha256 that {manifest} records, but its largest token id is "
            f"{actual_max}, not the {MAX_TOKEN_ID} {max_token_id} recorded there: the manifest was edited. "
            f"Make the shards again (rerun the data script), or skip the check (DistributedDataLoader("
            f"verify=False), train_gpt2.py --verify_shards 0)"
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
    verify: check each shard that a manifest in its folder lists against the sha256 (and the
        max_token_id) recorded there, once, the first time this loader opens it (ShardFormatError on
        a mismatch). The recorded max ids are used either way (the module's docstring says why).
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
        records = recorded_shards(self.files)  # read with verify off too: the max ids spare a scan
        self.checksums = {f: (r.sha256, r.manifest) for f, r in records.items()} if verify else {}
        # each shard's largest id as its manifest records it (checked with its sha256 when opened) ...
        self._recorded_max: dict[str, int] = {}
        dtypes = {f: dtype for f, (_, dtype) in zip(self.files, infos)}
        for f, record in records.items():
            if record.max_token_id is None:
                continue
            dtype = dtypes[f]
            if record.max_token_id >= 1 << (8 * dtype.itemsize):
                raise ShardFormatError(f"shard manifest {record.manifest} records {MAX_TOKEN_ID} "
                                       f"{record.max_token_id} for {f}, which holds {dtype.name} ids: the manifest "
                                       f"does not describe this shard; make the shards again")
            self._recorded_max[f] = record.max_token_id
        # ... and every largest id known so far, recorded or scanned (max_token_id() fills in the rest)
        self._max_ids: dict[str, int] = dict(self._recorded_max)
        self._verified: set[str] = set()
        self.reset()

    def max_token_id(self) -> tuple[int, str]:
        """(the largest token id in this loader's shards, the shard that holds it). A shard's max id comes
        from its manifest when one records it (no read; checked with the sha256 when the shard is opened),
        else from one scan of the shard (numpy at memory speed), remembered for this loader."""
        best, where = -1, self.files[0]
        for f in self.files:
            if f not in self._max_ids:
                self._max_ids[f] = max_token_id(f)
            if self._max_ids[f] > best:
                best, where = self._max_ids[f], f
        return best, where

    def check_token_ids(self, vocab_size: int) -> None:
        """ShardFormatError naming the first shard and position whose id is >= vocab_size; shards whose
        max id is known to fit are not read."""
        for f in self.files:
            if self._max_ids.get(f, vocab_size) < vocab_size:
                continue
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
            sha256, manifest = self.checksums[path]
            verify_shard(path, sha256, manifest, self._recorded_max.get(path))
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
