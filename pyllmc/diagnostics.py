"""Training-health diagnostics: the activation, gradient and update statistics of Zero to Hero's
lecture on activations and gradients, taken inside train_gpt2.py every N steps.

    health = TrainingDiagnostics(model, optimizer, every=100, loss_scale=1 / grad_accum_steps, log=log)
    for step ...:
        health.begin(step)            # a diagnostics step: hooks on the model for this step only
        ... fwd + bwd of the micro steps (the first one runs the hooks) ...
        health.before_update()        # gradient statistics (before any clip), snapshot of the weights
        ... clip, optimizer.step(), ZeRO exchange, zero_grad ...
        health.end(updated=True)      # update ratios, warnings; one "diagnostics" record in the log

What one record holds (per layer unless said; every statistic computed in float32, whatever the
training dtype):
  activations  mean, std, saturation (fraction with |x| > SATURATION_X), min, max and a histogram
               of: the residual stream after each block; each LayerNorm's output (ln_1, ln_2 per
               block, ln_f once); the GELU input (the c_fc output).
  attention    per head: the mean entropy of the attention probabilities and the mean of each
               query's largest probability; the fraction of heads that collapsed (mean largest
               probability > COLLAPSED_HEAD_MAX_PROB); a histogram of the probabilities. The fused
               attention kernels never materialise the probabilities, so the hook on c_attn
               recomputes them from q and k in float32, for the first ATTENTION_MAX_SEQUENCES
               sequences; query 0 (which can only attend to itself) is left out of the means.
  gradients    the residual stream's gradient after each block (norm, std, histogram); each
               parameter's gradient (norm, std; a histogram for the matrices), and each block's
               gradient norm.
  updates      per parameter, the update-to-data ratio log10(std(update) / std(weight)) (the
               lecture's rule of thumb: about -3), from the update the optimizer really applied:
               the weights are copied before optimizer.step() and subtracted after it.

Where the numbers come from, and why:
  * Activations and the residual gradients come from ONE micro batch: the first micro step of the
    step, on rank 0. The residual gradients are divided by
    the loss_scale the trainer gives the model (1 / micro steps), so they are the gradients of
    that micro batch's mean loss whatever the accumulation.
  * Parameter gradients are the whole step's: read after the last micro step, after DDP's
    all-reduce (GradientBuckets.finish() has averaged them), before the gradient clip (the clip
    is one scale factor for all of them; the train record has the norm it was computed from).
  * Updates are measured on the weights the optimizer updates: its float32 master copy when it
    keeps one (bf16 training: a bf16 weight moves by whole ulps or not at all, so its own
    difference adds the rounding to the update: +30% at lr 1e-5 in the tests), else the parameter
    itself. Each rank measures the
    parameters its optimizer steps: with ZeRO-1 those it owns (an all-reduce of the per-parameter
    numbers brings them to rank 0); without it rank 0 steps, and measures, all of them.
  * Hooks: forward (pre-)hooks on the model, the blocks, attn, attn.c_attn, mlp, mlp.c_fc and the
    model's head_input (what lm_head reads, on every loss path), and a tensor hook on each MLP's
    output (its gradient is the residual stream's, as h = residual + mlp_out), installed by begin()
    on a diagnostics step only. The module hooks remove themselves when the hooked forward returns
    (a hook on the model itself); the tensor hooks belong to that forward's graph and go with it. So
    no other step runs a hook, and every hook only reads: losses and updates are bitwise the same
    with and without diagnostics.
  * torch.compile'd graphs skip module hooks silently: the trainer runs the hooked micro step
    with the eager model while `capturing` is True.
  * Histograms have HISTOGRAM_BINS bins over [max(min, mean - k std), min(max, mean + k std)]
    (k = HISTOGRAM_STDS), recorded with the counts; what falls outside (outliers beyond k std;
    NaN and infinities count as above) is counted in "outside" = [below, above], so the counts
    always sum to the tensor's element count.
  * The statistics stay on the device until end(), which fetches them with one copy to the host;
    only each histogram's range is fetched when it is made (torch.histc takes it as floats).

Warnings (printed and listed in the record's "warnings") when a rule of thumb is broken; the
thresholds are the named constants below. The rules on updates apply to the weight matrices only
(wte, wpe and the blocks' Linear weights, as in the lecture): the std of a bias or a LayerNorm gain
(all zeros or all ones at init) says nothing of its scale.

The record (one line of main.jsonl; floats with SIGNIFICANT_DIGITS digits, NaN and inf as null):
  type "diagnostics", step, layers, updated (False: the trainer skipped a non-finite update, so
                no update numbers), warnings [sentences]
  source        rank, micro_step, sequences, tokens, attention_sequences, attention_uniform_entropy
  activations   residual, ln_1, ln_2, gelu_input: [per layer], ln_f: [one];
                each {mean, std, sat, min, max, hist}
  attention     [per layer] {entropy: [per head], max_prob: [per head], collapsed, hist}
  residual_grad [per layer] {norm, std, hist}
  params        {name: {grad_norm, grad_std, grad_hist (matrices), weight_std, update_std, update_log10}}
  block_grad_norm  [per layer]
  hist          {range: [low, high], counts: [HISTOGRAM_BINS ints], outside: [below, above]}
"""

