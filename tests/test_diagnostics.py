"""pyllmc.diagnostics and train_gpt2.py --diagnostics_every.

In process, on a 3-layer model small enough for the Triton interpreter and the CUDA simulator:
every statistic of a record against a hand computation (a forward written with torch.nn.functional,
autograd for the gradients, torch.optim.AdamW for the update), with gradient accumulation, in
bf16 with master weights, on every backend; histograms count every element; the rules of thumb.
Through the trainer (subprocesses, the tiny preset): the same losses with and without
diagnostics, bit for bit; warnings on broken runs and none on a healthy one; 2 gloo processes
(ZeRO-1) record what 1 process does; dev/plot.py --diagnostics draws PNGs from the log.
"""

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyllmc
from pyllmc import diagnostics
from pyllmc.diagnostics import TrainingDiagnostics, activation_summary, attention_summary, histogram
from pyllmc.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
from test_train import _raw_tokens, read_log, run_train, train_losses  # noqa: E402

# 3 blocks (the middle one has two neighbours), head dim 32 (what every attention backend takes in fp32)
SMALL = GPTConfig(block_size=16, vocab_size=64, padded_vocab_size=128, n_layer=3, n_head=2, n_embd=64)
B, T = 2, 16
REL = 1e-4  # the log keeps 5 significant digits (diagnostics.SIGNIFICANT_DIGITS)


class MemoryLog:
    def __init__(self):
        self.records = []

    def write(self, **record):
        self.records.append(record)


def _batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, SMALL.vocab_size, (B, T), generator=generator),
             torch.randint(0, SMALL.vocab_size, (B, T), generator=generator)) for _ in range(n)]


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _train(model, optimizer, batches_per_step, health=None, first_step=1):
    """The trainer's steps: accumulate over the micro batches (loss_scale 1/n), step, zero the gradients."""
    losses = []
    for step, batches in enumerate(batches_per_step, first_step):
        if health is not None:
            health.begin(step)
        total = 0.0
        for x, y in batches:
            _, loss = model(x, y, return_logits=False, inplace_backward=True, loss_scale=1.0 / len(batches))
            loss.backward()
            total += loss.item()
        if health is not None:
            health.before_update()
        optimizer.step()
        for p in model.parameters():
            p.grad = None
        if health is not None:
            health.end(updated=True)
        losses.append(total)
    return losses


