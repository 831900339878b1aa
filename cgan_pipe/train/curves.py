"""A loss-and-metric curve PNG of a run, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path

PANEL_W, PANEL_H, MARGIN = 420, 220, 48
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def plot_curves(rows: list[dict], eval_rows: list[dict], path: Path) -> Path | None:
    """Draw panels against step: D and G losses, images/s and data wait, and each evaluation metric;
    write them to `path` as one PNG. Returns None (writes nothing) before the first row."""
    panels = [("loss", rows, ["loss_d", "loss_g"]), ("images/s", rows, ["images_per_s"]),
              ("data wait (fraction of step time)", rows, ["data_wait"])]
    for key in ("classifier_fd", "class_accuracy", "classifier_score", "fid", "kid", "inception_score",
                "estimated_quality", "quality_spearman"):
        if any(key in row for row in eval_rows):
            panels.append((key, eval_rows, [key]))
    if not rows:
        return None
    columns = 2
    lines = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (columns * PANEL_W, lines * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, (title, data, keys) in enumerate(panels):
        left, top = (index % columns) * PANEL_W, (index // columns) * PANEL_H
        _panel(draw, font, (left, top), title, data, keys)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _panel(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, origin: tuple[int, int], title: str,
           rows: list[dict], keys: list[str]) -> None:
    left, top = origin
    x0, y0, x1, y1 = left + MARGIN, top + 24, left + PANEL_W - 12, top + PANEL_H - 28
    series = {key: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))] for key in keys}
    points = [p for values in series.values() for p in values]
    draw.text((left + MARGIN, top + 6), title, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="#888888")
    if not points:
        return
    lo_x, hi_x = min(p[0] for p in points), max(p[0] for p in points)
    lo_y, hi_y = min(p[1] for p in points), max(p[1] for p in points)
    hi_x, hi_y = (hi_x if hi_x > lo_x else lo_x + 1), (hi_y if hi_y > lo_y else lo_y + 1e-9 + abs(lo_y) * 0.01)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (x0 + (step - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - (value - lo_y) / (hi_y - lo_y) * (y1 - y0))

    for value in (lo_y, hi_y):
        draw.text((left + 2, xy(lo_x, value)[1] - 6), f"{value:.3g}", fill="#444444", font=font)
    draw.text((x0, y1 + 4), f"step {lo_x}", fill="#444444", font=font)
    draw.text((x1 - 70, y1 + 4), f"step {hi_x}", fill="#444444", font=font)
    for number, (key, values) in enumerate(series.items()):
        colour = COLOURS[number % len(COLOURS)]
        if len(values) > 1:
            draw.line([xy(*p) for p in values], fill=colour, width=2)
        elif values:
            x, y = xy(*values[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if len(keys) > 1:
            draw.text((x1 - 90, y0 + 4 + 12 * number), key, fill=colour, font=font)
