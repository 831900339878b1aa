"""Generate -> encode -> write: images from a checkpoint as JPEG/PNG/WebP files and shards."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import images
from .atomic import TEMP_MARK, atomic_path, disk_full_explained, write_text_atomic
from .config import config_from_dict
from .data.loader import DatasetInfo
from .data.manifest import Manifest, ShardInfo, write_manifest
from .data.fingerprint import file_sha256
from .data.shards import ShardSample, ShardWriter
from .distributed import wait_for_all_ranks
from .errors import ConfigError, DataError
from .models import build_networks, for_inference
from .train.checkpoint import load_checkpoint
from .train.ema import recompute_batchnorm, standing_inputs

log = logging.getLogger(__name__)
RECORD_NAME = "export.json"
CONTACT_SHEET = "contact-sheet.png"
CONTACT_SHEET_IMAGES = 64
UNLABELLED = "unlabelled"
DEFAULT_N = 1000
_PLAN_NAME = ".export-plan.json"  # in the work folder of an unfinished export: the record it is for
_DONE_NAME = ".part-{:06d}.done.json"  # per finished part: its shard and class counts


@dataclass(frozen=True)
class ExportSettings:
    """What to generate and how to write it."""

    n: int | None = None  # None: DEFAULT_N, or the sum of the per-class counts
    format: str = "jpeg"
    quality: int = 95
    subsampling: str = "4:2:0"  # JPEG chroma: 4:2:0 or 4:4:4
    png_compress_level: int = 6
    webp_lossless: bool = False
    classes: tuple[str, ...] | dict[str, int] | None = None  # None: all, balanced; names: round robin; name->count
    seed: int = 0  # image i uses seed + i
    truncation: float | None = None  # latent components beyond +-truncation are redrawn
    batch_size: int = 250
    shard_size: int = 5000  # images per shard, and per part: the unit a rerun resumes from and ranks share
    output: str = "both"  # files | shards | both
    ema: bool = True
    quality_cond: int | None = None  # quality-conditioned models: the requested quality (None: highest trained)


@dataclass
class ExportResult:
    """Where the export went and how fast it ran."""

    out_dir: Path
    files: Path | None  # None when only shards were asked for
    shards: Path | None  # None when only files were asked for
    n: int
    images_per_s: float | None  # None when the export was already up to date
    up_to_date: bool


def load_generator(state: dict, ema: bool, device: torch.device,
                   fast: bool = True) -> tuple[nn.Module, DatasetInfo, int]:
    """Build the (EMA or raw) generator stored in a checkpoint, in eval mode and, unless `fast` is
    False (the network exactly as trained, for comparisons), made ready for inference by
    `models.for_inference`; returns (G, dataset info, z_dim). An EMA generator from a checkpoint written
    before its BatchNorm statistics were its own gets them measured here."""
    cfg = config_from_dict(state["config"], origin="checkpoint config")
    info = _dataset_info(state)
    generator, _ = build_networks(cfg.model, info, cfg.compression)
    generator.load_state_dict(state["G_ema" if ema else "G"])
    generator = generator.to(device).eval().requires_grad_(False)
    if ema and state.get("ema_batchnorm") != "own":  # written before the EMA had statistics of its own
        qualities = state["dataset"].get("qualities") if generator.quality_conditioned else None
        recompute_batchnorm(generator, standing_inputs(cfg.model.z_dim, max(info.num_classes, 1),
                                                       cfg.train.batch_size, cfg.seed, device, qualities))
    return for_inference(generator) if fast else generator, info, cfg.model.z_dim


def _dataset_info(state: dict) -> DatasetInfo:
    """The shape and classes of the data a checkpoint was trained on."""
    ds = state["dataset"]
    return DatasetInfo(ds["resolution"], ds["channels"], tuple(ds["class_names"]), 0)


def requested_quality(state: dict, quality_cond: int | None, checkpoint: Path) -> int | None:
    """The quality to condition the checkpoint's generator on: `quality_cond`, or the highest it was
    trained on when that is None; None for a model without quality conditioning (ConfigError when one
    was asked of it)."""
    mode = state["config"].get("compression", {}).get("mode", "none")
    if mode != "condition":
        if quality_cond is not None:
            raise ConfigError(f"{checkpoint}: this model was trained without quality conditioning (compression.mode: "
                              f"{mode}), so it cannot be asked for a quality; leave out --quality-cond "
                              f"(export.quality_cond)")
        return None
    if quality_cond is None:
        return max(state["dataset"].get("qualities") or [100])
    return quality_cond


def check_settings(settings: ExportSettings) -> None:
    """Reject an unknown format or output, or an out-of-range value, before any work is done."""
    if settings.format not in images.EXTENSIONS:
        raise ConfigError(f"export format {settings.format!r} is not one of {', '.join(images.EXTENSIONS)}")
    if settings.output not in ("files", "shards", "both"):
        raise ConfigError(f"export output {settings.output!r} is not one of files, shards, both")
    if settings.subsampling not in ("4:2:0", "4:4:4"):
        raise ConfigError(f"JPEG subsampling {settings.subsampling!r} is not one of 4:2:0, 4:4:4")
    if not 1 <= settings.quality <= 100:
        raise ConfigError(f"export quality {settings.quality} must be between 1 and 100")
    if not 0 <= settings.png_compress_level <= 9:
        raise ConfigError(f"PNG compress level {settings.png_compress_level} must be between 0 and 9")
    if settings.quality_cond is not None and not 1 <= settings.quality_cond <= 100:
        raise ConfigError(f"quality condition {settings.quality_cond} must be between 1 and 100 (100: clean images)")
    if settings.truncation is not None and settings.truncation < 0.05:
        raise ConfigError(f"truncation {settings.truncation} must be at least 0.05 (or none)")
    for name in ("batch_size", "shard_size"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"export {name} must be > 0 (got {getattr(settings, name)})")
    if settings.classes is not None and not settings.classes:
        raise ConfigError("export classes: give at least one class (or none for all)")
    if isinstance(settings.classes, dict) and not all(count >= 1 for count in settings.classes.values()):
        raise ConfigError(f"export classes: every per-class count must be >= 1 (got {settings.classes})")
    if settings.n is not None and settings.n <= 0:
        raise ConfigError(f"export n must be > 0 (got {settings.n})")
    if settings.seed < 0:
        raise ConfigError(f"export seed must be >= 0 (got {settings.seed})")


def stored_quality(settings: ExportSettings) -> int | None:
    """The quality the images are encoded at: None for PNG and lossless WebP."""
    lossy = settings.format == "jpeg" or (settings.format == "webp" and not settings.webp_lossless)
    return settings.quality if lossy else None


def export(checkpoint: Path, out_dir: Path, settings: ExportSettings, *, device: torch.device,
           overwrite: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1) -> ExportResult:
    """Generate images from `checkpoint` into `out_dir`.

    Writes `files/<class>/seed<seed>-c<class id>-q<quality>[-qc<quality cond>].<ext>`
    and/or the same images as webdataset shards in `shards/` (manifest + DALI index,
    loadable like `prepare`'s; both folders are also valid `prepare` sources), a
    contact sheet of the first images, and `export.json`. Generation on the calling
    thread overlaps encoding and writing on another. The folder is built under a
    temp name, one part of `shard_size` images at a time, and renamed when
    complete: a killed export rerun with the same settings keeps its finished
    parts and writes the rest. A finished export with the same inputs is kept as
    is; one with other settings is replaced only with `overwrite`. With
    `world_size` > 1 (torchrun, a process group already joined) part i is written
    by rank i % world_size and rank 0 finishes the folder; every rank must call
    this with the same arguments.
    """
    check_settings(settings)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = load_checkpoint(checkpoint, map_location=device)
    G, info, z_dim = load_generator(state, settings.ema, device)
    labels = image_classes(settings, info)
    quality_cond = requested_quality(state, settings.quality_cond, checkpoint)
    if settings.output != "shards":
        _check_folder_names(info.class_names, checkpoint)
    record = _record(checkpoint, settings, len(labels), quality_cond)
    files_dir = out_dir / "files" if settings.output != "shards" else None
    shards_dir = out_dir / "shards" if settings.output != "files" else None
    previous = _previous_record(out_dir)
    if previous == record:
        return ExportResult(out_dir, files_dir, shards_dir, len(labels), None, True)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        if previous is None:
            raise ConfigError(f"{out_dir} exists and holds other files; choose a new folder or pass --overwrite")
        changed = sorted(key for key in record.keys() | previous.keys() if record.get(key) != previous.get(key))
        raise ConfigError(f"{out_dir} holds an export made with other settings ({', '.join(changed)} differ); "
                          f"choose a new folder, or pass --overwrite to replace it")

    work = out_dir.with_name(f".{out_dir.name}{TEMP_MARK}export")
    parts = math.ceil(len(labels) / settings.shard_size)
    if world_size > 1:
        wait_for_all_ranks()  # every rank has read out_dir before rank 0 touches the work folder
    if rank == 0:
        _resume(work, record)
    if world_size > 1:
        wait_for_all_ranks()
    done = _done_parts(work)
    todo = [i for i in range(parts) if i % world_size == rank and i not in done]
    images_done = sum(done[i]["images"] for i in done if i % world_size == rank)
    log.info(f"{out_dir}: {len(todo)} parts of up to {settings.shard_size} images to write, "
             f"{len(done)} of {parts} kept from an earlier run")
    start = time.perf_counter()
    with disk_full_explained(out_dir, "finished parts of the export are kept"):
        written = _write_parts(G, z_dim, todo, labels, quality_cond, work, settings, record, info, device,
                               progress, images_done)
    seconds = time.perf_counter() - start
    if world_size > 1:
        wait_for_all_ranks()
    if rank == 0:
        with disk_full_explained(out_dir, "finished parts of the export are kept"):
            first = list(range(min(CONTACT_SHEET_IMAGES, len(labels))))
            sheet = generate(G, z_dim, [settings.seed + i for i in first], labels[first], device, quality_cond,
                             settings.truncation)
            _write_contact_sheet(work / CONTACT_SHEET, sheet.cpu())
            _finish(work, out_dir, record, settings, info, parts, checkpoint)
    return ExportResult(out_dir, files_dir, shards_dir, len(labels), written / seconds if written else None, False)


def export_status(checkpoint: Path, out_dir: Path, settings: ExportSettings) -> tuple[str, str]:
    """What `export` would do, without doing it: ('up to date' | 'resume' | 'run', why)."""
    check_settings(settings)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = load_checkpoint(checkpoint)
    record = _record(checkpoint, settings, len(image_classes(settings, _dataset_info(state))),
                     requested_quality(state, settings.quality_cond, checkpoint))
    previous = _previous_record(out_dir)
    if previous == record:
        return "up to date", f"{out_dir / RECORD_NAME} records these settings and this checkpoint"
    work = out_dir.with_name(f".{out_dir.name}{TEMP_MARK}export")
    try:
        unfinished = json.loads((work / _PLAN_NAME).read_text()) == record
    except (OSError, ValueError):
        unfinished = False
    if unfinished:
        return "resume", f"{len(_done_parts(work))} parts of this export are already written in {work}"
    if previous is not None:
        changed = sorted(key for key in record.keys() | previous.keys() if record.get(key) != previous.get(key))
        return "run", f"the export in {out_dir} was made with other settings ({', '.join(changed)})"
    return "run", f"nothing exported in {out_dir} yet"


def _record(checkpoint: Path, settings: ExportSettings, n: int, quality_cond: int | None) -> dict[str, Any]:
    """What export.json records, as JSON gives it back (tuples become lists), so reruns compare equal."""
    return json.loads(json.dumps({"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
                                  **asdict(settings), "n": n, "quality_cond": quality_cond}))


def image_classes(settings: ExportSettings, info: DatasetInfo) -> torch.Tensor:
    """Class id of each image to export (its length is the number of images): round robin over the
    requested classes (all by default), or that many of each class for per-class counts."""
    classes = settings.classes
    if not info.class_names:
        if classes:
            raise ConfigError("export classes: this model is unconditional; give no classes")
        return torch.zeros(settings.n or DEFAULT_N, dtype=torch.int64)
    unknown = [c for c in classes or () if c not in info.class_names]
    if unknown:
        raise ConfigError(f"export classes: unknown {', '.join(map(repr, unknown))}; "
                          f"the model knows {', '.join(info.class_names)}")
    if isinstance(classes, dict):
        total = sum(classes.values())
        if settings.n is not None and settings.n != total:
            raise ConfigError(f"export: --n {settings.n} differs from the per-class counts, which add up to {total}; "
                              f"leave --n out")
        return torch.tensor([info.class_names.index(c) for c, count in classes.items() for _ in range(count)],
                            dtype=torch.int64)
    ids = torch.tensor([info.class_names.index(c) for c in classes or info.class_names])
    n = settings.n or DEFAULT_N
    return ids.repeat(n // len(ids) + 1)[:n]


def latents(seeds: list[int], z_dim: int, truncation: float | None = None) -> torch.Tensor:
    """One latent per seed, (N, z_dim), each drawn from N(0, I) with its own seed, so that an image
    does not depend on the batch it is generated in. With `truncation`, components beyond
    +-truncation are redrawn (the truncation trick of BigGAN: https://arxiv.org/abs/1809.11096)."""
    rows = []
    for seed in seeds:
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(z_dim, generator=rng)
        if truncation is not None:
            outside = z.abs() > truncation
            while outside.any():
                z[outside] = torch.randn(int(outside.sum()), generator=rng)
                outside = z.abs() > truncation
        rows.append(z)
    return torch.stack(rows)


@torch.no_grad()
def generate(G: nn.Module, z_dim: int, seeds: list[int], labels: torch.Tensor, device: torch.device,
             quality: int | torch.Tensor | None = None, truncation: float | None = None) -> torch.Tensor:
    """Images for the given seeds and class ids as uint8 RGB, NCHW, on `device`; a quality-conditioned
    G is asked for JPEG `quality` (1-100: one for all, or one per image)."""
    z = latents(seeds, z_dim, truncation)
    if quality is not None:
        quality = torch.as_tensor(quality, dtype=torch.float32).expand(len(seeds)).div(100).to(device)
    out = G(z.to(device), labels.to(device), quality).float()
    # NHWC memory (channels last): what the encoders read, so they copy nothing
    return out.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def _write_parts(G: nn.Module, z_dim: int, todo: list[int], labels: torch.Tensor, quality_cond: int | None,
                 work: Path, settings: ExportSettings, record: dict, info: DatasetInfo, device: torch.device,
                 progress: bool, images_done: int) -> int:
    """Generate the parts `todo` on this thread while a second one encodes and writes them; returns
    the number of images written."""
    sizes = {i: min(settings.shard_size, len(labels) - i * settings.shard_size) for i in todo}
    bar = tqdm(total=images_done + sum(sizes.values()), initial=images_done, desc="export", unit="img",
               disable=not progress, dynamic_ncols=True)
    pending: Future | None = None  # at most one batch waits to be written while the next is generated
    part = None
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer") as writer_thread:
        try:
            for index in todo:
                part = _Part(index, work, settings, record, info, quality_cond)
                first = index * settings.shard_size
                for start in range(first, first + sizes[index], settings.batch_size):
                    stop = min(start + settings.batch_size, first + sizes[index])
                    seeds = list(range(settings.seed + start, settings.seed + stop))
                    pixels = generate(G, z_dim, seeds, labels[start:stop], device, quality_cond, settings.truncation)
                    _wait(pending, bar)
                    pending = writer_thread.submit(part.add, seeds, labels[start:stop].tolist(), pixels)
                _wait(pending, bar)
                pending = writer_thread.submit(part.finish)
            _wait(pending, bar)
        except BaseException:
            with contextlib.suppress(BaseException):
                _wait(pending, None)  # let the writer stop before its part is cleaned up
            if part is not None:
                part.abort()
            raise
    return sum(sizes.values())


def _wait(future: Future | None, bar: tqdm | None) -> None:
    """Wait for a writer task, re-raising its error; count its images on `bar`."""
    if future is not None:
        done = future.result()
        if bar is not None:
            bar.update(done)


class _Part:
    """One part of an export (the images of one shard): encodes each batch and writes it as files
    and/or into the part's shard; `finish` records the part as done."""

    def __init__(self, index: int, work: Path, settings: ExportSettings, record: dict, info: DatasetInfo,
                 quality_cond: int | None):
        self.index, self.work, self.settings, self.quality_cond = index, work, settings, quality_cond
        self.names = info.class_names or (UNLABELLED,)
        self.labelled = bool(info.class_names)
        self.checkpoint_sha256 = record["checkpoint_sha256"]
        self.source = Path(record["checkpoint"]).name
        self.quality = stored_quality(settings)
        self.classes: Counter[str] = Counter()
        self.folders: set[str] = set()  # class folders known to exist
        self.shard = None
        if settings.output != "files":
            self.shard = ShardWriter(work / "shards", settings.shard_size, first_index=index)

    def add(self, seeds: list[int], labels: list[int], pixels: torch.Tensor) -> int:
        """Encode and write one batch; returns its number of images."""
        s = self.settings
        encoded = images.encode_batch(pixels, s.format, s.quality, subsampling=s.subsampling,
                                      compress_level=s.png_compress_level, lossless=s.webp_lossless)
        ext = images.EXTENSIONS[s.format]
        asked = f"-qc{self.quality_cond}" if self.quality_cond is not None else ""
        for seed, label, data in zip(seeds, labels, encoded):
            name = self.names[label]
            if s.output != "shards":
                if name not in self.folders:
                    (self.work / "files" / name).mkdir(parents=True, exist_ok=True)
                    self.folders.add(name)
                file_name = f"seed{seed:07d}-c{label}-q{self.quality or 0}{asked}.{ext}"
                _write_file(self.work / "files" / name / file_name, data)
            if self.shard is not None:
                meta = {"source": f"{self.source}:seed{seed}", "seed": seed, "class": name, "quality": self.quality,
                        "format": s.format, "checkpoint_sha256": self.checkpoint_sha256}
                if self.quality_cond is not None:
                    meta["quality_cond"] = self.quality_cond
                if s.truncation is not None:
                    meta["truncation"] = s.truncation
                self.shard.add(ShardSample(f"{seed:08d}", data, ext, label if self.labelled else None, meta))
            self.classes[name] += 1
        return len(seeds)

    def finish(self) -> int:
        """Close the shard, then mark the part done; returns 0 (its images were counted batch by batch)."""
        shards = self.shard.close() if self.shard is not None else []
        done = {"images": sum(self.classes.values()), "classes": dict(self.classes),
                "shard": asdict(shards[0]) if shards else None}
        write_text_atomic(self.work / _DONE_NAME.format(self.index), json.dumps(done))
        return 0

    def abort(self) -> None:
        """Delete the part's unfinished shard, so that no temp file is left."""
        if self.shard is not None:
            self.shard.__exit__(RuntimeError, None, None)


def _check_folder_names(class_names: tuple[str, ...], checkpoint: Path) -> None:
    """Refuse class names that would not stay one folder below files/ (a checkpoint is user input)."""
    for name in class_names:
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise DataError(f"{checkpoint}: class name {name!r} cannot be a folder name, so files cannot be "
                            f"written for it; export shards only (--output shards)")


def _write_file(path: Path, data: bytes) -> None:
    # os.open/write is ~1.6x faster than Path.write_bytes for small files; mode 0o666 less the umask
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_contact_sheet(path: Path, pixels: torch.Tensor) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(pixels, nrow=math.ceil(math.sqrt(len(pixels))), padding=2, pad_value=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _resume(work: Path, record: dict) -> None:
    """Keep the finished parts of an unfinished export of the same record in `work`; start afresh otherwise.
    Temp files of a killed run are removed either way."""
    try:
        same = json.loads((work / _PLAN_NAME).read_text()) == record
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(work, ignore_errors=True)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    done = _done_parts(work)
    for path in (work / "shards").iterdir():  # shards of parts not done, and temp files
        number = _part_number(path.name)
        if TEMP_MARK in path.name or number not in done:
            path.unlink()
    for path in work.glob(f".*{TEMP_MARK}*"):
        path.unlink()
    write_text_atomic(work / _PLAN_NAME, json.dumps(record))


def _part_number(name: str) -> int | None:
    digits = name.lstrip(".").split(".")[0].rpartition("-")[2]
    return int(digits) if digits.isdigit() else None


def _done_parts(work: Path) -> dict[int, dict[str, Any]]:
    """The records of the parts finished in `work`, whose shard (if any) is whole."""
    done = {}
    for path in work.glob(".part-*.done.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        shard = record["shard"]
        if shard is None or ((work / "shards" / shard["tar"]).is_file()
                             and (work / "shards" / shard["tar"]).stat().st_size == shard["bytes"]
                             and (work / "shards" / shard["index"]).is_file()):
            done[_part_number(path.name)] = record
    return done


def _finish(work: Path, out_dir: Path, record: dict, settings: ExportSettings, info: DatasetInfo, parts: int,
            checkpoint: Path) -> None:
    """Write the manifest and export.json of a work folder whose parts are all done, and rename it to `out_dir`."""
    done = _done_parts(work)
    missing = [i for i in range(parts) if i not in done]
    if missing:
        raise DataError(f"{out_dir}: {len(missing)} of {parts} parts are not written (e.g. part {missing[0]}); "
                        f"rerun the same command to finish them")
    names = info.class_names or (UNLABELLED,)
    classes = Counter()
    for part in done.values():
        classes.update(part["classes"])
    if settings.output == "files":
        shutil.rmtree(work / "shards")
    else:
        shards = [ShardInfo(**done[i]["shard"]) for i in range(parts)]
        write_manifest(work / "shards", Manifest(
            created_by="export", source=str(checkpoint), settings=record, resolution=info.resolution,
            image_format=settings.format, class_names=list(info.class_names), shards=shards,
            class_histogram={name: classes[name] for name in names},
            quality_histogram={str(stored_quality(settings)): record["n"]},
        ))
    for path in [work / _PLAN_NAME, *work.glob(".part-*.done.json")]:
        path.unlink()
    write_text_atomic(work / RECORD_NAME, json.dumps({**record, "images": record["n"]}, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)


def _previous_record(out_dir: Path) -> dict | None:
    """The record of the finished export in `out_dir`, if there is one."""
    try:
        done = json.loads((out_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    done.pop("images", None)
    return done