def _histograms_of(tree):
    if isinstance(tree, dict):
        if "counts" in tree and "outside" in tree:
            yield tree
        for value in tree.values():
            yield from _histograms_of(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _histograms_of(value)


# ---- statistics of known tensors ------------------------------------------------------------------------

def test_activation_statistics_by_hand():
    values = [-4.0, -1.0, 0.0, 0.5, 2.0, 3.5, 3.0, -3.0]  # two beyond |x| = 3; +-3 exactly are not saturated
    x = torch.tensor(values).view(2, 4)
    s = diagnostics._fetch(activation_summary(x))
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    assert s["mean"] == pytest.approx(mean, rel=1e-6) and s["std"] == pytest.approx(std, rel=1e-6)
    assert s["sat"] == pytest.approx(2 / 8) and (s["min"], s["max"]) == (-4.0, 3.5)
    # 5 std reach past both ends: the range is the data's
    assert s["hist"]["range"] == [-4.0, 3.5]
    expected, _ = np.histogram(values, bins=diagnostics.HISTOGRAM_BINS, range=(-4.0, 3.5))
    assert s["hist"]["counts"] == expected.tolist() and s["hist"]["outside"] == [0, 0]

    # bf16 in, float32 statistics of the bf16 values
    x16 = torch.randn(3, 37, dtype=torch.bfloat16) * 3
    s16 = diagnostics._fetch(activation_summary(x16))
    exact = x16.double()
    assert s16["mean"] == pytest.approx(exact.mean().item(), rel=1e-5, abs=1e-6)
    assert s16["std"] == pytest.approx(exact.std(correction=0).item(), rel=1e-5)
    assert s16["sat"] == pytest.approx((exact.abs() > 3).double().mean().item())
    assert sum(s16["hist"]["counts"]) + sum(s16["hist"]["outside"]) == x16.numel()


def test_histogram_counts_every_element_once():
    # Gaussian values, but none within a tenth of a bin of an inner edge: histc bins in float32, numpy in
    # float64, and a value within rounding of an edge may land on either side (1 seed in 1,500 had one)
    finite = torch.randn(5000)
    position = (finite + 1.0) * 8.0  # in bin widths from -1 (16 bins over [-1, 1])
    finite = torch.where((position - position.round()).abs() < 0.1, finite + 0.25 * 2.0 / 16, finite)
    odd = torch.tensor([1e6, -1e6, float("nan"), float("inf"), -float("inf"), 1.0, -1.0])  # 1.0: last bin (closed)
    values = torch.cat([finite, odd])
    counts, outside = histogram(values, -1.0, 1.0, bins=16)
    kept = values[torch.isfinite(values)].numpy()
    expected, _ = np.histogram(kept, bins=16, range=(-1.0, 1.0))
    assert counts.tolist() == expected.tolist()
    below = int((values < -1.0).sum())  # -1e6, -inf and the Gaussian's tail
    assert outside.tolist() == [below, values.numel() - int(counts.sum()) - below]
    assert int(counts.sum() + outside.sum()) == values.numel()

    # a tensor with outliers: the range stops at mean +- 5 std, the outliers are counted outside
    x = torch.cat([torch.randn(10000), torch.tensor([500.0, -800.0])])
    s = diagnostics._fetch(activation_summary(x))
    low, high = s["hist"]["range"]
    assert low > -800 and high < 500 and s["hist"]["outside"] == [1, 1]
    assert sum(s["hist"]["counts"]) == 10000
    # a constant tensor gets a range of width 1 around it
    s = diagnostics._fetch(activation_summary(torch.full((10,), 2.0)))
    assert s["hist"]["range"] == [1.5, 2.5] and sum(s["hist"]["counts"]) == 10

    for bad, match in [((values.view(-1, 1), -1.0, 1.0), "flat float32"), ((values.double(), -1.0, 1.0), "flat"),
                       ((values, 1.0, 1.0), "high > low"), ((values, -1.0, float("nan")), "finite")]:
        with pytest.raises(ValueError, match=match):
            histogram(*bad)


def _attention_by_hand(qkv, n_head):
    Bq, Tq, C3 = qkv.shape
    D = C3 // 3 // n_head
    q, k, _ = qkv.double().view(Bq, Tq, 3, n_head, D).unbind(2)  # (B, T, H, D)
    entropy, largest = torch.zeros(n_head, dtype=torch.float64), torch.zeros(n_head, dtype=torch.float64)
    for h in range(n_head):
        for b in range(Bq):
            for t in range(1, Tq):  # query 0 is left out
                p = torch.softmax(q[b, t, h] @ k[b, :t + 1, h].T / math.sqrt(D), dim=0)
                entropy[h] += -(p * p.log()).sum()
                largest[h] += p.max()
    rows = Bq * (Tq - 1)
    return entropy / rows, largest / rows


def test_attention_statistics_by_hand():
    H, D, Tq = 2, 8, 6
    qkv = torch.randn(3, Tq, 3 * H * D)
    a = diagnostics._fetch(attention_summary(qkv, H))
    entropy, largest = _attention_by_hand(qkv, H)
    assert a["entropy"] == pytest.approx(entropy.tolist(), rel=1e-5)
    assert a["max_prob"] == pytest.approx(largest.tolist(), rel=1e-5)
    assert a["collapsed"] == 0.0
    assert sum(a["hist"]["counts"]) + sum(a["hist"]["outside"]) == 3 * H * Tq * (Tq + 1) // 2
    assert a["hist"]["outside"] == [0, 0]  # probabilities lie in [0, 1]

    # q = 0: uniform attention, the largest entropy there is
    uniform = qkv.clone()
    uniform[..., : H * D] = 0
    a = diagnostics._fetch(attention_summary(uniform, H))
    assert a["entropy"] == pytest.approx([diagnostics.uniform_attention_entropy(Tq)] * H, rel=1e-6)
    # head 1's keys: one huge key at position 0 that every query matches; head 0 stays uniform
    collapsed = uniform.clone()
    collapsed[..., D: H * D] = 1.0  # head 1's queries
    collapsed[:, 0, H * D + D: 2 * H * D] = 100.0  # head 1's key at position 0
    a = diagnostics._fetch(attention_summary(collapsed, H))
    assert a["max_prob"][1] > diagnostics.COLLAPSED_HEAD_MAX_PROB and a["collapsed"] == 0.5
    assert a["entropy"][1] < 1e-3


# ---- a record of a tiny model against a hand computation --------------------------------------------------

def _hand_forward(model, x):
    """The model's forward in torch.nn.functional, keeping what a record describes. Returns (logits, taps)."""
    c = model.config
    taps = {"residual": [], "ln_1": [], "ln_2": [], "gelu_input": [], "attention": []}
    tr = model.transformer
    h = tr.wte.weight[x] + tr.wpe.weight[: x.size(1)]  # (B, T, C)
    for block in tr.h:
        a_in = F.layer_norm(h, (c.n_embd,), block.ln_1.weight, block.ln_1.bias, 1e-5)
        taps["ln_1"].append(a_in)
        qkv = F.linear(a_in, block.attn.c_attn.weight, block.attn.c_attn.bias)
        taps["attention"].append(qkv)
        q, k, v = qkv.view(*x.shape, 3, c.n_head, c.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(*x.shape, c.n_embd)
        h = h + F.linear(y, block.attn.c_proj.weight, block.attn.c_proj.bias)
        m_in = F.layer_norm(h, (c.n_embd,), block.ln_2.weight, block.ln_2.bias, 1e-5)
        taps["ln_2"].append(m_in)
        u = F.linear(m_in, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        taps["gelu_input"].append(u)
        h = h + F.linear(F.gelu(u, approximate="tanh"), block.mlp.c_proj.weight, block.mlp.c_proj.bias)
        h.retain_grad()
        taps["residual"].append(h)
    ln_f = F.layer_norm(h, (c.n_embd,), tr.ln_f.weight, tr.ln_f.bias, 1e-5)
    taps["ln_f"] = [ln_f]
    return F.linear(ln_f, tr.wte.weight)[..., : c.vocab_size], taps


def _std(t):
    return t.double().std(correction=0).item()


def _assert_activation(stats, tensor):
    t = tensor.detach().double()
    assert stats["mean"] == pytest.approx(t.mean().item(), rel=REL, abs=1e-6)
    assert stats["std"] == pytest.approx(_std(t), rel=REL)
    assert stats["sat"] == pytest.approx((t.abs() > diagnostics.SATURATION_X).double().mean().item(), rel=REL, abs=1e-9)
    assert sum(stats["hist"]["counts"]) + sum(stats["hist"]["outside"]) == t.numel()


def test_record_equals_hand_computation_with_accumulation():
    """Step 2 of 2 (2 micro steps each) on a fixed model: the record against a hand computation, and the
    run against one without diagnostics (bitwise)."""
    torch.manual_seed(0)
    model = GPT(SMALL, seed=3)
    plain = copy.deepcopy(model)
    reference = copy.deepcopy(model)  # torch.optim.AdamW: the update by hand
    steps = [_batches(2, seed=10), _batches(2, seed=11)]
    kwargs = dict(weight_decay=0.1, learning_rate=3e-3, backend="torch")
    log = MemoryLog()
    health = TrainingDiagnostics(model, model.configure_optimizers(**kwargs), every=2, loss_scale=0.5, log=log,
                                 print_fn=lambda line: None)
    with pyllmc.backend("torch"):
        losses = _train(model, health.optimizer, steps, health)
        assert losses == _train(plain, plain.configure_optimizers(**kwargs), steps)  # bit for bit
        for a, b in zip(model.parameters(), plain.parameters()):
            assert torch.equal(a, b)
    assert _hooks_left(model) == 0 and not health.capturing
    assert len(log.records) == 1
    record = log.records[0]
    assert record["type"] == "diagnostics" and record["step"] == 2 and record["layers"] == SMALL.n_layer
    assert record["source"] == {"rank": 0, "micro_step": 0, "sequences": B, "tokens": B * T,
                                "attention_sequences": B,
                                "attention_uniform_entropy": pytest.approx(diagnostics.uniform_attention_entropy(T), rel=REL)}

    # the model before step 2, by hand: torch.optim.AdamW with the same groups, step 1
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    others = [p for p in reference.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)

    def hand_step(batches, keep_first=False):
        first = None
        for i, (x, y) in enumerate(batches):
            logits, taps = _hand_forward(reference, x)
            loss = F.cross_entropy(logits.reshape(-1, SMALL.vocab_size), y.reshape(-1))
            (0.5 * loss).backward()
            if i == 0:
                first = taps
        return first

    hand_step(steps[0])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    taps = hand_step(steps[1])  # micro batch 0's activations; .grad of the residuals: 0.5 x its own loss's
    grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    optimizer.step()

    acts = record["activations"]
    for kind in ("residual", "ln_1", "ln_2", "gelu_input", "ln_f"):
        assert len(acts[kind]) == len(taps[kind])
        for stats, tensor in zip(acts[kind], taps[kind]):
            _assert_activation(stats, tensor)
    for stats, tensor in zip(record["residual_grad"], taps["residual"]):
        g = tensor.grad.double() / 0.5  # the gradient of micro batch 0's own mean loss
        assert stats["norm"] == pytest.approx(g.norm().item(), rel=REL) and stats["std"] == pytest.approx(
            _std(g), rel=REL)
        assert sum(stats["hist"]["counts"]) + sum(stats["hist"]["outside"]) == g.numel()
    for stats, qkv in zip(record["attention"], taps["attention"]):
        entropy, largest = _attention_by_hand(qkv.detach(), SMALL.n_head)
        assert stats["entropy"] == pytest.approx(entropy.tolist(), rel=REL)
        assert stats["max_prob"] == pytest.approx(largest.tolist(), rel=REL)

    block_sq = [0.0] * SMALL.n_layer
    for name, entry in record["params"].items():
        g = grads[name].double()  # the whole step's gradient: both micro batches
        assert entry["grad_norm"] == pytest.approx(g.norm().item(), rel=REL), name
        assert entry["grad_std"] == pytest.approx(_std(g), rel=REL), name
        assert ("grad_hist" in entry) == (g.dim() >= 2)
        if name.startswith("transformer.h."):
            block_sq[int(name.split(".")[2])] += g.norm().item() ** 2
        update = dict(reference.named_parameters())[name].detach().double() - before[name].double()
        assert entry["weight_std"] == pytest.approx(_std(before[name]), rel=REL), name
        assert entry["update_std"] == pytest.approx(_std(update), rel=1e-3), name
        if _std(before[name]) > 0:
            assert entry["update_log10"] == pytest.approx(math.log10(_std(update) / _std(before[name])),
                                                          abs=1e-3), name
        else:  # the biases: zero at init, still constant after one step
            assert entry["update_log10"] is None or name.endswith(".bias")
    assert record["block_grad_norm"] == pytest.approx([math.sqrt(s) for s in block_sq], rel=REL)
    histograms = list(_histograms_of(record))
    # per block: residual, ln_1, ln_2, GELU input, attention, residual gradient, 4 weight matrices; + ln_f, wte, wpe
    assert len(histograms) == 10 * SMALL.n_layer + 3
    assert all(len(h["counts"]) == diagnostics.HISTOGRAM_BINS and len(h["range"]) == 2 for h in histograms)


def test_bf16_updates_are_measured_on_the_master_weights():
    """bf16 parameters, float32 master weights in AdamW: the update is the master copy's, also at step 1,
    when the optimizer makes the master copies (from the parameters) during the step."""
    model = GPT(SMALL, seed=5).to(torch.bfloat16)
    # lr 1e-5: updates below half a bf16 ulp of the weights (~6e-5 at 0.02), which the master copy keeps
    optimizer = model.configure_optimizers(weight_decay=0.0, learning_rate=1e-5, backend="torch", master_weights=True)
    log = MemoryLog()
    health = TrainingDiagnostics(model, optimizer, every=1, log=log, print_fn=lambda line: None)
    name_of = {id(p): n for n, p in model.named_parameters()}
    before = {name: p.detach().float() for name, p in model.named_parameters()}  # step 1: the master's start
    masters = []
    with pyllmc.backend("torch"):
        for step, batches in enumerate([_batches(1, seed=20), _batches(1, seed=21)], 1):
            _train(model, optimizer, [batches], health, first_step=step)
            masters.append({name_of[id(p)]: s["master"].clone() for p, s in optimizer.state.items()})
    for record, start, end in zip(log.records, [before, masters[0]], masters):
        for name, entry in record["params"].items():
            assert entry["update_std"] == pytest.approx(_std(end[name].double() - start[name].double()), rel=1e-3)
            assert entry["weight_std"] == pytest.approx(_std(start[name]), rel=REL)
            assert math.isfinite(entry["grad_norm"])
        for stats in record["activations"]["residual"]:
            assert stats["std"] > 0 and math.isfinite(stats["mean"])
        for hist in _histograms_of(record):
            assert sum(hist["counts"]) + sum(hist["outside"]) > 0
    # the bf16 weights themselves move by whole ulps or not at all: their difference adds the rounding
    name = "transformer.h.0.mlp.c_fc.weight"
    bf16_update = _std(dict(model.named_parameters())[name].double() - masters[0][name].bfloat16().double())
    master_update = log.records[1]["params"][name]["update_std"]
    assert master_update == pytest.approx(1e-5, rel=0.5)  # Adam's early steps move each weight by ~lr
    assert bf16_update > 1.15 * master_update, (bf16_update, master_update)


def test_every_backend_records_what_torch_does(kernel_backend):
    """The cuda (simulator) and triton (interpreter) kernels give the torch backend's record."""
    backend, device = kernel_backend
    records = {}
    for name in (backend, "torch"):
        model = GPT(SMALL, seed=9).to(device)
        log = MemoryLog()
        health = TrainingDiagnostics(model, model.configure_optimizers(0.0, 1e-3, backend=name), every=1, log=log,
                                     print_fn=lambda line: None)
        x, y = _batches(1, seed=30)[0]
        with pyllmc.backend(name):
            _train(model, health.optimizer, [[(x.to(device), y.to(device))]], health)
        records[name] = log.records[0]
    ours, torch_ = records[backend], records["torch"]
    for kind, per_layer in torch_["activations"].items():
        for a, b in zip(ours["activations"][kind], per_layer):
            assert a["mean"] == pytest.approx(b["mean"], rel=1e-3, abs=1e-5), kind
            assert a["std"] == pytest.approx(b["std"], rel=1e-3), kind
    for a, b in zip(ours["attention"], torch_["attention"]):
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-3)
    for a, b in zip(ours["residual_grad"], torch_["residual_grad"]):
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-3)
    for name, b in torch_["params"].items():
        a = ours["params"][name]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), name
        if b.get("update_log10") is not None:
            assert a["update_log10"] == pytest.approx(b["update_log10"], abs=1e-2), name


