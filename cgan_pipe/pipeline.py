"""`cgan-pipe run`: prepare -> train -> export in order, each skipped when up to date; writes summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .atomic import write_text_atomic
from .config import PipelineConfig, parse_byte_size, to_dict
from .data.shards import PrepareSettings, prepare
from .export import ExportSettings, export
from .devices import resolve_device
from .distributed import require_one_process
from .train.loop import read_metrics, train

SUMMARY_NAME = "summary.json"


def prepare_settings(cfg: PipelineConfig) -> PrepareSettings:
    """The prepare stage's settings, taken from the pipeline config."""
    d = cfg.data
    return PrepareSettings(resolution=d.resolution, format=d.format, quality=d.quality,
                           shard_size=d.shard_size, limit=d.limit, seed=cfg.seed, split=d.split,
                           max_pixels=d.max_pixels, resize=d.resize, jpeg_subsampling=d.jpeg_subsampling,
                           png_compress_level=d.png_compress_level, webp_lossless=d.webp_lossless,
                           qualities=tuple(d.qualities) if d.qualities else None, quality_mode=d.quality_mode,
                           reencode=d.reencode,
                           shard_bytes=parse_byte_size(d.shard_bytes) if d.shard_bytes is not None else None)


def export_settings(cfg: PipelineConfig) -> ExportSettings:
    """The export stage's settings, taken from the pipeline config."""
    e = cfg.export
    return ExportSettings(n=e.n, format=e.format, quality=e.quality,
                          classes=tuple(e.classes) if e.classes is not None else None,
                          seed=e.seed, batch_size=e.batch_size, shard_size=e.shard_size, ema=e.ema)


def write_resolved_config(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Record the fully resolved config in the run directory as config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def run_pipeline(cfg: PipelineConfig, *, progress: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run every stage of `cfg` under its run directory and return (and write) the summary."""
    require_one_process("run")
    run_dir = cfg.run_path
    write_resolved_config(cfg, run_dir)
    shards_dir = run_dir / "shards"
    stages: dict[str, dict[str, Any]] = {}

    t0 = time.perf_counter()
    manifest, up_to_date = prepare(cfg.data.source, shards_dir, prepare_settings(cfg), workers=cfg.data.workers,
                                   download_dir=cfg.data.download_dir, progress=progress)
    stages["prepare"] = {"status": "up to date" if up_to_date else "ran", "seconds": _since(t0)}
    echo(f"prepare: {manifest.num_samples} samples in {len(manifest.shards)} shards at {shards_dir}"
         f" ({len(manifest.skipped)} skipped){' [up to date]' if up_to_date else ''}")

    t0 = time.perf_counter()
    result = train(cfg, shards_dir, run_dir, progress=progress)
    ran = result.images_per_s is not None
    stages["train"] = {"status": "ran" if ran else "up to date", "seconds": _since(t0),
                       "resumed_from": result.resumed_from}
    echo(f"train: step {result.steps}, checkpoint {result.checkpoint}{'' if ran else ' [up to date]'}")

    t0 = time.perf_counter()
    exported = export(result.checkpoint, run_dir / "export", export_settings(cfg),
                      device=resolve_device(cfg.train.device, "train.device"), progress=progress)
    stages["export"] = {"status": "up to date" if exported.up_to_date else "ran", "seconds": _since(t0)}
    echo(f"export: {exported.n} {cfg.export.format} images in {exported.out_dir}"
         f"{' [up to date]' if exported.up_to_date else ''}")

    rows = read_metrics(result.metrics)
    grids = sorted(result.samples.glob("step-*.png"))
    summary = {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.yaml"),
        "shards": str(shards_dir),
        "num_samples": manifest.num_samples,
        "skipped": len(manifest.skipped),
        "classes": manifest.class_names,
        "checkpoint": str(result.checkpoint),
        "steps": result.steps,
        "images_per_s": _mean(r["images_per_s"] for r in rows),
        "data_wait": _mean(r["data_wait"] for r in rows),
        "loss_d": rows[-1]["loss_d"] if rows else None,
        "loss_g": rows[-1]["loss_g"] if rows else None,
        "metrics": str(result.metrics),
        "samples": str(result.samples),
        "sample_grid": str(grids[-1]) if grids else None,
        "export_dir": str(exported.out_dir),
        "export_shards": str(exported.shards),
        "export_images": exported.n,
        "export_format": cfg.export.format,
        "export_quality": cfg.export.quality,
        "stages": stages,
    }
    write_text_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def _mean(values: Any) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
