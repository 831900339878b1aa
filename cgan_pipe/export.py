"""Export: images generated from a checkpoint, encoded and written as JPEG/PNG/WebP files and shards."""

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
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from . import images
from .atomic import atomic_path, disk_full_explained, remove_stale_temps, write_text_atomic
from .config import ExportConfig
from .data.batch import DatasetInfo
from .data.bucket import (ObjectMissing, abort_unfinished_uploads, delete_objects, object_sizes, published, read_bytes,
                          staging_dir, upload_file, write_object)
from .data.bucket_parts import BucketParts
from .data.manifest import MANIFEST_NAME, Manifest, ShardInfo, write_manifest
from .data.digest import file_sha256
from .data.shard_format import ShardSample, ShardWriter
from .devices import available_memory, gib
from .distributed import all_ranks, wait_for_all_ranks
from .errors import ConfigError, DataError
from .locations import is_url
from .lock import LOCK_NAME, folder_lock
from .resumable import ResumableParts
from .generation import checkpoint_dataset, generate, load_generator, requested_quality
from .train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
RECORD_NAME = "export.json"
CONTACT_SHEET = "contact-sheet.png"
CONTACT_SHEET_IMAGES = 64
UNLABELLED = "unlabelled"
DEFAULT_N = 1000
_PLAN_NAME = ".export-plan.json"  # in the work folder of an unfinished export: the record it is for
WORK_NAME = ".unfinished-export"  # in the export folder: the parts of an export until it is complete
EXPORT_ENTRIES = ("files", "shards", CONTACT_SHEET, RECORD_NAME)  # what a finished export holds (export.json last)


def _parts(work: Path) -> ResumableParts:
    """An unfinished export's parts in its work folder: a shard each in work/shards (or none, for files
    only), and their done records (shard, image and class counts)."""
    return ResumableParts(work, work / "shards", _PLAN_NAME, ".part-")


@dataclass
class ExportResult:
    """Where the export went and how fast it ran."""

    out_dir: Path | str  # a folder, or a bucket URL
    files: Path | str | None  # None when only shards were asked for
    shards: Path | str | None  # None when only files were asked for
    n: int
    images_per_s: float | None  # None when the export was already up to date
    up_to_date: bool


def stored_quality(settings: ExportConfig) -> int | None:
    """The quality the images are encoded at: None for PNG and lossless WebP."""
    lossy = settings.format == "jpeg" or (settings.format == "webp" and not settings.webp_lossless)
    return settings.quality if lossy else None


