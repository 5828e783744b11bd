"""One whole GPT-2 training step (forward + backward + AdamW): tokens/s, MFU and peak memory.

GPT-2 124M (12 layers, 12 heads, C = 768, vocabulary 50257 padded to 50304), B = 16, T = 1024,
bf16, the same random batch for every implementation, in the same run:

  cuda, triton    pyllmc's GPT (pyllmc/model.py) on that kernel backend, trained the way
                  train_gpt2.py trains: bf16 parameters with fp32 master weights in
                  pyllmc.optim.AdamW, the loss as the fused classifier (inplace_backward=True).
  torch.compile   the PyTorch baseline: NanoGPT below, a compact nanoGPT-style GPT-2 of plain
                  torch ops (F.layer_norm, F.gelu, F.scaled_dot_product_attention,
                  F.cross_entropy), fp32 parameters under bf16 autocast,
                  torch.optim.AdamW(fused=True), the model torch.compile'd.

All three start from the same weights (NanoGPT's parameter names are pyllmc's GPT's, so it
loads that state dict), and so their first losses agree to bf16 rounding: a check that the
three train the same model.

Per implementation: median time per step over the timed steps (after warm-up steps that
include compilation), tokens/s, model TFLOP/s from pyllmc.model's count (6 N + 12 L C T per
token), MFU against the GPU's dense bf16 peak (pyllmc.model.peak_bf16_flops: 989 TFLOP/s for
an H100 / H200 SXM), peak memory (torch.cuda.max_memory_allocated, beside pyllmc.memory's
accounting of it from the model's shapes), and the loss.

On a CPU (run.py --dry-run) the same code runs a tiny model in float32: the triton backend
under Triton's interpreter, the cuda backend on the CPU simulator when PYLLMC_CUDA_SIM=1, and
the baseline eagerly (torch.compile skipped: compiling takes minutes on a small CPU). The
numbers mean nothing there; the code path is what is tested.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__:  # imported as the package bench (dev/ on sys.path: the tests, dev/gpu_check_report.py)
    from .common import BenchFailure, Row, available_impls, quick
else:  # imported by dev/bench/run.py run as a script: this folder is on sys.path
    from common import BenchFailure, Row, available_impls, quick

BATCH, SEQ = 16, 1024
# (warm-up steps, timed steps); the first warm-up step compiles (torch.compile, Triton JIT)
GPU_STEPS, QUICK_STEPS, CPU_STEPS = (3, 10), (2, 5), (1, 1)
CPU_BATCH, CPU_SEQ = 2, 32
# The first losses of the implementations (same weights, same batch) must agree this closely:
# bf16 rounding of the weights moves GPT-2's initial loss (~11) by ~0.01.
FIRST_LOSS_TOLERANCE = 0.05
BASELINE = "torch.compile (nanoGPT-style)"
BASELINE_EAGER = "torch eager (nanoGPT-style)"


# ---- the PyTorch baseline: a compact nanoGPT-style GPT-2 --------------------------------------

class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """GPT-2 in plain torch ops, with pyllmc GPT's module names (so it loads its state dict)."""

    def __init__(self, config):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([NanoBlock(config.n_embd, config.n_head) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))[..., :self.vocab_size]  # (B, T, V) of (B, T, Vp)
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1))


def _decay_groups(model: nn.Module, weight_decay: float = 0.1) -> list:
    """GPT-2's split, as pyllmc's configure_optimizers: matrices decay, vectors do not."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# ---- one implementation's steps ---------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, device, warmup: int, timed: int):
    """Runs warmup + timed steps; returns (median seconds per timed step, first loss, last loss)."""
    losses, seconds = [], []
    for i in range(warmup + timed):
        _sync(device)
        started = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
        losses.append(float(loss))
    return statistics.median(seconds), losses[0], losses[-1]


def _pyllmc_step(base, impl: str, device, dtype, x, y):
    """The step of train_gpt2.py on one kernel backend; returns the step function."""
    import pyllmc

    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                     master_weights=dtype != torch.float32, backend=impl)

    def step():
        with pyllmc.backend(impl):
            _, loss = model(x, y, return_logits=False, inplace_backward=True)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, (model, opt)


def _baseline_step(base, device, dtype, x, y, compiled: bool):
    model = NanoGPT(base.config).to(device)
    model.load_state_dict(base.state_dict())
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(_decay_groups(model), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                            fused=fused, foreach=not fused)
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, (model, opt)


def _label(impl: str) -> str:
    """The row's name: says when a kernel backend ran on the CPU (simulator, interpreter)."""
    import pyllmc
    from pyllmc.backends import triton_interpreter_on

    if impl == "cuda" and pyllmc.available_backends()["cuda"].simulated:
        return "cuda (CPU simulator)"
    if impl == "triton" and not torch.cuda.is_available() and triton_interpreter_on():
        return "triton (interpreter)"
    return impl


