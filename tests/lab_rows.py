"""What the kernel lab's tests (tests/test_lab*.py) share: dev/lab/lab.py, imported under the name
its ladders import it by (`lab`), and `rows`, which runs a ladder once per test session and skips
where the CUDA simulator cannot be built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev" / "lab"))
try:
    import lab  # noqa: F401  (dev/lab/lab.py)
finally:
    sys.path.remove(str(ROOT / "dev" / "lab"))
from pyllmc import cuda_sim  # noqa: E402


def rows(name: str, mutant: str = "") -> dict:
    """rung stem -> Row of ladder `name` (with `mutant` planted), run once per test session."""
    try:
        return lab.rows(name, mutant)
    except cuda_sim.BuildError as err:
        pytest.skip(f"the CUDA simulator cannot be built here: {err}")
