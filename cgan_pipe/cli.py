"""The `cgan-pipe` command line: parse, call, report. No pipeline logic lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, get_origin, get_type_hints

import click
import yaml

from . import __version__
from .atomic import os_error_message
from .config import (METRICS, DataConfig, ExportConfig, LoaderConfig, ModelConfig, TrainConfig, load_pipeline,
                     to_dict)
from .errors import ConfigError, Interrupted, UserError
from .interrupts import terminations_interrupt
from .locations import join
from .params import ClassRequest, IntList, LocalPath, SeedRange, ShardLocation, WordList
from .schema import from_options, from_overrides, key_choices, key_default

if TYPE_CHECKING:
    from .data.manifest import Manifest

EXAMPLES = {
    "run": "cgan-pipe run pipelines/cifar.yaml --set train.steps=300 --from eval",
    "init": "cgan-pipe init ~/photos/pets --out pipelines/pets.yaml",
    "prepare": "cgan-pipe prepare ../shared/data/cifar10/train.tar shards/cifar-webp --format webp --quality 90",
    "train": "cgan-pipe train pipelines/cifar.yaml --set train.batch_size=128",
    "verify": "cgan-pipe verify runs/cifar/shards",
    "report": "cgan-pipe report runs/cifar",
    "inspect": "cgan-pipe inspect runs/cifar/shards --json",
    "bench prepare": "cgan-pipe bench prepare ../shared/data/cifar10/train.tar --dataset-tool dataset_tool.py",
    "bench loader": "cgan-pipe bench loader runs/cifar/shards --jpeg-distort 10,40 --json loader.json",
    "bench train": "cgan-pipe bench train runs/cifar/shards --arch resnet --batch-size 64,256 --json train.json",
    "bench export": "cgan-pipe bench export runs/cifar/checkpoints/ckpt-0005000.pt --n 10000 --json export.json",
    "generate": "cgan-pipe generate runs/cifar/checkpoints/ckpt-0005000.pt out/ --seeds 0-99 --classes cat=60,dog=40",
    "eval": "cgan-pipe eval runs/cifar/checkpoints/ckpt-0005000.pt --json",
}


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into a one-line message and exit code (2 usage/config, 1 runtime)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminations_interrupt():
                return command(*args, **kwargs)
        except UserError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            number = exc.signal_number if isinstance(exc, Interrupted) else signal.SIGINT
            kept = f": {exc.kept}" if isinstance(exc, Interrupted) and exc.kept else ""
            click.echo(f"interrupted by {signal.Signals(number).name}{kept}; rerun the same command to resume",
                       err=True)
            sys.exit(128 + number)
        except OSError as exc:  # met where no stage words it itself: a full disk, a read-only folder, ...
            click.secho(f"error: {os_error_message(exc)}", fg="red", err=True)
            sys.exit(1)

    return wrapper


class _StderrLog(logging.Handler):
    """cgan-pipe's log records as lines on stderr (whichever stream stderr is when they are written)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"[{record.name.removeprefix('cgan_pipe.')}] {record.getMessage()}", err=True)


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Record -q / -v; once both are known, set the level of cgan-pipe's log (and, at -vv, every library's)."""
    ctx.meta[f"cgan_pipe.{param.name}"] = value
    quiet, verbose = ctx.meta.get("cgan_pipe.quiet"), ctx.meta.get("cgan_pipe.verbose")
    if quiet is None or verbose is None:
        return
    if quiet and verbose:
        raise click.UsageError("give -q or -v, not both")
    handler = _StderrLog()
    ours = logging.getLogger("cgan_pipe")
    ours.handlers[:], ours.propagate = [handler], False
    ours.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    if verbose >= 2:
        logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)


def verbosity_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-q/--quiet and -v/--verbose for a command: read back with `_quiet()` and through the log level."""
    command = click.option("--verbose", "-v", count=True, expose_value=False, callback=_set_verbosity,
                           help="More detail on stderr: why each stage runs or is skipped, timings, caches, every "
                           "skipped input (-vv: debug, libraries included).")(command)
    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_verbosity,
                        help="Only results, warnings and errors: no progress bars or progress lines.")(command)


def _quiet() -> bool:
    return bool(click.get_current_context().meta.get("cgan_pipe.quiet"))


def _say(line: str) -> None:
    """A progress line (a stage's outcome): on stdout, unless -q."""
    if not _quiet():
        click.echo(line)


def _progress() -> bool:
    """Whether to draw progress bars: not with -q, and only on a terminal."""
    return not _quiet() and sys.stderr.isatty()


