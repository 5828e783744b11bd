"""The GPU check (dev/gpu_check.sh) cannot rot between GPU runs: its dry run runs here, on
the CPU, through the same script; the smoke's crash isolation is exercised with injected
faults; and the verdicts are checked on logs of the failures a GPU run can produce."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check_report

ROOT = Path(__file__).resolve().parents[1]
OUT_FILES = {"build.log", "smoke.jsonl", "smoke.log", "tests.log", "sanitizer.log", "bench.log", "bench.json",
             "summary.md"}


@pytest.fixture(scope="module")
def report():
    return gpu_check_report


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # only what a test gives
    return dict(env, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **extra)


def _rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the dry run, end to end --------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    # an RTX 3090's nvidia-smi: the check takes the architecture it builds for from the device it runs on
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text('#!/bin/sh\ncase "$*" in *compute_cap*) echo 8.6 ;; '
                                         '*) echo "NVIDIA GeForce RTX 3090, 580.65.06" ;; esac\n')
    (fake_bin / "nvidia-smi").chmod(0o755)
    env = _env(OUT=str(out), PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYLLMC_CUDA_ARCH", None)
    proc = subprocess.run(["bash", str(ROOT / "dev" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.md").read_text()
    build_log = (out / "build.log").read_text()
    assert re.search(r"^arch +86$", build_log, re.M) and "RTX 3090" in build_log, build_log[-3000:]
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}\n{summary}"
    assert summary.splitlines()[0].startswith("# GPU check --dry-run (no GPU): ok"), summary
    files = {p.name for p in out.iterdir()}
    assert files <= OUT_FILES and len(files) <= 8, files  # the device returns at most 8 files

    table = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    for stage in ("1. environment + build", "3. tests (pytest -m gpu)", "4. compute-sanitizer"):
        assert "skipped: no GPU" in table[stage], table[stage]
    assert "| ok" in table["2. smoke"] and "| ok" in next(v for k, v in table.items() if k.startswith("5. bench"))

    rows = _rows(out / "smoke.jsonl")
    plan = rows[0]
    cases = [r for r in rows if r["kind"] == "case"]
    assert plan["kind"] == "plan" and plan["cases"] == len(cases)
    ops = {r["op"] for r in cases}
    assert ops == {"gelu", "layernorm", "fused_residual_layernorm", "cross_entropy", "cross_entropy_fused",
                   "attention", "adamw", "rmsnorm", "fused_residual_rmsnorm", "swiglu", "relu2",
                   "rope"}
    ran = {(r["backend"], r["dtype"]) for r in cases if r["status"] == "pass"}
    assert ("triton", "float32") in ran and ("triton", "bfloat16") in ran
    if plan["backends"]["cuda"] == "simulated on the CPU":  # the cuda backend's code path ran too
        assert ("cuda", "float32") in ran and ("cuda", "bfloat16") in ran
    assert all(r["status"] in ("pass", "skip") for r in cases)
    assert {r["check"] for r in cases if r["status"] == "pass"} == {"numerics", "determinism"}

    bench = json.loads((out / "bench.json").read_text())
    steps = {r["impl"].split(" (")[0]: r for r in bench["rows"] if r["op"] == "train_step"}
    assert bench["complete"] and not bench["failures"]
    assert {"triton", "torch eager"} <= set(steps) and all(r["tokens_per_s"] > 0 for r in steps.values())


# ---- the smoke: a crash, a hang and an exception in one case each -------------------------------

@pytest.mark.slow
def test_smoke_isolates_crashes_hangs_and_errors(tmp_path):
    inject = ";".join(["crash:cuda gelu numerics 37x37 float32", "hang:triton gelu numerics 1x1 float32",
                       "raise:cuda gelu numerics 1x1 bfloat16"])
    proc = subprocess.run([sys.executable, str(ROOT / "dev" / "gpu_smoke.py"), "--small", "--ops", "gelu",
                           "--out", str(tmp_path), "--case-timeout", "8"],
                          cwd=ROOT, env=_env(GPU_SMOKE_INJECT=inject), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 1, proc.stdout[-3000:]
    rows = _rows(tmp_path / "smoke.jsonl")
    cases = {(r["backend"], r["case"]): r for r in rows if r["kind"] == "case"}
    assert len(cases) == rows[0]["cases"] == 8
    assert cases[("cuda", "gelu numerics 37x37 float32")]["status"] == "crash"
    assert cases[("triton", "gelu numerics 1x1 float32")]["status"] == "timeout"
    raised = cases[("cuda", "gelu numerics 1x1 bfloat16")]
    assert raised["status"] == "error" and "injected by GPU_SMOKE_INJECT" in raised["message"]
    others = [r for key, r in cases.items() if key not in {("cuda", "gelu numerics 37x37 float32"),
                                                           ("triton", "gelu numerics 1x1 float32"),
                                                           ("cuda", "gelu numerics 1x1 bfloat16")}]
    skipped_cuda = rows[0]["backends"]["cuda"] != "simulated on the CPU"
    assert all(r["status"] == ("skip" if skipped_cuda and r["backend"] == "cuda" else "pass") for r in others), others
    assert "FAILED" in proc.stdout and "| gelu |" in proc.stdout  # the verdict and the one-line-per-op table


# ---- verdicts on the logs of failed GPU runs --------------------------------------------------

def _pytest_log(lines, final):
    return "\n".join(["============================= test session starts =============================="]
                     + lines + ["=========================== short test summary info ============================",
                                f"======================= {final} in 12.34s ======================="]) + "\n"


def test_tests_all_cuda_skipped_is_a_failure_on_a_gpu(report, tmp_path):
    (tmp_path / "tests.log").write_text(_pytest_log(
        ["tests/test_gelu.py::test_gelu_matches_torch[dtype0-shape0-cuda] SKIPPED (backend 'cuda' unavailable: "
         "no CUDA GPU is visible)                          [ 50%]",
         "tests/test_attention.py::test_attention_gpt2_size[triton-dtype0] PASSED [100%]"],
        "1 passed, 1 skipped"))
    stage = report.Stage("tests", "ran", 0, 12.0, 120.0)
    on_gpu = report.judge_tests(stage, tmp_path, gpu=True)
    assert not on_gpu.ok and on_gpu.verdict == "FAILED"
    assert any("no [cuda] test passed" in p for p in on_gpu.problems)
    assert any("unavailable" in p for p in on_gpu.problems)
    assert "backend 'cuda' unavailable" in on_gpu.details


def test_tests_failures_are_named(report, tmp_path):
    (tmp_path / "tests.log").write_text(_pytest_log(
        ["tests/test_gelu.py::test_gelu_matches_torch[dtype0-shape0-cuda] PASSED [ 33%]",
         "tests/test_layernorm.py::test_deterministic[cuda-True] FAILED [ 66%]",
         "tests/test_attention.py::test_attention_lse[cuda-dtype0] PASSED [100%]"],
        "1 failed, 2 passed"))
    verdict = report.judge_tests(report.Stage("tests", "ran", 1, 12.0, 120.0), tmp_path, gpu=True)
    assert not verdict.ok and "tests/test_layernorm.py::test_deterministic[cuda-True]" in verdict.details
    assert "2 passed" in verdict.numbers and "[cuda] tests passed: 2" in verdict.numbers


def test_tests_cut_short_count_what_ran(report, tmp_path):
    (tmp_path / "tests.log").write_text("tests/test_gelu.py::test_gelu_matches_torch[dtype0-shape0-cuda] PASSED\n")
    verdict = report.judge_tests(report.Stage("tests", "ran", 124, 120.0, 120.0), tmp_path, gpu=True)
    assert not verdict.ok and any("limit" in p for p in verdict.problems) and "1 passed" in verdict.numbers


CLEAN_DRIVER = "cuda_driver: 60 cases in 3.2 s\n"


def _sanitizer_log(tmp_path, blocks):
    text = ""
    for tool, body in blocks.items():
        text += f"===== compute-sanitizer {tool}: start (limit 60 s)\n{body}===== compute-sanitizer {tool}: exit 0\n"
    (tmp_path / "sanitizer.log").write_text(text)


def test_sanitizer_verdicts(report, tmp_path):
    _sanitizer_log(tmp_path, {
        "memcheck": CLEAN_DRIVER + "========= ERROR SUMMARY: 0 errors\n",
        "racecheck": CLEAN_DRIVER + "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
        "=========     at attention_backward_kernel(float *)+0x1c0 in /src/csrc/attention.cu:321\n",
        "initcheck": "cuda_driver: every CUDA launcher on NVIDIA H200\n",
        "synccheck": CLEAN_DRIVER + "========= ERROR SUMMARY: 0 errors\n",
    })
    stages = [report.Stage(f"sanitizer:{tool}", "ran", rc, seconds, 60)
              for tool, rc, seconds in (("memcheck", 0, 20), ("racecheck", 99, 30), ("initcheck", 124, 60),
                                        ("synccheck", 0, 20))]
    verdict = report.judge_sanitizer(stages, tmp_path)
    assert not verdict.ok
    problems = " ".join(verdict.problems)
    assert "racecheck" in problems and "attention_backward_kernel (attention.cu:321)" in problems
    assert "initcheck: stopped at its 60 s limit" in problems
    assert "memcheck" not in problems and "synccheck" not in problems

    clean = report.judge_sanitizer([report.Stage("sanitizer:memcheck", "ran", 0, 20, 60)], tmp_path)
    assert not clean.ok and any("did not run" in p for p in clean.problems)  # three tools missing


def _smoke_rows(statuses, planned):
    rows = [{"kind": "plan", "cases": planned}]
    for i, status in enumerate(statuses):
        rows.append({"kind": "case", "op": "gelu", "backend": "cuda", "dtype": "float32", "check": "numerics",
                     "shape": "1x1", "case": f"gelu numerics {i}", "index": i, "status": status,
                     "worst_ratio": 0.5, "worst_output": "dx", "seconds": 0.1, "message": ""})
    return rows


def test_smoke_verdicts(report):
    assert report.smoke_summary(_smoke_rows(["pass", "pass"], 2), gpu=True)[0] == "ok"
    verdict, numbers = report.smoke_summary(_smoke_rows(["pass"], 2), gpu=True)
    assert verdict == "FAILED" and "1 never reported" in numbers
    assert report.smoke_summary(_smoke_rows(["pass", "skip"], 2), gpu=True)[0] == "FAILED"  # a GPU runs every case
    assert report.smoke_summary(_smoke_rows(["pass", "skip"], 2), gpu=False)[0] == "ok"
    assert report.smoke_summary(_smoke_rows(["pass", "timeout"], 2), gpu=False)[0] == "FAILED"
    assert report.smoke_summary([], gpu=False)[0] == "FAILED"  # no plan: it never started


def test_summary_first_line(report, tmp_path):
    """Stage 1's hard failure is the first line; later stages are 'not run'; never 'ok' for a partial run."""
    (tmp_path / "build.log").write_text('ENV-JSON {"gpu": "NVIDIA H200", "torch": "2.11.0"}\n')
    why = "torch sees NVIDIA H200 but the cuda backend is unavailable: ...; pyllmc._C.device_error(): 'no device'"
    stages = [report.Stage.parse(f"env_build|ran|10|30|120|{why}")] + \
        [report.Stage.parse(f"{name}|not-run||0|0|not run: stage 1 failed") for name in ("smoke", "tests", "bench")]
    code, text = report.summarize(tmp_path, stages, dry_run=False, final=True)
    first = text.splitlines()[0]
    assert code == 1 and first.startswith(f"# GPU check: FAILED: environment + build: {why}"), first
    assert "smoke" not in first  # what stage 1 kept from running is listed below, not in the verdict
    assert "| 2. smoke | not run | not run: stage 1 failed |" in text

    code, text = report.summarize(tmp_path, stages[:1], dry_run=False, final=False)
    assert code == 1 and text.startswith("# GPU check: INCOMPLETE")


