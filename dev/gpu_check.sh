#!/usr/bin/env bash
# One GPU run that proves every kernel, in under 8 minutes on one H100 / H200:
#
#   bash dev/gpu_check.sh              # on the GPU machine; results under $OUT (default ./gpu_check_out)
#   bash dev/gpu_check.sh --dry-run    # on a CPU: the same script, CUDA stages "skipped: no GPU"
#
# Stages, in this order, each with its own time limit, each writing its log under $OUT as it
# runs (a run killed at any point still leaves what it learned):
#   1. environment + build (<= 120 s): GPU, driver, versions; pip install --no-build-isolation
#      --no-deps -e . for the GPU's own architecture only (nvidia-smi), all cores. Fails hard (and stops) when torch sees a GPU but
#      the cuda backend cannot run: pyllmc._C's own device error is printed (a CUDA 13 runtime on
#      an older driver sees 0 devices, which would turn every CUDA test into a skip).
#   2. smoke (<= 90 s): dev/gpu_smoke.py, every op x backend x dtype x gradient at GPT-2 shapes
#      and odd ones, plus determinism; one JSON row per case, one table line per op.
#   3. tests (<= 120 s): pytest -m gpu (the [cuda] parametrizations and the GPU-only tests),
#      no -x, PYLLMC_TEST_TIMEOUT per test.
#   4. compute-sanitizer (<= 60 s per tool): memcheck, racecheck, initcheck, synccheck over
#      dev/cuda_driver.py (every CUDA launcher once at small odd shapes), into one log.
#   5. bench --quick (<= 120 s): every op's row and the whole training step (cuda, triton and
#      the torch.compile baseline: tokens/s, MFU, peak memory).
#   6. summary: $OUT/summary.md, rewritten after every stage and at exit (a trap); its first
#      line is the verdict. It is also the report to commit as dev/bench/results/<gpu>-<date>.md.
# The whole run keeps inside GPU_CHECK_BUDGET seconds (default 480): a stage gets its own limit
# or what is left after keeping the later stages' minimum, whichever is less.
#
# $OUT holds 8 files (the most the device returns): build.log smoke.jsonl smoke.log tests.log
# sanitizer.log bench.log bench.json summary.md.
# Exit code: 0 when every stage is ok (--dry-run: every stage that can run on a CPU), else 1.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

usage() { sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
OUT_FILES=(build.log smoke.jsonl smoke.log tests.log sanitizer.log bench.log bench.json summary.md)
for f in "${OUT_FILES[@]}"; do rm -f "$OUT/$f"; done  # an earlier run's logs must not be read as this run's

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's pyllmc, whatever else is installed
BUDGET="${GPU_CHECK_BUDGET:-480}"
SAFETY=10        # seconds kept for the last summary
MIN_STAGE=15     # a stage with less time than this is not started
START_EPOCH="$(date +%s)"
SECONDS=0
TMP="$(mktemp -d)"
PTXAS_PID=""
STAGES=()        # one record per finished stage: name|state|rc|seconds|limit|note
CURRENT=""       # the record of the stage in flight, for the trap
STOP=""          # set when a stage fails hard: the later stages are not run

if [ "$DRY_RUN" = 1 ]; then
    # No GPU: Triton's interpreter and the CUDA simulator run the kernels on CPU tensors.
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 PYLLMC_CUDA_SIM="${PYLLMC_CUDA_SIM:-1}"
    export PYLLMC_CSRC="$ROOT/csrc"
    DRY_FLAG=(--dry-run)
else
    unset TRITON_INTERPRET PYLLMC_CUDA_SIM  # either would make a GPU run test something else
    DRY_FLAG=()
fi

# ---- stage bookkeeping ------------------------------------------------------------------------

write_summary() {  # [--final]: writes $OUT/summary.md from the records; prints its first line
    local args=() s
    for s in ${STAGES[@]+"${STAGES[@]}"}; do args+=(--stage "$s"); done
    [ -n "$CURRENT" ] && args+=(--stage "$CURRENT")
    timeout 60 "$PY" "$ROOT/dev/gpu_check_report.py" --out "$OUT" ${args[@]+"${args[@]}"} \
        ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} --started "$START_EPOCH" --budget "$BUDGET" --ptxas-md "$TMP/ptxas.md" "$@"
}