set_option = click.option(
    "--set", "-s", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config key, e.g. --set train.steps=300 (repeatable).",
)
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the resolved config and stop.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cgan-pipe")
def main() -> None:
    """Train conditional GANs on archives of compressed images.

    Raw images -> webdataset shards -> DALI loader -> GAN -> JPEG/PNG/WebP.
    Exit codes: 0 success, 1 runtime failure, 2 usage or config error, 130 interrupted (SIGINT), 143
    terminated (SIGTERM; training first writes a checkpoint of the step under way).
    Every command takes -q (results only) and -v (more detail on stderr; -vv: debug).
    """
    for stream in (sys.stdout, sys.stderr):  # names that were not UTF-8 on disk print as escapes (\udce9)
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@main.command(epilog=f"Example: {EXAMPLES['init']}")
@click.argument("source", type=LocalPath())
@click.option("--out", type=LocalPath(dir_okay=False), default=None,
              help="Pipeline file to write [default: <source name>.yaml here].")
@click.option("--name", default=None, help="Pipeline name (and runs/<name>) [default: from the source].")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@verbosity_options
@_reports_errors
def init(source: str, out: str | None, name: str | None, force: bool) -> None:
    """Write a starter pipeline for SOURCE (an image folder, a tar of one, a list file or the CIFAR-10
    archive): lists it, opens a sample of its images, and sets the resolution, format, network family,
    widths, batch size and time budget for this data and this machine (its GPU or CPU, and their
    memory). Every key is written with its meaning as a comment; edit, then `cgan-pipe run` the file."""
    from .starter import pipeline_name, this_machine, write_starter

    name = name or pipeline_name(source)
    path = Path(out) if out else Path(f"{name}.yaml")
    survey, values = write_starter(source, path, name, machine=this_machine(), force=force)
    classes = len(survey.class_counts)
    click.echo(f"{survey.images} images, {classes or 'no'} classes; resolution {values['data.resolution']}, "
               f"{values['model.arch']} of width {values['model.g_width']}, batch {values['train.batch_size']}, "
               f"{values['train.max_minutes']} minutes")
    click.echo(f"wrote {path}; next: cgan-pipe run {path}")


@main.command(epilog=f"Example: {EXAMPLES['run']}")
@click.argument("pipeline", type=LocalPath(dir_okay=False))
@set_option
@click.option("--only", "only", default=None, metavar="STAGE[,STAGE..]",
              help="Run only these stages (prepare, train, eval, export); the others' earlier outputs are used.")
@click.option("--from", "start", default=None, metavar="STAGE", help="Run this stage and the ones after it.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the plan (what would run, what is up "
              "to date and why), and stop.")
@verbosity_options
@_reports_errors
def run(pipeline: str, overrides: tuple[str, ...], only: str | None, start: str | None, dry_run: bool) -> None:
    """Run a whole PIPELINE (YAML): prepare shards, train, evaluate, export images.

    Everything goes under the pipeline's run_dir (default runs/<name>/); a stage
    whose outputs are complete for the same settings is skipped, and training
    resumes from its last checkpoint. Writes run_dir/summary.json and
    run_dir/report.html. Under torchrun, rank 0 prepares, evaluates and exports;
    every rank trains.
    """
    from .pipeline import plan_pipeline, run_pipeline, select_stages

    cfg = load_pipeline(pipeline, list(overrides))
    stages = select_stages(tuple(s.strip() for s in only.split(",") if s.strip()) if only else (), start)
    if dry_run:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        click.echo("\nplan:")
        for stage, action, why in plan_pipeline(cfg, stages):
            click.echo(f"  {stage:8s} {action:12s} {why}")
        return
    summary = run_pipeline(cfg, progress=_progress(), echo=_say, stages=stages)
    if summary is None or "name" not in summary:  # another torchrun rank (rank 0 reports), or prepare alone
        return
    click.echo(f"done: {cfg.run_path / 'summary.json'} ({summary['images_per_s']} img/s training)")


def _keyed(cls: type, key: str, *decls: str, **kwargs: Any) -> Callable[..., Any]:
    """An option for key `key` of config section `cls`: its default, and its choices for a fixed set of
    strings, are the key's own, so the option and the YAML key cannot disagree."""
    if "type" not in kwargs and not kwargs.get("is_flag") and get_origin(get_type_hints(cls)[key]) is Literal:
        kwargs["type"] = click.Choice(key_choices(cls, key))
    return click.option(*decls, key, default=key_default(cls, key), show_default=not kwargs.get("is_flag"), **kwargs)


def _section(cls: type, values: dict[str, Any], given_as: dict[str, str] | None = None) -> Any:
    """Config section `cls` from the current command's options (`values`, by key), validated as its YAML
    keys are; errors name the option (`given_as` for keys not named after their option)."""
    options = {p.name: p.opts[0] if p.opts else p.name.upper() for p in click.get_current_context().command.params}
    names = {**options, **(given_as or {})}
    return from_options(cls, {key: (names.get(key, key), value) for key, value in values.items()})


