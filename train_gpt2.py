"""
Train GPT-2 (or a Llama) with pyllmc's hand-written kernels.

    python train_gpt2.py                     # the demo: a short run on tiny Shakespeare, samples as it learns
    python train_gpt2.py --help              # every option
    torchrun --standalone --nproc_per_node 8 train_gpt2.py ...   # data-parallel on 8 GPUs
    bash dev/run_gpt2_124M.sh                # GPT-2 124M on FineWeb-Edu 10B (llm.c's recipe)

With no arguments it trains on tiny Shakespeare (downloaded on first use and prepared as token
shards in the user cache; a local copy: $PYLLMC_DATA_DIR or --corpus FILE; offline, saying so, the
docstrings of the Python standard library) a model that suits the machine: GPT-2 124M on a GPU (a
short run); on a CPU the 2-layer "tiny" preset with GPT-2's BPE trimmed to the corpus's 4,096
commonest tokens, on a schedule that ends with real words within 3 minutes on 2 cores (DEMO_CPU in
pyllmc/settings.py). --input_bin / --input_val_bin train on any llm.c token shards.

The Llama family trains the same way: --model llama-tiny, or llama2.c's stories260K .. stories110M
(pyllmc.models lists the presets of both), e.g. on the TinyStories shards of dev/data/tinystories.py.

The output directory (--output_dir) receives main.jsonl (one JSON object per step, eval, sample and
event; python dev/plot.py OUT/main.jsonl draws it), the checkpoints ckpt_<step>.pt (--resume 1
continues the run exactly), and, when asked, llm.c model files (model_<step>.bin) and Hugging Face
directories (hf_<step>/).

Read top to bottom: the command line; the step's pieces (learning rate, gradient norm, evaluation,
samples); train(): settings, data, model, optimizer, then the step loop. What surrounds the recipe
lives in pyllmc: settings (the command line's meaning, the CPU demo, resume), inputs (data, tokenizer,
starting weights), distributed (processes, gradient buckets, ZeRO-1), checkpoint (the saved state),
reporting (the step line and main.jsonl), diagnostics (--diagnostics_every).
"""

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Triton runs kernels on CPU tensors only in its interpreter, which must be on before any kernel
# is defined; without a GPU switch it on now, so that --backend triton works on a CPU (it
# changes nothing else: the torch backend and the CUDA extension do not read it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyllmc  # noqa: E402
from pyllmc import checkpoint, diagnostics, distributed, inputs, ops, settings  # noqa: E402
from pyllmc.data import ShardFormatError  # noqa: E402
from pyllmc.reporting import TrainingReport, progress  # noqa: E402
from pyllmc.settings import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="Train GPT-2 with pyllmc's kernels (run with no arguments for a short demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--input_bin", type=str, default="",
                   help="training token shards (llm.c format: uint16 or uint32 ids), a file or glob pattern; empty: "
                        "the --corpus, prepared on first use in the user cache")
    g.add_argument("--input_val_bin", type=str, default="",
                   help="validation token shards, a file or glob pattern; empty: the --corpus's val split when "
                        "training on it, else no validation")
    g.add_argument("--corpus", type=str, default="auto",
                   help="without --input_bin: auto (tiny Shakespeare, downloaded or from $PYLLMC_DATA_DIR; offline, "
                        "the docstrings and comments of this Python's standard library), tinyshakespeare, stdlib, "
                        "or a text file of your own (cut into documents at blank lines)")
    g.add_argument("--tokenizer", type=str, default="auto",
                   help="what the token ids mean (samples are decoded with it, checkpoints record it): auto: what "
                        "the shards' manifest declares, else gpt2 for uint16 shards and ids (no decoder) for uint32; "
                        "for the --corpus: gpt2, or gpt2-trimmed (GPT-2 trimmed to the corpus's commonest "
                        f"--vocab_size tokens, {settings.DEMO_TRIM_VOCAB:,} by default: the CPU demo's); a name (gpt2, ids, "
                        "mulaw) for shards that declare none")
    g.add_argument("--verify_shards", type=int, default=1,
                   help="1: check each shard that a *_manifest.json beside it lists (the dev/data scripts write "
                        "one) against its recorded sha256 and largest token id, once per run, when first opened "
                        "(about 0.8 s per GB); "
                        "0: skip (shards without a manifest are never checked)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="auto",
                   help=f"what to train: a preset initialised at random ({inputs.PRESET_HELP}); a path to start from: a "
                        "pyllmc checkpoint (.pt), an llm.c model file (.bin) or a Hugging Face / save_pretrained "
                        "directory; hf:NAME for GPT.from_pretrained(NAME); auto: gpt2 on a GPU, tiny on a CPU")
    g.add_argument("--vocab_size", type=int, default=-1,
                   help="token ids of a model trained from scratch (wte / lm_head padded to a multiple of 128, as "
                        "in llm.c); -1: the tokenizer's (50257 for GPT-2); a pretrained model keeps its own")
    g.add_argument("--backend", type=str, default="auto", choices=["auto", "cuda", "triton", "torch"],
                   help="which kernels run the ops: cuda (pyllmc._C), triton, torch (PyTorch reference), "
                        "auto: the fastest that works on the device")
    g.add_argument("--dtype", type=str, default="auto", choices=["auto", "bfloat16", "float32"],
                   help="parameter/activation dtype; bfloat16 keeps float32 master weights in the optimizer; "
                        "auto: bfloat16 on a GPU, float32 on a CPU")
    g.add_argument("--loss_head", type=str, default="chunked", choices=["chunked", "fused"],
                   help="chunked: the classifier matmul and the loss by chunks of rows, the (B, T, V) logits never "
                        "held (ops.linear_cross_entropy); fused: llm.c's fused classifier over the whole logits")
    g.add_argument("--compile", type=int, default=0,
                   help="1: torch.compile the model's forward + backward as one graph (fullgraph); the optimizer "
                        "step and the clip stay eager")
    g = parser.add_argument_group("batch and schedule")
    g.add_argument("--batch_size", "-b", type=int, default=4, help="micro batch size B (sequences per rank per micro step)")
    g.add_argument("--sequence_length", "-t", type=int, default=64, help="sequence length T (<= the model's block_size)")
    g.add_argument("--total_batch_size", type=int, default=-1,
                   help="tokens per optimizer step; must be a multiple of B*T*world_size, the quotient is the number "
                        "of gradient-accumulation micro steps; -1: B*T*world_size (no accumulation)")
    g.add_argument("--num_iterations", "-n", type=int, default=-1,
                   help="optimizer steps to train; -1: the CPU demo's (DEMO_CPU) with --model auto on a CPU, else 10")
    g.add_argument("--learning_rate", "-l", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warmup steps from 0 to the peak learning rate")
    g.add_argument("--learning_rate_decay_frac", type=float, default=1.0,
                   help="cosine decay after warmup, down to learning_rate * this at the last step (1.0: constant)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (on matrices only)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the model initialisation and of the samples")
    g.add_argument("--zero_stage", type=int, default=0, choices=[0, 1],
                   help="1: ZeRO-1, shard the optimizer state across data-parallel ranks")
    g.add_argument("--stop_at_step", type=int, default=0,
                   help="end this run after this step, with a checkpoint, as if interrupted (for time-limited jobs: "
                        "continue later with --resume 1); 0: run to --num_iterations")
    g = parser.add_argument_group("evaluation and samples")
    g.add_argument("--val_loss_every", type=int, default=0,
                   help="validation loss (and HellaSwag) every this many steps, at step 0 and at the end; "
                        "0: only at the end")
    g.add_argument("--val_max_steps", type=int, default=20, help="batches per validation; 0: no validation")
    g.add_argument("--hellaswag", type=str, default="0",
                   help="HellaSwag accuracy at each validation: 1 reads --hellaswag_path, a path reads that file, 0: off")
    g.add_argument("--hellaswag_path", type=str, default="",
                   help="HellaSwag jsonl; empty: hellaswag_val*.jsonl in $PYLLMC_DATA_DIR, else where python "
                        "dev/data/hellaswag.py writes it (the user cache: <cache>/data/hellaswag/hellaswag_val.jsonl)")
    g.add_argument("--hellaswag_max_examples", type=int, default=-1, help="score only the first N examples; -1: all")
    g.add_argument("--sample_every", type=int, default=0,
                   help="print a sample every this many steps and at the end; 0: only at the end; -1: never")
    g.add_argument("--sample_length", type=int, default=64, help="tokens per sample")
    g.add_argument("--sample_top_k", type=int, default=50, help="sample from the top k tokens (0: all)")
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=str, default="",
                   help="where main.jsonl and the checkpoints go; empty: write nothing")
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="checkpoint every this many steps and at the end (needs --output_dir); 0: only at the end; "
                        "-1: never")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="keep the newest K checkpoints (0: all)")
    g.add_argument("--resume", type=int, default=0,
                   help="1: continue from the newest valid checkpoint in --output_dir (starts fresh when there is "
                        "none), with the settings the run recorded there: a flag that shapes training given with "
                        "another value is refused (see --resume_override); output, logging and evaluation flags "
                        "may change")
    g.add_argument("--resume_override", type=str, default="",
                   help="with --resume 1: flags (names without --, comma-separated, e.g. num_iterations,learning_rate) "
                        "whose value on this command line replaces the one the run recorded, on purpose")
    g.add_argument("--write_llmc", type=int, default=0, help="1: with each checkpoint, also the model in llm.c's format")
    g.add_argument("--write_hf", type=int, default=0, help="1: with each checkpoint, also a Hugging Face directory")
    g.add_argument("--log_every", type=int, default=1, help="print a step line every this many steps (the log gets all)")
    g.add_argument("--diagnostics_every", type=int, default=0,
                   help="every this many steps, per-layer activation, gradient and update-ratio statistics "
                        "(pyllmc.diagnostics) as one \"diagnostics\" record in main.jsonl, with a warning for each "
                        "rule of thumb broken; python dev/plot.py OUT/main.jsonl --diagnostics draws them; 0: off")
    g.add_argument("--device", type=str, default="", help="cuda, cuda:N or cpu; empty: cuda when available")
    return parser


