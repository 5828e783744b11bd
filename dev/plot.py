"""Plot a training run from its main.jsonl: train loss, val loss and HellaSwag accuracy vs step.

    python dev/plot.py log_gpt2_124M/main.jsonl                          # -> log_gpt2_124M/curves.png
    python dev/plot.py run/main.jsonl --ref other_run/main.jsonl -o cmp.png
    python dev/plot.py a/main.jsonl b/main.jsonl --labels ours baseline   # several runs, one figure

Each log is what train_gpt2.py writes (one JSON object per line: "train" records with step
and loss, "val" with val_loss, "hellaswag" with acc_norm). --ref adds a reference run drawn
dashed. The train loss is also shown smoothed (exponential moving average, --smooth).
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
    args = parser.parse_args(argv)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("dev/plot.py needs matplotlib: pip install matplotlib")

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


if __name__ == "__main__":
    main()