record() {  # name state rc seconds limit note
    STAGES+=("$1|$2|$3|$4|$5|${6:-}")
    CURRENT=""
    write_summary >/dev/null 2>>"$TMP/report.err"
}

STAGE_NAME="" STAGE_END=0 STAGE_T0=0 STAGE_LIMIT=0 STAGE_LOG=""
stage_begin() {  # name cap reserve log: 1 (and a "not run" record) when too little time is left
    local left=$((BUDGET - SAFETY - SECONDS - $3))
    local limit=$(( left < $2 ? left : $2 ))
    if [ -n "$STOP" ]; then record "$1" not-run "" 0 0 "$STOP"; return 1; fi
    if [ "$limit" -lt "$MIN_STAGE" ]; then
        record "$1" not-run "" 0 0 "not started: ${limit} s left of the ${BUDGET} s budget"
        return 1
    fi
    STAGE_NAME="$1" STAGE_LIMIT="$limit" STAGE_T0="$SECONDS" STAGE_END=$((SECONDS + limit)) STAGE_LOG="$OUT/$4"
    CURRENT="$1|running||0|$limit|"
    echo "== $1 (limit ${limit} s, log $4)"
    write_summary >/dev/null 2>>"$TMP/report.err"  # a run killed from here on says where it was
    return 0
}

step() {  # CMD...: runs inside the stage's limit, appending to its log; returns CMD's exit code
    local left=$((STAGE_END - SECONDS))
    [ "$left" -gt 0 ] || return 124
    timeout --kill-after=5 "$left" "$@" >>"$STAGE_LOG" 2>&1
}

stage_end() {  # rc [note]
    local secs=$((SECONDS - STAGE_T0))
    echo "   $STAGE_NAME: exit $1 after ${secs} s${2:+: $2}"
    record "$STAGE_NAME" ran "$1" "$secs" "$STAGE_LIMIT" "${2:-}"
}

skip_stage() {  # name reason
    echo "== $1: skipped: $2"
    record "$1" skipped "" 0 0 "$2"
}

