"""Profile one optimizer step of a small GPT-2 and list the work that no kernel asked for.

    TRITON_INTERPRET=1 python dev/profile_step.py --backend triton    # on a CPU: the interpreter
    python dev/profile_step.py --backend torch

One step as the trainer takes it (2 accumulation micro steps, the fused classifier, the loss
scaled by 1 / steps, pyllmc's AdamW), under torch.profiler with shapes and memory. Then, over
the model's forward and backward, two lists:

- logits traffic: ops that read, write or allocate an (N, V)- or (N, Vp)-sized tensor (N = B*T)
  other than the lm_head matmuls and the cross-entropy op itself;
- copies: copy_, clone, contiguous (when it copies), cat / stack, slice_backward and their kin.

What runs inside a pyllmc op (an event under a `pyllmc::` custom op in the profiler's tree)
belongs to that op: the Triton interpreter's copy-back of kernel arguments, the torch
backend's own math. Everything else is the model's glue, and the glue should move nothing.
The test suite (tests/test_profile_step.py) asserts both lists are empty.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field

import torch

VIEW_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::slice", "aten::select", "aten::as_strided", "aten::transpose",
    "aten::permute", "aten::t", "aten::expand", "aten::unbind", "aten::split", "aten::split_with_sizes",
    "aten::unsqueeze", "aten::squeeze", "aten::_reshape_alias", "aten::alias", "aten::detach", "aten::detach_",
    "aten::narrow", "aten::chunk", "aten::view_as", "aten::unflatten", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::numpy_T", "aten::expand_as", "aten::_has_compatible_shallow_copy_type",
}
# Ops that are views or no-ops unless they have a copying child (then that child is counted).
MAYBE_COPY_OPS = {"aten::reshape", "aten::contiguous", "aten::flatten", "aten::to", "aten::type_as"}
COPY_OPS = {"aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::slice_backward", "aten::select_backward",
            "aten::_to_copy", "aten::index_select_backward", "aten::as_strided_scatter", "aten::slice_scatter",
            "aten::select_scatter", "aten::unbind_backward", "aten::new_empty_strided"}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}


@dataclass
class Finding:
    op: str
    shapes: list
    scope: str  # the nearest enclosing named event (the autograd node, for the backward)

    def __str__(self):
        return f"{self.op} {self.shapes} (in {self.scope})"


@dataclass
class Report:
    logits_ops: list = field(default_factory=list)  # Findings
    copies: list = field(default_factory=list)      # Findings
    copied_bytes: int = 0                           # of the copies, float32 elements (the CPU run)


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _scope(event) -> str:
    for a in _ancestors(event):
        if not a.name.startswith("aten::"):
            return a.name
    return "model"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def analyse(events, logits_numels: set, logits_bytes: int) -> Report:
    """The glue's logits traffic and copies among profiler `events` (the model's fwd + bwd)."""
    report = Report()
    for e in events:
        if not e.name.startswith("aten::"):
            continue  # scopes, autograd nodes: their aten ops are looked at one by one
        if any(a.name.startswith("pyllmc::") for a in _ancestors(e)):
            continue  # an op's own business
        if any(a.name in MATMUL_OPS for a in _ancestors(e)):
            continue  # inside a matmul (its reshapes of the operands)
        shapes = [list(s) for s in (e.input_shapes or []) if isinstance(s, (list, tuple))]
        numels = [_numel(s) for s in shapes if s]
        if e.name in COPY_OPS:
            report.copies.append(Finding(e.name, shapes, _scope(e)))
            report.copied_bytes += 4 * (max(numels) if numels else 0)
        if e.name in VIEW_OPS or e.name in MAYBE_COPY_OPS or e.name in MATMUL_OPS:
            continue
        allocates_logits = (getattr(e, "self_cpu_memory_usage", 0) or 0) >= 0.9 * logits_bytes
        if allocates_logits or any(n in logits_numels for n in numels):
            report.logits_ops.append(Finding(e.name, shapes, _scope(e)))
    return report


def profile_step(backend: str, *, n_layer=2, n_head=2, n_embd=64, B=4, T=32, vocab_size=1000, padded=1024,
                 accum=2, seed=0) -> Report:
    """One optimizer step (accum micro steps) of a small GPT-2 on `backend`, CPU float32."""
    import pyllmc
    from pyllmc.model import GPT, GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig(block_size=T, vocab_size=vocab_size, padded_vocab_size=padded, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd)
    model = GPT(config, seed=seed)
    optimizer = pyllmc.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, backend=backend)
    batches = [(torch.randint(0, vocab_size, (B, T)), torch.randint(0, vocab_size, (B, T))) for _ in range(accum)]
    takes_scale = "loss_scale" in inspect.signature(model.forward).parameters

    def micro_step(x, y):
        if takes_scale:
            _, loss = model(x, y, return_logits=False, inplace_backward=True, loss_scale=1.0 / accum)
        else:  # the trainer before loss scales were baked in
            _, loss = model(x, y, return_logits=False, inplace_backward=True)
            loss = loss / accum
        loss.backward()

    with pyllmc.backend(backend):
        micro_step(*batches[0])  # warm-up: first-call work (kernel compiles, caches) is not the step's
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                    profile_memory=True) as prof:
            for x, y in batches:
                with torch.profiler.record_function("micro_step"):
                    micro_step(x, y)
        optimizer.step()
    N = B * T
    return analyse(prof.events(), {N * vocab_size, N * padded}, 4 * N * vocab_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", choices=["cuda", "triton", "torch"])
    args = parser.parse_args(argv)
    report = profile_step(args.backend)
    print(f"backend {args.backend}: one step, 2 micro steps (fwd + bwd):")
    print(f"  glue ops touching (N, V) logits: {len(report.logits_ops)}")
    for f in report.logits_ops:
        print(f"    {f}")
    print(f"  glue copies: {len(report.copies)}, {report.copied_bytes / 1e6:.2f} MB (float32)")
    for f in report.copies:
        print(f"    {f}")
    return 1 if (report.logits_ops or report.copies) else 0


if __name__ == "__main__":
    sys.exit(main())
