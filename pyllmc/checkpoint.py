"""Training checkpoints: atomic writes, keep-the-last-K, resume from the newest valid one.

A training checkpoint is one `torch.save` file, `ckpt_<step:08d>.pt`, holding whatever the
trainer puts in it (model, optimizer, data-loader and RNG states, step, arguments) plus a
small header (`format`, `version`, `step`) that tells a finished checkpoint from anything else.

Crash safety. A checkpoint is written to a temporary file in the same directory, flushed and
fsync'ed, then renamed over the final name with `os.replace` (atomic on POSIX), and the
directory itself is fsync'ed so the rename survives a power cut. A process killed at any
point therefore leaves either the previous set of checkpoints or the new one, never a
half-written file under a checkpoint name. Reading still guards against the rest (a disk
that lied, a file copied by hand): `load_latest` tries the newest checkpoint first and
falls back to older ones, with a warning, when a file does not load or lacks the header.

Checksums. torch's zip container checks no payload checksum, so a flipped bit in a tensor
would load without a word. Every checkpoint therefore carries a checksum of every byte before
it: the zip archive torch.save writes (the pickled non-tensor state, each tensor's raw bytes,
the zip's headers). It is computed while torch.save writes (the bytes pass through a hasher on
their way to the file; no second read) and stored as the zip's archive comment, the last bytes
of the file, so the file stays a plain zip that torch.load and zipfile read as before:

    ... zip members ... central directory | end record (comment length = L) | comment (L bytes)
    comment = b"pyllmc-checksum xxh3_128 <32 hex digits>\n"   (or sha256, 64 hex digits)

The hash is XXH3-128 (the xxhash package: ~10 GB/s on one core, against ~1.2 GB/s for
hashlib.sha256, which made a GPT-2 124M checkpoint's save and load more than 2x slower,
dev/bench/checkpoint.py); where xxhash is not installed, sha256 is written and read instead.
load_checkpoint verifies the checksum (reading the file through mmap, from the page cache)
before unpickling anything; a mismatch is a ChecksumError (a ValueError) naming the file, the
parts of it that are damaged (the zip members whose CRC-32 fails) and the two digests, so
load_latest skips the file like any damaged one. Version-1 checkpoints (written before
checksums) still load, with a notice.

Tokenizer. The trainer records the spec of the tokenizer its data declared (pyllmc.tokenizer) under
"tokenizer"; recorded_tokenizer(state) reads it back (checkpoints from before it was recorded were
GPT-2's when their model has GPT-2's vocabulary) and check_tokenizer refuses another one, so a run
is never resumed, continued or decoded with a tokenizer whose ids mean something else.

Checkpoint files are pickles (they hold numpy/python RNG states and arbitrary loader
states): load only checkpoints you wrote yourself.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

FORMAT = "pyllmc-train-checkpoint"
VERSION = 2  # 2: carries a checksum; 1: written before checksums (read, unverified, with a notice)
READABLE_VERSIONS = (1, 2)
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")
_TMP_PREFIX = ".tmp-"


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to produce a file, then move it to `path` atomically.

    The temporary file lives in the destination directory (os.replace must not cross file
    systems) and is removed when `write` or the rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:  # the writer may not have synced: make the bytes durable
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


# ---- checksums ------------------------------------------------------------------------------

class ChecksumError(ValueError):
    """A checkpoint whose bytes differ from those its checksum was computed over (or whose checksum
    record is damaged); the message names the file and what failed."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before checkpoints carried checksums: loaded without verification."""


_CHECKSUM_TAG = b"pyllmc-checksum"
_EOCD_SIGNATURE = b"PK\x05\x06"  # the zip's end of central directory record ...
_EOCD_SIZE = 22  # ... without its comment; the comment length is its last 2 bytes
_MAX_COMMENT = 255  # our comment is 58 or 90 bytes; anything longer is not ours
_COMMENT = re.compile(rb"pyllmc-checksum ([a-z0-9_]{1,16}) ([0-9a-f]{1,128})\n")
_DIGEST_SIZES = {"xxh3_128": 16, "sha256": 32}
_CHUNK = 64 << 20


def _xxhash():
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash


def default_algorithm() -> str:
    """The hash new checkpoints get: XXH3-128 where the xxhash package is installed, else sha256."""
    return "xxh3_128" if _xxhash() is not None else "sha256"