def export(checkpoint: Path, out_dir: Path | str, settings: ExportConfig, *, device: torch.device,
           overwrite: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1) -> ExportResult:
    """Generate images from `checkpoint` into `out_dir` (a folder, or an s3:// URL: see `export_into_bucket`).

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
    if is_url(out_dir):
        return export_into_bucket(checkpoint, str(out_dir), settings, device=device, overwrite=overwrite,
                                  progress=progress, rank=rank, world_size=world_size)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    job = _job(checkpoint, settings, device)
    files_dir = out_dir / "files" if settings.output != "shards" else None
    shards_dir = out_dir / "shards" if settings.output != "files" else None
    previous = _previous_record(out_dir)
    if previous == job.record:
        return ExportResult(out_dir, files_dir, shards_dir, job.n, None, True)
    _check_replaceable(out_dir, job.record, previous, overwrite)
    _check_room(out_dir, job.n, settings)

    with folder_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        work = _work_folder(out_dir)
        parts = math.ceil(job.n / settings.shard_size)
        if world_size > 1:
            wait_for_all_ranks()  # every rank has read out_dir before rank 0 touches the work folder
        if rank == 0:
            _resume(work, job.record)
        if world_size > 1:
            wait_for_all_ranks()
        done = _parts(work).done()
        todo = [i for i in range(parts) if i % world_size == rank and i not in done]
        images_done = sum(done[i]["images"] for i in done if i % world_size == rank)
        log.info(f"{out_dir}: {len(todo)} parts of up to {settings.shard_size} images to write, "
                 f"{len(done)} of {parts} kept from an earlier run")
        start = time.perf_counter()
        with disk_full_explained(out_dir, "finished parts of the export are kept"):
            written = _write_parts(job, todo, work, settings, device, progress, images_done)
        seconds = time.perf_counter() - start
        if world_size > 1:
            wait_for_all_ranks()
        if rank == 0:
            with disk_full_explained(out_dir, "finished parts of the export are kept"):
                _write_contact_sheet(work / CONTACT_SHEET, job, settings, device)
                _finish(work, out_dir, job, settings, parts, checkpoint)
    return ExportResult(out_dir, files_dir, shards_dir, job.n, written / seconds if written else None, False)


@dataclass
class _Job:
    """What every part of one export is made from: the generator, the class of each image, and what
    export.json records."""

    G: nn.Module
    z_dim: int
    info: DatasetInfo
    labels: torch.Tensor  # the class id of each image: its length is the number of images
    quality_cond: int | None
    record: dict[str, Any]

    @property
    def n(self) -> int:
        return len(self.labels)


def _job(checkpoint: Path, settings: ExportConfig, device: torch.device) -> _Job:
    """The export of `checkpoint` with `settings`, its generator on `device`; errors in the request first."""
    state = load_checkpoint(checkpoint, map_location=device)
    G, info, z_dim = load_generator(state, settings.ema, device)
    labels = image_classes(settings, info)
    quality_cond = requested_quality(state, settings.quality_cond, checkpoint)
    if settings.output != "shards":
        _check_folder_names(info.class_names, checkpoint)
    return _Job(G, z_dim, info, labels, quality_cond, _record(checkpoint, settings, len(labels), quality_cond))


def _check_replaceable(out_dir: Path, record: dict[str, Any], previous: dict[str, Any] | None,
                       overwrite: bool) -> None:
    """ConfigError unless an export of `record` may be written into `out_dir`: a new or empty folder, an
    unfinished export of the same record, or (with `overwrite`) a finished export with other settings.
    What cgan-pipe did not write is never replaced, `overwrite` or not."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a folder to export into (a new one is made)")
    present = sorted(path.name for path in out_dir.iterdir() if path.name not in (LOCK_NAME, WORK_NAME)) \
        if out_dir.is_dir() else []
    ours = previous is not None or (_work_folder(out_dir) / _PLAN_NAME).is_file()  # a finished or killed export
    foreign = [name for name in present if name not in EXPORT_ENTRIES or not ours]
    if foreign:
        raise ConfigError(f"{out_dir} holds files cgan-pipe did not write ({_first_few(foreign)}); export into a "
                          f"new folder")
    if previous is not None and not overwrite:
        changed = sorted(key for key in record.keys() | previous.keys() if record.get(key) != previous.get(key))
        raise ConfigError(f"{out_dir} holds an export made with other settings ({', '.join(changed)} differ); "
                          f"choose a new folder, or pass --overwrite to replace it")


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def export_into_bucket(checkpoint: Path, url: str, settings: ExportConfig, *, device: torch.device,
                       overwrite: bool = False, progress: bool = True, rank: int = 0,
                       world_size: int = 1) -> ExportResult:
    """`export` into the bucket prefix `url`: each part is written in a local staging folder and uploaded
    (its shard, index and files, then its done record) as soon as it is finished, while the next is
    generated, so local disk holds at most two parts; the contact sheet, the shards' manifest and
    export.json go last, so the bucket never looks complete before it is. A killed run, rerun on any
    machine, keeps the parts finished in the bucket and gives the bucket an uninterrupted run gives.
    Objects under `url` that no export wrote are an error; an export with other settings is replaced only
    with `overwrite`. With `world_size` > 1 the ranks share the parts as for a folder, each staging its own,
    and rank 0 finishes the bucket."""
    checkpoint, url = Path(checkpoint), url.rstrip("/")
    job = _job(checkpoint, settings, device)
    shards_url, files_url = (None if settings.output == "files" else f"{url}/shards",
                             None if settings.output == "shards" else f"{url}/files")
    staging = staging_dir(url) / f"rank-{rank}" if world_size > 1 else staging_dir(url)
    work = staging / "export"
    parts = BucketParts(url, _parts(work), shards="shards/")
    previous = _bucket_record(url)  # a missing bucket, wrong credentials or endpoint fail here
    if world_size > 1:
        wait_for_all_ranks()  # every rank has read the record before rank 0 changes the bucket
    count = math.ceil(job.n / settings.shard_size)
    if previous == job.record:
        if rank == 0:
            parts.finish(count)  # the plan and records of a run killed just after writing export.json
        return ExportResult(url, files_url, shards_url, job.n, None, True)
    with folder_lock(staging):  # one writer per bucket prefix and rank on this machine
        try:
            claimed: dict[int, int] | ConfigError | None = \
                _claim_bucket(parts, job.record, previous, overwrite) if rank == 0 else None
        except ConfigError as error:
            claimed = error  # every rank stops with it
        claimed = all_ranks(claimed, world_size)[0]
        if isinstance(claimed, ConfigError):
            raise claimed
        mine = range(rank, count, world_size)
        done = {i: images for i, images in claimed.items() if i % world_size == rank}
        done.update(_upload_staged(work, parts, job.record, done, mine))
        shutil.rmtree(work, ignore_errors=True)  # what is left is of parts not finished
        _resume(work, job.record)
        todo = [i for i in mine if i not in done]
        log.info(f"{url}: {len(todo)} parts of up to {settings.shard_size} images to write in {work}, each uploaded "
                 f"once written; {len(claimed)} of {count} kept from an earlier run")
        start = time.perf_counter()
        with disk_full_explained(staging, "finished parts of the export are kept in the bucket"), \
                _Uploads(parts, work, job.record) as uploads:
            written = _write_parts(job, todo, work, settings, device, progress, sum(done.values()), uploads)
        seconds = time.perf_counter() - start
        if world_size > 1:
            wait_for_all_ranks()
        if rank == 0:
            _finish_in_bucket(parts, work, job, settings, count, checkpoint, device)
    published(staging, url)
    return ExportResult(url, files_url, shards_url, job.n, written / seconds if written else None, False)


