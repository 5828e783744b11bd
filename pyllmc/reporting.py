"""What train_gpt2.py says while it trains: the step line, main.jsonl, outliers, the summary.

The trainer computes; this module words it. `TrainingReport` is handed each step's numbers
and writes them in two places: a line on stdout (every --log_every steps, and the first and
last) and one JSON object per step in OUT/main.jsonl (every step; dev/plot.py draws it). It
also keeps the running statistics that flag an outlier step (a loss or gradient norm more than
OUTLIER_ZSCORE standard deviations above the last OUTLIER_WINDOW steps' mean), which a
checkpoint saves so that a resumed run flags the same steps, and the step times that give the
ETA and the summary's means (the first step of a run warms up and compiles: left out).

Only rank 0 prints and writes; on the other ranks every call is silent.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

OUTLIER_WINDOW = 128  # steps in the running mean/std of the loss and the grad norm
OUTLIER_ZSCORE = 5.0  # z-scores above this are logged as outliers
MAX_CONSECUTIVE_SKIPS = 20  # abort when this many updates in a row are skipped (non-finite)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress(iterable, desc: str, enabled: bool, total: Optional[int] = None):
    """tqdm when it is installed, else a one-line counter (both on stderr)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return _simple_progress(iterable, desc, total if total is not None else len(iterable))
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _simple_progress(iterable, desc, total):
    for i, item in enumerate(iterable):
        print(f"\r{desc} {i + 1}/{total}", end="", file=sys.stderr, flush=True)
        yield item
    print("\r" + " " * (len(desc) + 24) + "\r", end="", file=sys.stderr, flush=True)


class OutlierDetector:
    """Running mean/std of the last `window` values; z-score of a new one (nan until warmed up)."""

    def __init__(self, window: int = OUTLIER_WINDOW, min_values: int = 10):
        self.values = collections.deque(maxlen=window)
        self.min_values = min_values

    def update(self, x: float) -> float:
        z = float("nan")
        if len(self.values) >= self.min_values:
            mean = sum(self.values) / len(self.values)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / len(self.values))
            z = (x - mean) / std if std > 0 else float("nan")
        if math.isfinite(x):  # a skipped step's NaN must not poison the window
            self.values.append(x)
        return z

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])


