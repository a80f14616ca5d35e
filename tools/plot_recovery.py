"""Held-out perplexity against wall time of training, from tools/zo_recovery.py's JSON files (one
line per run and text) and, optionally, first-order points (--first-order JSON: a list of
{"label", "seconds", "verse", "prose", "technical"}), as one PNG with a panel per text.

    python tools/plot_recovery.py docs/data/zo_*.json --first-order docs/data/first_order.json \
        --out docs/zo_recovery.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXTS = ("verse", "prose", "technical")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--first-order", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TEXTS), figsize=(5 * len(TEXTS), 4), constrained_layout=True)
    cpu = None
    for path in a.runs:
        run = json.loads(path.read_text())
        cpu = cpu or run.get("cpu")
        c = run["config"]
        how = "exact gradients (NumPy)" if c.get("gradient") == "exact" else "ZO"
        label = f"{how} {c['granularity']}, {c['optimizer']}, lr {c['lr']:g}, b{c['batch']}x{c['seq_len']}"
        if c.get("schedule", "constant") != "constant":
            label += f", {c['schedule']} over {c['steps']} steps"
        if run.get("windows"):
            label += f", {run['windows']} windows"
        for ax, name in zip(axes, TEXTS):
            xs = [p["seconds"] / 60 for p in run["points"]]
            ax.plot(xs, [p[name] for p in run["points"]], marker="o", ms=3, label=label)
    if a.first_order:
        for p in json.loads(a.first_order.read_text()):
            for ax, name in zip(axes, TEXTS):
                ax.scatter([p["seconds"] / 60], [p[name]], marker="s", s=40, zorder=3,
                           label=p["label"])
    for ax, name in zip(axes, TEXTS):
        ax.set_title(f"{name}: held-out perplexity")
        ax.set_xlabel("minutes of training (2 cores)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8)
    fig.suptitle(f"SmolLM2-135M at k=2, group 64: recovery by training time ({cpu})", fontsize=10)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    print(a.out)


if __name__ == "__main__":
    main()