# -----------------------------------------------------------------------------
# the pieces of a step

def learning_rate_at(it, args):
    """Linear warmup to the peak, then cosine decay to peak * decay_frac at the last step (it is 0-based)."""
    max_lr, min_lr = args.learning_rate, args.learning_rate * args.learning_rate_decay_frac
    if it < args.warmup_iters:
        return max_lr * (it + 1) / args.warmup_iters
    decay_steps = max(1, args.num_iterations - args.warmup_iters)
    ratio = min(1.0, (it - args.warmup_iters) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def gradient_norm(params):
    """Global L2 norm of the gradients, accumulated in float32 whatever their dtype."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def evaluate(model, val_loader, steps, device, master):
    """Mean loss of the first `steps` validation batches (from the split's start each time, so evaluations
    compare), averaged over the ranks; None without validation."""
    if val_loader is None:
        return None
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=device, dtype=torch.float32)
    with torch.no_grad():
        for _ in progress(range(steps), "val", master):
            x, y = val_loader.next_batch()
            _, loss = model(x.to(device), y.to(device), return_logits=False)
            total += loss.float()
    total /= steps
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total /= dist.get_world_size()
    model.train()
    return total.item()


def hellaswag_accuracy(model, path, args, tokenizer, process):
    """HellaSwag (pyllmc.hellaswag) scored with the run's tokenizer, the examples dealt out over the ranks;
    None when --hellaswag is off."""
    if path is None:
        return None
    from pyllmc.hellaswag import evaluate as hellaswag_evaluate
    max_examples = None if args.hellaswag_max_examples < 0 else args.hellaswag_max_examples
    return hellaswag_evaluate(model, str(path), device=process.device, max_examples=max_examples, rank=process.rank,
                              world_size=process.world_size, progress=process.master, tokenizer=tokenizer,
                              vocab_size=model.config.vocab_size)


def sample(model, tokenizer, length, top_k, seed, device):
    """`length` token ids drawn after the tokenizer's start token. The draws come from their own generator,
    inside fork_rng, so sampling never moves the training RNG (a resumed run stays bitwise the same)."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        generator = torch.Generator(device=device).manual_seed(seed)
        prompt = torch.full((1, 1), tokenizer.start_token, dtype=torch.long, device=device)
        tokens = model.generate(prompt, length, temperature=1.0, top_k=top_k if top_k > 0 else None,
                                generator=generator)
    return tokens[0, 1:].tolist()


def every(n, step, last_step):
    """Every n steps (n > 0) and at the last one."""
    return last_step or (n > 0 and step % n == 0)


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    parser = build_parser()
    args, given = settings.parse_command_line(parser, argv)  # given: the flags the command line sets
    process = distributed.setup(args.device)  # rank, world size, device; the process group under torchrun
    if args.model == "auto" and process.device_type == "cpu":  # the CPU demo: DEMO_CPU's values are the defaults
        args = settings.cpu_demo_defaults(parser, args, given)
    try:
        train(args, given, process)
    except (ConfigError, ShardFormatError) as err:  # bad settings; a damaged shard met during the run
        print(f"train_gpt2.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.teardown(process)
    return 0


def train(args, given, process):
    device, master, world_size = process.device, process.master, process.world_size
    print0 = functools.partial(print, flush=True) if master else (lambda *a, **k: None)

    # ---- settings: the command line's, or those the run that --resume 1 continues recorded; all checked ----
    args, plan, resume = settings.resolve(args, given, process, print0)
    B, T, grad_accum_steps = plan.batch_size, plan.sequence_length, plan.grad_accum_steps
    stop_step = min(args.num_iterations, args.stop_at_step) if args.stop_at_step > 0 else args.num_iterations

    # ---- what the run starts from: the data, its tokenizer, the model; each checked against the others ----
    start = inputs.starting_point(settings.model_spec_for(args.model, device), resume)
    data = inputs.find_data(args, process, start.tokenizer, say=print0)
    tokenizer = data.tokenizer
    hellaswag_path = inputs.hellaswag_file(args, legacy=REPO / "dev" / "data" / "hellaswag" / "hellaswag_val.jsonl")
    model, source, from_scratch = inputs.starting_model(start, args, tokenizer)
    train_loader, val_loader = inputs.make_loaders(data, args, process)
    inputs.check_data(args, [(train_loader, "--input_bin"), (val_loader, "--input_val_bin")], model.config,
                      tokenizer, from_scratch, hellaswag_path)

    # bfloat16 training keeps the parameters (so activations and gradients) in bfloat16 and AdamW a float32
    # master copy of each (llm.c's way): half the memory and bandwidth, no loss of update precision
    model.to(device=device, dtype=plan.dtype)
    raw_model, params = model, list(model.parameters())
    optimizer = raw_model.configure_optimizers(weight_decay=args.weight_decay, learning_rate=args.learning_rate,
                                               betas=(0.9, 0.95), eps=1e-8, backend=plan.backend,
                                               master_weights=plan.dtype != torch.float32)
    # several processes: rank 0's weights everywhere, gradient buckets all-reduced during the backward, ZeRO-1
    buckets, sharded, optimizer = distributed.data_parallel(params, optimizer, process, zero_stage=args.zero_stage)
    if args.compile:  # the pyllmc ops trace into the graph: one graph per micro step, no breaks
        model = torch.compile(model, fullgraph=True)

    # ---- the state a checkpoint saves and restores, the report (stdout and main.jsonl), the diagnostics ----
    state = checkpoint.TrainingState(raw_model, optimizer, train_loader, val_loader, rank=process.rank,
                                     world_size=world_size, ddp=process.ddp, zero=sharded is not None)
    try:
        start_step = checkpoint.restore_training(resume[0], state, batch_size=B, sequence_length=T,
                                                 zero_stage=args.zero_stage) if resume else 0
    except ValueError as err:  # another batch shape, number of processes or ZeRO stage; other shards
        raise ConfigError(str(err)) from None
    if start_step >= stop_step:
        raise ConfigError(f"the checkpoint is at step {start_step}, already at or past the end "
                          f"({stop_step}): raise --num_iterations to train further")
    output_dir = Path(args.output_dir) if args.output_dir else None
    report = TrainingReport(output_dir, master, num_iterations=args.num_iterations, start_step=start_step,
                            stop_step=stop_step, resumed=resume is not None, tokens_per_step=plan.total_batch_size,
                            saved_outliers=resume[0]["outliers"] if resume else None)
    report.start(args, raw_model, source, data, train_loader, val_loader, plan, process, zero=state.zero)
    save = functools.partial(checkpoint.save_training, output_dir, run=state, keep_last=args.keep_checkpoints,
                             settings=settings.run_settings(args, model=start.spec, dtype=plan.dtype_name,
                                                            corpus=data.corpus_name),
                             tokenizer=tokenizer.spec(), llmc=bool(args.write_llmc), hf=bool(args.write_hf),
                             dtype=plan.dtype_name)
    health = diagnostics.TrainingDiagnostics(raw_model, optimizer, every=args.diagnostics_every,
                                             loss_scale=1.0 / grad_accum_steps, rank=process.rank, zero=state.zero,
                                             log=report.log, print_fn=print0)
    checkpointing = output_dir is not None and args.checkpoint_every >= 0
    val_loss = hellaswag = None

    # ---- training ----
    run_start = time.perf_counter()
    model.train()
    with pyllmc.backend(plan.backend):
        if start_step == 0 and args.val_loss_every > 0:
            val_loss = evaluate(model, val_loader, args.val_max_steps, device, master)
            report.val_loss(0, val_loss)
            hellaswag = hellaswag_accuracy(raw_model, hellaswag_path, args, tokenizer, process)
            report.hellaswag(0, hellaswag)
        step = start_step
        last_sync = time.perf_counter()  # steps are timed from one host sync to the next
        while step < stop_step:
            lr = learning_rate_at(step, args)
            step += 1
            last_step = step == stop_step
            health.begin(step)  # a diagnostics step hooks this step's first forward

            # ---- the recipe: forward and backward of grad_accum_steps micro batches, clip, AdamW ----
            with ops.deferred_target_checks():  # bad target ids are checked on the device, reported at the sync
                loss_accum = torch.zeros((), device=device, dtype=torch.float32)
                for micro_step in range(grad_accum_steps):
                    x, y = train_loader.next_batch()  # (B, T) token ids; y is x shifted by one
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if buckets is not None and micro_step == grad_accum_steps - 1:
                        buckets.arm()  # this backward all-reduces each gradient bucket as soon as it is full
                    # The loss head computes dloss/dlogits (1/grad_accum_steps included) in the forward: chunked, the
                    # logits of a few rows at a time, never the whole (B, T, V); fused, llm.c's trick, over the whole
                    # logits in place (the (B, T, V) gradient needs no memory of its own).
                    forward = raw_model if health.capturing else model  # compiled graphs skip the diagnostics' hooks
                    chunked = args.loss_head == "chunked"
                    _, loss = forward(x, y, return_logits=False, inplace_backward=not chunked, chunked_loss=chunked,
                                      loss_scale=1.0 / grad_accum_steps)
                    loss_accum += loss.detach()
                    loss.backward()
                if buckets is not None:  # the gradients, and the loss, averaged over the ranks
                    buckets.finish()
                    dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)
                    loss_accum /= world_size
                norm = gradient_norm(params)
                health.before_update()  # a diagnostics step: gradient statistics (before the clip), weights copied
                loss_value, norm_value = loss_accum.item(), norm.item()  # the step's host sync
            # since the previous sync: the previous step's update, still queued then, and this fwd + bwd
            now = time.perf_counter()
            dt, last_sync = now - last_sync, now
            skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
            if not skipped:  # a NaN/inf update would poison the parameters and the optimizer's moments
                if args.grad_clip > 0 and norm_value > args.grad_clip:
                    torch._foreach_mul_([p.grad for p in params if p.grad is not None],
                                        args.grad_clip / (norm_value + 1e-6))
                if optimizer is not None:  # (None: a ZeRO-1 rank that owns no parameter)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                if sharded is not None:  # ZeRO-1: each parameter's new value comes from the rank that owns it
                    sharded.exchange()
            if buckets is not None:
                buckets.zero_grad()  # the .grad views into the buckets stay
            else:
                for p in params:
                    p.grad = None
            # ---- end of the recipe: what follows reports, evaluates, samples and saves ----

            report.step(step, loss=loss_value, lr=lr, norm=norm_value, dt=dt, skipped=skipped, log_every=args.log_every)
            health.end(updated=not skipped, prefix=report.prefix(step))
            # evaluation, samples and checkpoints are not counted in the next step's time
            evaluating = every(args.val_loss_every, step, last_step)
            sampling = args.sample_every >= 0 and every(args.sample_every, step, last_step)
            saving = checkpointing and every(args.checkpoint_every, step, last_step)
            if evaluating:
                val_loss = evaluate(model, val_loader, args.val_max_steps, device, master)
                report.val_loss(step, val_loss)
                hellaswag = hellaswag_accuracy(raw_model, hellaswag_path, args, tokenizer, process)
                report.hellaswag(step, hellaswag)
            if sampling and master:
                ids = sample(raw_model, tokenizer, args.sample_length, args.sample_top_k, args.seed + step, device)
                report.sample(step, ids, tokenizer, output_dir)
            if saving:  # every rank adds its loaders' positions and RNG state (and its ZeRO-1 optimizer part)
                path = save(step=step, tokens_seen=step * plan.total_batch_size, outliers=report.outlier_state())
                report.checkpoint(step, path)  # (rank 0's path; the others say nothing)
                if process.ddp:
                    dist.barrier()
            if evaluating or sampling or saving:
                last_sync = time.perf_counter()

    report.summary(step, elapsed=time.perf_counter() - run_start, val_loss=val_loss, hellaswag=hellaswag, device=device)


if __name__ == "__main__":
    sys.exit(main())