from __future__ import annotations

import json
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import models
from .ops.attention import split_heads

SATURATION_X = 3.0  # |x| past which tanh-GELU is flat (x < -3: output and gradient ~ 0) or linear (x > 3)
HISTOGRAM_BINS = 64  # fine enough to show a distribution's shape, 64 integers per tensor in the log
HISTOGRAM_STDS = 5.0  # range mean +- 5 std: a Gaussian's bulk (all but 6e-7) inside, outliers counted outside
ATTENTION_MAX_SEQUENCES = 4  # probabilities recomputed for 4 sequences: 4 x T queries per head is plenty,
#                              and at GPT-2's T = 1024 each (4, H, T, T) float32 temporary stays ~200 MB
COLLAPSED_HEAD_MAX_PROB = 0.99  # a head whose queries put > 99% on one key, on average, attends to one token
SIGNIFICANT_DIGITS = 5  # floats in the log: enough for any plot or comparison, a third of repr's length

# ---- warnings: the rules of thumb ----
GELU_SATURATION_LIMIT = 0.5  # half a layer's GELU inputs where it is flat (no gradient) or linear (no
#                              nonlinearity): the MLP has mostly stopped being one. Not lower: the CPU demo at
#                              lr 6e-3 had its first layer at ~30% (13% flat, 17% linear) in a run that learned
UPDATE_LOG10_HIGH = -1.5  # updates of 3% of the weights' std per step: the weights are being overwritten
UPDATE_LOG10_LOW = -5.0  # 1e-5 of the weights' std per step: the parameter has practically stopped learning
GRAD_NORM_NEIGHBOUR_FACTOR = 10.0  # a block's gradient norm 10x both neighbours': an exploding layer, not noise
COLLAPSED_HEADS_LIMIT = 0.5  # one collapsed head may be a real positional head (previous or first token);
#                              most of a layer's heads collapsed means its attention stopped mixing tokens


# ---- statistics of one tensor (device tensors; a histogram's range is fetched, one host sync) -------

HISTC_EXACT_ELEMENTS = 1 << 24  # torch.histc counts in float32: exact up to 2^24, so chunks at most that long


def histogram(values: torch.Tensor, low: float, high: float, bins: int = HISTOGRAM_BINS):
    """Counts of `values` (flat, float32) in `bins` equal bins over [low, high] (the last bin closed).

    Returns (counts (bins,) int64, outside (2,) int64: [below low (-inf too), above high (+inf and
    NaN too)]): together they count every element exactly once.
    """
    if not (isinstance(values, torch.Tensor) and values.dim() == 1 and values.dtype == torch.float32):
        raise ValueError(f"histogram: values must be a flat float32 tensor; got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__} "
                         f"{getattr(values, 'dtype', '')}")
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"histogram: bins must be an int >= 1; got {bins!r}")
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"histogram: the range must be finite with high > low; got [{low}, {high}]")
    counts = sum(torch.histc(chunk, bins, low, high).to(torch.int64)  # histc skips NaN and what is outside
                 for chunk in values.split(HISTC_EXACT_ELEMENTS))
    below = torch.count_nonzero(values < low)
    return counts, torch.stack([below, values.numel() - counts.sum() - below])