# ---- the rules of thumb ------------------------------------------------------------------------------------

def _one_record(model, lr=1e-4, step_batches=None):
    log = MemoryLog()
    lines = []
    health = TrainingDiagnostics(model, model.configure_optimizers(0.0, lr, backend="torch"), every=1, log=log,
                                 print_fn=lines.append)
    with pyllmc.backend("torch"):
        _train(model, health.optimizer, step_batches or [_batches(1, seed=40)], health)
    return log.records[0], lines


def test_warnings_fire_on_broken_models_and_stay_quiet_on_a_healthy_one():
    healthy, lines = _one_record(GPT(SMALL, seed=1))
    assert healthy["warnings"] == [] and not any("warning" in line for line in lines)
    assert len(lines) == 1 and lines[0].startswith("diagnostics: update/weight log10 ")

    saturated = GPT(SMALL, seed=1)
    with torch.no_grad():
        saturated.transformer.h[1].mlp.c_fc.weight.mul_(60)  # pre-activations of std ~ 10: ~3/4 |x| > 3
    record, lines = _one_record(saturated)
    assert [w for w in record["warnings"] if w.startswith("GELU saturation")] == [
        w for w in record["warnings"] if "layer 1 (" in w and "GELU" in w]
    assert any(w.startswith("GELU saturation above 50%") and "layer 1 (" in w and "layer 0 (" not in w
               for w in record["warnings"]), record["warnings"]
    assert any(line.startswith("warning: GELU saturation") for line in lines)

    collapsed = GPT(SMALL, seed=1)
    with torch.no_grad():
        collapsed.transformer.h[2].attn.c_attn.weight[: 2 * SMALL.n_embd].mul_(100)  # q and k: huge logits
    record, _ = _one_record(collapsed)
    assert any(w.startswith("attention heads collapsed") and "layer 2 (100% of its heads)" in w
               for w in record["warnings"]), record["warnings"]

    record, _ = _one_record(GPT(SMALL, seed=1), lr=1e-1)  # the learning rate x 1000
    high = [w for w in record["warnings"] if w.startswith("update/weight ratio above")]
    assert len(high) == 1 and "transformer.h.0.mlp.c_fc.weight 10^" in high[0]
    assert "bias" not in high[0] and ".ln_" not in high[0]  # the rule is about matrices


