"""llm.c token shards and the distributed data loader.

Shard format (interoperable with llm.c's dev/data scripts and its C loader):
    header: 256 int32 little-endian = (magic 20240520, version 1, token count, 0, ...)
    body:   token count uint16 GPT-2 token ids
Files are named like `fineweb_val_000000.bin`, `fineweb_train_000001.bin`; shard 0 is the
validation split.

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
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
TOKEN_BYTES = 2  # version 1 stores uint16 tokens
MANIFEST_SUFFIX = "_manifest.json"  # <prefix>_manifest.json beside the shards records their sha256


class ShardFormatError(ValueError):
    """A file is not a valid llm.c token shard; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------
# shards


def write_shard(path, tokens) -> str:
    """Write `tokens` (any integer sequence, each in [0, 65536)) as an llm.c shard; returns the
    file's sha256 (hex), computed from the bytes as they are written, for the manifest.

    Atomic: written to a temporary file beside `path`, then renamed over it, so a reader (or a
    resumed data script) never sees a half-written shard."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens for {path} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens for {path} must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
        raise ValueError(
            f"tokens for {path} must be in [0, 65536) to fit uint16 shards, got range "
            f"[{arr.min()}, {arr.max()}]"
        )
    if arr.size >= 2**31:
        raise ValueError(f"{arr.size} tokens for {path}: the header's int32 count allows < 2**31")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in (header.tobytes(), arr.astype("<u2", copy=False).tobytes()):
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
    if magic != SHARD_MAGIC:
        raise ShardFormatError(
            f"{path} is not an llm.c token shard: magic number {magic}, expected {SHARD_MAGIC}"
        )
    if version != SHARD_VERSION:
        raise ShardFormatError(
            f"token shard {path} has version {version}; only version {SHARD_VERSION} (uint16 tokens) is supported"
        )
    if ntok < 0:
        raise ShardFormatError(f"token shard {path} has a negative token count {ntok} in its header")
    expected = HEADER_BYTES + TOKEN_BYTES * ntok
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
    return ntok


def read_shard(path) -> np.ndarray:
    """The tokens of an llm.c shard as a read-only uint16 array (memory-mapped), validated."""
    ntok = read_shard_header(path)
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


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
        self.shard_tokens = [read_shard_header(f) for f in self.files]
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