def _histogram_record(x: torch.Tensor, mean, std, minimum, maximum) -> dict:
    """The histogram of x over [max(min, mean - k std), min(max, mean + k std)] (k = HISTOGRAM_STDS),
    widened to +-0.5 around a constant tensor. Fetching the range is a host sync (histc takes floats)."""
    low, high, mean = torch.stack([torch.maximum(minimum, mean - HISTOGRAM_STDS * std),
                                   torch.minimum(maximum, mean + HISTOGRAM_STDS * std), mean]).tolist()
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        center = mean if math.isfinite(mean) else 0.0
        low, high = center - 0.5, center + 0.5
    counts, outside = histogram(x, low, high)
    return {"range": [low, high], "counts": counts, "outside": outside}


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(torch.float32)  # a copy for bf16; fp32 is only read, never written


def _mean_std(x: torch.Tensor):
    # two reductions: half the time of torch.var_mean on a CPU
    return x.mean(), x.std(correction=0)


def activation_summary(x: torch.Tensor) -> dict:
    """mean, std (population), saturation (fraction |x| > SATURATION_X), min, max, histogram of x."""
    x = _as_float32(x)
    mean, std = _mean_std(x)
    minimum, maximum = torch.aminmax(x)
    saturated = torch.count_nonzero(x.abs() > SATURATION_X) / x.numel()
    return {"mean": mean, "std": std, "sat": saturated, "min": minimum, "max": maximum,
            "hist": _histogram_record(x, mean, std, minimum, maximum)}


def gradient_summary(g: torch.Tensor, with_histogram: bool = True) -> dict:
    """norm, std (population) and (optionally) a histogram of a gradient."""
    g = _as_float32(g)
    mean, std = _mean_std(g)
    summary = {"norm": torch.linalg.vector_norm(g), "std": std}
    if with_histogram:
        summary["hist"] = _histogram_record(g, mean, std, *torch.aminmax(g))
    return summary


def attention_summary(qkv: torch.Tensor, n_head: int) -> dict:
    """Entropy and largest probability per head of causal attention, recomputed from c_attn's output.

    qkv: (B, T, 3C), the packed q, k, v of GPT-2's c_attn. Uses the first ATTENTION_MAX_SEQUENCES
    sequences, in float32, scale 1/sqrt(D) as ops.attention.
    """
    q, k, _ = split_heads(qkv.detach()[:ATTENTION_MAX_SEQUENCES], n_head)  # (S, H, T, D) strided views
    return attention_summary_of(q, k)