@main.command(epilog=f"Example: {EXAMPLES['prepare']}")
@click.argument("source")
@click.argument("out", type=ShardLocation(write=True))
@_keyed(DataConfig, "format", "--format", help="Image format in the shards (JPEGs already at the resolution are "
        "copied untouched); 'keep' copies any RGB JPEG/PNG/WebP at the resolution, else writes PNG.")
@click.option("--quality", "qualities", type=IntList(1, 100), default=str(key_default(DataConfig, "quality")),
              show_default=True, metavar="Q[,Q..]",
              help="JPEG/WebP quality for re-encoded images; several (10,30,50) write each image once "
              "per quality (or once, at a random one, with --quality-mode random).")
@_keyed(DataConfig, "quality_mode", "--quality-mode",
        help="With several qualities: one sample per quality, or one random quality per image.")
@_keyed(DataConfig, "resolution", "--resolution", type=int, help="Square side in pixels (a power of two).")
@_keyed(DataConfig, "shard_size", "--shard-size", type=int, help="Samples per shard.")
@_keyed(DataConfig, "shard_bytes", "--shard-bytes", metavar="SIZE",
        help="Aim shards at about SIZE instead (e.g. 256MB, 1GiB), from the mean size of 256 encoded images.")
@_keyed(DataConfig, "reencode", "--reencode", is_flag=True,
        help="Re-encode JPEGs that could be copied byte for byte, at --format/--quality.")
@_keyed(DataConfig, "limit", "--limit", type=int, help="Use at most N images (seeded subset).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Shuffle seed.")
@_keyed(DataConfig, "resize", "--resize", help="Images not at the resolution: centre crop, pad with black, or skip.")
@_keyed(DataConfig, "jpeg_subsampling", "--subsampling", help="Chroma subsampling of re-encoded JPEGs.")
@_keyed(DataConfig, "png_compress_level", "--png-level", type=int, help="PNG zlib level (0-9).")
@_keyed(DataConfig, "webp_lossless", "--lossless", is_flag=True, help="Lossless WebP.")
@_keyed(DataConfig, "max_pixels", "--max-pixels", type=int,
        help="Skip images with more pixels, unread (decompression-bomb limit).")
@click.option("--rank", type=click.IntRange(min=0), default=0, envvar=["RANK", "SLURM_PROCID"], show_default=True,
              help="This machine's rank when several write one shard set (default from RANK/SLURM_PROCID).")
@click.option("--world-size", type=click.IntRange(min=1), default=1, envvar=["WORLD_SIZE", "SLURM_NTASKS"],
              show_default=True, help="How many machines write the shard set (default from WORLD_SIZE/SLURM_NTASKS).")
@click.option("--merge", is_flag=True,
              help="Write the manifest of OUT once every rank has finished (SOURCE and other options unused).")
@_keyed(DataConfig, "workers", "--workers", type=int,
        help="Processes writing shards [default: one per core]; the shards do not depend on it.")
@_keyed(DataConfig, "upload_scratch", "--upload-scratch", metavar="SIZE",
        help="Into a bucket: local disk for shards waiting for their upload (e.g. 1GB).")
@_keyed(DataConfig, "split", "--split", help="Split of a CIFAR-10 python archive.")
@verbosity_options
@_reports_errors
def prepare(out: Path | str, qualities: list[int], seed: int, rank: int, world_size: int, merge: bool,
            **data_keys: Any) -> None:
    """Turn raw images at SOURCE into webdataset shards in OUT.

    SOURCE is an image-folder tree (class = folder name), a tar/tar.gz of one, a
    list file of paths (.txt), an existing shard set (re-shard / re-encode), the
    CIFAR-10 python archive, or 'download:cifar10'. Every image Pillow decodes is
    taken, whatever its name; every other file is skipped, and each skipped file
    is in the manifest with its reason (counted per reason here; -v lists them).
    OUT receives shard-NNNNNN.tar, a DALI index (.idx) per shard and
    manifest.json. A killed run rerun with the same arguments keeps the shards it
    finished; a finished one does nothing.
    """
    from .data.shards import merge_shards, prepare as prepare_shards
    from .distributed import ranks, wait_for_all_ranks

    if merge:
        manifest = merge_shards(out)
        click.echo(f"merged {len(manifest.shards)} shards, {manifest.num_samples} samples -> "
                   f"{join(out, 'manifest.json')}")
        return
    data = _section(DataConfig, {**data_keys, "quality": qualities[0],
                                 "qualities": qualities if len(qualities) > 1 else None},
                    {"quality": "--quality", "qualities": "--quality"})
    with ranks() as (_, group):  # under torchrun every rank writes its shards, then rank 0 writes the manifest
        manifest, up_to_date = prepare_shards(data, out, seed=seed, rank=rank, world_size=world_size,
                                              progress=_progress() and rank == 0)
        if group > 1 and not up_to_date:  # every rank read the same manifest before any wrote, so all agree
            wait_for_all_ranks()
            manifest = merge_shards(out) if rank == 0 else None
            wait_for_all_ranks()
    if group > 1 and rank != 0:
        return
    if manifest is None:
        click.echo(f"rank {rank} of {world_size}: its shards are written in {out}; when every rank is done, "
                   f"run `cgan-pipe prepare SOURCE {out} --merge`")
        return
    if up_to_date:
        click.echo(f"{out}: already complete for these settings; nothing to do")
    click.echo(f"{manifest.num_samples} samples in {len(manifest.shards)} shards, "
               f"{len(manifest.skipped)} skipped -> {join(out, 'manifest.json')}")
    _report_skipped(manifest)