def test_report_needs_no_torch(tmp_path):
    """The summary must be written even when the environment it reports on is broken."""
    code = ("import sys; sys.modules['torch'] = None; "
            "import gpu_check_report as r; "  # found in the working directory, dev/ (python -c looks there first)
            f"sys.exit(r.main(['--out', {str(tmp_path)!r}, '--stage', 'bench|ran|0|1|120|', '--final']))")
    env = {"gpu": "NVIDIA H200", "date": "2030-01-01 00:00 UTC"}
    (tmp_path / "bench.json").write_text(json.dumps({"environment": env, "ceilings": None, "rows": [], "failures": [],
                                                     "complete": True}))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "dev", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr  # FAILED (no step rows, other stages missing), but written
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("# GPU check: FAILED") and "no train_step row" in text
    assert "dev/bench/results/NVIDIA-H200-2030-01-01.md" in text


def _good_gpu_run(tmp_path):
    """The logs of a GPU run where everything passed."""
    (tmp_path / "build.log").write_text('ENV-JSON {"gpu": "NVIDIA H200", "driver": "580.65", "torch": "2.11.0", '
                                        '"triton": "3.6.0", "cuda_backend": "available", "build_seconds": 61}\n')
    smoke = _smoke_rows(["pass", "pass"], 2)
    (tmp_path / "smoke.jsonl").write_text("".join(json.dumps(r) + "\n" for r in smoke))
    (tmp_path / "tests.log").write_text(_pytest_log(
        ["tests/test_gelu.py::test_gelu_matches_torch[dtype0-shape0-cuda] PASSED [100%]"], "1 passed"))
    clean = {tool: CLEAN_DRIVER + "========= ERROR SUMMARY: 0 errors\n"
             for tool in ("memcheck", "initcheck", "synccheck")}
    clean["racecheck"] = CLEAN_DRIVER + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    _sanitizer_log(tmp_path, clean)
    step = dict(op="train_step", ms=100.0, tokens_per_s=163840.0, mfu=0.4, peak_memory_bytes=2**34, shape="GPT-2")
    rows = [dict(op="gelu_forward", impl=impl, ms=0.1) for impl in ("torch eager", "cuda", "triton")]
    rows += [dict(step, impl=impl) for impl in ("cuda", "triton", "torch.compile (nanoGPT-style)")]
    (tmp_path / "bench.json").write_text(json.dumps({
        "environment": {"gpu": "NVIDIA H200", "date": "2030-01-02 03:04 UTC"}, "ceilings": {"copy_gbps": 4000.0,
        "matmul_tflops": 800.0}, "failures": [], "complete": True, "rows": rows}))
    stages = ["env_build|ran|0|70|120|", "smoke|ran|0|50|90|", "tests|ran|0|80|120|"]
    stages += [f"sanitizer:{tool}|ran|0|20|60|" for tool in ("memcheck", "racecheck", "initcheck", "synccheck")]
    return stages + ["bench|ran|0|100|120|"]


