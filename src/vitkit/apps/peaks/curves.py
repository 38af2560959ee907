"""Training curves from Lightning's CSV log."""

from __future__ import annotations

import csv
from pathlib import Path

from vitkit.atomic import atomic_path


def plot_curves(metrics_csv: Path, out_png: Path) -> Path | None:
    """Plot loss, validation IoU and annealing probabilities against the step; None without a log."""
    if not metrics_csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    series.setdefault(k, []).append((float(step), float(v)))
    panels = [("loss", [k for k in series if k.startswith("train/loss")]),
              ("validation", [k for k in series if k.startswith("val/")]),
              ("mask annealing", [k for k in series if k.startswith("anneal/")])]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in sorted(keys):
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, label=k, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_path(out_png) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out_png