def _report_skipped(manifest: Manifest) -> None:
    """Where the source's files went, the skipped ones counted per reason with an example each; -v lists
    every skipped file, as the manifest does."""
    from .data.inputs import count_by_kind, kind_of

    inputs = manifest.inputs
    if inputs:
        beyond = f", {inputs['beyond_limit']} beyond --limit" if inputs["beyond_limit"] else ""
        click.echo(f"{inputs['files']} files in the source: {inputs['kept']} kept, {inputs['skipped']} "
                   f"skipped{beyond}")
    first_of = {}
    for entry in manifest.skipped:
        first_of.setdefault(kind_of(entry), entry)
    for kind, count in count_by_kind(manifest.skipped).items():
        example = first_of[kind]
        detail = example["reason"].removeprefix(f"{kind}: ") if example["reason"] != kind else ""
        click.echo(f"  {count:>7}  {kind}, e.g. {example['source']}{f': {detail}' if detail else ''}")
    if logging.getLogger("cgan_pipe").isEnabledFor(logging.INFO):  # -v
        for entry in manifest.skipped:
            click.echo(f"  skipped {entry['source']}: {entry['reason']}", err=True)
    elif manifest.skipped:
        click.echo("  (-v lists every skipped file; each is in the manifest with its reason)", err=True)


