"""The `cgan-pipe` command line: parse, call, report. No pipeline logic lives here."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click
import yaml

from . import __version__
from .atomic import DISK_FULL
from .config import load_pipeline, to_dict
from .errors import ConfigError, UserError

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
            return command(*args, **kwargs)
        except UserError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except OSError as exc:  # a full disk met where no stage words it itself
            if exc.errno not in DISK_FULL:
                raise
            click.secho(f"error: {exc.filename or 'writing'}: no space left on the device; finished work is kept: "
                        f"free some space and rerun the same command to resume", fg="red", err=True)
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
    Exit codes: 0 success, 1 runtime failure, 2 usage or config error, 130 interrupted.
    Every command takes -q (results only) and -v (more detail on stderr; -vv: debug).
    """


@main.command(epilog=f"Example: {EXAMPLES['init']}")
@click.argument("source")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Pipeline file to write [default: <source name>.yaml here].")
@click.option("--name", default=None, help="Pipeline name (and runs/<name>) [default: from the source].")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@verbosity_options
@_reports_errors
def init(source: str, out: str | None, name: str | None, force: bool) -> None:
    """Write a starter pipeline for SOURCE (an image folder, a tar of one, a list file or the CIFAR-10
    archive): lists it, opens a sample of its images, and sets the resolution, format, model width,
    batch size and time budget for this data and this machine. Every key is written with its
    meaning as a comment; edit, then `cgan-pipe run` the file."""
    import torch

    from .starter import pipeline_name, write_starter

    name = name or pipeline_name(source)
    path = Path(out) if out else Path(f"{name}.yaml")
    survey, values = write_starter(source, path, name, cuda=torch.cuda.is_available(), force=force)
    classes = len(survey.class_counts)
    click.echo(f"{survey.images} images, {classes or 'no'} classes; resolution {values['data.resolution']}, "
               f"batch {values['train.batch_size']}, {values['train.max_minutes']} minutes")
    click.echo(f"wrote {path}; next: cgan-pipe run {path}")


@main.command(epilog=f"Example: {EXAMPLES['run']}")
@click.argument("pipeline", type=click.Path(dir_okay=False))
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


@main.command(epilog=f"Example: {EXAMPLES['prepare']}")
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png", "webp", "keep"]), default="jpeg",
              show_default=True, help="Image format in the shards (JPEGs already at the resolution are "
              "copied untouched); 'keep' copies any RGB JPEG/PNG/WebP at the resolution, else writes PNG.")
@click.option("--quality", "quality_text", default="95", show_default=True, metavar="Q[,Q..]",
              help="JPEG/WebP quality for re-encoded images; several (10,30,50) write each image once "
              "per quality (or once, at a random one, with --quality-mode random).")
@click.option("--quality-mode", type=click.Choice(["all", "random"]), default="all", show_default=True,
              help="With several qualities: one sample per quality, or one random quality per image.")
@click.option("--resolution", type=click.Choice([str(2 ** i) for i in range(3, 11)]), default="32",
              show_default=True, help="Square side in pixels.")
@click.option("--shard-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Samples per shard.")
@click.option("--shard-bytes", metavar="SIZE", default=None,
              help="Aim shards at about SIZE instead (e.g. 256MB, 1GiB), from the mean size of 256 encoded images.")
@click.option("--reencode", is_flag=True,
              help="Re-encode JPEGs that could be copied byte for byte, at --format/--quality.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N images (seeded subset).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Shuffle seed.")
@click.option("--resize", type=click.Choice(["crop", "pad", "reject"]), default="crop", show_default=True,
              help="Images not at the resolution: centre crop, pad with black, or skip.")
@click.option("--subsampling", type=click.Choice(["4:2:0", "4:4:4"]), default="4:2:0", show_default=True,
              help="Chroma subsampling of re-encoded JPEGs.")
