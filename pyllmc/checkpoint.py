"""Training checkpoints: atomic writes, keep-the-last-K, resume from the newest valid one.

A training checkpoint is one `torch.save` file, `ckpt_<step:08d>.pt`, holding a run's state plus a
small header (`format`, `version`, `step`) that tells a finished checkpoint from anything else.
save_training / restore_training are the one place that writes and reads the trainer's state
(TrainingState: model, optimizer, every rank's data-loader positions and RNG states; with the run's
settings, tokenizer and outlier windows), so the schema lives here:

    model_family, model_config   "gpt2" or "llama" (pyllmc.models; absent: gpt2) and its config (a dict)
    model                        the model's state_dict
    optimizer                    AdamW's state_dict; with ZeRO-1 a list, one per rank
    ranks                        per rank: train_loader / val_loader positions, rng (python, numpy, torch)
    outliers                     the report's running windows (pyllmc.reporting)
    settings                     the flags, "auto"s decided, paths absolute: what --resume 1 continues
    world_size, zero_stage, tokens_seen, tokenizer (its spec)

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
load_latest skips the file like any damaged one.

Tokenizer. The trainer records the spec of the tokenizer its data declared (pyllmc.tokenizer) under
"tokenizer"; recorded_tokenizer(state) reads it back (checkpoints from before it was recorded were
GPT-2's when their model has GPT-2's vocabulary) and check_tokenizer refuses another one, so a run
is never resumed, continued or decoded with a tokenizer whose ids mean something else.

Settings. The trainer records the run's settings (its flags, with "auto"s decided and paths absolute)
under "settings"; resume_settings gives a resumed run those, refusing a command line that asks for other
values of the ones that shape training unless it names them in an override (SettingsConflict says both
values and how), so that --resume 1 continues the run it names rather than another one.

A checkpoint is data, not code. People share checkpoints (to resume or fine-tune), and a pickle
can name any Python callable to run while it loads; a checksum cannot help (anyone can write a valid
one). So everything the trainer puts in a checkpoint is plain data (tensors, ints, floats, strings,
bools, None, lists, tuples, dicts; numpy's RNG state as a dict holding a tensor), and every checkpoint
is read with torch.load(weights_only=True), whose restricted unpickler accepts nothing else and calls
nothing. A file that names any other Python object is refused before anything is unpickled
(UnsafeCheckpointError, a ValueError). Checkpoints of the earlier format (versions 1 and 2 pickled
numpy's RNG state as a numpy array, which only the unrestricted unpickler takes) are refused the same
way, with the command that converts a file you wrote yourself:

    python -m pyllmc.checkpoint convert --trust-this-file OLD.pt NEW.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import mmap
import os
import pickle
import random
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

FORMAT = "pyllmc-train-checkpoint"
# 3: plain data only, read with weights_only=True; 2: a checksum, numpy objects pickled; 1: before checksums.
# Versions 1 and 2 are refused with the conversion command (convert_trusted, below).
VERSION = 3
READABLE_VERSIONS = (3,)
CONVERTIBLE_VERSIONS = (1, 2)
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


_PLAIN_LEAVES = (torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.Size, torch.device)


def check_plain_data(obj, where: str = "") -> None:
    """TypeError naming the first value that torch.load(weights_only=True) could not read back: a
    checkpoint holds tensors, numbers, strings, bools, None, and lists, tuples and dicts of them."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint state{where}: key {key!r} is a {type(key).__name__}, not a str or int")
            check_plain_data(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain_data(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES) or type(obj).__module__ == "numpy":
        raise TypeError(f"checkpoint state{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint "
                        f"holds only plain data (tensors, numbers, strings, lists, tuples, dicts), which loads "
                        f"without running code; convert it (a numpy array: torch.from_numpy)")


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, keep_last: int = 0) -> Path:
    """Write `state` (plus the header) as the checkpoint of `step`; keep only the newest
    `keep_last` checkpoints (0 keeps all). Returns the checkpoint's path."""
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), **state}
    check_plain_data(payload)  # what cannot be loaded back as plain data is refused now, not at resume
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


class UnsafeCheckpointError(ValueError):
    """A file that names Python objects beyond plain data (the restricted unpickler's set): loading it
    could run code, so it is refused; an earlier-format pyllmc checkpoint gets the conversion command."""


# What checkpoints of versions 1 and 2 pickled besides plain data: numpy's RNG state (an ndarray).
_EARLIER_FORMAT_GLOBALS = re.compile(r"^numpy\.(core\.multiarray\._reconstruct|_core\.multiarray\._reconstruct|"
                                     r"ndarray|dtype|dtypes\.\w+)$")