@main.command(epilog=f"Example: {EXAMPLES['train']}")
@click.argument("pipeline", type=LocalPath(dir_okay=False))
@set_option
@dry_run_option
@verbosity_options
@_reports_errors
def train(pipeline: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Train the GAN of PIPELINE on the shards in its run_dir/shards (or loader.shards).

    Resumes from the newest checkpoint in run_dir/checkpoints. Make the shards
    first with `cgan-pipe run` or `cgan-pipe prepare SOURCE RUN_DIR/shards`.
    Under `torchrun --nproc-per-node N -m cgan_pipe train ...` each rank trains on
    its part of the shards (gradients averaged; gloo on CPU, NCCL on GPUs) and
    rank 0 writes the files.
    """
    from .distributed import ranks, training_backend
    from .lock import folder_lock
    from .pipeline import write_resolved_config
    from .train.loop import train as train_gan

    cfg = load_pipeline(pipeline, list(overrides))
    if dry_run:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    shards = cfg.loader.shards or cfg.run_path / "shards"
    with ranks(training_backend(cfg.train.device)) as (rank, _):  # under torchrun each trains on its part
        with folder_lock(cfg.run_path) if rank == 0 else contextlib.nullcontext():  # before its first write
            if rank == 0:
                write_resolved_config(cfg, cfg.run_path)
            result = train_gan(cfg, shards, cfg.run_path, progress=_progress())
    if rank != 0:
        return
    speed = f", {result.images_per_s:.0f} img/s" if result.images_per_s else " (already complete)"
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from and result.images_per_s else ""
    click.echo(f"step {result.steps}{resumed}{speed}; checkpoint {result.checkpoint}")


@main.command(epilog=f"Example: {EXAMPLES['generate']}")
@click.argument("checkpoint", type=LocalPath(dir_okay=False))
@click.argument("out", type=ShardLocation(write=True))
@_keyed(ExportConfig, "n", "--n", type=int,
        help="Number of images [default: 1000, or the sum of the --classes counts, or the --seeds range].")
@click.option("--seeds", "seed_range", type=SeedRange(), default=None,
              help="Seeds A to B inclusive, one image each (the same seeds give the same images).")
@_keyed(ExportConfig, "seed", "--seed", type=int, help="First seed; image i uses seed+i.")
@_keyed(ExportConfig, "classes", "--classes", type=ClassRequest(), metavar="NAMES|NAME=COUNT,..",
        help="cat,dog: those classes, round robin; cat=100,dog=50: that many of each [default: all, balanced].")
@_keyed(ExportConfig, "format", "--format", help="Output format.")
@_keyed(ExportConfig, "quality", "--quality", type=int, help="JPEG/WebP quality (1-100).")
@_keyed(ExportConfig, "jpeg_subsampling", "--subsampling", help="JPEG chroma subsampling.")
@_keyed(ExportConfig, "png_compress_level", "--png-level", type=int, help="PNG zlib compress level (0-9).")
@_keyed(ExportConfig, "webp_lossless", "--lossless", is_flag=True, help="Lossless WebP (--quality is then ignored).")
@_keyed(ExportConfig, "output", "--output",
        help="A folder per class, webdataset shards (+ manifest, DALI index), or both.")
@_keyed(ExportConfig, "quality_cond", "--quality-cond", type=int, metavar="Q",
        help="For a model trained with compression.mode: condition, the JPEG quality (1-100) the images "
        "should look like; 100 asks for clean images (default: the highest quality it was trained on).")
@_keyed(ExportConfig, "truncation", "--truncation", type=float, metavar="T",
        help="Redraw latent components beyond +-T (>= 0.05): more typical, less varied images.")
@_keyed(ExportConfig, "batch_size", "--batch-size", type=int, help="Images per generator call.")
@_keyed(ExportConfig, "shard_size", "--shard-size", type=int,
        help="Images per output shard, and per unit of work a rerun resumes from.")
@click.option("--raw", is_flag=True, help="Use the raw generator instead of its EMA.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the generator runs (and the JPEG 4:4:4 encoder: nvJPEG on cuda).")
@click.option("--overwrite", is_flag=True, help="Replace the export in OUT when it was made with other settings "
              "(files cgan-pipe did not write are never replaced).")
@verbosity_options
@_reports_errors
def generate(checkpoint: str, out: Path | str, seed_range: tuple[int, int] | None, raw: bool, device: str,
             overwrite: bool, **export_keys: Any) -> None:
    """Generate images from CHECKPOINT into OUT as files and/or webdataset shards.

    Files are OUT/files/<class>/seed<seed>-c<class id>-q<quality>[-qc<quality cond>].<ext>;
    OUT/shards holds the same images with .cls and .json (seed, class, quality,
    checkpoint hash) plus a manifest and DALI index, readable by the loader; both
    are valid prepare sources. OUT/contact-sheet.png shows the first 64. A killed run, rerun, keeps
    its finished shards. Under `torchrun --nproc-per-node N -m cgan_pipe generate ...`
    the ranks share the seeds and rank 0 writes the manifest. A model trained with
    compression.mode: condition is asked for a look, e.g. q10 artefacts:
    `cgan-pipe generate runs/cifar-quality/checkpoints/ckpt-0003000.pt out/ --n 100 --quality-cond 10`.
    """
    from .devices import resolve_device
    from .distributed import rank_device, ranks
    from .export import export

    if seed_range is not None:
        first, count = seed_range
        if export_keys["n"] is not None and export_keys["n"] != count:
            raise ConfigError(f"--n {export_keys['n']} and --seeds {first}-{first + count - 1} ({count} seeds) "
                              f"disagree; give one of them")
        export_keys.update(seed=first, n=count)
    settings = _section(ExportConfig, {**export_keys, "ema": not raw}, {"ema": "--raw"})
    target = rank_device(resolve_device(device, "--device"))
    with ranks() as (rank, world):  # under torchrun the ranks share the parts and rank 0 finishes the folder
        result = export(Path(checkpoint), out, settings, device=target, overwrite=overwrite,
                        progress=_progress() and rank == 0, rank=rank, world_size=world)
    if rank != 0:
        return
    if result.up_to_date:
        click.echo(f"{out}: already complete for these settings; nothing to do")
    else:
        speed = f" ({result.images_per_s:.0f} img/s)" if result.images_per_s else ""
        click.echo(f"{result.n} images{speed} -> {result.out_dir}")
    click.echo(json.dumps({"export_dir": str(result.out_dir),
                           "export_files": str(result.files) if result.files else None,
                           "export_shards": str(result.shards) if result.shards else None}))


@main.command("eval", epilog=f"Example: {EXAMPLES['eval']}")
@click.argument("checkpoint", type=LocalPath(dir_okay=False))
@click.option("--shards", type=ShardLocation(), default=None, help="Real shard set to compare with, a folder or "
              "URL (default: the run's shards beside the checkpoint, else the checkpoint config's loader.shards).")
@click.option("--metrics", "metric_names", type=WordList(METRICS), default=None, metavar="M[,M..]",
              help="classifier, fid, kid, is, quality (default: the checkpoint config's eval.metrics).")
@click.option("--n", "n_samples", type=click.IntRange(min=2), default=None, help="Generated images to score.")
@click.option("--inception-weights", default=None, type=LocalPath(dir_okay=False),
              help="Local pt_inception-2015-12-05-6726825d.pth for fid/kid/is.")
@click.option("--cache-dir", default=None, type=LocalPath(file_okay=False),
              help="Where the classifier and reference features are cached.")
@click.option("--classifier-steps", type=click.IntRange(min=1), default=None,
              help="Training batches of the feature classifier (default: eval.classifier_steps).")
@click.option("--raw", is_flag=True, help="Score the raw generator instead of its EMA.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@verbosity_options
@_reports_errors
def evaluate(checkpoint: str, shards: str | None, metric_names: tuple[str, ...] | None, n_samples: int | None,
             inception_weights: str | None, cache_dir: str | None, classifier_steps: int | None, raw: bool,
             device: str, as_json: bool) -> None:
    """Score the generator in CHECKPOINT against real shards.

    classifier: Frechet distance in the features of a small classifier trained on
    the real shards (once, then cached), its Inception-style score, and the class
    accuracy of conditional samples. fid/kid/is: the standard FID Inception-v3.
    quality: the JPEG quality of the samples estimated from their pixels, their
    block-edge ratio (1.0: no JPEG block structure) and, for a quality-conditioned
    model, its agreement with the requested quality.
    """
    from .config import config_from_dict
    from .devices import resolve_device
    from .metrics.evaluate import evaluate_checkpoint
    from .train.checkpoint import load_checkpoint

    cfg = config_from_dict(load_checkpoint(Path(checkpoint))["config"], origin=f"{checkpoint} config")
    changes = {"n_samples": n_samples, "inception_weights": inception_weights, "cache_dir": cache_dir,
               "classifier_steps": classifier_steps,
               "metrics": list(metric_names) if metric_names else None}
    eval_cfg = config_from_dict({**to_dict(cfg), "eval": {**to_dict(cfg.eval), **{k: v for k, v in changes.items()
                                                                                 if v is not None}}},
                                origin="eval options").eval
    beside = Path(checkpoint).resolve().parent.parent / "shards"
    shards = shards or (str(beside) if (beside / "manifest.json").is_file() else cfg.loader.shards)
    if not shards:
        raise ConfigError(f"{checkpoint}: no shard set beside it; give the real shards with --shards")
    scores = evaluate_checkpoint(Path(checkpoint), shards, eval_cfg, cfg.loader, resolve_device(device, "--device"),
                                 ema=not raw, progress=_progress())
    if as_json:
        click.echo(json.dumps(scores, indent=2))
        return
    for key, value in scores.items():
        click.echo(f"{key:>18}  {json.dumps(value) if isinstance(value, dict) else value}")


@main.command(epilog=f"Example: {EXAMPLES['report']}")
@click.argument("run_dir", type=LocalPath(file_okay=False))
@verbosity_options
@_reports_errors
def report(run_dir: str) -> None:
    """Write RUN_DIR/report.html again from what the run left there: results, curves, sample grids
    over training, exported images, data summary and configuration, with every image embedded
    (`cgan-pipe run` writes it at the end of each run)."""
    from .report import write_report

    click.echo(f"wrote {write_report(Path(run_dir))}")


@main.command(epilog=f"Example: {EXAMPLES['verify']}")
@click.argument("shards", type=ShardLocation())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@verbosity_options
@_reports_errors
def verify(shards: Path | str, as_json: bool) -> None:
    """Check the shard set in SHARDS; exit 0 when sound, 1 when anything is wrong.

    Compares each shard's sha256, sample count and DALI index with the manifest,
    checks every sample's image, .cls and .json, and decodes every image with
    DALI's CPU decoder (the loader's) at the manifest's resolution. Every problem
    is listed by shard and sample key.
    """
    from dataclasses import asdict

    from .data.verify import verify_shards

    report = verify_shards(shards, progress=_progress())
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "shards": report.shards, "samples": report.samples,
                               "problems": [asdict(p) for p in report.problems]}, indent=2))
    else:
        for p in report.problems:
            click.echo(f"{p.shard}{':' + p.key if p.key else ''}: {p.problem}")
        verdict = "ok" if report.ok else f"FAILED, {len(report.problems)} problems"
        click.echo(f"{shards}: {report.samples} samples in {report.shards} shards: {verdict}")
    if not report.ok:
        sys.exit(1)


@main.command("inspect", epilog=f"Example: {EXAMPLES['inspect']}")
@click.argument("shards", type=ShardLocation())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--sheet", type=LocalPath(dir_okay=False), default=None,
              help="Where to write the contact sheet PNG [default: SHARDS/contact-sheet.png].")
@click.option("--per-class", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Samples per class on the contact sheet.")
@verbosity_options
@_reports_errors
def inspect_shard_set(shards: Path | str, as_json: bool, sheet: str | None, per_class: int) -> None:
    """Summarise the shard set in SHARDS and write a contact sheet (one row per class).

    Shows sample and shard counts, resolution, format, class and quality
    histograms and bytes per image, from the manifest and index files.
    """
    from .data.verify import contact_sheet, inspect_shards

    if sheet is None and isinstance(shards, str):
        raise ConfigError(f"{shards} is a URL: give --sheet PATH, a local file for the contact sheet")
    summary = inspect_shards(shards)
    summary["contact_sheet"] = str(contact_sheet(shards, Path(sheet or Path(shards) / "contact-sheet.png"),
                                                 per_class=per_class))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{key:>24}  {value}")


@main.group()
def bench() -> None:
    """Time cgan-pipe's stages beside the plain way of doing the same work."""