def _bucket_record(url: str) -> dict[str, Any] | None:
    """The record of the finished export in the bucket prefix `url`, if there is one."""
    try:
        done = json.loads(read_bytes(f"{url}/{RECORD_NAME}"))
    except (ObjectMissing, ValueError):
        return None  # none, or unreadable: not a finished export
    if not isinstance(done, dict):
        return None
    done.pop("images", None)
    return done


def _claim_bucket(parts: BucketParts, record: dict[str, Any], previous: dict[str, Any] | None,
                  overwrite: bool) -> dict[int, int]:
    """Take the bucket prefix for the export `record` (`previous`: the finished export there): keep the parts
    of an unfinished export of the same record, record the plan, then delete every other object (export.json
    first). Returns the images of each part kept. ConfigError when the prefix holds objects no export wrote,
    or another export and not `overwrite`."""
    url, names = parts.url, parts.names
    found = object_sizes(url, recursive=True)
    foreign = sorted(name for name in found if name.split("/")[0] not in EXPORT_ENTRIES and name != names.plan_name
                     and not (name.endswith(".done.json") and names.number(name) is not None))
    if foreign:
        raise ConfigError(f"{url} holds objects cgan-pipe did not write ({_first_few(foreign)}); export into a new "
                          f"prefix")
    ours = parts.plan() == record  # an export of these settings, killed before it was complete
    if found and not ours and not overwrite:
        what = "an export made with other settings" if previous is not None else "an unfinished export"
        raise ConfigError(f"{url} holds {what}; choose a new prefix, or pass --overwrite to replace it")
    kept = parts.done(record, found) if ours else {}
    keep = {name for number, done in kept.items() for name in (*parts.objects(done), names.record_name(number))}
    write_object(f"{url}/{names.plan_name}", json.dumps(record).encode())  # first: a kill from here on resumes
    delete_objects(url, [RECORD_NAME] if RECORD_NAME in found else [])  # the old export is no longer complete
    delete_objects(url, [name for name in found if name not in keep and name not in (RECORD_NAME, names.plan_name)])
    abort_unfinished_uploads(url, lambda name: True)
    return {number: done["images"] for number, done in kept.items()}


def _upload_staged(work: Path, parts: BucketParts, record: dict[str, Any], done: dict[int, int],
                   mine: range) -> dict[int, int]:
    """Upload the parts of `mine` that a run killed before uploading them left finished in the staging folder
    `work` (not those `done` in the bucket); returns the images of each."""
    staged = _parts(work)
    if not staged.same_plan(record):
        return {}
    uploaded = {}
    for number, finished in sorted(staged.done().items()):
        if number in mine and number not in done:
            log.info(f"{parts.url}: uploading part {number}, written by a run that stopped before uploading it")
            parts.ship(work, number, finished, record)
            uploaded[number] = finished["images"]
    return uploaded