def test_rules_on_crafted_records():
    dims = {"transformer.h.0.mlp.c_fc.weight": 2, "transformer.h.0.mlp.c_fc.bias": 1}

    def params(log10, weight_std=0.02):
        update_std = weight_std * 10 ** log10 if log10 is not None else 0.0
        return {"transformer.h.0.mlp.c_fc.weight": {"grad_norm": 1.0, "weight_std": weight_std,
                                                    "update_std": update_std, "update_log10": log10},
                "transformer.h.0.mlp.c_fc.bias": {"grad_norm": 1.0, "weight_std": 1e-6, "update_std": 1e-3,
                                                  "update_log10": 3.0}}  # a bias: never warned about

    assert diagnostics.warnings_of({"params": params(-3.0)}, dims) == []
    assert diagnostics.warnings_of({"params": params(-1.2)}, dims)[0].startswith("update/weight ratio above 10^-1.5")
    assert diagnostics.warnings_of({"params": params(-5.5)}, dims)[0].startswith("update/weight ratio below 10^-5")
    assert diagnostics.warnings_of({"params": params(None)}, dims)[0].startswith("not changed")
    spike = diagnostics.warnings_of({"block_grad_norm": [0.1, 0.2, 2.5, 0.2], "params": {}}, dims)
    assert spike == ["gradient norm over 10x both neighbouring blocks' in layer 2 (2.5 against 0.2, 0.2)"]
    assert diagnostics.warnings_of({"block_grad_norm": [0.1, 0.9, 2.5, 0.2], "params": {}}, dims) == []
    assert diagnostics.warnings_of({"block_grad_norm": [3.0, 0.2], "params": {}}, dims)[0].endswith("layer 0 (3 against 0.2)")
    nan = {"params": {"transformer.h.0.mlp.c_fc.weight": {"grad_norm": float("nan")}}}
    assert diagnostics.warnings_of(nan, dims) == ["non-finite values in the gradient of transformer.h.0.mlp.c_fc.weight"]


