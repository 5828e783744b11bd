#!/usr/bin/env bash
# GPT-2 124M on FineWeb-Edu 10B tokens: llm.c's recipe, one epoch, with pyllmc's kernels.
#
#   bash dev/run_gpt2_124M.sh            # all GPUs of this machine (torchrun), or the one GPU
#   NUM_GPUS=1 bash dev/run_gpt2_124M.sh # a single GPU: same tokens per step via gradient accumulation
#
# 524,288 tokens per step (2^19, ~0.5M as in the GPT-3 paper) = 64 sequences of 1024 tokens per
# micro step x NUM_GPUS x accumulation steps; lr 6e-4 (3x GPT-3's 124M lr, as llm.c found works),
# 700 warmup steps, cosine decay to 0, weight decay 0.1, gradient clipping at 1.0, bf16 params
# with fp32 master weights. 10B tokens / 524,288 = 19,073 steps. Validation loss and HellaSwag
# every 250 steps, a checkpoint every 1000 steps (the last 3 kept) plus llm.c-format model files.
# Rerunning the same command after an interruption continues from the newest checkpoint.
# On 8 H100s this takes about 3 hours (llm.c: ~0.3 s/step); expect ~3.28 val loss and ~0.30 HellaSwag
# acc_norm at the end. Lower MICRO_BATCH (32, 16, ...) if a GPU runs out of memory: the total
# batch stays the same, only the accumulation changes.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
NUM_GPUS="$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))"
MICRO_BATCH="${MICRO_BATCH:-64}"
DATA_DIR="${DATA_DIR:-dev/data/edu_fineweb10B}"
OUT_DIR="${OUT_DIR:-log_gpt2_124M}"
PYTHON="${PYTHON:-python}"

# 1. data: FineWeb-Edu sample-10BT as 100M-token llm.c shards (resumable; skips finished shards),
#    and the HellaSwag validation set
if ! ls "$DATA_DIR"/fineweb_train_*.bin >/dev/null 2>&1 || [ -n "${PREPARE_DATA:-}" ]; then
    "$PYTHON" dev/data/fineweb.py --version 10B --output_dir "$DATA_DIR"
fi
"$PYTHON" dev/data/hellaswag.py  # into pyllmc's user cache, where the trainer looks; downloads only once

# 2. train
LAUNCH=("$PYTHON")
if [ "$NUM_GPUS" -gt 1 ]; then
    LAUNCH=(torchrun --standalone --nproc_per_node "$NUM_GPUS")
fi
"${LAUNCH[@]}" train_gpt2.py \
    --input_bin "$DATA_DIR/fineweb_train_*.bin" \
    --input_val_bin "$DATA_DIR/fineweb_val_*.bin" \
    --output_dir "$OUT_DIR" \
    --model d12 \
    --batch_size "$MICRO_BATCH" \
    --sequence_length 1024 \
    --total_batch_size 524288 \
    --num_iterations 19073 \
    --learning_rate 6e-4 \
    --warmup_iters 700 \
    --learning_rate_decay_frac 0.0 \
    --weight_decay 0.1 \
    --grad_clip 1.0 \
    --dtype bfloat16 \
    --backend auto \
    --compile 0 \
    --val_loss_every 250 \
    --val_max_steps 20 \
    --hellaswag 1 \
    --sample_every 1000 \
    --checkpoint_every 1000 \
    --keep_checkpoints 3 \
    --write_llmc 1 \
    --log_every 10 \
    --resume 1 \
    "$@"

# 3. curves
"$PYTHON" dev/plot.py "$OUT_DIR/main.jsonl" --output "$OUT_DIR/curves.png" || true