def _unsafe_globals(path) -> list[str]:
    """The Python objects a checkpoint's pickle names that torch.load(weights_only=True) refuses, found by
    reading its opcodes (nothing is unpickled); [] where this torch cannot tell."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return sorted(finder(str(path)))
    except Exception:  # a damaged pickle: the load's own error says so
        return []


def _refuse_unsafe(path, err: Exception) -> UnsafeCheckpointError:
    names = _unsafe_globals(path)
    if names and all(_EARLIER_FORMAT_GLOBALS.match(name) for name in names):
        return UnsafeCheckpointError(
            f"{path}: a checkpoint of pyllmc's earlier format, which pickled Python objects ({', '.join(names)}); "
            f"pyllmc now loads checkpoints only as plain data, because a pickled object can run any code while it "
            f"loads. If you wrote this file yourself, convert it once: python -m pyllmc.checkpoint convert "
            f"--trust-this-file {path} NEW.pt")
    named = f"it names {', '.join(names)}" if names else f"{type(err).__name__}: {err}"
    return UnsafeCheckpointError(
        f"{path}: refused: a pyllmc checkpoint holds only plain data (tensors, numbers, strings, lists, dicts), "
        f"and this file asks the unpickler for more ({named}); loading it could run code. Do not load it "
        f"unless you know who made it and why")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> dict:
    """Load one checkpoint as plain data (torch.load with weights_only=True: nothing in the file is run).

    ValueError when the file is not a complete pyllmc checkpoint; ChecksumError (a ValueError) when its
    bytes do not match its checksum; UnsafeCheckpointError (a ValueError) when it names Python objects
    beyond plain data: a file made to run code, or one of pyllmc's earlier format (the message gives the
    conversion command). verify=False skips the checksum."""
    algorithm = verify_checksum(path) if verify else None  # before anything is unpickled
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # the restricted unpickler met a global it does not allow
        raise _refuse_unsafe(path, err) from None
    except Exception as err:  # truncated zip, garbage bytes...
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise ValueError(f"{path}: not a {FORMAT} file (no header)")
    version = state.get("version")
    if version in CONVERTIBLE_VERSIONS:
        raise UnsafeCheckpointError(
            f"{path}: a checkpoint of pyllmc's earlier format (version {version}); if you wrote it yourself, "
            f"convert it once: python -m pyllmc.checkpoint convert --trust-this-file {path} NEW.pt")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: checkpoint version {version}, this pyllmc reads {READABLE_VERSIONS}")
    if verify and algorithm is None:
        raise ChecksumError(f"{path}: a version-{version} checkpoint without its checksum record "
                            f"(the end of the file was damaged or rewritten)")
    return state


def convert_trusted(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Rewrite a checkpoint of the earlier format (versions 1, 2) as the current one (plain data).

    THIS RUNS THE UNRESTRICTED UNPICKLER on `source`: whatever code the file names runs. Call it only on
    a file you wrote yourself (the command line asks for --trust-this-file). The checksum of a version-2
    file is verified first; the result is checked to load as plain data before it is written."""
    source, destination = Path(source), Path(destination)
    if source.resolve() == destination.resolve():
        raise ValueError(f"{destination}: write the converted checkpoint to a new file (the original stays as it is)")
    verify_checksum(source)
    state = torch.load(source, map_location="cpu", weights_only=False)  # trusted by the caller, see above
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise ValueError(f"{source}: not a {FORMAT} file (no header)")
    if state.get("version") not in CONVERTIBLE_VERSIONS + READABLE_VERSIONS:
        raise ValueError(f"{source}: checkpoint version {state.get('version')}, this pyllmc converts "
                         f"{CONVERTIBLE_VERSIONS}")
    for rank in state.get("ranks") or []:
        rng = rank.get("rng") if isinstance(rank, dict) else None
        if rng is not None and isinstance(rng.get("numpy"), tuple):
            rng["numpy"] = _plain_numpy_state(rng["numpy"])
    state.pop("format"), state.pop("version")
    step = state.pop("step")
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), **state}
    path = atomic_torch_save(payload, destination)
    try:
        load_checkpoint(path)
    except ValueError as err:
        path.unlink(missing_ok=True)
        raise ValueError(f"{source}: holds more than plain data even after conversion ({err}); not converted") from None
    return path


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