def test_summary_ok_only_when_everything_ran_and_passed(report, tmp_path):
    stages = [report.Stage.parse(s) for s in _good_gpu_run(tmp_path)]
    code, text = report.summarize(tmp_path, stages, dry_run=False, final=True)
    assert code == 0 and text.splitlines()[0] == "# GPU check: ok", text
    assert "163,840 tok/s, MFU 40.0%, 16.0 GiB" in text
    assert "dev/bench/results/NVIDIA-H200-2030-01-02.md" in text

    code, text = report.summarize(tmp_path, stages[:-1], dry_run=False, final=True)  # the bench never ran
    assert code == 1 and "bench (run.py --quick): not run" in text.splitlines()[0]
    (tmp_path / "bench.json").unlink()  # the bench ran but wrote nothing
    code, text = report.summarize(tmp_path, stages, dry_run=False, final=True)
    assert code == 1 and "bench: no results" in text.splitlines()[0]


def test_ptxas_table_is_quoted_with_its_spills(report):
    table = ("| file | kernel | registers | spill stores | spill loads | stack | static smem | barriers |\n"
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
             "| gelu.cu | `gelu_kernel<bf16>` | 16 | 0 | 0 | 0 | 0 | 0 |\n"
             "| attention.cu | `attention_forward_kernel<bf16, 128>` | 255 | 64 | 64 | 64 | 0 | 1 |\n")
    section = report.ptxas_section(table, "90")
    assert "2 kernel instances, 1 spilling: attention.cu `attention_forward_kernel<bf16, 128>`" in section
    assert "<details>" in section and "`gelu_kernel<bf16>`" in section