@click.option("--png-level", type=click.IntRange(0, 9), default=6, show_default=True, help="PNG zlib level.")
@click.option("--lossless", is_flag=True, help="Lossless WebP.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=64_000_000, show_default=True,
              help="Skip images with more pixels, unread (decompression-bomb limit).")
@click.option("--rank", type=click.IntRange(min=0), default=0, envvar=["RANK", "SLURM_PROCID"], show_default=True,
              help="This machine's rank when several write one shard set (default from RANK/SLURM_PROCID).")
@click.option("--world-size", type=click.IntRange(min=1), default=1, envvar=["WORLD_SIZE", "SLURM_NTASKS"],
              show_default=True, help="How many machines write the shard set (default from WORLD_SIZE/SLURM_NTASKS).")
@click.option("--merge", is_flag=True,
              help="Write the manifest of OUT once every rank has finished (SOURCE and other options unused).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes writing shards [default: one per core]; the shards do not depend on it.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Split of a CIFAR-10 python archive.")
@verbosity_options
@_reports_errors
def prepare(source: str, out: str, fmt: str, quality_text: str, quality_mode: str, resolution: str, shard_size: int,
            shard_bytes: str | None, reencode: bool, limit: int | None, seed: int, resize: str, subsampling: str,
            png_level: int, lossless: bool, max_pixels: int, rank: int, world_size: int, merge: bool,
            workers: int | None, split: str) -> None:
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
    from .config import parse_byte_size
    from .data.shards import PrepareSettings, merge_shards, prepare as prepare_shards
    from .distributed import process_group, started_by_torchrun, wait_for_all_ranks

    if merge:
        manifest = merge_shards(Path(out))
        click.echo(f"merged {len(manifest.shards)} shards, {manifest.num_samples} samples -> "
                   f"{Path(out) / 'manifest.json'}")
        return
    try:
        qualities = [int(q) for q in quality_text.split(",") if q.strip()]
    except ValueError:
        raise ConfigError(f"--quality {quality_text!r}: expected a number or a comma-separated list") from None
    if not qualities or not all(1 <= q <= 100 for q in qualities):
        raise ConfigError(f"--quality {quality_text!r}: qualities are between 1 and 100")
    try:
        shard_bytes_value = parse_byte_size(shard_bytes) if shard_bytes is not None else None
    except ValueError as exc:
        raise ConfigError(f"--shard-bytes: {exc}") from None
    settings = PrepareSettings(resolution=int(resolution), format=fmt, quality=qualities[0],
                               qualities=tuple(qualities) if len(qualities) > 1 else None,
                               quality_mode=quality_mode, shard_size=shard_size,
                               limit=limit, seed=seed, split=split, max_pixels=max_pixels, resize=resize,
                               jpeg_subsampling=subsampling, png_compress_level=png_level, webp_lossless=lossless,
                               reencode=reencode, shard_bytes=shard_bytes_value)
    if started_by_torchrun():  # every rank writes its shards, then rank 0 writes the manifest
        with process_group():
            manifest, up_to_date = prepare_shards(source, Path(out), settings, workers=workers, rank=rank,
                                                  world_size=world_size, progress=_progress() and rank == 0)
            if not up_to_date:  # every rank read the same manifest before any wrote, so all agree
                wait_for_all_ranks()
                manifest = merge_shards(Path(out)) if rank == 0 else None
                wait_for_all_ranks()
        if rank != 0:
            return
    else:
        manifest, up_to_date = prepare_shards(source, Path(out), settings, workers=workers, rank=rank,
                                              world_size=world_size, progress=_progress())
    if manifest is None:
        click.echo(f"rank {rank} of {world_size}: its shards are written in {out}; when every rank is done, "
                   f"run `cgan-pipe prepare SOURCE {out} --merge`")
        return
    if up_to_date:
        click.echo(f"{out}: already complete for these settings; nothing to do")
    click.echo(f"{manifest.num_samples} samples in {len(manifest.shards)} shards, "
               f"{len(manifest.skipped)} skipped -> {Path(out) / 'manifest.json'}")
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
@click.argument("pipeline", type=click.Path(dir_okay=False))
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
    from .distributed import process_group, started_by_torchrun, training_backend
    from .pipeline import write_resolved_config
    from .train.loop import train as train_gan

    cfg = load_pipeline(pipeline, list(overrides))
    if dry_run:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    shards = cfg.loader.shards or cfg.run_path / "shards"
    if started_by_torchrun():  # one process per GPU (or CPU rank): each trains on its part of the shards
        with process_group(training_backend(cfg.train.device)):
            if int(os.environ["RANK"]) == 0:
                write_resolved_config(cfg, cfg.run_path)
            result = train_gan(cfg, shards, cfg.run_path, progress=_progress())
        if int(os.environ["RANK"]) != 0:
            return
    else:
        write_resolved_config(cfg, cfg.run_path)
        result = train_gan(cfg, shards, cfg.run_path, progress=_progress())
    speed = f", {result.images_per_s:.0f} img/s" if result.images_per_s else " (already complete)"
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from and result.images_per_s else ""
    click.echo(f"step {result.steps}{resumed}{speed}; checkpoint {result.checkpoint}")