def attention_summary_of(q: torch.Tensor, k: torch.Tensor) -> dict:
    """attention_summary from the queries q (S, H, T, D) and keys k (S, H_kv, T, D) the attention reads
    (a Llama's after RoPE; H_kv dividing H: query head h reads key head h // (H / H_kv))."""
    q, k = q.detach()[:ATTENTION_MAX_SEQUENCES], k.detach()[:ATTENTION_MAX_SEQUENCES]
    q, k = q.to(torch.float32), k.to(torch.float32)
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (S, H, T, D): a copy is fine for a summary
    S, H, T, D = q.shape
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (S, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()  # (T, T) key j <= query i
    scores.masked_fill_(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (S, H, T, T), exactly 0 above the diagonal
    del scores
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # (S, H, T) nats; 0 log 0 = 0
    largest = probs.amax(dim=-1)  # (S, H, T)
    # query 0 sees only itself (entropy 0, probability 1): left out of the per-head means
    entropy_per_head = entropy[:, :, 1:].mean(dim=(0, 2)) if T > 1 else entropy.mean(dim=(0, 2))  # (H,)
    largest_per_head = largest[:, :, 1:].mean(dim=(0, 2)) if T > 1 else largest.mean(dim=(0, 2))  # (H,)
    causal_probs = probs.masked_select(causal)  # (S * H * T (T + 1) / 2,)
    counts, outside = histogram(causal_probs, 0.0, 1.0)
    return {"entropy": entropy_per_head, "max_prob": largest_per_head,
            "collapsed": (largest_per_head > COLLAPSED_HEAD_MAX_PROB).to(torch.float32).mean(),
            "hist": {"range": [0.0, 1.0], "counts": counts, "outside": outside}}


def uniform_attention_entropy(T: int) -> float:
    """The mean entropy (nats) of uniform causal attention over queries 1 .. T-1: the largest possible."""
    return sum(math.log(t + 1) for t in range(1, T)) / (T - 1) if T > 1 else 0.0


# ---- moving the record to the host, once -------------------------------------------------------

def _fetch(tree):
    """The tree with every tensor replaced by Python numbers (lists for non-0-dim tensors): one copy
    to the host for all of them."""
    leaves: list[torch.Tensor] = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            leaves.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(tree)
    if not leaves:
        return tree
    flat = torch.cat([t.detach().reshape(-1).to(device=leaves[0].device, dtype=torch.float64) for t in leaves])
    values = iter(flat.cpu().tolist())

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            items = [next(values) for _ in range(node.numel())]
            if not node.is_floating_point():
                items = [int(v) for v in items]
            return items[0] if node.dim() == 0 else items
        if isinstance(node, dict):
            return {key: rebuild(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [rebuild(value) for value in node]
        return node

    return rebuild(tree)


def rounded(tree, digits: int = SIGNIFICANT_DIGITS):
    """Floats rounded to `digits` significant digits; NaN and infinities become None (valid JSON)."""
    if isinstance(tree, float):
        return float(f"{tree:.{digits}g}") if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {key: rounded(value, digits) for key, value in tree.items()}
    if isinstance(tree, list):
        return [rounded(value, digits) for value in tree]
    return tree


def _block_index(name: str) -> Optional[int]:
    """3 for "transformer.h.3.mlp.c_fc.weight"; None for parameters outside the blocks."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "transformer" and parts[1] == "h":
        return int(parts[2])
    return None


# ---- the trainer's side ----------------------------------------------------------------------------

class TrainingDiagnostics:
    """Collects one "diagnostics" record every `every` steps of a GPT training loop (see the module doc).

    model: the (uncompiled) pyllmc GPT; optimizer: this rank's optimizer (with ZeRO-1 the one over the
    parameters it owns, possibly None); loss_scale: what the trainer passes the model (1 / micro steps);
    zero: ZeRO-1 (the update numbers are all-reduced); log: an object with write(**record) (rank 0);
    print_fn: prints a line (rank 0's print).
    """

    def __init__(self, model, optimizer=None, *, every: int, loss_scale: float = 1.0, rank: int = 0,
                 zero: bool = False, log=None, print_fn: Callable[[str], None] = print):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: off); got {every!r}")
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0; got {loss_scale!r}")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.loss_scale = float(loss_scale)
        self.rank = rank
        self.zero = zero
        self.log = log
        self.print_fn = print_fn
        self.names = [name for name, _ in model.named_parameters()]  # the tied lm_head.weight is wte's
        self.params = [p for _, p in model.named_parameters()]
        self.capturing = False  # True while the module hooks wait for the step's first forward
        self.step = None
        self._handles: list = []
        self._reset()

    def _reset(self):
        self._activations: Optional[dict] = None
        self._attention: Optional[list] = None
        self._residual_grads: Optional[list] = None
        self._source: Optional[dict] = None
        self._gradients: Optional[dict] = None
        self._snapshot: Optional[list] = None  # (index, param, float32 copy of what the optimizer updates)

    @property
    def master(self) -> bool:
        return self.rank == 0

    # ---- begin: hooks for this step's first forward

    def begin(self, step: int) -> bool:
        """Start step `step`; on a diagnostics step (every `every`) install the hooks (rank 0). Returns
        whether this is a diagnostics step."""
        self._remove_hooks()
        self._reset()
        self.step = step if self.every > 0 and step % self.every == 0 else None
        if self.step is None:
            return False
        if self.master:
            self._install_hooks()
        return True

    @property
    def active(self) -> bool:
        return self.step is not None

    def _install_hooks(self):
        blocks = self.model.transformer.h
        L = len(blocks)
        acts = {"residual": [None] * L, "ln_1": [None] * L, "ln_2": [None] * L, "ln_f": [None],
                "gelu_input": [None] * L}
        self._activations, self._attention, self._residual_grads = acts, [None] * L, [None] * L
        n_head = self.model.config.n_head
        scale = 1.0 / self.loss_scale
        hook = self._handles.append

        def keep(kind, i):
            def on_input(module, args):
                acts[kind][i] = activation_summary(args[0])
            return on_input

        def on_block(i):
            def on_output(module, args, output):
                acts["residual"][i] = activation_summary(output[0])  # (B, T, C) the stream after block i
            return on_output

        def on_mlp(i):
            # The stream after block i is h = residual + mlp_out, made by a fused op together with LN(h);
            # a hook on h would see only the gradient arriving through the residual path, not the part
            # through LN(h). The op hands the whole d loss / d h to both its inputs: hook mlp_out.
            def on_output(module, args, mlp_out):
                if mlp_out.requires_grad:
                    def on_grad(grad):  # (B, T, C): d(loss_scale * micro-batch loss) / d h
                        self._residual_grads[i] = gradient_summary(grad * scale)
                    mlp_out.register_hook(on_grad)
            return on_output

        def on_c_fc(i):
            def on_output(module, args, output):
                acts["gelu_input"][i] = activation_summary(output)
            return on_output

        def on_c_attn(i):
            def on_output(module, args, output):
                self._attention[i] = attention_summary(output, n_head)
            return on_output

        def on_rotated_qk(i):  # a Llama's q (B, T, H, D) and k (B, T, H_kv, D) after RoPE
            def on_output(module, args, output):
                q, k = output
                self._attention[i] = attention_summary_of(q.transpose(1, 2), k.transpose(1, 2))
            return on_output

        def on_model(module, args, output):  # the hooked forward is over: the module hooks go
            self._remove_hooks()

        gelu = models.family_of(self.model) == "gpt2"  # a Llama's MLP is SwiGLU: no GELU to saturate
        for i, block in enumerate(blocks):
            hook(block.attn.register_forward_pre_hook(keep("ln_1", i)))
            if hasattr(block.attn, "rotated_qk"):  # the attention reads q and k after RoPE (Llama)
                hook(block.attn.rotated_qk.register_forward_hook(on_rotated_qk(i)))
            else:
                hook(block.attn.c_attn.register_forward_hook(on_c_attn(i)))
            hook(block.mlp.register_forward_pre_hook(keep("ln_2", i)))
            if gelu:
                hook(block.mlp.c_fc.register_forward_hook(on_c_fc(i)))
            hook(block.mlp.register_forward_hook(on_mlp(i)))
            hook(block.register_forward_hook(on_block(i)))
        hook(self.model.head_input.register_forward_pre_hook(keep("ln_f", 0)))  # what the loss head reads

        def on_model_input(module, args, kwargs):
            idx = args[0] if args else kwargs["idx"]
            self._source = {"rank": self.rank, "micro_step": 0, "sequences": idx.size(0), "tokens": idx.numel(),
                            "attention_sequences": min(idx.size(0), ATTENTION_MAX_SEQUENCES),
                            "attention_uniform_entropy": uniform_attention_entropy(idx.size(1))}
        hook(self.model.register_forward_pre_hook(on_model_input, with_kwargs=True))
        hook(self.model.register_forward_hook(on_model))
        self.capturing = True

    def _remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.capturing = False

    # ---- before the update: gradients, and the weights as they are

    @torch.no_grad()
    def before_update(self) -> None:
        """Read the step's gradients (rank 0) and copy the weights this rank's optimizer will update."""
        if not self.active:
            return
        self._remove_hooks()  # in case the step ran no forward through the hooked model
        if self.master:
            self._gradients = {
                name: (gradient_summary(p.grad, with_histogram=p.dim() >= 2) if p.grad is not None else None)
                for name, p in zip(self.names, self.params)}
        self._snapshot = [(i, p, self._updated_tensor(p).to(torch.float32, copy=True))
                          for i, p in self._measured_params()]

    def _measured_params(self):
        """(index, parameter) of the parameters this rank measures: those its optimizer steps."""
        if self.optimizer is None or not (self.master or self.zero):
            return []
        index = {id(p): i for i, p in enumerate(self.params)}
        return [(index[id(p)], p) for group in self.optimizer.param_groups for p in group["params"]]

    def _updated_tensor(self, p):
        """What the optimizer updates for p: its float32 master copy when it keeps one, else p. (The
        master copy is made from p at the first step, so before it p itself stands for it exactly.)"""
        master_copy = self.optimizer.state.get(p, {}).get("master")
        return p if master_copy is None else master_copy

    # ---- end: updates, warnings, the record

    @torch.no_grad()
    def end(self, updated: bool = True, prefix: str = "") -> Optional[dict]:
        """Finish a diagnostics step (after the update and any ZeRO exchange): measure the updates,
        write the record and print the warnings (rank 0). Returns the record as logged (rank 0), else
        None. updated: whether the optimizer stepped (False when the trainer skipped a non-finite
        step). Every rank must call it on a diagnostics step when zero=True (one all-reduce)."""
        if not self.active:
            return None
        self._remove_hooks()
        measuring = updated and self._snapshot is not None and (self.master or self.zero)
        updates = self._measure_updates() if measuring else None
        step = self.step
        self.step = None
        if not self.master:
            self._reset()
            return None
        dims = {name: p.dim() for name, p in zip(self.names, self.params)}
        record = self._assemble(step, updated, updates)
        record["warnings"] = warnings_of(record, dims)
        record = rounded(record)
        self._reset()
        if self.log is not None:
            self.log.write(**record)
        lead = f"{prefix} | " if prefix else ""
        self.print_fn(f"{lead}diagnostics: {summary_line(record, dims)} | "
                      f"{len(json.dumps(record)) / 1024:.1f} KB logged")
        for warning in record["warnings"]:
            self.print_fn(f"{lead}warning: {warning}")
        return record

    def _assemble(self, step: int, updated: bool, updates: Optional[list]) -> dict:
        """The record, its numbers on the host (one copy), per-parameter entries joined by name."""
        L = len(self.model.transformer.h)
        raw = _fetch({"source": self._source, "activations": self._activations, "attention": self._attention,
                      "residual_grad": self._residual_grads, "gradients": self._gradients})
        params, block_sq = {}, [0.0] * L
        for i, name in enumerate(self.names):
            entry = {}
            grad = (raw["gradients"] or {}).get(name)
            if grad is not None:
                entry.update({"grad_norm": grad["norm"], "grad_std": grad["std"]})
                if "hist" in grad:
                    entry["grad_hist"] = grad["hist"]
                block = _block_index(name)
                if block is not None:
                    block_sq[block] += grad["norm"] ** 2
            if updates is not None and not math.isnan(updates[i][0]):  # NaN: no rank's optimizer steps it
                update_std, weight_std = updates[i]
                ratio = update_std / weight_std if weight_std > 0 else float("nan")
                entry.update({"weight_std": weight_std, "update_std": update_std,
                              "update_log10": math.log10(ratio) if ratio > 0 else None})
            params[name] = entry
        return {"type": "diagnostics", "step": step, "layers": L, "updated": bool(updated), "source": raw["source"],
                "activations": raw["activations"], "attention": raw["attention"],
                "residual_grad": raw["residual_grad"], "params": params,
                "block_grad_norm": [math.sqrt(s) for s in block_sq] if raw["gradients"] else None}

    def _measure_updates(self) -> list:
        """[(std(update), std(weight before))] per parameter, NaN where no rank measured it."""
        device = self.params[0].device
        numbers = torch.zeros((len(self.params), 2), dtype=torch.float64, device=device)  # (P, 2)
        measured = torch.zeros(len(self.params), dtype=torch.float64, device=device)  # (P,) 1: measured here
        for i, p, before in self._snapshot:
            update = self._updated_tensor(p).to(torch.float32) - before
            numbers[i, 0] = update.std(correction=0).to(torch.float64)
            numbers[i, 1] = before.std(correction=0).to(torch.float64)
            measured[i] = 1.0
        self._snapshot = None
        if self.zero:  # each parameter is measured by its owner only: the sums are the owners' numbers
            dist.all_reduce(numbers, op=dist.ReduceOp.SUM)
            dist.all_reduce(measured, op=dist.ReduceOp.SUM)
        numbers[measured == 0] = float("nan")
        return numbers.cpu().tolist()


# ---- warnings and the printed line -----------------------------------------------------------------

def warnings_of(record: dict, param_dims: dict) -> list:
    """The rules of thumb a (host) diagnostics record breaks: one sentence per rule, naming every offender."""
    offenders: dict[str, list] = {}

    def flag(rule, what):
        offenders.setdefault(rule, []).append(what)

    activations = record.get("activations") or {}
    for kind, per_layer in activations.items():
        for layer, stats in enumerate(per_layer or []):
            if stats is not None and not all(math.isfinite(stats[k]) for k in ("mean", "std")):
                flag("nonfinite", f"{kind} of layer {layer}")
    for layer, stats in enumerate(activations.get("gelu_input") or []):
        if stats is not None and stats["sat"] > GELU_SATURATION_LIMIT:
            flag("gelu", f"layer {layer} ({100 * stats['sat']:.0f}%)")
    for layer, heads in enumerate(record.get("attention") or []):
        if heads is not None and heads["collapsed"] > COLLAPSED_HEADS_LIMIT:
            flag("attention", f"layer {layer} ({100 * heads['collapsed']:.0f}% of its heads)")
    for name, entry in (record.get("params") or {}).items():
        if "grad_norm" in entry and not math.isfinite(entry["grad_norm"]):
            flag("nonfinite", f"the gradient of {name}")
        if param_dims.get(name, 0) < 2 or "update_std" not in entry:
            continue  # the rule is about matrices: a bias's or a LayerNorm gain's std says nothing of its scale
        ratio = entry["update_log10"]
        if ratio is None and entry["weight_std"] > 0:
            flag("unchanged", name)
        elif ratio is not None and ratio > UPDATE_LOG10_HIGH:
            flag("update_high", f"{name} 10^{ratio:.2f}")
        elif ratio is not None and ratio < UPDATE_LOG10_LOW:
            flag("update_low", f"{name} 10^{ratio:.2f}")
    norms = record.get("block_grad_norm") or []
    for layer, norm in enumerate(norms):
        neighbours = [norms[j] for j in (layer - 1, layer + 1) if 0 <= j < len(norms)]
        if neighbours and all(n is not None and norm is not None and norm > GRAD_NORM_NEIGHBOUR_FACTOR * n
                              for n in neighbours):
            flag("grad_norm", f"layer {layer} ({norm:.3g} against {', '.join(f'{n:.3g}' for n in neighbours)})")

    sentences = {
        "nonfinite": "non-finite values in {}",
        "gelu": (f"GELU saturation above {100 * GELU_SATURATION_LIMIT:.0f}% (inputs with |x| > {SATURATION_X:g}, "
                 f"where GELU is flat or linear) in {{}}: lower the init scale of c_fc or the learning rate"),
        "attention": (f"attention heads collapsed (queries put > {100 * COLLAPSED_HEAD_MAX_PROB:.0f}% on one key) in "
                      f"{{}}: q.k logits too large; lower the learning rate or check the init of c_attn"),
        "update_high": (f"update/weight ratio above 10^{UPDATE_LOG10_HIGH:g} (about 10^-3 is healthy): {{}}: "
                        f"the learning rate is too high for these"),
        "update_low": (f"update/weight ratio below 10^{UPDATE_LOG10_LOW:g} (about 10^-3 is healthy): {{}}: "
                       f"these barely learn; the learning rate is too low for them"),
        "unchanged": "not changed by this step's update: {}",
        "grad_norm": f"gradient norm over {GRAD_NORM_NEIGHBOUR_FACTOR:g}x both neighbouring blocks' in {{}}",
    }
    return [sentences[rule].format(", ".join(found)) for rule, found in offenders.items()]


def summary_line(record: dict, param_dims: dict) -> str:
    """One line: the range of the matrices' update ratios, the largest GELU saturation, attention
    entropy (1 = uniform over the visible keys), the blocks' gradient norms."""
    def present(values):
        return [v for v in values if v is not None]

    parts = []
    ratios = present(e.get("update_log10") for name, e in record["params"].items() if param_dims.get(name, 0) >= 2)
    if ratios:
        parts.append(f"update/weight log10 {min(ratios):.2f}..{max(ratios):.2f}")
    gelu = [s["sat"] if s is not None else None for s in record["activations"].get("gelu_input") or []]
    if present(gelu):
        worst = max((i for i, v in enumerate(gelu) if v is not None), key=gelu.__getitem__)
        parts.append(f"GELU saturation max {100 * gelu[worst]:.2f}% (layer {worst})")
    heads = [a for a in record.get("attention") or [] if a is not None and None not in a["entropy"]]
    uniform = (record.get("source") or {}).get("attention_uniform_entropy")
    if heads and uniform:
        relative = [sum(a["entropy"]) / len(a["entropy"]) / uniform for a in heads]
        collapsed = sum((a["collapsed"] or 0) * len(a["entropy"]) for a in heads)
        parts.append(f"attention entropy {min(relative):.2f}..{max(relative):.2f} of uniform, "
                     f"{collapsed:.0f} collapsed heads")
    norms = present(record.get("block_grad_norm") or [])
    if norms:
        parts.append(f"block grad norms {min(norms):.3g}..{max(norms):.3g}")
    return " | ".join(parts) if parts else "no statistics"
