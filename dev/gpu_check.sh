#!/usr/bin/env bash
# The one command for a GPU machine (no internet; its own torch and triton):
#   1. build pyllmc in place (pip install --no-build-isolation --no-deps -e .)
#   2. print the GPU and versions
#   3. run the whole test suite, the CUDA tests included
#   4. run compute-sanitizer memcheck and racecheck over the CUDA kernel tests
#   5. run the benchmarks (dev/bench/run.py), ending with a short table
# Logs and results go under $OUT when it is set (else ./gpu_check_out).
# Usage: bash dev/gpu_check.sh [--skip-bench] [--skip-sanitizer] [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
skip_bench=0; skip_san=0; kexpr=""
for a in "$@"; do
    case "$a" in
        --skip-bench) skip_bench=1 ;;
        --skip-sanitizer) skip_san=1 ;;
        *) kexpr="$a" ;;
    esac
done
status=()

step() { echo; echo "=== $* ==="; }

step "build"
export PYLLMC_CUDA_ARCH="${PYLLMC_CUDA_ARCH:-90}"
if $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    status+=("build: ok")
else
    tail -40 "$OUT/build.log"; echo "build failed: see $OUT/build.log"; exit 1
fi

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$PY - <<'PY' | tee -a "$OUT/env.txt"
import torch, triton, pyllmc, platform
from pyllmc import _C
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "pyllmc._C runtime", _C.cuda_runtime_version())
print(pyllmc.available_backends())
PY

step "tests"
kargs=(); [ -n "$kexpr" ] && kargs=(-k "$kexpr")
if $PY -m pytest -q -rs tests "${kargs[@]}" 2>&1 | tee "$OUT/tests.log"; then
    status+=("tests: ok ($(tail -1 "$OUT/tests.log"))")
else
    status+=("tests: FAILED ($(tail -1 "$OUT/tests.log"))")
fi

if [ "$skip_san" = 0 ]; then
    # Sanitize only the CUDA backend's kernel tests: -k cuda selects the [cuda] parametrizations.
    for tool in memcheck racecheck; do
        step "compute-sanitizer $tool"
        # bounded: instrumented runs are 10-100x slower; a timeout reports, it does not hang the check
        if timeout "${SANITIZER_TIMEOUT:-900}" compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
            $PY -m pytest -q -x tests -k "cuda and not compile" -p no:cacheprovider >"$OUT/sanitizer-$tool.log" 2>&1; then
            status+=("compute-sanitizer $tool: clean")
        else
            tail -30 "$OUT/sanitizer-$tool.log"
            status+=("compute-sanitizer $tool: ERRORS (see sanitizer-$tool.log)")
        fi
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3
    done
fi

if [ "$skip_bench" = 0 ]; then
    step "benchmarks"
    if $PY dev/bench/run.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"; then
        status+=("bench: ok")
    else
        status+=("bench: FAILED (see bench.log)")
    fi
fi

step "summary"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
if printf '%s\n' "${status[@]}" | grep -q -E "FAILED|ERRORS"; then exit 1; fi