@bench.command("prepare", epilog=f"Example: {EXAMPLES['bench prepare']}")
@click.argument("source", type=LocalPath(exists=True, dir_okay=False))
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="JPEG quality of the re-encode runs.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="prepare's processes [default: one per core].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images only.")
@click.option("--dataset-tool", type=LocalPath(exists=True, dir_okay=False), default=None,
              help="Path of StyleGAN2-ADA's dataset_tool.py, to time it on the same images (extracted first).")
@click.option("--json", "json_path", type=LocalPath(dir_okay=False), default=None,
              help="Also write the records [{method, images, seconds, images_per_s}] to this file.")
@verbosity_options
@_reports_errors
def bench_prepare_command(source: str, quality: int, workers: int | None, limit: int | None,
                          dataset_tool: str | None, json_path: str | None) -> None:
    """Time prepare on the tar SOURCE: --format keep, and a re-encode to JPEG at --quality, beside a
    single-process Pillow loop doing the same re-encode (and StyleGAN2-ADA's dataset_tool when given).

    Prints one line per method and the ratios the project's targets are stated in.
    """
    from .atomic import write_text_atomic
    from .bench import bench_prepare

    records = bench_prepare(Path(source), quality=quality, workers=workers, limit=limit,
                            dataset_tool=Path(dataset_tool) if dataset_tool else None, echo=click.echo)
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")