finish() {
    local code verdict
    trap - EXIT
    [ -n "$PTXAS_PID" ] && kill "$PTXAS_PID" 2>/dev/null
    verdict="$(write_summary --final 2>>"$TMP/report.err")"
    code=$?
    if [ -z "$verdict" ]; then  # the report itself failed: never leave an "ok" behind
        {
            echo "# GPU check: FAILED: the summary could not be written (dev/gpu_check_report.py failed)"
            echo
            echo "Stage records (name|state|exit code|seconds|limit|note):"
            for s in ${STAGES[@]+"${STAGES[@]}"} ${CURRENT:+"$CURRENT"}; do echo "- $s"; done
            echo
            echo "dev/gpu_check_report.py said:"
            tail -20 "$TMP/report.err" | sed 's/^/    /'
        } >"$OUT/summary.md"
        code=1
    fi
    echo
    sed -n '1,/^| 6\. summary/p' "$OUT/summary.md"
    echo
    echo "gpu_check: $(head -1 "$OUT/summary.md" | sed 's/^# //') (${SECONDS} s; logs in $OUT)"
    rm -rf "$TMP"
    exit "$code"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "gpu_check: $([ "$DRY_RUN" = 1 ] && echo 'dry run (no GPU)' || echo 'GPU run'), OUT=$OUT, budget ${BUDGET} s"

# ---- 1. environment + build ---------------------------------------------------------------------

# Build for the GPU this runs on, its architecture only (the fastest build), whatever NVIDIA GPU it is
# (sm_80 or newer runs every stage; below, the bf16 tensor-core kernels report themselves unavailable).
# PYLLMC_CUDA_ARCH given by the caller wins; without nvidia-smi (a dry run on a CPU) it stays unset.
gpu_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
if [ -z "${PYLLMC_CUDA_ARCH:-}" ] && [ -n "$gpu_arch" ]; then
    export PYLLMC_CUDA_ARCH="$gpu_arch"
fi

# The environment probe: one ENV-JSON line for the summary, then the same as text.
# Exit 11: torch sees no GPU; exit 10: it sees one but the cuda backend cannot run there.
cat >"$TMP/probe.py" <<'PY'
import json, os, platform, shutil, subprocess, sys

dry = os.environ["DRY_RUN"] == "1"
env = {"python": platform.python_version(), "arch": os.environ.get("PYLLMC_CUDA_ARCH", "not set (no nvidia-smi)"),
       "jobs": os.environ.get("MAX_JOBS"), "build_seconds": float(os.environ.get("BUILD_SECONDS") or 0) or None}
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    if q.returncode == 0 and q.stdout.strip():
        env["gpu"], env["driver"] = [s.strip() for s in q.stdout.splitlines()[0].split(",")[:2]]
if shutil.which("nvcc"):
    v = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    env["nvcc"] = next((line.split("release")[1].split(",")[0].strip() for line in v.splitlines()
                        if "release" in line), "?")
import torch, triton
env.update(torch=torch.__version__, cuda_torch=torch.version.cuda, triton=triton.__version__)
import pyllmc
status = pyllmc.available_backends()
try:
    from pyllmc import _C
    rt = _C.cuda_runtime_version()
    env["cuda_runtime_C"] = f"{rt // 1000}.{rt % 1000 // 10}"
    env["device_count_C"] = _C.device_count()
    env["device_error_C"] = _C.device_error()
except ImportError as err:
    env["cuda_runtime_C"] = f"not built ({err})"
cuda = status["cuda"]
env["cuda_backend"] = "simulated on the CPU" if cuda.simulated else ("available" if cuda.available else cuda.reason)
env["triton_backend"] = ("interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "available") \
    if status["triton"].available else status["triton"].reason
seen = torch.cuda.is_available()
if seen:
    env["gpu"] = torch.cuda.get_device_name()
    env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    env["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
print("ENV-JSON " + json.dumps(env))
for key, value in env.items():
    print(f"{key:16s} {value}")
if dry:
    sys.exit(0)
if not seen:
    print("FATAL: no GPU: torch.cuda.is_available() is False (on a CPU machine, run with --dry-run)")
    sys.exit(11)
if not cuda.available or cuda.simulated:
    print(f"FATAL: torch sees {env['gpu']} but the cuda backend is unavailable: {cuda.reason}; "
          f"pyllmc._C.device_error(): {env.get('device_error_C', 'no _C')!r}")
    sys.exit(10)
PY

if [ "$DRY_RUN" = 1 ]; then
    if stage_begin env_build 60 0 build.log; then
        echo "=== environment (dry run: the build of pyllmc._C is skipped: no GPU)" >>"$STAGE_LOG"
        step env DRY_RUN=1 "$PY" "$TMP/probe.py"
        rc=$?
        stage_end "$rc" "$([ "$rc" = 0 ] || echo "the environment probe failed (exit $rc): see build.log")"
    fi
else
    if stage_begin env_build 120 275 build.log; then
        echo "=== environment (CPU cores: $(nproc))" >>"$STAGE_LOG"
        step nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
        step nvcc --version
        export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
        echo "=== build: PYLLMC_CUDA_ARCH=$PYLLMC_CUDA_ARCH MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps -v -e ." \
            >>"$STAGE_LOG"
        t0=$SECONDS
        step "$PY" -m pip install --no-build-isolation --no-deps -v -e .
        build_rc=$?
        build_s=$((SECONDS - t0))
        echo "=== cuda backend probe" >>"$STAGE_LOG"
        step env DRY_RUN=0 BUILD_SECONDS="$build_s" "$PY" "$TMP/probe.py"
        rc=$?
        note=""
        if [ "$build_rc" != 0 ]; then
            rc=1
            note="the build failed (pip exit $build_rc after ${build_s} s): $(grep -E 'error|Error' "$STAGE_LOG" | tail -1 | cut -c1-300)"
        elif [ "$rc" != 0 ]; then
            note="$(grep '^FATAL: ' "$STAGE_LOG" | tail -1 | sed 's/^FATAL: //' | cut -c1-600)"
            [ -n "$note" ] || note="the environment probe failed (exit $rc): see build.log"
        fi
        stage_end "$rc" "$note"
        if [ "$rc" != 0 ]; then
            echo "   FATAL: $note"
            STOP="not run: stage 1 failed (no usable cuda backend)"
        fi
    fi
fi

# ---- 2. smoke -----------------------------------------------------------------------------------

if [ "$DRY_RUN" = 1 ]; then
    if stage_begin smoke 90 0 smoke.log; then
        step "$PY" dev/gpu_smoke.py --small --out "$OUT" --time-limit $((STAGE_LIMIT - 5))
        stage_end $?
    fi
else
    if stage_begin smoke 90 230 smoke.log; then
        step "$PY" dev/gpu_smoke.py --out "$OUT" --time-limit $((STAGE_LIMIT - 5))
        stage_end $?
    fi
fi

# ---- 3. tests -----------------------------------------------------------------------------------

if [ "$DRY_RUN" = 1 ]; then
    skip_stage tests "no GPU"
else
    if [ -z "$STOP" ] && [ -f dev/ptxas_report.py ]; then
        # The ptxas table for the report, on the CPU cores the tests leave idle; stopped before the bench.
        ptxas_arch="${PYLLMC_CUDA_ARCH:-90}"
        timeout 200 "$PY" dev/ptxas_report.py --arch "${ptxas_arch%%+*}" --md "$TMP/ptxas.md" >"$TMP/ptxas.log" 2>&1 &
        PTXAS_PID=$!
    fi
    if stage_begin tests 120 170 tests.log; then
        step env PYLLMC_TEST_TIMEOUT=60 "$PY" -m pytest -m gpu -v -rfEs -p no:cacheprovider --durations=10 tests
        stage_end $?
    fi
fi

# ---- 4. compute-sanitizer -------------------------------------------------------------------------

if [ "$DRY_RUN" = 1 ]; then
    skip_stage sanitizer "no GPU"
else
    SANITIZER="$(command -v compute-sanitizer || true)"
    for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
        [ -n "$SANITIZER" ] || { [ -x "$candidate" ] && SANITIZER="$candidate"; }
    done
    later=3
    for tool in memcheck racecheck initcheck synccheck; do
        # each tool: 60 s, or a fair share of what is left after keeping the bench's 90 s
        share=$(( (BUDGET - SAFETY - SECONDS - 90) / (later + 1) ))
        if stage_begin "sanitizer:$tool" $(( share < 60 ? share : 60 )) 90 sanitizer.log; then
            echo "===== compute-sanitizer $tool: start (limit ${STAGE_LIMIT} s)" >>"$STAGE_LOG"
            if [ -z "$SANITIZER" ]; then
                echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)" >>"$STAGE_LOG"
                stage_end 127 "compute-sanitizer not found"
            else
                step "$SANITIZER" --tool "$tool" --error-exitcode 99 --launch-timeout 60 "$PY" dev/cuda_driver.py
                rc=$?
                echo "===== compute-sanitizer $tool: exit $rc after $((SECONDS - STAGE_T0)) s" >>"$STAGE_LOG"
                stage_end "$rc"
            fi
        fi
        later=$((later - 1))
    done
fi

# ---- 5. bench -------------------------------------------------------------------------------------

if [ -n "$PTXAS_PID" ] && kill -0 "$PTXAS_PID" 2>/dev/null; then
    kill "$PTXAS_PID" 2>/dev/null  # not finished: the bench gets the machine to itself
fi
PTXAS_PID=""
if [ "$DRY_RUN" = 1 ]; then
    if stage_begin bench 120 0 bench.log; then
        step "$PY" dev/bench/run.py --dry-run --json "$OUT/bench.json"
        stage_end $?
    fi
else
    if stage_begin bench 120 0 bench.log; then
        step "$PY" dev/bench/run.py --quick --json "$OUT/bench.json"
        stage_end $?
    fi
fi
# 6. summary: the EXIT trap (finish) writes the final summary.md and sets the exit code.