class _Uploads:
    """Parts of an export uploaded as they finish, on a thread of their own: a finished part waits for the
    one before it to be uploaded, so that at most two are on local disk, one uploading while the next is
    written. An upload's failure is raised at the next part, or on leaving the block."""

    def __init__(self, parts: BucketParts, work: Path, record: dict[str, Any]):
        self.parts, self.work, self.record = parts, work, record
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-upload")
        self.uploading: Future | None = None

    def __enter__(self) -> _Uploads:
        return self

    def __call__(self, number: int, done: dict[str, Any]) -> None:
        """Upload part `number`, recorded as `done` in the work folder, once the part before it is uploaded."""
        self._wait()
        self.uploading = self.thread.submit(self.parts.ship, self.work, number, done, self.record)

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if exc_info[0] is None:
                self._wait()
        finally:
            self.thread.shutdown(wait=True)

    def _wait(self) -> None:
        uploading, self.uploading = self.uploading, None
        if uploading is not None:
            uploading.result()


def _finish_in_bucket(parts: BucketParts, work: Path, job: _Job, settings: ExportConfig, count: int,
                      checkpoint: Path, device: torch.device) -> None:
    """Once all `count` parts are in the bucket: upload the contact sheet, the shards' manifest, then
    export.json; then delete the plan and the done records."""
    url = parts.url
    listed = {**object_sizes(url), **{f"shards/{name}": size for name, size in object_sizes(f"{url}/shards").items()}}
    records = parts.records(job.record, count, listed)
    with disk_full_explained(work, "the parts are all in the bucket; rerun the same command to finish"):
        _write_contact_sheet(work / CONTACT_SHEET, job, settings, device)
        upload_file(work / CONTACT_SHEET, f"{url}/{CONTACT_SHEET}")
        if settings.output != "files":
            manifest = _manifest(records, job, settings, checkpoint)
            upload_file(write_manifest(work / "shards", manifest), f"{url}/shards/{MANIFEST_NAME}")
    write_object(f"{url}/{RECORD_NAME}", (json.dumps({**job.record, "images": job.n}, indent=2) + "\n").encode())
    parts.finish(count)


def export_record(checkpoint: Path, settings: ExportConfig) -> dict[str, Any]:
    """What export.json records for an export of `checkpoint` with `settings`."""
    state = load_checkpoint(checkpoint)
    return _record(checkpoint, settings, len(image_classes(settings, checkpoint_dataset(state))),
                   requested_quality(state, settings.quality_cond, checkpoint))