def _plain_numpy_state(legacy) -> dict:
    """numpy's global RNG state as plain data: np.random.get_state()'s tuple ("MT19937", key (624,) uint32,
    pos, has_gauss, cached_gaussian) as a dict with the key in an int64 tensor."""
    kind, key, pos, has_gauss, cached_gaussian = legacy
    return {"bit_generator": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def rng_state() -> dict:
    """Every global RNG a training run may draw from: python, numpy, torch CPU and CUDA (plain data)."""
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, None)
        "numpy": _plain_numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))  # weights_only loads tuples back as tuples; be sure
    numpy = state["numpy"]
    np.random.set_state((numpy["bit_generator"], numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
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


# ---- the run's settings, which a resume continues with ---------------------------------------

class SettingsConflict(ValueError):
    """A resume whose command line asks for other settings than the run it continues: the message
    names both values and how to change them on purpose."""


def recorded_settings(state: dict) -> dict:
    """The settings (the trainer's flags) a checkpoint's run trained with (resolved: paths absolute,
    "auto"s decided)."""
    settings = state.get("settings")
    return dict(settings) if isinstance(settings, dict) else {}


def resume_settings(recorded: dict, current: dict, given, *, local=(), free=(), fixed=(), override=(),
                    where: str = "the checkpoint") -> tuple[dict, set, dict]:
    """The settings a resumed run continues with, from those its checkpoint `recorded` and this command
    line's (`current`, of which `given` were set on it; the rest hold defaults).

    Every recorded setting comes back, but the `local` ones (this invocation's own: where to write, which
    device, when to stop): a flag not given takes its recorded value. A flag given keeps its value when it
    is `free` (shapes nothing the training computes: logging, evaluation, exports), when it equals the
    recorded value, or when `override` names it; otherwise SettingsConflict (a ValueError) names both
    values and how to drop or override it. A `fixed` setting (one the saved state depends on) cannot be
    overridden. Returns (settings, the names taken from the record, {name: (recorded, given)} overridden)."""
    given, override = set(given), set(override)
    unknown = sorted(override - set(current))
    if unknown:
        raise SettingsConflict(f"--resume_override names {', '.join(unknown)}: not a flag of this trainer")
    free_here = set(local) | set(free)
    problems = [f"--{name} may differ from the run's without an override" for name in sorted(override & free_here)]
    problems += [f"--{name} cannot change in a resumed run (the saved state depends on it): start a new run "
                 f"from the weights instead (--model CKPT with another --output_dir)"
                 for name in sorted(override & set(fixed))]
    problems += [f"--{name} is not on this command line: give the new value with it" for name in
                 sorted(override - given - free_here - set(fixed))]
    if problems:
        raise SettingsConflict("--resume_override: " + "; ".join(problems))
    settings, inherited, overridden, conflicts = dict(current), set(), {}, []
    for name, value in recorded.items():
        if name not in current or name in local:
            continue
        if name not in given:
            settings[name] = value
            inherited.add(name)
        elif current[name] != value and name not in free:
            if name in override:
                overridden[name] = (value, current[name])
            else:
                conflicts.append(name)
    if conflicts:
        lines = "\n".join(f"  --{name} {current[name]} (this command line) vs {recorded[name]} (the run)"
                          for name in conflicts)
        movable = [name for name in conflicts if name not in fixed]
        how = (f"drop {'it' if len(conflicts) == 1 else 'them'} to continue the run as it was"
               + (f", or change {'it' if len(movable) == 1 else 'them'} on purpose with --resume_override "
                  f"{','.join(movable)}" if movable else ""))
        fixed_named = [name for name in conflicts if name in fixed]
        if fixed_named:
            how += (f" ({', '.join('--' + n for n in fixed_named)} cannot change in a resumed run: start a new run "
                    f"from the weights instead, --model CKPT with another --output_dir)")
        raise SettingsConflict(f"--resume 1 continues the run of {where} with the settings it recorded, and this "
                               f"command line gives others:\n{lines}\n{how}")
    return settings, inherited, overridden


# ---- a training run's state: what a checkpoint holds, saved and restored in one place ----------

@dataclass
class TrainingState:
    """The live parts of a run that a checkpoint saves and a resume restores (references, not copies).

    Every rank contributes its own data-loader positions and RNG state, and with ZeRO-1 (zero) its
    own part of the optimizer state; rank 0 gathers them and writes the one file."""
    model: torch.nn.Module                 # the model as trained (not a torch.compile wrapper)
    optimizer: Optional[torch.optim.Optimizer]  # None: a ZeRO-1 rank that owns no parameter
    train_loader: Any                      # pyllmc.data.DistributedDataLoader
    val_loader: Any                        # the same, or None (no validation)
    rank: int = 0
    world_size: int = 1
    ddp: bool = False                      # several processes (torch.distributed is initialised)
    zero: bool = False                     # ZeRO-1: each rank's optimizer holds its own parameters only


def save_training(directory: str | os.PathLike, *, step: int, run: TrainingState, settings: dict,
                  tokens_seen: int, tokenizer: dict, outliers: dict, keep_last: int = 0, llmc: bool = False,
                  hf: bool = False, dtype: str = "float32") -> Optional[Path]:
    """Checkpoint `run` at `step` (call on every rank); rank 0 writes ckpt_<step>.pt, and with llmc / hf the
    model as an llm.c file (model_<step>.bin, in `dtype`, with its sha256) / a Hugging Face directory
    (hf_<step>/), keeping the newest keep_last of each. Returns the checkpoint's path on rank 0, else None.

    settings: what --resume 1 continues with (the flags, "auto"s decided, paths absolute); tokenizer: its
    spec (a resume or decode with another is refused); outliers: the report's outlier windows."""
    import torch.distributed as dist

    mine = {
        "train_loader": run.train_loader.state_dict(),
        "val_loader": run.val_loader.state_dict() if run.val_loader is not None else None,
        "rng": rng_state(),
    }
    shard = run.optimizer.state_dict() if (run.zero and run.optimizer is not None) else None
    if run.ddp:
        gathered = [None] * run.world_size if run.rank == 0 else None
        dist.gather_object((mine, shard), gathered, dst=0)
    else:
        gathered = [(mine, shard)]
    if run.rank != 0:
        return None
    from pyllmc.models import config_state  # (pyllmc.models imports the model modules, which need not load here)
    state = {
        **config_state(run.model),  # model_family, model_config
        "model": run.model.state_dict(),
        "optimizer": [s for _, s in gathered] if run.zero else run.optimizer.state_dict(),
        "ranks": [m for m, _ in gathered],
        "outliers": outliers,
        "settings": settings,
        "world_size": run.world_size,
        "zero_stage": settings["zero_stage"],
        "tokens_seen": tokens_seen,
        "tokenizer": tokenizer,
    }
    path = save_checkpoint(directory, step, state, keep_last=keep_last)
    directory = Path(directory)
    if llmc:  # atomic, with its sha256 in model_<step>.bin.sha256
        from pyllmc.llmc import write_model
        write_model(str(directory / f"model_{step:08d}.bin"), run.model, dtype=dtype)
    if hf:
        run.model.save_pretrained(str(directory / f"hf_{step:08d}"))
    prune_exports(directory, keep_last)
    return path


def prune_exports(directory: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` llm.c model files (with their .sha256) and HF directories, like the checkpoints."""
    if keep <= 0:
        return
    import shutil
    for pattern in ("model_*.bin", "hf_*"):
        for old in sorted(Path(directory).glob(pattern))[:-keep]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)


def check_resumable(state: dict, batch_size: int, sequence_length: int, world_size: int, zero_stage: int) -> None:
    """ValueError unless this run can continue `state` exactly: the loaders' positions count B x T tokens
    per rank, and each rank restores its own loaders, RNG and (ZeRO-1) optimizer part."""
    saved = recorded_settings(state)
    for key, value in (("batch_size", batch_size), ("sequence_length", sequence_length)):
        if saved.get(key) != value:
            raise ValueError(f"the checkpoint was trained with --{key} {saved.get(key)}, this run has {value}: "
                             f"an exact resume needs the same value")
    if state["world_size"] != world_size:
        raise ValueError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                         f"{world_size}: resume with the same number of processes")
    if state["zero_stage"] != zero_stage and world_size > 1:
        raise ValueError(f"the checkpoint was written with --zero_stage {state['zero_stage']}: "
                         f"resume with the same value")


def restore_training(state: dict, run: TrainingState, *, batch_size: int, sequence_length: int,
                     zero_stage: int) -> int:
    """Put a checkpoint's state back into `run` (this rank's part); returns the step it was taken at.
    ValueError when the run cannot continue it exactly (check_resumable), or when the loaders' shards are
    not the ones the run had."""
    check_resumable(state, batch_size, sequence_length, run.world_size, zero_stage)
    if run.optimizer is not None:
        run.optimizer.load_state_dict(state["optimizer"][run.rank] if run.zero else state["optimizer"])
    mine = state["ranks"][run.rank]
    try:
        run.train_loader.load_state_dict(mine["train_loader"])
        if run.val_loader is not None and mine.get("val_loader") is not None:
            run.val_loader.load_state_dict(mine["val_loader"])
    except ValueError as err:  # other shards than the run's (an overridden --input_bin, say)
        raise ValueError(f"--resume 1: {err}") from None
    set_rng_state(mine["rng"])
    return state["step"]


# ---- command line -----------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyllmc.checkpoint",
                                     description="Convert a training checkpoint of pyllmc's earlier format.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="rewrite an earlier-format checkpoint (versions 1, 2) as plain data",
                             description="Loads SOURCE with the unrestricted unpickler (which runs whatever code the "
                                         "file names) and writes it as a current checkpoint that loads as plain "
                                         "data. Only for a file you wrote yourself.")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--trust-this-file", action="store_true",
                         help="say that you wrote SOURCE yourself: loading it may run any code it holds")
    args = parser.parse_args(argv)
    if not args.trust_this_file:
        parser.error("convert loads SOURCE with the unrestricted unpickler, which runs any code the file holds: "
                     "add --trust-this-file only if you wrote it yourself")
    try:
        path = convert_trusted(args.source, args.destination)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} (checkpoint version {VERSION}: plain data, loads without running code)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