def test_no_hook_is_installed_or_runs_between_diagnostics_steps(monkeypatch):
    """every=3 over 6 steps: only steps 3 and 6 have hooks, only while their first forward runs, and no
    statistic is taken on any other step (the tensor hooks of the backward included)."""
    calls = []
    for name in ("activation_summary", "attention_summary", "gradient_summary"):
        original = getattr(diagnostics, name)
        monkeypatch.setattr(diagnostics, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = GPT(SMALL, seed=2)
    log = MemoryLog()
    health = TrainingDiagnostics(model, model.configure_optimizers(0.0, 1e-3, backend="torch"), every=3,
                                 loss_scale=0.5, log=log, print_fn=lambda line: None)
    with pyllmc.backend("torch"):
        for step, batches in enumerate([_batches(2, seed=50 + s) for s in range(6)], 1):
            calls.clear()
            diagnosed = health.begin(step)
            assert diagnosed == (step % 3 == 0) and health.capturing == diagnosed
            assert (_hooks_left(model) > 0) == diagnosed, step
            for x, y in batches:
                _, loss = model(x, y, return_logits=False, inplace_backward=True, loss_scale=0.5)
                assert _hooks_left(model) == 0 and not health.capturing  # gone once the hooked forward returns
                loss.backward()
            health.before_update()
            health.optimizer.step()
            for p in model.parameters():
                p.grad = None
            health.end(updated=True)
            assert _hooks_left(model) == 0
            if diagnosed:  # per block: ln_1, ln_2, GELU input, residual; + ln_f; attention; the residual
                # gradients (micro step 0 only) and each parameter's gradient
                assert calls.count("activation_summary") == 4 * SMALL.n_layer + 1
                assert calls.count("attention_summary") == SMALL.n_layer
                assert calls.count("gradient_summary") == SMALL.n_layer + len(list(model.parameters()))
            else:
                assert calls == [], (step, calls)
    assert [r["step"] for r in log.records] == [3, 6]


def test_bad_settings_are_refused():
    model = GPT(SMALL, seed=1)
    for every in (-1, 1.5, "5"):
        with pytest.raises(ValueError, match="every must be an int >= 0"):
            TrainingDiagnostics(model, every=every)
    with pytest.raises(ValueError, match="loss_scale must be > 0"):
        TrainingDiagnostics(model, every=1, loss_scale=0.0)
    health = TrainingDiagnostics(model, every=0)  # off: nothing is ever installed
    for step in (1, 2, 3):
        assert health.begin(step) is False and _hooks_left(model) == 0
        health.before_update()
        assert health.end() is None


# ---- through the trainer ----------------------------------------------------------------------------------

COMMON = ["--model", "tiny", "--batch_size", "2", "--sequence_length", "32", "--val_max_steps", "1",
          "--sample_every", "-1", "--backend", "torch", "--device", "cpu", "--seed", "7", "--checkpoint_every", "-1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pyllmc.data import write_shard

    d = tmp_path_factory.mktemp("diag_shards")
    write_shard(d / "train.bin", _raw_tokens("tinyshakespeare_gpt2_train.bin")[:20000])
    write_shard(d / "val.bin", _raw_tokens("tinyshakespeare_gpt2_val.bin")[:2000])
    return ["--input_bin", str(d / "train.bin"), "--input_val_bin", str(d / "val.bin")]


@pytest.fixture(scope="module")
def healthy_run(shards, tmp_path_factory):
    """6 steps of 2 micro steps, a small learning rate, diagnostics every 3 steps; and the same run without."""
    args = [*COMMON, *shards, "--num_iterations", "6", "--total_batch_size", "128", "--learning_rate", "1e-4"]
    plain, diagnosed = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("diagnosed")
    run_train([*args, "--output_dir", str(plain)])
    result = run_train([*args, "--output_dir", str(diagnosed), "--diagnostics_every", "3"])
    return read_log(plain), read_log(diagnosed), result, diagnosed


def test_trainer_losses_are_unchanged_and_a_healthy_run_is_quiet(healthy_run):
    plain, diagnosed, result, _ = healthy_run
    assert train_losses(diagnosed) == train_losses(plain)  # bit for bit
    assert [r["val_loss"] for r in diagnosed if r["type"] == "val"] == [r["val_loss"] for r in plain if r["type"] == "val"]
    records = [r for r in diagnosed if r["type"] == "diagnostics"]
    assert [r["step"] for r in records] == [3, 6]
    lines = re.findall(r"^step +(\d+)/6 \| diagnostics: update/weight log10 -[\d.]+\.\.-[\d.]+ \| GELU saturation "
                       r"max [\d.]+% \(layer \d\) \| attention entropy [\d.]+\.\.[\d.]+ of uniform, \d+ collapsed heads "
                       r"\| block grad norms \S+ \| [\d.]+ KB logged$", result.stdout, re.M)
    assert lines == ["3", "6"], result.stdout
    assert "warning" not in result.stdout and all(r["warnings"] == [] for r in records)
    for r in records:
        assert r["source"]["tokens"] == 2 * 32 and r["updated"] is True
        assert len(r["activations"]["residual"]) == 2 and len(r["residual_grad"]) == 2
        assert all(-5 < e["update_log10"] < -1.5 for n, e in r["params"].items() if n.endswith("c_fc.weight"))


def test_trainer_warns_on_broken_runs(shards, tmp_path):
    args = [*COMMON, *shards, "--num_iterations", "1", "--total_batch_size", "64", "--val_max_steps", "0",
            "--diagnostics_every", "1"]
    result = run_train([*args, "--learning_rate", "0.1", "--output_dir", str(tmp_path / "lr")])  # 100x the default
    assert re.search(r"^step 1/1 \| warning: update/weight ratio above 10\^-1\.5 .*transformer\.h\.0\.mlp\.c_fc\.weight",
                     result.stdout, re.M), result.stdout
    record = [r for r in read_log(tmp_path / "lr") if r["type"] == "diagnostics"][0]
    assert any(w.startswith("update/weight ratio above") for w in record["warnings"])

    model = GPT(GPTConfig.from_preset("tiny"), seed=7)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(60)  # GELU inputs of std ~ 14: ~4/5 |x| > 3
    model.save_pretrained(str(tmp_path / "saturated"))
    result = run_train([*args, "--learning_rate", "1e-4", "--model", str(tmp_path / "saturated"),
                        "--output_dir", str(tmp_path / "gelu")])
    assert re.search(r"^step 1/1 \| warning: GELU saturation above 50% .* in layer 0 \(\d+%\), layer 1 \(\d+%\)",
                     result.stdout, re.M), result.stdout
    assert "update/weight ratio" not in result.stdout


def test_trainer_refuses_a_negative_diagnostics_every(trainer, capsys):
    assert trainer.main(["--diagnostics_every", "-1", "--device", "cpu"]) == 2
    assert "--diagnostics_every must be >= 0 (0: off); got -1" in capsys.readouterr().err


def test_two_processes_record_what_one_does(shards, healthy_run, tmp_path):
    """2 gloo processes (ZeRO-1), one micro step each, against 1 process with 2 micro steps: the same micro
    batch on rank 0 as micro step 0, the same gradients after the all-reduce, the same updates measured
    by each parameter's owner; one record, written by rank 0."""
    _, one, _, _ = healthy_run
    args = [*COMMON, *shards, "--num_iterations", "3", "--total_batch_size", "128", "--learning_rate", "1e-4",
            "--diagnostics_every", "3", "--val_max_steps", "0", "--zero_stage", "1", "--output_dir", str(tmp_path)]
    result = run_train(args, nproc=2)
    assert result.stdout.count("| diagnostics:") == 1
    two = [r for r in read_log(tmp_path) if r["type"] == "diagnostics"]
    one = [r for r in one if r["type"] == "diagnostics" and r["step"] == 3]
    assert len(two) == 1 and len(one) == 1
    a, b = two[0], one[0]
    for kind in b["activations"]:
        for x, y in zip(a["activations"][kind], b["activations"][kind]):
            assert x["mean"] == pytest.approx(y["mean"], rel=1e-3, abs=1e-6) and x["std"] == pytest.approx(y["std"], rel=1e-4)
    for x, y in zip(a["residual_grad"], b["residual_grad"]):
        assert x["norm"] == pytest.approx(y["norm"], rel=1e-4)
    for name, y in b["params"].items():
        x = a["params"][name]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), name
        assert (x["update_log10"] is None) == (y["update_log10"] is None), name
        if y["update_log10"] is not None:
            assert x["update_log10"] == pytest.approx(y["update_log10"], abs=1e-3), name


def test_plot_draws_the_diagnostics(healthy_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="dev/plot.py needs matplotlib (the test extra installs it)")
    import plot  # dev/plot.py (pytest puts dev/ on sys.path)

    _, _, _, out = healthy_run
    argv = [str(out / "main.jsonl"), "--diagnostics", "-o", str(tmp_path / "fig")]
    plot.main([*argv, "--step", "3"])
    printed = capsys.readouterr().out
    for kind in ("histograms", "updates", "layers"):
        png = tmp_path / f"fig_{kind}.png"
        assert f"wrote {png}" in printed
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no diagnostics record at step 7; there are: 3, 6"):
        plot.main([*argv, "--step", "7"])
    (tmp_path / "plain.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no diagnostics records \\(train with --diagnostics_every N\\)"):
        plot.main([str(tmp_path / "plain.jsonl"), "--diagnostics"])