@main.command(epilog=f"Example: {EXAMPLES['generate']}")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", type=click.IntRange(min=1), default=None,
              help="Number of images [default: 1000, or the sum of the --classes counts, or the --seeds range].")
@click.option("--seeds", "seed_range", default=None, metavar="A-B",
              help="Seeds A to B inclusive, one image each (the same seeds give the same images).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="First seed; image i uses seed+i.")
@click.option("--classes", default=None, metavar="NAMES|NAME=COUNT,..",
              help="cat,dog: those classes, round robin; cat=100,dog=50: that many of each [default: all, balanced].")
@click.option("--format", "fmt", default="jpeg", show_default=True, help="jpeg, png or webp.")
@click.option("--quality", type=int, default=95, show_default=True, help="JPEG/WebP quality (1-100).")
@click.option("--subsampling", type=click.Choice(["4:2:0", "4:4:4"]), default="4:2:0", show_default=True,
              help="JPEG chroma subsampling.")
@click.option("--png-level", type=int, default=6, show_default=True, help="PNG zlib compress level (0-9).")
@click.option("--lossless", is_flag=True, help="Lossless WebP (--quality is then ignored).")
@click.option("--output", type=click.Choice(["files", "shards", "both"]), default="both", show_default=True,
              help="A folder per class, webdataset shards (+ manifest, DALI index), or both.")
@click.option("--quality-cond", type=int, default=None, metavar="Q",
              help="For a model trained with compression.mode: condition, the JPEG quality (1-100) the images "
              "should look like; 100 asks for clean images (default: the highest quality it was trained on).")
@click.option("--truncation", type=float, default=None, metavar="T",
              help="Redraw latent components beyond +-T (>= 0.05): more typical, less varied images.")
@click.option("--batch-size", type=int, default=250, show_default=True, help="Images per generator call.")
@click.option("--shard-size", type=int, default=5000, show_default=True,
              help="Images per output shard, and per unit of work a rerun resumes from.")
@click.option("--raw", is_flag=True, help="Use the raw generator instead of its EMA.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the generator runs (and the JPEG 4:4:4 encoder: nvJPEG on cuda).")
@click.option("--overwrite", is_flag=True, help="Replace OUT when it holds other files, or an export made with "
              "other settings.")
@verbosity_options
@_reports_errors
def generate(checkpoint: str, out: str, n: int | None, seed_range: str | None, seed: int, classes: str | None,
             fmt: str, quality: int, subsampling: str, png_level: int, lossless: bool, output: str,
             quality_cond: int | None, truncation: float | None, batch_size: int, shard_size: int, raw: bool,
             device: str, overwrite: bool) -> None:
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
    from .distributed import process_group, started_by_torchrun
    from .export import ExportSettings, export

    if seed_range is not None:
        seed, count = _seed_range(seed_range)
        if n is not None and n != count:
            raise ConfigError(f"--n {n} and --seeds {seed_range} ({count} seeds) disagree; give one of them")
        n = count
    settings = ExportSettings(n=n, format=fmt.lower(), quality=quality, subsampling=subsampling,
                              png_compress_level=png_level, webp_lossless=lossless, classes=_class_request(classes),
                              seed=seed, truncation=truncation, batch_size=batch_size, shard_size=shard_size,
                              output=output, ema=not raw, quality_cond=quality_cond)
    target = resolve_device(device, "--device")
    if started_by_torchrun():  # the ranks share the parts; rank 0 finishes the folder
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if target.type == "cuda":
            import torch

            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(target)  # nvJPEG and any default-device work follow this rank's GPU
        with process_group():  # gloo: the ranks only wait for each other
            result = export(Path(checkpoint), Path(out), settings, device=target, overwrite=overwrite,
                            progress=_progress() and rank == 0, rank=rank, world_size=world)
        if rank != 0:
            return
    else:
        result = export(Path(checkpoint), Path(out), settings, device=target, overwrite=overwrite,
                        progress=_progress())
    if result.up_to_date:
        click.echo(f"{out}: already complete for these settings; nothing to do")
    else:
        speed = f" ({result.images_per_s:.0f} img/s)" if result.images_per_s else ""
        click.echo(f"{result.n} images{speed} -> {result.out_dir}")
    click.echo(json.dumps({"export_dir": str(result.out_dir),
                           "export_files": str(result.files) if result.files else None,
                           "export_shards": str(result.shards) if result.shards else None}))


def _seed_range(text: str) -> tuple[int, int]:
    """'A-B' -> (A, number of seeds); ConfigError otherwise."""
    first, sep, last = text.partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()) or int(last) < int(first):
        raise ConfigError(f"--seeds {text!r}: expected A-B with 0 <= A <= B, e.g. --seeds 0-999")
    return int(first), int(last) - int(first) + 1


