"""Plot a training run from its main.jsonl: train loss, val loss and HellaSwag accuracy vs step.

    python dev/plot.py log_gpt2_124M/main.jsonl                          # -> log_gpt2_124M/curves.png
    python dev/plot.py run/main.jsonl --ref other_run/main.jsonl -o cmp.png
    python dev/plot.py a/main.jsonl b/main.jsonl --labels ours baseline   # several runs, one figure

Each log is what train_gpt2.py writes (one JSON object per line: "train" records with step
and loss, "val" with val_loss, "hellaswag" with acc_norm). --ref adds a reference run drawn
dashed. The train loss is also shown smoothed (exponential moving average, --smooth).

    python dev/plot.py OUT/main.jsonl --diagnostics [--step 500] [-o PREFIX]

draws the "diagnostics" records of a run with --diagnostics_every (pyllmc.diagnostics), the
figures of Zero to Hero's lecture on activations and gradients, as three PNGs, PREFIX_*.png
(default OUT/diagnostics_*.png):
  histograms  at one step (--step, default the last diagnosed): the residual stream, the LayerNorm
              outputs, the GELU input, the attention probabilities, the residual stream's gradient
              and the weight gradients of the MLP's c_fc, one line per layer (density, so layers
              of any size overlay);
  updates     log10 of the update-to-data ratio of every weight matrix over the steps, with the
              lecture's -3 and the warning limits;
  layers      per layer over the steps: GELU saturation, attention entropy (1 = uniform), the
              residual stream's std, the block's gradient norm.
matplotlib is an optional dependency (pip install matplotlib).
"""

import argparse
import json
import sys
from pathlib import Path


def read_log(path):
    """{'train': [(step, loss)], 'val': [(step, loss)], 'hellaswag': [(step, acc_norm)]} of one log.

    A resumed run may have logged some steps twice: the last record of a step wins."""
    series = {"train": {}, "val": {}, "hellaswag": {}}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(f"{path}:{number}: skipping a line that is not JSON", file=sys.stderr)
                continue
            kind = record.get("type")
            if kind == "train" and not record.get("skipped"):
                series["train"][record["step"]] = record["loss"]
            elif kind == "val":
                series["val"][record["step"]] = record["val_loss"]
            elif kind == "hellaswag":
                series["hellaswag"][record["step"]] = record["acc_norm"]
    return {k: sorted(v.items()) for k, v in series.items()}


def ema(values, alpha):
    out, average = [], None
    for v in values:
        average = v if average is None else alpha * average + (1 - alpha) * v
        out.append(average)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="main.jsonl file(s) of train_gpt2.py")
    parser.add_argument("--ref", type=Path, action="append", default=[], help="reference run log(s), drawn dashed")
    parser.add_argument("--labels", nargs="+", help="legend labels of the logs (default: their directory names)")
    parser.add_argument("--output", "-o", type=Path, help="PNG to write (default: curves.png beside the first log)")
    parser.add_argument("--smooth", type=float, default=0.9, help="EMA factor of the smoothed train loss (0: none)")
    parser.add_argument("--ylim", type=float, nargs=2, metavar=("LOW", "HIGH"), help="loss axis range")
    parser.add_argument("--diagnostics", action="store_true",
                        help="draw the log's diagnostics records (train_gpt2.py --diagnostics_every) instead; "
                             "--output is then the prefix of the three PNGs")
    parser.add_argument("--step", type=int, help="with --diagnostics: the step of the histograms (default: the last)")
    args = parser.parse_args(argv)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("dev/plot.py needs matplotlib: pip install matplotlib")

    if args.diagnostics:
        if len(args.logs) != 1 or args.ref:
            sys.exit("--diagnostics draws one log (no --ref)")
        prefix = args.output or args.logs[0].parent / "diagnostics"
        for path in plot_diagnostics(plt, args.logs[0], Path(prefix), args.step):
            print(f"wrote {path}")
        return

    runs = []
    labels = args.labels or [p.parent.name or p.stem for p in args.logs]
    if len(labels) != len(args.logs):
        sys.exit(f"--labels has {len(labels)} names for {len(args.logs)} logs")
    for path, label in zip(args.logs, labels):
        runs.append((label, read_log(path), "-"))
    for path in args.ref:
        runs.append((f"{path.parent.name or path.stem} (ref)", read_log(path), "--"))

    has_hellaswag = any(series["hellaswag"] for _, series, _ in runs)
    fig, axes = plt.subplots(1, 2 if has_hellaswag else 1, figsize=(14 if has_hellaswag else 8, 5), squeeze=False)
    loss_ax = axes[0][0]
    for i, (label, series, style) in enumerate(runs):
        color = f"C{i}"
        if series["train"]:
            steps, losses = zip(*series["train"])
            if args.smooth > 0:
                loss_ax.plot(steps, losses, style, color=color, alpha=0.25, linewidth=0.8)
                loss_ax.plot(steps, ema(losses, args.smooth), style, color=color, label=f"{label} train")
            else:
                loss_ax.plot(steps, losses, style, color=color, label=f"{label} train")
        if series["val"]:
            steps, losses = zip(*series["val"])
            loss_ax.plot(steps, losses, style, color=color, marker="o", markersize=3, label=f"{label} val")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    if args.ylim:
        loss_ax.set_ylim(*args.ylim)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    loss_ax.set_title("loss")
    if has_hellaswag:
        ax = axes[0][1]
        for i, (label, series, style) in enumerate(runs):
            if series["hellaswag"]:
                steps, acc = zip(*series["hellaswag"])
                ax.plot(steps, acc, style, color=f"C{i}", marker="o", markersize=3, label=label)
        ax.axhline(0.25, color="gray", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("acc_norm")
        ax.set_title("HellaSwag")
        ax.grid(alpha=0.3)
        ax.legend()

    output = args.output or args.logs[0].parent / "curves.png"
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


# ---- diagnostics (pyllmc.diagnostics records) ---------------------------------------------------

DIAGNOSTICS_DPI = 80  # 7-point legends stay legible; the 16 x 8.5 inch figure is 1280 x 680 pixels
MATRIX_KINDS = {"attn.c_attn.weight": ("-", "attn.c_attn"), "attn.c_proj.weight": ("--", "attn.c_proj"),
                "mlp.c_fc.weight": ("-.", "mlp.c_fc"), "mlp.c_proj.weight": (":", "mlp.c_proj")}


def _save_png(fig, path):
    """The figure as a 256-colour PNG: a third of the full-colour file's size, no visible difference."""
    import io

    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DIAGNOSTICS_DPI)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)