class JsonlLog:
    """main.jsonl: one JSON object per line, flushed at once (a crash loses nothing logged)."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and path.exists():
            # a resumed run continues the log: drop what the interrupted run logged after its checkpoint
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.file = open(path, "a")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


class NullLog:
    """The log of a run without --output_dir, and of every rank but 0."""

    def write(self, **record) -> None:
        pass


class TrainingReport:
    """The run's voice: print0 and the log for anyone; step() and summary() for the loop.

    output_dir: where main.jsonl goes (None: nowhere); resumed: the log continues after start_step
    instead of starting empty; tokens_per_step: the global batch, for tok/s and the token count;
    saved_outliers: the outlier windows a checkpoint saved (outlier_state())."""

    def __init__(self, output_dir: Optional[Path], master: bool, *, num_iterations: int, start_step: int,
                 stop_step: int, resumed: bool, tokens_per_step: int, saved_outliers: Optional[dict] = None):
        self.master = master
        if output_dir is not None and master:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.log = JsonlLog(output_dir / "main.jsonl", resume_step=start_step if resumed else None)
        else:
            self.log = NullLog()
        self.num_iterations, self.start_step, self.stop_step = num_iterations, start_step, stop_step
        self.tokens_per_step = tokens_per_step
        self.width = len(str(num_iterations))
        self.outliers = {"loss": OutlierDetector(), "norm": OutlierDetector()}
        for name, state in (saved_outliers or {}).items():  # a resumed run flags what the whole run would
            self.outliers[name].load_state_dict(state)
        self.step_times, self.step_mfus = [], []
        self.skips_in_a_row = 0
        self.mfu = lambda tokens_per_second: None  # start() sets the model's estimate on a GPU

    def outlier_state(self) -> dict:
        return {name: detector.state_dict() for name, detector in self.outliers.items()}

    def print0(self, *args, **kwargs) -> None:
        if self.master:
            print(*args, **kwargs, flush=True)

    def prefix(self, step: int) -> str:
        """"step  7/100": the start of every line about a step."""
        return f"step {step:{self.width}d}/{self.num_iterations}"

    def start(self, args, model, source: str, data, train_loader, val_loader, plan, process, *, zero: bool) -> None:
        """The record that opens the run's log (its settings, model, data), and the banner saying the same."""
        config, tokenizer = model.config, data.tokenizer
        self.log.write(type="config", step=self.start_step, args=vars(args), model_config=dataclasses.asdict(config),
                       world_size=process.world_size, backend=plan.backend, dtype=plan.dtype_name,
                       device=process.device,
                       data=data.describe(), tokenizer=tokenizer.spec(), tokenizer_label=tokenizer.label,
                       tokenizer_fingerprint=tokenizer.fingerprint)
        device_name = torch.cuda.get_device_name(process.device) if process.device_type == "cuda" else "cpu"
        if process.device_type == "cuda":  # model FLOPs utilisation against the GPU's bf16 peak
            self.mfu = lambda tokens_per_second: model.estimate_mfu(tokens_per_second, device_name,
                                                                    seq_len=plan.sequence_length)
        padded = f" (padded {config.padded_vocab_size:,})" if config.padded_vocab_size != config.vocab_size else ""
        heads = f"{config.n_head} heads" + (f" ({config.n_kv_head} key/value)" if config.n_kv_head != config.n_head
                                            else "")
        from pyllmc.models import family_of  # (the model modules load with the model, not with this one)
        family = {"gpt2": "GPT-2", "llama": "Llama"}[family_of(config)]
        self.print0(f"model: {source} | {family}, {model.num_parameters():,} parameters | {config.n_layer} layers, "
                    f"{heads}, {getattr(config, 'dim', None) or config.n_embd} channels, block {config.block_size}, "
                    f"vocab {config.vocab_size:,}{padded}")
        self.print0(f"device: {device_name} x {process.world_size} | backend {plan.backend} | {plan.dtype_name}"
                    f"{' + float32 master weights' if plan.dtype != torch.float32 else ''}"
                    f"{' | ZeRO-1' if zero else ''}{' | compiled (torch.compile, fullgraph)' if args.compile else ''}")
        if data.prepared is not None:
            self.print0(f"corpus: {data.prepared.description} | shards "
                        f"{'made now' if data.prepared.made_now else 'cached'} in {data.prepared.directory}")
        self.print0(f"data: {len(train_loader.files)} train shard(s), {train_loader.num_tokens:,} tokens"
                    f"{f' | {len(val_loader.files)} val shard(s)' if val_loader else ' | no validation'} | tokenizer "
                    f"{tokenizer.describe()}{f' ({data.tokenizer_source})' if data.prepared is None else ''}")
        self.print0(f"batch: {plan.batch_size} x {plan.sequence_length} x {process.world_size} rank(s) x "
                    f"{plan.grad_accum_steps} micro steps = {plan.total_batch_size:,} tokens/step | "
                    f"{self.num_iterations} steps | lr {args.learning_rate:g}, warmup {args.warmup_iters}, "
                    f"decay to x{args.learning_rate_decay_frac:g}")

    def step(self, step: int, *, loss: float, lr: float, norm: float, dt: float, skipped: bool, log_every: int) -> None:
        """One optimizer step: its record in the log, its line every log_every steps, an outlier flagged; a
        skipped (non-finite) step said, and RuntimeError after MAX_CONSECUTIVE_SKIPS of them in a row."""
        if skipped:
            self.skips_in_a_row += 1
            self.print0(f"{self.prefix(step)} | non-finite loss {loss} or grad norm {norm}: update skipped")
            if self.skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(f"{self.skips_in_a_row} updates in a row were skipped (non-finite loss or "
                                   f"gradients): "
                                   "the run has diverged; lower --learning_rate or resume from an earlier checkpoint")
        else:
            self.skips_in_a_row = 0
        tokens_per_second = self.tokens_per_step / dt
        mfu = self.mfu(tokens_per_second)
        # the first step of a run warms up (and compiles): not counted, unless it is the only one
        if step > self.start_step + 1 or self.stop_step == self.start_step + 1:
            self.step_times.append(dt)
            if mfu is not None:
                self.step_mfus.append(mfu)
        eta = (self.stop_step - step) * (sum(self.step_times) / len(self.step_times) if self.step_times else dt)
        loss_z, norm_z = self.outliers["loss"].update(loss), self.outliers["norm"].update(norm)
        record = dict(type="train", step=step, loss=loss, lr=lr, norm=norm, dt_ms=dt * 1000,
                      tok_per_s=tokens_per_second, mfu=mfu, tokens=step * self.tokens_per_step)
        if skipped:
            record["skipped"] = True
        if loss_z > OUTLIER_ZSCORE or norm_z > OUTLIER_ZSCORE:
            record.update(outlier=True, loss_z=loss_z, norm_z=norm_z)
            self.print0(f"{self.prefix(step)} | outlier: loss z-score {loss_z:.1f}, "
                        f"grad norm z-score {norm_z:.1f} (window {OUTLIER_WINDOW})")
        self.log.write(**record)
        if step % log_every == 0 or step == self.stop_step or step == self.start_step + 1:
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            self.print0(f"{self.prefix(step)} | loss {loss:.4f} | lr {lr:.2e} | "
                        f"norm {norm:.2f} | dt {dt * 1000:.1f}ms | tok/s {tokens_per_second:,.0f} | "
                        f"MFU {mfu_text} | ETA {format_duration(eta)}")

    def sample(self, step: int, ids: list, tokenizer, output_dir: Optional[Path]) -> None:
        """A sample's token ids: text printed and logged; audio written as a WAV file into output_dir."""
        if tokenizer.modality == "text":
            text = tokenizer.decode(ids)
            self.print0(f"---- sample at step {step} ----\n{text}\n----")
            self.log.write(type="sample", step=step, text=text)
        else:
            path = tokenizer.write_sample(ids, output_dir / f"sample_{step:08d}.wav")
            self.print0(f"{self.prefix(step)} | sample: {len(ids):,} tokens written to {path}")
            self.log.write(type="sample", step=step, path=str(path), tokens=len(ids))

    def val_loss(self, step: int, val_loss: Optional[float]) -> None:
        """The validation loss (None: no validation, nothing to say)."""
        if val_loss is not None:
            self.print0(f"{self.prefix(step)} | val loss {val_loss:.4f}")
            self.log.write(type="val", step=step, val_loss=val_loss)

    def hellaswag(self, step: int, result: Optional[dict]) -> None:
        """A HellaSwag result (None: not evaluated)."""
        if result is not None:
            self.print0(f"{self.prefix(step)} | HellaSwag acc_norm {result['acc_norm']:.4f} "
                        f"(acc {result['acc']:.4f}, n={result['n']})")
            self.log.write(type="hellaswag", step=step, **result)

    def checkpoint(self, step: int, path: Path) -> None:
        self.print0(f"{self.prefix(step)} | checkpoint {path}")
        self.log.write(type="checkpoint", step=step, path=str(path))

    def summary(self, step: int, *, elapsed: float, val_loss: Optional[float], hellaswag: Optional[dict],
                device) -> None:
        """The run's last record and its two or three closing lines."""
        trained = step - self.start_step
        step_times, step_mfus = self.step_times, self.step_mfus
        mean_dt = sum(step_times) / len(step_times) if step_times else float("nan")
        summary = dict(type="summary", step=step, steps_this_run=trained, tokens_seen=step * self.tokens_per_step,
                       time_s=elapsed, train_time_s=sum(step_times), mean_tok_per_s=self.tokens_per_step / mean_dt,
                       mean_mfu=sum(step_mfus) / len(step_mfus) if step_mfus else None,
                       final_val_loss=val_loss,
                       hellaswag_acc_norm=hellaswag["acc_norm"] if hellaswag else None,
                       peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                        if torch.device(device).type == "cuda" else None))
        self.log.write(**summary)
        mfu_text = f"{100 * summary['mean_mfu']:.1f}%" if summary["mean_mfu"] is not None else "n/a"
        stopped = " (stopped early: continue with --resume 1)" if self.stop_step < self.num_iterations else ""
        self.print0(f"done{stopped}: step {step}/{self.num_iterations}, {trained} steps this run, "
                    f"{summary['tokens_seen']:,} tokens seen, {format_duration(elapsed)}")
        val_text = f"final val loss {val_loss:.4f}" if val_loss is not None else "no validation"
        memory_text = (f" | peak GPU memory {summary['peak_memory_gib']:.2f} GiB"
                       if summary["peak_memory_gib"] is not None else "")
        self.print0(f"  mean tok/s {summary['mean_tok_per_s']:,.0f} | mean MFU {mfu_text} | {val_text}{memory_text}")
        if hellaswag:
            self.print0(f"  HellaSwag acc_norm {hellaswag['acc_norm']:.4f} (acc {hellaswag['acc']:.4f}, "
                        f"n={hellaswag['n']})")
