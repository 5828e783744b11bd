"""What the checksums cost, on the CPU: checkpoint write and load with and without the checksum,
and the verification of token shards, per GB.

    python dev/bench/checkpoint.py                 # GPT-2 124M + AdamW state, 6 repetitions
    python dev/bench/checkpoint.py --model tiny --reps 3 --shard_mb 64   # a quick look

The checkpoint is what train_gpt2.py saves for the model (--model, float32 or --dtype bfloat16
with float32 master weights), with pyllmc's AdamW state after one step (exp_avg, exp_avg_sq),
a data-loader state, every RNG state and the arguments. In one run, each variant timed --reps
times after one warm-up round:

  save   torch.save of the checkpoint into a file, to the page cache: plain (as before
         checksums) against through pyllmc.checkpoint.ChecksumWriter (hashing every byte on its
         way out). The file is fsync'ed after the clock stops, so each save starts clean. This
         is the CPU cost the checksum adds.
  write  the durable write the trainer does, pyllmc.checkpoint.atomic_torch_save(state, path,
         checksum=False | True): torch.save, fsync, atomic rename, fsync of the folder. The disk
         adds its own noise here (on a shared cloud disk, seconds).
  load   load_checkpoint(path, verify=False) against load_checkpoint(path) (checksum verified),
         the file in the page cache both times (it was just written)
  shard  pyllmc.data.verify_shard (sha256 of the file) of a --shard_mb token shard, per GB

The two variants of each row run back to back, each first in half of the repetitions (so
--reps is even): a disk or a core that is slower for whatever runs first after something else
(as a shared cloud disk is after an fsync) weighs on both alike. The ratio is that of the mean
times over all repetitions; the medians are printed too.

Not part of dev/bench/run.py's GPU list: this measures the host, not the kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyllmc
from common import cpu_name  # run as a script: this folder is on sys.path
from pyllmc import checkpoint
from pyllmc.data import DistributedDataLoader, file_sha256, verify_shard, write_shard
from pyllmc.model import GPT, GPTConfig


def training_state(model_name: str, dtype: torch.dtype, folder: Path) -> dict:
    """The dict train_gpt2.py's save() hands to save_checkpoint, for one process."""
    model = GPT(GPTConfig.from_preset(model_name), seed=0).to(dtype)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, backend="torch",
                                           master_weights=dtype != torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    write_shard(folder / "bench_train_000001.bin", np.arange(10_000) % 50257)
    loader = DistributedDataLoader(str(folder / "bench_train_*.bin"), 4, 64)
    loader.next_batch()
    return {
        "model_config": {"preset": model_name},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ranks": [{"train_loader": loader.state_dict(), "val_loader": None, "rng": checkpoint.rng_state()}],
        "outliers": {"loss": {"values": [3.0] * 128}, "norm": {"values": [1.0] * 128}},
        "args": {"model": model_name, "batch_size": 16, "sequence_length": 1024},
        "world_size": 1, "zero_stage": 0, "tokens_seen": 0,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="GPT preset (default gpt2: 124M)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter dtype; bfloat16 adds float32 master weights to the optimizer state")
    parser.add_argument("--algorithm", default=None, choices=["xxh3_128", "sha256"],
                        help="checksum to time (default: what save_checkpoint writes here, xxh3_128 with xxhash)")
    parser.add_argument("--reps", type=int, default=6, help="repetitions of each variant (rounded up to even)")
    parser.add_argument("--shard_mb", type=int, default=512, help="size of the token shard to verify, MB")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.reps = max(2, args.reps + args.reps % 2)

    if args.algorithm == "sha256":
        checkpoint._xxhash = lambda: None  # what an installation without xxhash writes
    elif args.algorithm == "xxh3_128" and checkpoint.default_algorithm() != "xxh3_128":
        parser.error("--algorithm xxh3_128 needs the xxhash package (pip install xxhash)")
    folder = Path(args.dir or tempfile.mkdtemp(prefix="pyllmc-ckpt-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 1,
               **training_state(args.model, dtype, folder)}
    plain, checked = folder / "ckpt_00000001.pt", folder / "ckpt_00000002.pt"

    def save(path, checksum):
        with open(path, "wb") as f:
            if checksum:
                writer = checkpoint.ChecksumWriter(f)
                torch.save(payload, writer)
                writer.finish()
            else:
                torch.save(payload, f)
            f.flush()

    def fsync(path):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    rows = {  # name: (without checksum, with checksum)
        "save": (lambda: save(plain, False), lambda: save(checked, True)),
        "write": (lambda: checkpoint.atomic_torch_save(payload, plain, checksum=False),
                  lambda: checkpoint.atomic_torch_save(payload, checked, checksum=True)),
        "load": (lambda: checkpoint.load_checkpoint(plain, verify=False), lambda: checkpoint.load_checkpoint(checked)),
    }
    times = {name: ([], []) for name in rows}
    for rep in range(-1, args.reps):  # rep -1 warms up (allocator, page cache, the files' first creation)
        for name, variants in rows.items():
            order = [0, 1] if rep % 2 else [1, 0]
            for v in order:
                times[name][v].append(timed(variants[v]))
                if name == "save":
                    fsync(plain if v == 0 else checked)
    times = {name: (a[1:], b[1:]) for name, (a, b) in times.items()}
    size = checked.stat().st_size
    median = {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in times.items()}
    ratio = {name: sum(b) / sum(a) for name, (a, b) in times.items()}

    shard = folder / "bench_shard.bin"
    digest = write_shard(shard, np.arange(args.shard_mb * 2**19, dtype=np.int64) % 50257)
    shard_times = [timed(lambda: verify_shard(shard, digest, "bench")) for _ in range(max(3, args.reps))]
    shard_s_per_gb = statistics.median(shard_times) / (shard.stat().st_size / 1e9)
    assert file_sha256(shard) == digest

    result = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "pyllmc": pyllmc.__version__,
        "algorithm": checkpoint.read_checksum_record(checked)[0], "model": args.model, "dtype": args.dtype,
        "checkpoint_bytes": size, "reps": args.reps,
        "times_s": {name: {"without": a, "with": b} for name, (a, b) in times.items()},
        "median_s": {name: {"without": a, "with": b} for name, (a, b) in median.items()},
        "ratio": ratio, "shard_bytes": shard.stat().st_size, "shard_verify_s_per_gb": shard_s_per_gb,
    }
    labels = {"save": "checkpoint save, CPU (torch.save to the page cache)",
              "write": "checkpoint write, durable (+ fsync, rename)",
              "load": "checkpoint load (from the page cache)"}
    print(f"# Checksum costs: {args.model} ({args.dtype}) + AdamW state, {size / 1e9:.2f} GB checkpoint, "
          f"{result['algorithm']}\n")
    print(f"{result['cpu']}, {result['cores']} cores, python {result['python']}, torch {result['torch']}, "
          f"{result['date']}; median times of {args.reps} runs, ratio of the mean times\n")
    print("| | without checksum | with checksum | ratio |")
    print("| --- | --- | --- | --- |")
    for name, label in labels.items():
        print(f"| {label} | {median[name][0]:.2f} s | {median[name][1]:.2f} s | {ratio[name]:.2f}x |")
    print(f"| token shard verification (sha256, page cache) | | {shard_s_per_gb:.2f} s per GB | |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for path in (plain, checked, shard, folder / "bench_train_000001.bin"):
        path.unlink(missing_ok=True)
    if args.dir is None:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
