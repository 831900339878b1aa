"""A run's loss, throughput and metric curves against step, as one PNG (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
from pathlib import Path

from ..atomic import atomic_path

PLOTTED_METRICS = ("classifier_fd", "class_accuracy", "classifier_score", "fid", "kid", "inception_score",
                   "estimated_quality", "quality_spearman")


def plot_curves(rows: list[dict], eval_rows: list[dict], path: Path) -> Path | None:
    """Draw panels against step: D and G losses, images/s, data wait, and each evaluation metric; write
    them to `path` as one PNG. Returns None (writes nothing) before the first row."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported on first use: ~0.3 s
    from matplotlib.figure import Figure

    panels = [("losses", rows, ["loss_d", "loss_g"]), ("images/s", rows, ["images_per_s"]),
              ("data wait (fraction of step time)", rows, ["data_wait"])]
    panels += [(key, eval_rows, [key]) for key in PLOTTED_METRICS if any(key in row for row in eval_rows)]
    columns = 2
    figure = Figure(figsize=(11, 3.2 * math.ceil(len(panels) / columns)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the off-screen canvas: no display, and no pyplot state in the caller's process
    axes = list(figure.subplots(math.ceil(len(panels) / columns), columns, squeeze=False).flat)
    for ax, (title, data, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in data if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="o" if len(points) < 2 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    for ax in axes[len(panels):]:  # the empty cell of an odd number of panels
        ax.set_visible(False)
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)
