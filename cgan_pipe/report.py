"""The run report: one self-contained HTML page (images embedded) from what a run left in its folder."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .data.verify import inspect_shards
from .errors import DataError

REPORT_NAME = "report.html"
GRIDS_SHOWN = 6  # sample grids over time, evenly spaced from first to last
_STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}table{border-collapse:collapse}
td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}figure{display:inline-block;margin:.4em}
figcaption{font-size:13px;color:#555}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:13px}"""


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` from the run's summary.json, config, shards, metrics, sample grids,
    curves and export; returns its path. Every image is embedded, so the file opens anywhere
    without a server; links to the exported files are relative to the run folder."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        raise DataError(f"{run_dir}: no summary.json; run the pipeline first (`cgan-pipe run PIPELINE.yaml`)"
                        ) from None
    parts = [f"<h1>{_e(summary['name'])}</h1>",
             f"<p>Run folder <code>{_e(run_dir)}</code>: {summary['steps']} training steps.</p>",
             "<h2>Results</h2>", _table(_headline(summary))]
    curves = run_dir / "curves.png"
    if curves.is_file():
        parts += ["<h2>Curves</h2>", _figure(curves, "losses, images/s, data wait and metrics against step")]
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    if grids:
        count = min(GRIDS_SHOWN, len(grids))
        shown = [grids[round(i * (len(grids) - 1) / max(count - 1, 1))] for i in range(count)]
        parts += ["<h2>Samples over training</h2>",
                  "<p>EMA generator, the same latents at every step; one row per class (20 classes spread "
                  "over the labels when there are more), a requested JPEG quality per column for a "
                  "quality-conditioned model.</p>"]
        parts += [_figure(grid, f"step {int(grid.stem.split('-')[1])}") for grid in dict.fromkeys(shown)]
    export = Path(summary["export_dir"]) if summary.get("export_dir") else None
    if export is not None and export.is_dir():
        parts += ["<h2>Exported images</h2>", _table(_export_rows(summary, export, run_dir))]
        if (export / "contact-sheet.png").is_file():
            parts.append(_figure(export / "contact-sheet.png", "the first exported images"))
    shards = Path(summary["shards"])
    if (shards / "manifest.json").is_file():
        data = inspect_shards(shards)
        parts += ["<h2>Data</h2>", _table({k: v for k, v in data.items() if k not in ("class_histogram", "path")})]
    config = Path(summary["config"])
    if config.is_file():
        parts += ["<h2>Configuration</h2>", f"<pre>{_e(config.read_text())}</pre>"]
    page = (f"<!doctype html><html lang=en><meta charset=utf-8><title>{_e(summary['name'])}: cgan-pipe report"
            f"</title><style>{_STYLE}</style><body>{''.join(parts)}</body></html>\n")
    path = run_dir / REPORT_NAME
    write_text_atomic(path, page)
    return path


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    rows = {"training images/s": summary.get("images_per_s"), "data wait": summary.get("data_wait"),
            "final D loss": summary.get("loss_d"), "final G loss": summary.get("loss_g"),
            "checkpoint": summary.get("checkpoint")}
    rows.update({f"eval: {k}": v for k, v in (summary.get("eval") or {}).items() if not isinstance(v, dict)})
    stages = summary.get("stages", {})
    rows.update({f"stage {name}": f"{stage['status']} ({stage['seconds']:.0f} s)" for name, stage in stages.items()})
    return rows


def _export_rows(summary: dict[str, Any], export: Path, run_dir: Path) -> dict[str, Any]:
    rows = {"images": summary.get("export_images"), "format": summary.get("export_format"),
            "quality": summary.get("export_quality")}
    for key in ("export_files", "export_shards"):
        if summary.get(key):
            target = Path(summary[key])
            shown = target.relative_to(run_dir) if target.is_relative_to(run_dir) else target
            rows[key.split("_")[1]] = _Html(f'<a href="{_e(shown)}/">{_e(shown)}/</a>')
    return rows


def _table(rows: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, _Html):
            return value
        if isinstance(value, float):
            return f"{value:.4g}"
        return _e(", ".join(map(str, value)) if isinstance(value, list) else value)

    body = "".join(f"<tr><th>{_e(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows.items() if v is not None)
    return f"<table>{body}</table>"


class _Html(str):
    """Markup built here from escaped parts, to be inserted as is."""


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _e(value: Any) -> str:
    return html.escape(str(value))