def _new_hasher(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        xxhash = _xxhash()
        if xxhash is None:  # not damage: the file may be fine, this installation cannot tell
            raise RuntimeError("this checkpoint's checksum is XXH3-128; verifying it needs the xxhash package "
                               "(pip install xxhash)")
        return xxhash.xxh3_128()
    raise KeyError(algorithm)


def _comment_length(algorithm: str) -> int:
    return len(_CHECKSUM_TAG) + 1 + len(algorithm) + 1 + 2 * _DIGEST_SIZES[algorithm] + 1


class ChecksumWriter:
    """The file object torch.save writes to: passes every byte on to `f` and through the hasher,
    holding back the zip's end record until finish() sets its comment length and appends the
    checksum as the comment. torch.save writes its zip sequentially, without seeking."""

    def __init__(self, f, algorithm: Optional[str] = None):
        self.f = f
        self.algorithm = algorithm or default_algorithm()
        self.hasher = _new_hasher(self.algorithm)
        self.tail = b""  # the last _EOCD_SIZE bytes written so far, not yet passed on

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n >= _EOCD_SIZE:
            if self.tail:
                self._emit(self.tail)
            self._emit(view[: n - _EOCD_SIZE])
            self.tail = bytes(view[n - _EOCD_SIZE:])
        else:
            pending = self.tail + bytes(view)
            cut = max(0, len(pending) - _EOCD_SIZE)
            if cut:
                self._emit(pending[:cut])
            self.tail = pending[cut:]
        return n

    def _emit(self, chunk) -> None:
        self.hasher.update(chunk)
        self.f.write(chunk)

    def flush(self) -> None:
        self.f.flush()

    def finish(self) -> str:
        """Write the end record and the checksum comment; returns the hex digest."""
        tail = self.tail
        if len(tail) != _EOCD_SIZE or tail[:4] != _EOCD_SIGNATURE or tail[20:] != b"\0\0":
            raise RuntimeError("torch.save did not end its file with a zip end record without comment; "
                               "this torch writes a format pyllmc.checkpoint does not know")
        length = _comment_length(self.algorithm)
        self._emit(tail[:20] + length.to_bytes(2, "little"))
        digest = self.hasher.hexdigest()
        comment = b"%s %s %s\n" % (_CHECKSUM_TAG, self.algorithm.encode(), digest.encode())
        assert len(comment) == length
        self.f.write(comment)  # the comment is not part of what it checks
        self.tail = b""
        return digest


def atomic_torch_save(obj: Any, path: str | os.PathLike, checksum: bool = True) -> Path:
    """torch.save(obj) to `path` atomically, with the checksum record (checksum=False: without,
    as before version 2, for comparisons only)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            if checksum:
                writer = ChecksumWriter(f)
                torch.save(obj, writer)
                writer.finish()
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def read_checksum_record(path: str | os.PathLike) -> Optional[tuple[str, str, int]]:
    """(algorithm, hex digest, number of bytes it covers) from a checkpoint's zip comment; None when
    the file has no comment (a version-1 checkpoint); ValueError when it has no zip end record."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - _EOCD_SIZE - _MAX_COMMENT))
        tail = f.read()
    # the end record is the last signature whose comment reaches exactly to the end of the file
    pos = tail.rfind(_EOCD_SIGNATURE)
    while pos >= 0 and pos + _EOCD_SIZE + int.from_bytes(tail[pos + 20: pos + 22], "little") != len(tail):
        pos = tail.rfind(_EOCD_SIGNATURE, 0, pos)
    if pos < 0:
        raise ValueError(f"{path}: not a readable checkpoint (no zip end record at the end of its {size} bytes: "
                         f"truncated, or not a torch.save file)")
    comment = tail[pos + _EOCD_SIZE:]
    if not comment:
        return None
    match = _COMMENT.fullmatch(comment)
    algorithm = match and match.group(1).decode()
    if not match or algorithm not in _DIGEST_SIZES or len(comment) != _comment_length(algorithm):
        raise ChecksumError(f"{path}: damaged checksum record {comment[:80]!r} (the zip comment at the end of "
                            f"the file)")
    return algorithm, match.group(2).decode(), size - len(comment)


def file_digest(path: str | os.PathLike, algorithm: str, length: Optional[int] = None) -> str:
    """Hex digest of the first `length` bytes of the file (all of it by default), read through mmap
    (straight from the page cache, no copy)."""
    hasher = _new_hasher(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = size if length is None else min(length, size)
        if length == 0:
            return hasher.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                for start in range(0, length, _CHUNK):
                    hasher.update(view[start: min(length, start + _CHUNK)])
            finally:
                view.release()
    return hasher.hexdigest()


def _damaged_parts(path) -> str:
    """Which zip members of a damaged checkpoint fail their CRC-32 (the error path only)."""
    bad = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        while member.read(_CHUNK):
                            pass
                except Exception:  # a bad CRC, a damaged header, anything
                    bad.append(info.filename.split("/", 1)[-1])
    except Exception as err:
        return f"its zip directory is damaged ({type(err).__name__}: {err})"
    if not bad:
        return "every zip member's CRC-32 still matches: the damage is in the zip's headers"
    described = [("the pickled state (structure, non-tensor values, tensor shapes)" if name == "data.pkl" else
                  f"tensor bytes {name}" if name.startswith("data/") else name) for name in bad[:4]]
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return "damaged: " + ", ".join(described) + more


def verify_checksum(path: str | os.PathLike) -> Optional[str]:
    """Check a checkpoint's bytes against its checksum record: the algorithm when they match, None
    when the file has no record (version 1); ChecksumError when they differ."""
    record = read_checksum_record(path)
    if record is None:
        return None
    algorithm, expected, length = record
    actual = file_digest(path, algorithm, length)
    if actual != expected:
        raise ChecksumError(f"{path}: checksum mismatch, the file changed after it was written "
                            f"({_damaged_parts(path)}; {algorithm} of its first {length} bytes is {actual}, "
                            f"the checkpoint records {expected})")
    return algorithm


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, keep_last: int = 0) -> Path:
    """Write `state` (plus the header) as the checkpoint of `step`; keep only the newest
    `keep_last` checkpoints (0 keeps all). Returns the checkpoint's path."""
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), **state}
    path = atomic_torch_save(payload, checkpoint_path(directory, step))
    remove_stale_temporaries(directory)
    if keep_last > 0:
        for _, old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
        fsync_dir(directory)
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete temporaries left by writers that died mid-write (there is one writer per directory)."""
    for entry in Path(directory).glob(f"{_TMP_PREFIX}ckpt_*"):
        entry.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> dict:
    """Load one checkpoint; ValueError when the file is not a complete pyllmc checkpoint, ChecksumError
    (a ValueError) when its bytes do not match its checksum. verify=False skips the checksum."""
    algorithm = verify_checksum(path) if verify else None  # before anything is unpickled
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, garbage bytes, unpickling errors...
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise ValueError(f"{path}: not a {FORMAT} file (no header)")
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: checkpoint version {version}, this pyllmc reads {READABLE_VERSIONS}")
    if verify and algorithm is None:
        if version >= 2:
            raise ChecksumError(f"{path}: a version-{version} checkpoint without its checksum record "
                                f"(the end of the file was damaged or rewritten)")
        warnings.warn(f"{path}: written before checkpoints carried checksums (version {version}): "
                      f"loaded without verification", UnverifiedCheckpointWarning, stacklevel=2)
    return state


def load_latest(directory: str | os.PathLike, map_location: Any = "cpu") -> Optional[tuple[dict, Path]]:
    """The newest checkpoint in `directory` that loads, and its path; None when there is none.

    A newer file that fails to load (partial write, a checksum mismatch, any damage) is skipped
    with a warning.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, map_location), path
        except ValueError as err:
            warnings.warn(f"skipping checkpoint of step {step}: {err}", stacklevel=2)
    return None