def read_diagnostics(path):
    """The diagnostics records of one log, by step (a resumed run's repeat of a step: the last wins)."""
    records = {}
    with open(path) as f:
        for line in f:
            if '"diagnostics"' not in line:  # cheap: the other records are most of a long log
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") == "diagnostics":
                records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def _layer_colors(plt, n):
    cmap = plt.get_cmap("viridis")
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def _density(hist):
    """(bin centers, density) of a histogram record: count / (all elements * bin width)."""
    low, high = hist["range"]
    counts = hist["counts"]
    total = sum(counts) + sum(hist["outside"])
    width = (high - low) / len(counts)
    centers = [low + (i + 0.5) * width for i in range(len(counts))]
    return centers, [c / (total * width) if total else 0.0 for c in counts]


def _histogram_panel(ax, colors, per_layer, title, label_of, xlabel, log_y=False):
    drawn = False
    for layer, stats in enumerate(per_layer):
        hist = stats.get("hist") if stats else None
        if not hist:
            continue
        centers, density = _density(hist)
        ax.plot(centers, density, color=colors[layer % len(colors)], linewidth=1.2, label=label_of(layer, stats))
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("density (log scale)" if log_y else "density", fontsize=9)
    if log_y and drawn:
        ax.set_yscale("log")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # gradients: 1e-5, not 0.00001 in every tick
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2 if len(per_layer) > 6 else 1)
    else:
        ax.text(0.5, 0.5, "not in this record", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_diagnostics(plt, path, prefix, step=None):
    from pyllmc.diagnostics import GELU_SATURATION_LIMIT, SATURATION_X, UPDATE_LOG10_HIGH, UPDATE_LOG10_LOW

    records = read_diagnostics(path)
    if not records:
        sys.exit(f"{path}: no diagnostics records (train with --diagnostics_every N)")
    if step is None:
        record = records[-1]
    else:
        matching = [r for r in records if r["step"] == step]
        if not matching:
            sys.exit(f"{path}: no diagnostics record at step {step}; there are: "
                     f"{', '.join(str(r['step']) for r in records)}")
        record = matching[0]
    L = record["layers"]
    colors = _layer_colors(plt, L)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []

    # ---- histograms at one step
    acts = record["activations"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))

    def act_label(layer, s):
        return f"layer {layer}: mean {s['mean']:+.2f}, std {s['std']:.2f}"

    def gelu_label(layer, s):  # saturation means something for the GELU input only
        return f"{act_label(layer, s)}, sat {100 * s['sat']:.1f}%"

    def grad_label(layer, s):
        return f"layer {layer}: std {s['std']:.2e}"

    _histogram_panel(axes[0][0], colors, acts["residual"], "residual stream after each block", act_label,
                     "activation")
    _histogram_panel(axes[0][1], colors, acts["ln_2"], "LayerNorm output (ln_2, the MLP's input)", act_label,
                     "activation")
    gelu_ax = axes[0][2]
    _histogram_panel(gelu_ax, colors, acts["gelu_input"],
                     f"GELU input (sat: |x| > {SATURATION_X:g}, shaded)", gelu_label, "pre-activation (c_fc output)")
    low, high = gelu_ax.get_xlim()  # show the saturated regions even when no input reaches them
    low, high = min(low, -1.2 * SATURATION_X), max(high, 1.2 * SATURATION_X)
    gelu_ax.axvspan(low, -SATURATION_X, color="red", alpha=0.07)
    gelu_ax.axvspan(SATURATION_X, high, color="red", alpha=0.07)
    gelu_ax.set_xlim(low, high)
    attention = record.get("attention") or []
    uniform = (record.get("source") or {}).get("attention_uniform_entropy") or 1.0
    _histogram_panel(axes[1][0], colors, attention, "attention probabilities (causal entries, log scale)",
                     lambda layer, a: (f"layer {layer}: entropy {sum(a['entropy']) / len(a['entropy']) / uniform:.2f}"
                                       f" of uniform, {100 * a['collapsed']:.0f}% heads collapsed"),
                     "probability", log_y=True)
    _histogram_panel(axes[1][1], colors, record.get("residual_grad") or [], "gradient of the residual stream",
                     grad_label, "d loss / d activation")
    params = record["params"]
    fc = [params.get(f"transformer.h.{i}.mlp.c_fc.weight", {}) for i in range(L)]
    _histogram_panel(axes[1][2], colors, [{"hist": p["grad_hist"], "std": p["grad_std"]} if "grad_hist" in p
                                          else None for p in fc], "gradient of mlp.c_fc.weight", grad_label,
                     "d loss / d weight")
    source = record.get("source") or {}
    fig.suptitle(f"{path.parent.name or path}: activations and gradients at step {record['step']} "
                 f"(rank {source.get('rank', 0)}'s micro batch, {source.get('tokens', '?')} tokens; "
                 f"density per layer)", fontsize=12)
    fig.tight_layout()
    out = prefix.with_name(prefix.name + "_histograms.png")
    _save_png(fig, out)
    plt.close(fig)
    written.append(out)

    # ---- update ratios over the steps
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(11, 6))
    names = [n for n in record["params"] if n.endswith(tuple(MATRIX_KINDS) + ("wte.weight", "wpe.weight"))]
    for name in names:
        series = [(r["step"], r["params"].get(name, {}).get("update_log10")) for r in records]
        series = [(s, v) for s, v in series if v is not None]
        if not series:
            continue
        xs, ys = zip(*series)
        kind = next((k for k in MATRIX_KINDS if name.endswith(k)), None)
        if kind is not None:
            layer = int(name.split(".")[2])
            style, short = MATRIX_KINDS[kind]
            ax.plot(xs, ys, style, color=colors[layer], linewidth=1.3, label=f"{layer} {short}")
        else:
            ax.plot(xs, ys, "-", color="black" if "wte" in name else "gray", linewidth=1.6,
                    label=name.split(".")[1])
    ax.axhline(-3, color="black", linewidth=0.8, label="lecture's ~ -3")
    ax.axhline(UPDATE_LOG10_HIGH, color="red", linestyle="--", linewidth=0.8, label="warning limits")
    ax.axhline(UPDATE_LOG10_LOW, color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("log10( std(update) / std(weight) )")
    ax.set_title(f"{path.parent.name or path}: update-to-data ratio of each weight matrix (the update AdamW applied)",
                 fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, min(6, (len(names) + 2) // 8)), loc="best")
    fig.tight_layout()
    out = prefix.with_name(prefix.name + "_updates.png")
    _save_png(fig, out)
    plt.close(fig)
    written.append(out)

    # ---- per layer over the steps
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)

    def over_steps(ax, value_of, title, ylabel, log_y=False):
        for layer in range(L):
            xs, ys = [], []
            for r in records:
                value = value_of(r, layer)
                if value is not None:
                    xs.append(r["step"])
                    ys.append(value)
            ax.plot(xs, ys, color=colors[layer], marker="o", markersize=2.5, linewidth=1.2, label=f"layer {layer}")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if L > 6 else 1)

    def stat(kind, key, scale=1.0):
        def value_of(r, layer):
            per_layer = (r.get("activations") or {}).get(kind) or []
            s = per_layer[layer] if layer < len(per_layer) else None
            return None if s is None or s.get(key) is None else scale * s[key]
        return value_of

    def entropy(r, layer):
        heads = (r.get("attention") or [None] * L)[layer]
        u = (r.get("source") or {}).get("attention_uniform_entropy")
        if not heads or not u or None in heads["entropy"]:
            return None
        return sum(heads["entropy"]) / len(heads["entropy"]) / u

    def grad_norm(r, layer):
        norms = r.get("block_grad_norm") or []
        return norms[layer] if layer < len(norms) else None

    over_steps(axes[0][0], stat("gelu_input", "sat", 100), f"GELU saturation (|x| > {SATURATION_X:g})", "%")
    axes[0][0].axhline(100 * GELU_SATURATION_LIMIT, color="red", linestyle="--", linewidth=0.8, label="warning limit")
    axes[0][0].legend(fontsize=7, ncol=2 if L > 6 else 1)
    over_steps(axes[0][1], entropy, "attention entropy, mean over heads", "fraction of uniform's")
    over_steps(axes[1][0], stat("residual", "std"), "residual stream std after each block", "std")
    over_steps(axes[1][1], grad_norm, "gradient norm of each block's parameters", "norm", log_y=True)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{path.parent.name or path}: per-layer health over {len(steps)} diagnosed steps", fontsize=12)
    fig.tight_layout()
    out = prefix.with_name(prefix.name + "_layers.png")
    _save_png(fig, out)
    plt.close(fig)
    written.append(out)
    return written


if __name__ == "__main__":
    main()
