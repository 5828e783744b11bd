#!/usr/bin/env bash
# A short GPT-2 124M run on one GPU with the cuda backend and with the torch backend,
# side by side, same data, seed and schedule: loss curves, tok/s, MFU and peak memory.
#   PYLLMC_DATA_DIR=dir-with-tinyshakespeare.txt bash dev/gpu_train_compare.sh [steps]
# (on a machine with internet the data is downloaded on first use instead).
# Logs go to $OUT (else ./gpu_train_out): <backend>/main.jsonl and a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_train_out}"
STEPS="${1:-50}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for backend in cuda torch; do
    echo "=== $backend backend, $STEPS steps"
    $PY train_gpt2.py --model gpt2 --backend "$backend" --dtype bfloat16 \
        --batch_size 16 --sequence_length 1024 --total_batch_size 65536 \
        --num_iterations "$STEPS" --learning_rate 6e-4 --warmup_iters 10 \
        --val_loss_every 25 --val_max_steps 4 --sample_every 0 --checkpoint_every 0 \
        --output_dir "$OUT/$backend" 2>&1 | tee "$OUT/$backend.log"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'backend':8} {'first loss':>10} {'last loss':>10} {'val loss':>9} {'tok/s':>10} {'MFU':>7} {'peak GiB':>9}")
for backend in ("cuda", "torch"):
    recs = [json.loads(l) for l in (out / backend / "main.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in recs if r.get("type") == "train"]
    val = [r for r in recs if r.get("type") == "val"]
    summary = next((r for r in recs if r.get("type") == "summary"), {})
    mfu = summary.get("mean_mfu")
    peak = summary.get("peak_memory_gib")
    print(f"{backend:8} {train[0]['loss']:10.4f} {train[-1]['loss']:10.4f} "
          f"{(val[-1]['val_loss'] if val else float('nan')):9.4f} {summary.get('mean_tok_per_s', 0):10.0f} "
          f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>7} {'n/a' if peak is None else f'{peak:.1f}':>9}")
PY