def export_status(checkpoint: Path, out_dir: Path, settings: ExportConfig) -> tuple[str, str]:
    """What `export` would do, without doing it: ('up to date' | 'resume' | 'run', why)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    record = export_record(checkpoint, settings)
    previous = _previous_record(out_dir)
    if previous == record:
        return "up to date", f"{out_dir / RECORD_NAME} records these settings and this checkpoint"
    work = _work_folder(out_dir)
    if _parts(work).same_plan(record):
        return "resume", f"{len(_parts(work).done())} parts of this export are already written in {work}"
    if previous is not None:
        changed = sorted(key for key in record.keys() | previous.keys() if record.get(key) != previous.get(key))
        return "run", f"the export in {out_dir} was made with other settings ({', '.join(changed)})"
    return "run", f"nothing exported in {out_dir} yet"


def _record(checkpoint: Path, settings: ExportConfig, n: int, quality_cond: int | None) -> dict[str, Any]:
    """What export.json records, as JSON gives it back (tuples become lists), so reruns compare equal."""
    return json.loads(json.dumps({"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
                                  **asdict(settings), "n": n, "quality_cond": quality_cond}))


def image_classes(settings: ExportConfig, info: DatasetInfo) -> torch.Tensor:
    """Class id of each image to export (its length is the number of images): round robin over the
    requested classes (all by default), or that many of each class for per-class counts."""
    classes = settings.classes
    n = sum(classes.values()) if isinstance(classes, dict) else settings.n or DEFAULT_N
    free = available_memory(torch.device("cpu"))
    if 8 * n > free:  # the class id of every image is held while they are written
        raise ConfigError(f"export.n: {n:,} images (--n, --seeds or the --classes counts) would need {gib(8 * n)} "
                          f"of memory just for their class ids, more than the {gib(free)} free; export fewer at a "
                          f"time (each seed range is reproducible: --seeds A-B)")
    if not info.class_names:
        if classes:
            raise ConfigError("export classes: this model is unconditional; give no classes")
        return torch.zeros(n, dtype=torch.int64)
    unknown = [c for c in classes or () if c not in info.class_names]
    if unknown:
        raise ConfigError(f"export classes: unknown {', '.join(map(repr, unknown))}; "
                          f"the model knows {', '.join(info.class_names)}")
    if isinstance(classes, dict):
        return torch.tensor([info.class_names.index(c) for c, count in classes.items() for _ in range(count)],
                            dtype=torch.int64)
    ids = torch.tensor([info.class_names.index(c) for c in classes or info.class_names])
    return ids.repeat(n // len(ids) + 1)[:n]


def _write_parts(job: _Job, todo: list[int], work: Path, settings: ExportConfig, device: torch.device,
                 progress: bool, images_done: int,
                 finished: Callable[[int, dict[str, Any]], None] | None = None) -> int:
    """Generate the parts `todo` on this thread while a second one encodes and writes them, and hands each
    finished part (its number and done record) to `finished`; returns the number of images written."""
    labels = job.labels
    sizes = {i: min(settings.shard_size, len(labels) - i * settings.shard_size) for i in todo}
    bar = tqdm(total=images_done + sum(sizes.values()), initial=images_done, desc="export", unit="img",
               disable=not progress, dynamic_ncols=True)
    pending: Future | None = None  # at most one batch waits to be written while the next is generated
    part = None
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer") as writer_thread:
        try:
            for index in todo:
                part = _Part(index, work, settings, job, finished)
                first = index * settings.shard_size
                for start in range(first, first + sizes[index], settings.batch_size):
                    stop = min(start + settings.batch_size, first + sizes[index])
                    seeds = list(range(settings.seed + start, settings.seed + stop))
                    pixels = generate(job.G, job.z_dim, seeds, labels[start:stop], device, job.quality_cond,
                                      settings.truncation)
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
    and/or into the part's shard; `finish` records the part as done and hands it to `finished`."""

    def __init__(self, index: int, work: Path, settings: ExportConfig, job: _Job,
                 finished: Callable[[int, dict[str, Any]], None] | None):
        self.index, self.work, self.settings, self.finished = index, work, settings, finished
        self.quality_cond = job.quality_cond
        self.names = job.info.class_names or (UNLABELLED,)
        self.labelled = bool(job.info.class_names)
        self.checkpoint_sha256 = job.record["checkpoint_sha256"]
        self.source = Path(job.record["checkpoint"]).name
        self.quality = stored_quality(settings)
        self.classes: Counter[str] = Counter()
        self.folders: set[str] = set()  # class folders known to exist
        self.files: list[str] = []  # the files written, relative to the work folder
        self.shard = None
        if settings.output != "files":
            self.shard = ShardWriter(work / "shards", settings.shard_size, first_index=index)

    def add(self, seeds: list[int], labels: list[int], pixels: torch.Tensor) -> int:
        """Encode and write one batch; returns its number of images."""
        s = self.settings
        encoded = images.encode_batch(pixels, s.format, s.quality, subsampling=s.jpeg_subsampling,
                                      compress_level=s.png_compress_level, lossless=s.webp_lossless)
        ext = images.EXTENSIONS[s.format]
        asked = f"-qc{self.quality_cond}" if self.quality_cond is not None else ""
        for seed, label, data in zip(seeds, labels, encoded):
            name = self.names[label]
            if s.output != "shards":
                if name not in self.folders:
                    (self.work / "files" / name).mkdir(parents=True, exist_ok=True)
                    self.folders.add(name)
                file_name = f"files/{name}/seed{seed:07d}-c{label}-q{self.quality or 0}{asked}.{ext}"
                _write_file(self.work / file_name, data)
                self.files.append(file_name)
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
        """Close the shard, mark the part done and hand it on; returns 0 (its images were counted batch by
        batch)."""
        shards = self.shard.close() if self.shard is not None else []
        done = {"images": sum(self.classes.values()), "classes": dict(self.classes),
                "shard": asdict(shards[0]) if shards else None, "files": self.files}
        _parts(self.work).mark_done(self.index, done)
        if self.finished is not None:
            self.finished(self.index, done)
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