@bench.command("loader", epilog=f"Example: {EXAMPLES['bench loader']}")
@click.argument("shards", type=ShardLocation(exists=True))
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=100, show_default=True,
              help="Batches timed per loader, after 10 of warm-up.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads (DALI) or processes (DataLoader) per loader [default: one per core].")
@click.option("--jpeg-distort", type=IntList(1, 100, length=2, ascending=True), default=None, metavar="LO,HI",
              help="Also time each loader with on-the-fly JPEG distortion at a quality drawn from LO..HI "
              "(loader.jpeg_distort), and print its cost.")
@click.option("--backends", type=WordList(("dali", "torch", "baseline")), default="dali,torch,baseline",
              show_default=True,
              help="Which loaders to time, comma-separated (the ratios need the baseline).")
@click.option("--bucket-reads", type=click.Choice(["shards", "samples"]), default=None,
              help="How DALI reads a shard set in a bucket (loader.bucket_reads) [default: shards].")
@click.option("--set", "-s", "overrides", multiple=True, metavar="loader.KEY=VALUE",
              help="Any other loader setting for every loader timed, as in a pipeline (repeatable), e.g. "
              "--set loader.bucket_cache_mb=50.")
@click.option("--json", "json_path", type=LocalPath(dir_okay=False), default=None,
              help="Also write the records [{backend, device, images, seconds, images_per_s}] to this file.")
@verbosity_options
@_reports_errors
def bench_loader_command(shards: Path | str, batch_size: int, batches: int, workers: int | None,
                         jpeg_distort: list[int] | None, backends: tuple[str, ...], bucket_reads: str | None,
                         overrides: tuple[str, ...], json_path: str | None) -> None:
    """Time the loaders on the shard set SHARDS with flip + normalise: DALI and the torch backend
    (decoding on the CPU, and on the GPU when present), and a baseline (webdataset + Pillow +
    torchvision transforms in a DataLoader with a worker per core); prints images/s and each
    one's ratio to the baseline."""
    from .atomic import write_text_atomic
    from .bench import bench_loader

    settings = from_overrides(LoaderConfig, "loader", list(overrides))
    if not workers and not any(item.strip().startswith("loader.threads=") for item in overrides):
        workers = os.cpu_count() or 1  # one thread or process per core, unless --set says otherwise
    records = bench_loader(shards, batch_size=batch_size, batches=batches, workers=workers,
                           jpeg_distort=tuple(jpeg_distort) if jpeg_distort else None, backends=backends,
                           bucket_reads=bucket_reads, settings=settings, echo=click.echo)
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")


