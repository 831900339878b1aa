"""`cgan-pipe run`: prepare -> train -> eval -> export in order, each skipped when up to date; writes summary.json."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .atomic import write_text_atomic
from .config import PipelineConfig, to_dict
from .data.digest import file_sha256
from .data.fingerprint import shard_set_fingerprint
from .data.inputs import count_by_kind, counts_text
from .data.batch import dataset_info
from .data.manifest import read_manifest
from .data.shards import prepare, prepare_status
from .errors import ConfigError, DataError
from .export import export, export_status
from .lock import folder_lock
from .report import REPORT_NAME, write_report
from .metrics.evaluate import check_eval_settings, evaluate_checkpoint
from .devices import resolve_device
from .distributed import rank_and_world, ranks, training_backend, wait_for_all_ranks
from .train.loop import read_metrics, train, train_status, trained_so_far

log = logging.getLogger(__name__)
EVAL_NAME = "eval.json"
STAGES = ("prepare", "train", "eval", "export")

SUMMARY_NAME = "summary.json"


def write_resolved_config(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Record the fully resolved config in the run directory as config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def select_stages(only: tuple[str, ...] = (), start: str | None = None) -> tuple[str, ...]:
    """The stages to run, in order: all of them, `only` those named, or those from `start` on."""
    for name in (*only, *([start] if start else [])):
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
    if only and start:
        raise ConfigError("give --only or --from, not both")
    if only:
        return tuple(stage for stage in STAGES if stage in only)
    return STAGES[STAGES.index(start):] if start else STAGES


def plan_pipeline(cfg: PipelineConfig, selected: tuple[str, ...] = STAGES) -> list[tuple[str, str, str]]:
    """What `run_pipeline` would do, stage by stage, without doing it: (stage, action, why), the action
    being 'run', 'resume', 'up to date' or 'not selected'."""
    run_dir = cfg.run_path
    rows = [("prepare", *prepare_status(cfg.data, run_dir / "shards", cfg.seed))]
    if "prepare" in selected and rows[0][1] != "up to date":  # the shards to train on are not made yet
        rows += [("train", "run", "after prepare"), *_plan_after_a_new_checkpoint(cfg, "after prepare")]
    else:
        rows.append(("train", *train_status(cfg, run_dir, run_dir / "shards")))
        rows += (_plan_after_training(cfg, run_dir) if rows[1][1] == "up to date"
                 else _plan_after_a_new_checkpoint(cfg, "after training"))
    return [(stage, action if stage in selected else "not selected", why) for stage, action, why in rows]


def _plan_after_a_new_checkpoint(cfg: PipelineConfig, why: str) -> list[tuple[str, str, str]]:
    """The eval and export rows of the plan when training will write a new checkpoint."""
    return [("eval", "run", why) if cfg.eval.metrics else ("eval", "up to date", "no eval.metrics"),
            ("export", "run", why)]


def _plan_after_training(cfg: PipelineConfig, run_dir: Path) -> list[tuple[str, str, str]]:
    """The eval and export rows of the plan when training is complete."""
    checkpoint = trained_so_far(run_dir).checkpoint
    if not cfg.eval.metrics:
        rows = [("eval", "up to date", "no eval.metrics")]
    elif _stored_scores(cfg, checkpoint, run_dir / "shards", run_dir / EVAL_NAME) is not None:
        rows = [("eval", "up to date", f"{run_dir / EVAL_NAME} scored {checkpoint.name} (same sha256) on these "
                                       f"shards with these settings")]
    else:
        rows = [("eval", "run", f"{checkpoint.name} is not scored on these shards with these settings yet")]
    return rows + [("export", *export_status(checkpoint, run_dir / "export", cfg.export))]


def run_pipeline(cfg: PipelineConfig, *, progress: bool, echo: Callable[[str], None],
                 stages: tuple[str, ...] = STAGES) -> dict[str, Any] | None:
    """Run the `stages` of `cfg` (all by default) under its run directory and return (and write) the
    summary and report. A stage left out reads what an earlier run of it left (DataError if nothing);
    prepare alone returns only {"stages": ...} and writes neither.

    Under torchrun, rank 0 prepares the shards while the others wait, every rank trains on its
    part of them, and rank 0 alone evaluates, exports and writes the summary (the others return None).
    """
    with ranks(training_backend(cfg.train.device)) as (rank, _), \
            folder_lock(cfg.run_path) if rank == 0 else contextlib.nullcontext():
        return _run_stages(cfg, stages, progress=progress, echo=echo)


def _run_stages(cfg: PipelineConfig, selected: tuple[str, ...], *, progress: bool,
                echo: Callable[[str], None]) -> dict[str, Any] | None:
    rank, world = rank_and_world()
    run_dir = cfg.run_path
    shards_dir = run_dir / "shards"
    stages: dict[str, dict[str, Any]] = {}

    def skipped(stage: str) -> None:
        stages[stage] = {"status": "not selected", "seconds": 0.0}

    t0 = time.perf_counter()
    if rank == 0:
        write_resolved_config(cfg, run_dir)
    if rank == 0 and log.isEnabledFor(logging.INFO):  # -v: what each stage is about to do, and why
        try:
            for stage, action, why in plan_pipeline(cfg, selected):
                log.info(f"plan: {stage} {action}: {why}")
        except DataError as exc:
            log.info(f"plan: unknown until the stages run ({exc})")
    if rank == 0 and "prepare" in selected:
        manifest, up_to_date = prepare(cfg.data, shards_dir, seed=cfg.seed, progress=progress)
        stages["prepare"] = {"status": "up to date" if up_to_date else "ran", "seconds": _since(t0)}
        kinds = counts_text(count_by_kind(manifest.skipped))
        kinds = f", {kinds}" if kinds else ""
        echo(f"prepare: {manifest.num_samples} samples in {len(manifest.shards)} shards at {shards_dir}"
             f" ({len(manifest.skipped)} inputs skipped{kinds}){' [up to date]' if up_to_date else ''}")
    if world > 1:
        wait_for_all_ranks()
        if rank != 0:
            progress = False
    if "prepare" not in selected or rank != 0:
        manifest = read_manifest(shards_dir)
        skipped("prepare")

    if selected == ("prepare",):  # nothing downstream to read, report or summarise
        return {"stages": stages} if rank == 0 else None
    check_eval_settings(cfg.eval, dataset_info(manifest))  # before hours of training, not after
    t0 = time.perf_counter()
    if "train" in selected:
        result = train(cfg, shards_dir, run_dir, progress=progress)
        ran = result.images_per_s is not None
        stages["train"] = {"status": "ran" if ran else "up to date", "seconds": _since(t0),
                           "resumed_from": result.resumed_from}
    else:
        result, ran = trained_so_far(run_dir), False
        skipped("train")
    if rank != 0:
        return None
    note = "" if ran else " [up to date]" if "train" in selected else " [not selected]"
    echo(f"train: step {result.steps}, checkpoint {result.checkpoint}{note}")

    t0 = time.perf_counter()
    if "eval" in selected:
        scores, fresh = _evaluate(cfg, result.checkpoint, shards_dir, run_dir / EVAL_NAME, progress)
        stages["eval"] = {"status": "ran" if fresh else "up to date", "seconds": _since(t0)}
    else:
        scores, fresh = _stored_scores(cfg, result.checkpoint, shards_dir, run_dir / EVAL_NAME) or {}, False
        skipped("eval")
    if scores:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k in _HEADLINE)
        echo(f"eval: {shown}{'' if fresh else ' [up to date]'}")

    t0 = time.perf_counter()
    exported = None
    if "export" in selected:
        exported = export(result.checkpoint, run_dir / "export", cfg.export, overwrite=True,  # its own
                          device=resolve_device(cfg.train.device, "train.device"), progress=progress)
        stages["export"] = {"status": "up to date" if exported.up_to_date else "ran", "seconds": _since(t0)}
        echo(f"export: {exported.n} {cfg.export.format} images in {exported.out_dir}"
             f"{' [up to date]' if exported.up_to_date else ''}")
    else:
        skipped("export")

    rows = read_metrics(result.metrics)
    grids = sorted(result.samples.glob("step-*.png"))
    summary = {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.yaml"),
        "shards": str(shards_dir),
        "source_sha256": manifest.settings.get("source_sha256"),
        "shards_sha256": shard_set_fingerprint(manifest),
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
        "eval": scores,
        "samples": str(result.samples),
        "sample_grid": str(grids[-1]) if grids else None,
        "export_dir": str(exported.out_dir) if exported else None,
        "export_files": str(exported.files) if exported and exported.files else None,
        "export_shards": str(exported.shards) if exported and exported.shards else None,
        "export_images": exported.n if exported else None,
        "export_format": cfg.export.format,
        "export_quality": cfg.export.quality,
        "stages": stages,
        "report": str(run_dir / REPORT_NAME),
    }
    log.info("seconds per stage: " + ", ".join(f"{stage} {v['seconds']:.1f} ({v['status']})"
                                                for stage, v in stages.items()))
    write_text_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    write_report(run_dir)
    echo(f"report: {run_dir / REPORT_NAME}")
    return summary


_HEADLINE = ("classifier_fd", "class_accuracy", "classifier_score", "fid", "kid", "inception_score",
             "estimated_quality", "quality_spearman", "quality_mae")


def _evaluate(cfg: PipelineConfig, checkpoint: Path, shards: Path, record: Path,
              progress: bool) -> tuple[dict[str, Any], bool]:
    """The eval stage: metrics of the final checkpoint, reused from `record` when it scored the same
    checkpoint with the same settings. Returns (scores, whether they were computed now)."""
    if not cfg.eval.metrics:
        return {}, False
    stored = _stored_scores(cfg, checkpoint, shards, record)
    if stored is not None:
        return stored, False
    scores = evaluate_checkpoint(checkpoint, shards, cfg.eval, cfg.loader,
                                 resolve_device(cfg.train.device, "train.device"), progress=progress)
    write_text_atomic(record, json.dumps({**_scored_inputs(cfg, checkpoint, shards), "scores": scores},
                                         indent=2) + "\n")
    return scores, True


def _scored_inputs(cfg: PipelineConfig, checkpoint: Path, shards: Path) -> dict[str, Any]:
    """What eval scores depend on: the checkpoint (path and sha256), the reference shards (content
    hash) and the eval settings."""
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
            "shards_sha256": shard_set_fingerprint(read_manifest(shards)), "settings": to_dict(cfg.eval)}


def _stored_scores(cfg: PipelineConfig, checkpoint: Path, shards: Path, record: Path) -> dict[str, Any] | None:
    """The scores in `record` if it scored this very `checkpoint` on `shards` with the current eval
    settings, else None."""
    try:
        stored = json.loads(record.read_text())
        inputs = _scored_inputs(cfg, checkpoint, shards)
        if all(stored.get(key) == value for key, value in inputs.items()):
            return stored["scores"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # missing or unreadable: not scored
    return None


def _mean(values: Any) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