def run(device="cuda", dtype=torch.bfloat16) -> list[Row]:
    from pyllmc.memory import step_memory
    from pyllmc.model import GPT, GPTConfig

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        config, batch, seq = GPTConfig(), BATCH, SEQ  # GPT-2 124M
        warmup, timed = QUICK_STEPS if quick() else GPU_STEPS
        shape = f"GPT-2 124M, B={batch}, T={seq}, {str(dtype).replace('torch.', '')}"
    else:
        config = GPTConfig(block_size=CPU_SEQ, vocab_size=512, padded_vocab_size=512, n_layer=2, n_head=2, n_embd=64)
        batch, seq = CPU_BATCH, CPU_SEQ
        warmup, timed = CPU_STEPS
        shape = f"tiny GPT (CPU dry run), B={batch}, T={seq}, {str(dtype).replace('torch.', '')}"
    base = GPT(config, seed=0)  # fp32 on the CPU: every implementation starts from these weights
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # the same batch for all, every step
    flops_per_step = base.estimate_flops_per_token(seq) * batch * seq
    device_name = torch.cuda.get_device_name(device) if on_gpu else None

    impls = [(impl, False) for impl in available_impls()] + [(BASELINE if on_gpu else BASELINE_EAGER, on_gpu)]
    rows, failures, first_losses = [], [], {}
    for impl, compiled in impls:
        print(f"step: {impl} ...", flush=True)
        step = state = None
        try:
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if impl in ("cuda", "triton"):
                step, state = _pyllmc_step(base, impl, device, dtype, x, y)
            else:
                step, state = _baseline_step(base, device, dtype, x, y, compiled)
            seconds, first_loss, last_loss = _time_steps(step, device, warmup, timed)
        except Exception as err:  # noqa: BLE001 - report it and measure the others
            failures.append(f"train_step {impl}: {type(err).__name__}: {str(err).strip()[:300]}")
            print(f"step: {impl} FAILED: {failures[-1]}", flush=True)
            if compiled:  # still measure a baseline: the same model, eagerly (the loop reaches it next)
                impls.append((BASELINE_EAGER, False))
            continue
        finally:
            step = state = None  # free this implementation's model and optimizer before the next
            gc.collect()
        tokens_per_s = batch * seq / seconds
        first_losses[impl] = first_loss
        note = f"loss {first_loss:.3f} -> {last_loss:.3f} over {warmup + timed} steps"
        if impl in ("cuda", "triton"):  # what the model's shapes say one step holds (pyllmc.memory)
            account = step_memory(config, batch, seq, dtype=dtype, master_weights=dtype != torch.float32)
            note += f"; accounted peak {account.peak_bytes / 2**30:.2f} GiB"
            print(f"step: {impl}: memory from the model's shapes:\n{account.table()}", flush=True)
        rows.append(Row(
            "train_step", _label(impl), seconds * 1e3, flops=flops_per_step, shape=shape, note=note,
            tokens_per_s=tokens_per_s,
            mfu=base.estimate_mfu(tokens_per_s, device_name, seq) if device_name else None,
            peak_memory_bytes=torch.cuda.max_memory_allocated(device) if on_gpu else None))
        print(f"step: {impl}: {seconds * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, {rows[-1].note}", flush=True)
        if not math.isfinite(last_loss):
            failures.append(f"train_step {impl}: the loss is {last_loss}")
    baseline = next((first_losses[i] for i in (BASELINE, BASELINE_EAGER) if i in first_losses), None)
    for impl in ("cuda", "triton"):
        if impl in first_losses and baseline is not None and \
                not abs(first_losses[impl] - baseline) <= FIRST_LOSS_TOLERANCE:
            failures.append(f"train_step {impl}: first loss {first_losses[impl]:.4f}, the PyTorch baseline's "
                            f"{baseline:.4f} from the same weights and batch (more than {FIRST_LOSS_TOLERANCE} apart)")
    if failures:
        raise BenchFailure(rows, failures)
    return rows