@bench.command("train", epilog=f"Example: {EXAMPLES['bench train']}")
@click.argument("shards", type=LocalPath(exists=True, file_okay=False))
@click.option("--arch", "archs", type=WordList(tuple(key_choices(ModelConfig, "arch"))), default="dcgan,resnet",
              show_default=True, help="Architectures, comma-separated.")
@click.option("--batch-size", "batch_sizes", type=IntList(1), default="64,256", show_default=True,
              help="Batch sizes, comma-separated.")
@click.option("--precision", "precisions", type=WordList(("fp32", "bf16", "fp16")), default="fp32,bf16",
              show_default=True,
              help="fp32, bf16, fp16 (CUDA only), comma-separated.")
@click.option("--compile", "compile_modes", type=click.Choice(["off", "on", "both"]), default="both",
              show_default=True, help="torch.compile off, on, or each.")
@click.option("--channels-last", "channels_last_modes", type=click.Choice(["off", "on", "both"]), default="off",
              show_default=True, help="Channels-last memory format (train.channels_last) off, on, or each.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps timed per setting, after as many of warm-up.")
@click.option("--width", type=click.IntRange(min=1), default=256, show_default=True, help="g_width = d_width.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["dali", "torch"]), default="dali", show_default=True,
              help="Loader backend.")
@_keyed(TrainConfig, "loss", "--loss", help="GAN loss.")
@_keyed(TrainConfig, "r1_gamma", "--r1", type=float, help="R1 penalty weight (0: off); its steps are timed too.")
@_keyed(TrainConfig, "r2_gamma", "--r2", type=float, help="R2 penalty weight (0: off), applied with R1.")
@_keyed(TrainConfig, "r1_every", "--r1-every", type=int, help="Steps between penalty steps.")
@click.option("--json", "json_path", type=LocalPath(dir_okay=False), default=None,
              help="Also write the records [{arch, batch_size, precision, compile, channels_last, device, images, "
              "seconds, images_per_s, data_wait, peak_memory_mib, host_syncs_per_step, resolution, width, loss, "
              "r1_gamma, r2_gamma, r1_every}] to this file, rewritten after each setting.")
@verbosity_options
@_reports_errors
def bench_train_command(shards: str, archs: tuple[str, ...], batch_sizes: list[int], precisions: tuple[str, ...],
                        compile_modes: str, channels_last_modes: str, steps: int, width: int, device: str,
                        backend: str, loss: str, r1_gamma: float, r2_gamma: float, r1_every: int,
                        json_path: str | None) -> None:
    """Time training on the shard set SHARDS for each architecture, batch size, precision, memory
    format and compile setting: images/s (kimg/s x 1000), data-wait fraction, peak CUDA memory, and (on
    CUDA, uncompiled) host syncs per training step."""
    from .atomic import write_text_atomic
    from .bench import TrainRecord, bench_train

    def write(records: list[TrainRecord]) -> None:
        if json_path:
            write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")

    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    bench_train(Path(shards), archs=archs, batch_sizes=tuple(batch_sizes), precisions=precisions,
                compiles=modes[compile_modes], channels_lasts=modes[channels_last_modes], steps=steps, width=width,
                device=device, loader_backend=backend, loss=loss, r1_gamma=r1_gamma, r2_gamma=r2_gamma,
                r1_every=r1_every, echo=click.echo, on_record=write)


@bench.command("export", epilog=f"Example: {EXAMPLES['bench export']}")
@click.argument("checkpoint", type=LocalPath(exists=True, dir_okay=False))
@click.option("--n", type=click.IntRange(min=1), default=10_000, show_default=True, help="Images per method.")
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG quality.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--scratch", type=LocalPath(file_okay=False), default=None,
              help="Folder to write into (on the disk to measure) [default: the system's temp folder].")
@click.option("--json", "json_path", type=LocalPath(dir_okay=False), default=None,
              help="Also write the records [{method, images, seconds, images_per_s}] to this file.")
@verbosity_options
@_reports_errors
def bench_export_command(checkpoint: str, n: int, batch_size: int, quality: int, device: str, scratch: str | None,
                         json_path: str | None) -> None:
    """Time JPEG export of N images from CHECKPOINT beside a plain loop (the generator as trained,
    then Pillow's Image.save per image), on the same seeds and batches; also each generator alone
    and a shards-only export. Prints the speed-ups, the encode-and-write share of the time, and
    how far the exported images decode from the plain loop's."""
    from .atomic import write_text_atomic
    from .bench import bench_export

    records = bench_export(Path(checkpoint), n=n, batch_size=batch_size, quality=quality, device=device,
                           scratch=Path(scratch) if scratch else None, echo=click.echo)
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")