def _write_contact_sheet(path: Path, job: _Job, settings: ExportConfig, device: torch.device) -> None:
    """Write the first images of the export as one PNG grid at `path`."""
    from PIL import Image
    from torchvision.utils import make_grid

    first = list(range(min(CONTACT_SHEET_IMAGES, job.n)))
    pixels = generate(job.G, job.z_dim, [settings.seed + i for i in first], job.labels[first], device,
                      job.quality_cond, settings.truncation).cpu()
    grid = make_grid(pixels, nrow=math.ceil(math.sqrt(len(pixels))), padding=2, pad_value=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _resume(work: Path, record: dict) -> None:
    """Keep the finished parts of an unfinished export of the same record in `work`; start afresh otherwise.
    Temp files of a killed run are removed either way."""
    if not _parts(work).same_plan(record):
        shutil.rmtree(work, ignore_errors=True)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    _parts(work).resume(record)
    remove_stale_temps(work)  # e.g. the contact sheet's


SHARD_SAMPLE_BYTES = 3 * 1024  # the least a sample takes in a tar: image, .cls and .json, each a header and a block
FILE_BYTES = 64  # less than any image file written (JPEG, PNG and WebP headers alone are longer)


def _check_room(out_dir: Path, n: int, settings: ExportConfig) -> None:
    """ConfigError when `n` images cannot fit on the file system of `out_dir` even at the least they take:
    a request for a trillion images is refused at once, not after the disk is full."""
    place = next(folder for folder in (out_dir.absolute(), *out_dir.absolute().parents) if folder.exists())
    disk = os.statvfs(place)
    free = disk.f_bavail * disk.f_frsize
    need = n * ((FILE_BYTES if settings.output != "shards" else 0) + (SHARD_SAMPLE_BYTES if settings.output != "files"
                                                                       else 0))
    files_short = settings.output != "shards" and disk.f_files and n > disk.f_favail  # a file per image
    if need > free or files_short:
        lack = f"{n:,} files, where {disk.f_favail:,} more fit" if files_short else \
            f"at least {gib(need)}, where {gib(free)} are free"
        raise ConfigError(f"export.n: {n:,} images (--n, --seeds or the --classes counts) into {out_dir} need {lack}; "
                          f"export fewer, or into a larger file system")


def _finish(work: Path, out_dir: Path, job: _Job, settings: ExportConfig, parts: int, checkpoint: Path) -> None:
    """Write the manifest of a work folder whose parts are all done, move its outputs into `out_dir` in place of
    an earlier export's, and write export.json there last, so that `out_dir` never looks complete before it is."""
    done = _parts(work).done()
    missing = [i for i in range(parts) if i not in done]
    if missing:
        raise DataError(f"{out_dir}: {len(missing)} of {parts} parts are not written (e.g. part {missing[0]}); "
                        f"rerun the same command to finish them")
    if settings.output == "files":
        shutil.rmtree(work / "shards")
    else:
        write_manifest(work / "shards", _manifest([done[i] for i in range(parts)], job, settings, checkpoint))
    (out_dir / RECORD_NAME).unlink(missing_ok=True)  # first: what follows no longer matches it
    for name in EXPORT_ENTRIES:  # an earlier export's (only such entries are there: _check_replaceable)
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for name in EXPORT_ENTRIES:
        if (work / name).exists():
            (work / name).rename(out_dir / name)
    write_text_atomic(out_dir / RECORD_NAME, json.dumps({**job.record, "images": job.n}, indent=2) + "\n")
    shutil.rmtree(work)  # the plan and the done records


def _manifest(records: list[dict[str, Any]], job: _Job, settings: ExportConfig, checkpoint: Path) -> Manifest:
    """The manifest of the exported shards, from the done records of all parts, in order."""
    names = job.info.class_names or (UNLABELLED,)
    classes: Counter[str] = Counter()
    for part in records:
        classes.update(part["classes"])
    return Manifest(
        created_by="export", source=str(checkpoint), settings=job.record, resolution=job.info.resolution,
        image_format=settings.format, class_names=list(job.info.class_names),
        shards=[ShardInfo(**part["shard"]) for part in records],
        class_histogram={name: classes[name] for name in names},
        quality_histogram={str(stored_quality(settings)): job.n},
    )


def _work_folder(out_dir: Path) -> Path:
    """Where the export into `out_dir` is built until it is complete."""
    return out_dir / WORK_NAME


def _previous_record(out_dir: Path) -> dict | None:
    """The record of the finished export in `out_dir`, if there is one."""
    try:
        done = json.loads((out_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict):
        return None
    done.pop("images", None)
    return done
