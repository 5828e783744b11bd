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

Checkpoint files are pickles (they hold numpy/python RNG states and arbitrary loader
states): load only checkpoints you wrote yourself.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

FORMAT = "pyllmc-train-checkpoint"
VERSION = 1
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


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


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load one checkpoint; ValueError when the file is not a complete pyllmc checkpoint."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, garbage bytes, unpickling errors...
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise ValueError(f"{path}: not a {FORMAT} file (no header)")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')}, this pyllmc reads {VERSION}")
    return state


def load_latest(directory: str | os.PathLike, map_location: Any = "cpu") -> Optional[tuple[dict, Path]]:
    """The newest checkpoint in `directory` that loads, and its path; None when there is none.

    A newer file that fails to load (partial write, corruption) is skipped with a warning.
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