def _class_request(text: str | None) -> tuple[str, ...] | dict[str, int] | None:
    """'cat,dog' -> ('cat', 'dog'); 'cat=10,dog=5' -> {'cat': 10, 'dog': 5}; ConfigError for a mix or a bad count."""
    if not text:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not any("=" in item for item in items):
        return tuple(items)
    counts = {}
    for item in items:
        name, _, count = item.partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"--classes {text!r}: {item!r} is not NAME=COUNT with a count >= 1 "
                              f"(give all classes as names, or all as NAME=COUNT)")
        counts[name.strip()] = int(count)
    return counts


@main.command("eval", epilog=f"Example: {EXAMPLES['eval']}")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--shards", default=None, help="Real shard set to compare with (default: the run's shards beside "
              "the checkpoint, else the checkpoint config's loader.shards).")
@click.option("--metrics", "metric_names", default=None, metavar="M[,M..]",
              help="classifier, fid, kid, is, quality (default: the checkpoint config's eval.metrics).")
@click.option("--n", "n_samples", type=click.IntRange(min=2), default=None, help="Generated images to score.")
@click.option("--inception-weights", default=None, type=click.Path(dir_okay=False),
              help="Local pt_inception-2015-12-05-6726825d.pth for fid/kid/is.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Where the classifier and reference features are cached.")
@click.option("--classifier-steps", type=click.IntRange(min=1), default=None,
              help="Training batches of the feature classifier (default: eval.classifier_steps).")
