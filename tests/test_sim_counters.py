"""The memory counters of the CUDA simulator (pyllmc.sim_counters, csrc/sim/counters.cpp).

The counters build is a variant of its own (one per process), so the runs happen in child
processes; the build itself happens here first, so its one-time cost (~2 minutes on 2 cores,
cached) is not a child's. The known-answer kernels pin the counting rules; the baseline
(dev/sim_counters_baseline.json) holds every kernel's traffic at its current level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sim_counters as tool  # dev/sim_counters.py (pytest puts dev/ on sys.path); not pyllmc.sim_counters
from pyllmc import cuda_sim, sim_counters

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def counters_build():
    try:
        cuda_sim.build("counters", verbose=False)
    except cuda_sim.BuildError as err:
        pytest.skip(f"the CUDA simulator cannot be built here: {err}")


def _child_env():
    env = dict(os.environ, PYLLMC_CUDA_SIM="1", PYLLMC_CUDA_SIM_VARIANT="counters")
    env.pop("PYLLMC_CSRC", None)
    return env


def test_known_answer_kernels_count_exactly(counters_build):
    program = ("import json; from pyllmc import sim_counters\n"
               "print(json.dumps({k: [v[1], v[2], v[3].requests] for k, v in sim_counters.known_answers().items()}))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=_child_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    want = {name: value for name, _, value in sim_counters.KNOWN_ANSWERS}
    assert {k: v[1] for k, v in got.items()} == want
    # one request per warp and site, 32 for the transposes' row loops
    assert got["copy"][2] == 1 and got["ldmatrix_128B_rows"][2] == 1 and got["transpose"][2] == 32


def test_every_kernel_holds_its_baseline(counters_build):
    done = subprocess.run([sys.executable, str(ROOT / "dev" / "sim_counters.py"), "--check", "--quiet"],
                          capture_output=True, text=True, env=_child_env(), timeout=600)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert "REGRESSION" not in done.stdout


def _launch(**changes):
    base = {"kernel": "k", "blocks": 1, "sectors": 8, "ideal_sectors": 4, "excess_sectors": 4, "wavefronts": 2,
            "ideal_wavefronts": 2, "excess_wavefronts": 0, "unique_read": 128, "unique_written": 128,
            "block_read": 128, "block_written": 128, "main_loop_at_ideal": ["a.cu|x = y[i];|global|ld|"],
            "not_at_ideal": ["a.cu|z[2 * i] = x;|global|st|"]}
    return {**base, **changes}


def test_compare_flags_each_kind_of_regression_and_nothing_else():
    baseline = {"case": [_launch()]}
    assert tool.compare({"case": [_launch()]}, baseline) == []
    # improvements pass
    assert tool.compare({"case": [_launch(excess_sectors=0, unique_read=64, not_at_ideal=[])]}, baseline) == []
    for change, word in ((dict(excess_sectors=5), "excess_sectors 5 > baseline 4"),
                         (dict(excess_wavefronts=1), "excess_wavefronts 1 > baseline 0"),
                         (dict(unique_read=129), "unique_read 129 > baseline 128"),
                         (dict(unique_written=160), "unique_written 160 > baseline 128"),
                         (dict(not_at_ideal=["a.cu|x = y[i];|global|ld|"]), "no longer at the ideal")):
        problems = tool.compare({"case": [_launch(**change)]}, baseline)
        assert len(problems) == 1 and word in problems[0], (change, problems)
    assert "launches" in tool.compare({"case": [_launch(kernel="other")]}, baseline)[0]
    assert "not in the baseline" in tool.compare({"new": [_launch()]}, baseline)[0]


def test_the_baseline_names_its_compiler_and_every_case():
    data = json.loads((ROOT / "dev" / "sim_counters_baseline.json").read_text())
    assert data["compiler"].startswith("g++")
    assert sorted(data["cases"]) == sorted(case.name for case in tool.cases())


@pytest.mark.slow
def test_planted_regressions_are_caught(counters_build):
    done = subprocess.run([sys.executable, str(ROOT / "dev" / "sim_counters.py"), "--mutants"],
                          capture_output=True, text=True, env=_child_env(), timeout=900)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert f"{len(tool.MUTANTS)} of {len(tool.MUTANTS)} mutants caught" in done.stdout