# ---- random number generator states ---------------------------------------------------------

def rng_state() -> dict:
    """Every global RNG a training run may draw from: python, numpy, torch CPU and CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different machine: restore this process's device only
            torch.cuda.set_rng_state(cuda_states[0])


# ---- the tokenizer a checkpoint's run used --------------------------------------------------

def recorded_tokenizer(state: dict) -> Optional[dict]:
    """The spec of the tokenizer a checkpoint's run used: what the trainer recorded, else (checkpoints
    from before it was recorded) GPT-2's when the model has GPT-2's 50,257 ids, else None (unknown)."""
    if isinstance(state.get("tokenizer"), dict):
        return state["tokenizer"]
    config = state.get("model_config") or {}
    return {"name": "gpt2"} if config.get("vocab_size") == 50257 else None


def check_tokenizer(state: dict, tokenizer, path: str | os.PathLike = "the checkpoint") -> None:
    """pyllmc.tokenizer.TokenizerMismatchError (a ValueError) when the checkpoint's run used another
    tokenizer than `tokenizer`; nothing when they are the same or the checkpoint's is unknown."""
    from pyllmc.tokenizer import check_same

    recorded = recorded_tokenizer(state)
    if recorded is not None:
        check_same(recorded, tokenizer, f"checkpoint {path}")