@click.option("--raw", is_flag=True, help="Score the raw generator instead of its EMA.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@verbosity_options
@_reports_errors
def evaluate(checkpoint: str, shards: str | None, metric_names: str | None, n_samples: int | None,
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
               "metrics": [m.strip() for m in metric_names.split(",") if m.strip()] if metric_names else None}
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
@click.argument("run_dir", type=click.Path(file_okay=False))
@verbosity_options
@_reports_errors
def report(run_dir: str) -> None:
    """Write RUN_DIR/report.html again from what the run left there: results, curves, sample grids
    over training, exported images, data summary and configuration, with every image embedded
    (`cgan-pipe run` writes it at the end of each run)."""
    from .report import write_report

    click.echo(f"wrote {write_report(Path(run_dir))}")


@main.command(epilog=f"Example: {EXAMPLES['verify']}")
@click.argument("shards", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@verbosity_options
@_reports_errors
def verify(shards: str, as_json: bool) -> None:
    """Check the shard set in SHARDS; exit 0 when sound, 1 when anything is wrong.

    Compares each shard's sha256, sample count and DALI index with the manifest,
    checks every sample's image, .cls and .json, and decodes every image with
    DALI's CPU decoder (the loader's) at the manifest's resolution. Every problem
    is listed by shard and sample key.
    """
    from dataclasses import asdict

    from .data.verify import verify_shards

    report = verify_shards(Path(shards), progress=_progress())
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
@click.argument("shards", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Where to write the contact sheet PNG [default: SHARDS/contact-sheet.png].")
@click.option("--per-class", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Samples per class on the contact sheet.")
@verbosity_options
@_reports_errors
def inspect_shard_set(shards: str, as_json: bool, sheet: str | None, per_class: int) -> None:
    """Summarise the shard set in SHARDS and write a contact sheet (one row per class).

    Shows sample and shard counts, resolution, format, class and quality
    histograms and bytes per image, from the manifest and index files.
    """
    from .data.verify import contact_sheet, inspect_shards

    summary = inspect_shards(Path(shards))
    summary["contact_sheet"] = str(contact_sheet(Path(shards), Path(sheet or Path(shards) / "contact-sheet.png"),
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
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="JPEG quality of the re-encode runs.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="prepare's processes [default: one per core].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images only.")
@click.option("--dataset-tool", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Path of StyleGAN2-ADA's dataset_tool.py, to time it on the same images (extracted first).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
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
    rate = {r.method: r.images_per_s for r in records}
    click.echo(f"re-encode: prepare / Pillow loop = "
               f"{rate[f'prepare-jpeg-q{quality}'] / rate[f'pil-loop-jpeg-q{quality}']:.2f}x")
    if "stylegan2-ada-dataset_tool" in rate:
        click.echo(f"keep: prepare / dataset_tool = {rate['prepare-keep'] / rate['stylegan2-ada-dataset_tool']:.2f}x")
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")


@bench.command("loader", epilog=f"Example: {EXAMPLES['bench loader']}")
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=100, show_default=True,
              help="Batches timed per loader, after 10 of warm-up.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads (DALI) or processes (DataLoader) per loader [default: one per core].")
@click.option("--jpeg-distort", "distort_text", default=None, metavar="LO,HI",
              help="Also time each loader with on-the-fly JPEG distortion at a quality drawn from LO..HI "
              "(loader.jpeg_distort), and print its cost.")
@click.option("--backends", "backends_text", default="dali,torch,baseline", show_default=True,
              help="Which loaders to time, comma-separated (the ratios need the baseline).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the records [{backend, device, images, seconds, images_per_s}] to this file.")
@verbosity_options
@_reports_errors
def bench_loader_command(shards: str, batch_size: int, batches: int, workers: int | None, distort_text: str | None,
                         backends_text: str, json_path: str | None) -> None:
    """Time the loaders on the shard set SHARDS with flip + normalise: DALI and the torch backend
    (decoding on the CPU, and on the GPU when present), and a baseline (webdataset + Pillow +
    torchvision transforms in a DataLoader with a worker per core); prints images/s and each
    one's ratio to the baseline."""
    from .atomic import write_text_atomic
    from .bench import bench_loader

    distort = None
    if distort_text is not None:
        try:
            distort = tuple(int(q) for q in distort_text.split(","))
        except ValueError:
            distort = ()
        if len(distort) != 2 or not 1 <= distort[0] <= distort[1] <= 100:
            raise ConfigError(f"--jpeg-distort {distort_text!r}: expected LO,HI with 1 <= LO <= HI <= 100")
    backends = tuple(b.strip() for b in backends_text.split(","))
    unknown = [b for b in backends if b not in ("dali", "torch", "baseline")]
    if unknown or not backends:
        raise ConfigError(f"--backends {backends_text!r}: expected some of dali, torch, baseline")
    records = bench_loader(Path(shards), batch_size=batch_size, batches=batches, workers=workers,
                           jpeg_distort=distort, backends=backends, echo=click.echo)
    baseline = next((r.images_per_s for r in records if r.backend == "baseline"), None)
    for record in records if baseline else []:
        click.echo(f"{record.backend}/{record.device}: {record.images_per_s / baseline:.2f}x the baseline")
    for record in (r for r in records if r.backend.endswith("+jpeg_distort")):
        backend = record.backend.removesuffix("+jpeg_distort")
        plain = next(r for r in records if r.backend == backend and r.device == record.device)
        click.echo(f"jpeg_distort on {backend}/{record.device} costs "
                   f"{1 - record.images_per_s / plain.images_per_s:.1%} of its throughput")
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")


@bench.command("train", epilog=f"Example: {EXAMPLES['bench train']}")
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--arch", "archs", default="dcgan,resnet", show_default=True, help="Architectures, comma-separated.")
@click.option("--batch-size", "batch_sizes", default="64,256", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--precision", "precisions", default="fp32,bf16", show_default=True,
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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the records [{arch, batch_size, precision, compile, channels_last, device, images, "
              "seconds, images_per_s, data_wait, peak_memory_mib, host_syncs_per_step}] to this file.")
@verbosity_options
@_reports_errors
def bench_train_command(shards: str, archs: str, batch_sizes: str, precisions: str, compile_modes: str,
                        channels_last_modes: str, steps: int, width: int, device: str, backend: str,
                        json_path: str | None) -> None:
    """Time training on the shard set SHARDS for each architecture, batch size, precision, memory
    format and compile setting: images/s (kimg/s x 1000), data-wait fraction, peak CUDA memory, and (on
    CUDA, uncompiled) host syncs per training step."""
    from .atomic import write_text_atomic
    from .bench import bench_train

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-size {batch_sizes!r}: expected comma-separated numbers") from None
    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    records = bench_train(Path(shards), archs=tuple(a.strip() for a in archs.split(",")), batch_sizes=sizes,
                          precisions=tuple(p.strip() for p in precisions.split(",")), compiles=modes[compile_modes],
                          channels_lasts=modes[channels_last_modes], steps=steps, width=width, device=device,
                          loader_backend=backend, echo=click.echo)
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")


@bench.command("export", epilog=f"Example: {EXAMPLES['bench export']}")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--n", type=click.IntRange(min=1), default=10_000, show_default=True, help="Images per method.")
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG quality.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--scratch", type=click.Path(file_okay=False), default=None,
              help="Folder to write into (on the disk to measure) [default: the system's temp folder].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
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
    rate = {r.method: r.images_per_s for r in records}
    seconds = {r.method: r.seconds for r in records}
    click.echo(f"export / plain = {rate['export'] / rate['plain']:.2f}x; "
               f"export-shards / plain = {rate['export-shards'] / rate['plain']:.2f}x; "
               f"generator: {rate['generate'] / rate['generate-plain']:.2f}x")
    click.echo(f"encoding and writing add {seconds['export'] / seconds['generate'] - 1:.0%} (files) and "
               f"{seconds['export-shards'] / seconds['generate'] - 1:.0%} (shards) to generation")
    if json_path:
        write_text_atomic(Path(json_path), json.dumps([r.to_dict() for r in records], indent=2) + "\n")
