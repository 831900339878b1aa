"""Prepare: raw images -> shuffled webdataset tar shards (shard_format.py), a DALI index per shard, a manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import random
import tempfile
import threading
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, ImageOps
from tqdm import tqdm

from .. import images
from ..atomic import disk_full_explained
from ..compression import estimate_jpeg_quality, estimate_jpeg_quality_zigzag
from ..config import DataConfig, default_cache_dir, parse_byte_size
from ..errors import ConfigError, DataError
from ..lock import folder_lock
from ..processes import process_pool
from ..resumable import ResumableParts
from .fingerprint import source_fingerprint
from ..locations import is_url
from .bucket import UPLOAD_THREADS, delete_objects, object_sizes, published, staging_dir, upload_file
from .bucket_parts import BucketParts
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, read_remote_manifest, write_manifest
from . import tars
from .shard_format import SHARD_NAME, ShardSample, ShardWriter, sample_files
from .inputs import DUPLICATE, count_by_kind, counts_text, left_out, left_out_because
from .listing import Listing, SourceItem, shuffled_positions
from .sources import ItemReader, RawImage, is_decompressed_name, open_source

log = logging.getLogger(__name__)
EXIF_ORIENTATION = 0x0112
_PLAN_NAME = ".prepare-plan.json"  # the settings an unfinished prepare in this folder was run with


def _parts(out_dir: Path) -> ResumableParts:
    """An unfinished prepare's shards, and their done records (ShardInfo, skips, histograms), in `out_dir`."""
    return ResumableParts(out_dir, out_dir, _PLAN_NAME, ".shard-")


# The data keys that decide a shard set's bytes, as its manifest records them (in this order).
RECORDED_KEYS = ("resolution", "format", "quality", "shard_size", "limit", "seed", "split", "max_pixels", "resize",
                 "jpeg_subsampling", "png_compress_level", "webp_lossless", "qualities", "quality_mode", "reencode",
                 "shard_bytes")


def prepare(data: DataConfig, out_dir: Path | str, *, seed: int = 0, rank: int = 0, world_size: int = 1,
            progress: bool = True) -> tuple[Manifest | None, bool]:
    """Turn the raw images at `data.source` into a complete shard set in `out_dir`: a folder, or a bucket
    prefix (s3://...), into which each shard is uploaded as soon as it is written (`_Bucket`).

    Images are shuffled (by `seed`) before writing, since DALI only shuffles within
    a buffer; shard i holds the i-th run of `shard_size` inputs, less the
    undecodable ones, which are skipped and listed with the reason. Shards are
    written by `data.workers` processes (default: all cores) and the result does not
    depend on their number. A killed run rerun with the same settings keeps the
    shards it finished and writes the rest. Returns the manifest and whether the
    existing shard set was already complete (in which case nothing is written).

    With `world_size` > 1 (many machines on a shared folder or bucket), this call
    writes only the shards of `rank` (shard i belongs to rank i % world_size) and
    returns no manifest; `merge_shards(out_dir)` writes it once every rank is done.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    out: _Folder | _Bucket = _Bucket(str(out_dir), data, rank, world_size) if is_url(out_dir) else \
        _Folder(Path(out_dir), data, rank, world_size)
    recorded = recorded_settings(data, seed)
    existing = out.complete(recorded)
    if existing is not None:
        return existing, True

    workers = data.workers or os.cpu_count() or 1
    counter = multiprocessing.get_context("spawn").Value("q", 0)  # images written, by any process
    with contextlib.ExitStack() as held:  # the destination's lock, from the first change to it
        with contextlib.ExitStack() as stack:
            # The pool starts first, so that its processes start up while the source is listed.
            pool = stack.enter_context(_start_pool(workers, counter)) if workers > 1 else None
            if pool is None:  # written here: count here
                _count_into(counter)
                stack.callback(_count_into, None)
            src = stack.enter_context(open_source(data.source, data.split, data.download_dir,
                                                  scratch_dir=out.shards_dir))
            listing = src.items
            inputs = min(len(listing), data.limit or len(listing))  # the first of the seeded order
            input_bytes = _probe_input_bytes(listing, inputs, src.reader, src.class_names, data, seed) \
                if data.shard_bytes is not None or isinstance(out, _Bucket) else None
            per_shard = _inputs_per_shard(data, input_bytes)
            jobs = [
                _ShardJob(index=i, first_key=first, count=min(per_shard, inputs - first), listing=listing,
                          reader=src.reader, data=data, seed=seed, class_names=src.class_names,
                          out_dir=out.shards_dir)
                for i, first in enumerate(range(0, inputs, per_shard))
            ]
            plan = {"settings": recorded, "jobs": len(jobs), "inputs": inputs, "inputs_per_shard": per_shard,
                    "class_names": src.class_names, "rejected": src.rejected, "files": src.files}
            mine = {job.index for job in jobs if job.index % world_size == rank}
            shard_bytes = per_shard * input_bytes if input_bytes is not None else None
            out.check_room(shard_bytes, per_shard)
            # Only now that the source is known to be readable may an old shard set be touched, and only the
            # files cgan-pipe wrote: another process's writing, or a user's file in the way, stops it here.
            done = out.claim(plan, len(jobs), held)
            todo = [job for job in jobs if job.index in mine and job.index not in done]
            log.info(f"{src.description}: {inputs} of its {src.files} files to read into {len(jobs)} shards of up to "
                     f"{per_shard} images ({len(src.rejected)} left out unread); "
                     f"{len(todo)} to write with {workers} worker(s), {len(done)} kept from an earlier run")
            counter.value = sum(jobs[i].count for i in done)
            stack.enter_context(_progress_bar(counter, sum(jobs[i].count for i in mine), progress))
            try:
                with disk_full_explained(out.shards_dir, "finished shards are kept"):
                    _write_all(pool, workers, todo, out, shard_bytes)
            except BrokenProcessPool:
                raise DataError(f"a prepare worker died (out of memory?) while writing {out_dir}; finished shards "
                                f"are kept: rerun the same command to resume, with fewer --workers if memory is short"
                                ) from None
            out.written()

        if world_size > 1:
            return None, False
        with disk_full_explained(out.shards_dir, "the shards are all written, only the manifest is missing"):
            return out.merge(), False


def _write_all(pool: ProcessPoolExecutor | None, workers: int, todo: list[_ShardJob], out: _Folder | _Bucket,
               shard_bytes: float | None) -> None:
    """Write the shards of `todo` (in `pool`'s `workers` processes, else here) and hand each to `out` as it is
    done, with no more than `out.scratch` bytes of shards (about `shard_bytes` each) written and not yet
    handed over (`out.finished` returns a future while it still needs the files)."""
    writing: dict[Future, _ShardJob] = {}
    handing: dict[Future, int] = {}  # future -> the shard's bytes on disk until it completes

    def settle() -> None:
        finished, _ = wait([*writing, *handing], return_when=FIRST_COMPLETED)
        for future in finished:
            if future in handing:
                handing.pop(future)
                future.result()  # an upload's failure stops the prepare
                continue
            job, record = writing.pop(future), future.result()
            after = out.finished(job.index, record)
            if after is not None:
                handing[after] = record["shard"]["bytes"] if record["shard"] else 0

    def held() -> float:
        return len(writing) * (shard_bytes or 0) + sum(handing.values())

    for job in todo:
        if pool is None:  # one process: write, then hand over (waiting for the upload before the next)
            after = out.finished(job.index, _write_job(job))
            if after is not None:
                after.result()
            continue
        while writing or handing:
            room = out.scratch is None or held() + (shard_bytes or 0) <= out.scratch
            if room and len(writing) < 2 * workers:
                break
            settle()
        writing[pool.submit(_write_job, job)] = job
    while writing or handing:
        settle()


class _Folder:
    """Where prepare writes a shard set in a folder: the shards in place, the manifest written last."""

    scratch = None  # no bound on the shards written at once

    def __init__(self, out_dir: Path, data: DataConfig, rank: int, world_size: int):
        self.out_dir, self.rank, self.world_size = out_dir, rank, world_size
        self.shards_dir = out_dir
        _check_outside_source(data.source, out_dir)

    def complete(self, recorded: dict[str, Any]) -> Manifest | None:
        """The folder's manifest when it is complete for the settings `recorded`, else None."""
        if (self.out_dir / MANIFEST_NAME).exists():
            try:
                existing = read_manifest(self.out_dir)
                if existing.settings == recorded:
                    return existing
            except DataError:
                pass  # unusable manifest: rebuild
        return None

    def claim(self, plan: dict[str, Any], parts: int, held: contextlib.ExitStack) -> dict[int, dict[str, Any]]:
        """Take the folder (its lock, held by `held`) for `plan` and return the finished parts kept."""
        mine = self._mine
        if self.rank == 0:
            held.enter_context(folder_lock(self.out_dir))
        owned = _our_files(self.out_dir, parts, mine)
        done = _parts(self.out_dir).resume(plan, mine=mine, owned=owned)
        if self.world_size == 1:  # several ranks leave it to the merge, as one may not have read it yet
            (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # it no longer describes the folder
        return done

    def check_room(self, shard_bytes: float | None, per_shard: int) -> None:
        """A folder takes shards of any size."""

    def finished(self, number: int, record: dict[str, Any]) -> None:
        """A shard is written in place: nothing more to do."""

    def written(self) -> None:
        """Every shard of this rank is written: nothing more to do."""

    def merge(self) -> Manifest:
        """The manifest, written once every shard is (one rank)."""
        return merge_shards(self.out_dir)

    def _mine(self, number: int) -> bool:
        return number % self.world_size == self.rank


class _Bucket:
    """Where prepare writes a shard set in a bucket prefix: each shard is written in a local staging folder,
    uploaded (its index, then its done record after it) as soon as it is complete, and deleted locally, with
    at most `data.upload_scratch` bytes of shards on local disk; the manifest goes last (`merge_shards`).
    The bucket holds what is done, so a killed run resumes on any machine to the bucket an uninterrupted
    run gives, and the ranks of a job share one prefix, each its own shards."""

    def __init__(self, url: str, data: DataConfig, rank: int, world_size: int):
        self.url, self.data, self.rank, self.world_size = url.rstrip("/"), data, rank, world_size
        self.scratch = parse_byte_size(data.upload_scratch)
        staging = staging_dir(self.url)
        self.shards_dir = staging / f"rank-{rank}" if world_size > 1 else staging
        self.parts = BucketParts(self.url, _parts(self.shards_dir))
        self.listed: dict[str, int] = {}  # the prefix's objects when prepare started, with their sizes
        self.plan: dict[str, Any] = {}
        self.records: dict[int, dict[str, Any]] = {}  # this rank's finished parts: uploaded, or uploading

    def complete(self, recorded: dict[str, Any]) -> Manifest | None:
        """The bucket's manifest when it is complete for the settings `recorded` (and the records of a run
        killed just after writing it removed), else None."""
        self.listed = object_sizes(self.url)  # a missing bucket, wrong credentials or endpoint fail here, at once
        if MANIFEST_NAME not in self.listed:
            return None
        try:
            existing = read_remote_manifest(self.url)
        except DataError:
            return None  # unusable manifest: rebuild
        if existing.settings != recorded:
            return None
        if self.rank == 0 and any(name == self.parts.names.plan_name or name.endswith(".done.json")
                                  for name in self.listed):
            self.parts.finish(len(existing.shards), self.listed)
        return existing

    def claim(self, plan: dict[str, Any], parts: int, held: contextlib.ExitStack) -> dict[int, dict[str, Any]]:
        """Take the prefix for `plan`: the manifest is removed first (it no longer describes the prefix); the
        parts of this rank finished in the bucket are kept, those finished in the staging folder but not
        uploaded are uploaded now. Returns the finished parts."""
        self.plan = plan
        held.enter_context(folder_lock(self.shards_dir))  # one writer per prefix and rank on this machine
        self.uploads = held.enter_context(ThreadPoolExecutor(max_workers=UPLOAD_THREADS))
        listed_manifest = _remote_listed(self.url) if MANIFEST_NAME in self.listed else set()
        unfinished = self.parts.plan() is not None

        def owned(name: str) -> bool:
            return name in listed_manifest or unfinished or name.endswith(".done.json")

        delete_objects(self.url, [MANIFEST_NAME] if MANIFEST_NAME in self.listed else [])
        done = self.parts.claim(plan, self.listed, self._mine, owned)
        staged = _parts(self.shards_dir)
        for number, record in staged.resume(plan, mine=self._mine).items():
            if number not in done:
                log.info(f"{self.url}: uploading shard {number}, written by a run that stopped before uploading it")
                self.parts.ship(self.shards_dir, number, record, plan)
                done[number] = record
        for path in staged.files(self._mine):  # all in the bucket now: the local copies go
            path.unlink()
        log.info(f"{self.url}: preparing in {self.shards_dir}, each shard uploaded once written "
                 f"(at most {self.scratch / 1e6:,.0f} MB of them held locally: data.upload_scratch)")
        self.records = dict(done)
        return done

    def check_room(self, shard_bytes: float | None, per_shard: int) -> None:
        """ConfigError unless a shard of about `shard_bytes` (`per_shard` inputs) fits in the scratch."""
        if shard_bytes is not None and shard_bytes > self.scratch:
            raise ConfigError(f"data.upload_scratch: {self.data.upload_scratch} is less than one shard (about "
                              f"{shard_bytes / 1e6:,.1f} MB for {per_shard} images); raise it (--upload-scratch), "
                              f"or make shards smaller (data.shard_size, data.shard_bytes)")

    def finished(self, number: int, record: dict[str, Any]) -> Future:
        """Upload the shard just written (in a thread); the future completes once its local copy is gone."""
        self.records[number] = record
        return self.uploads.submit(self.parts.ship, self.shards_dir, number, record, self.plan)

    def written(self) -> None:
        """Every shard of this rank is in the bucket: the staging folder goes."""
        published(self.shards_dir, self.url)

    def merge(self) -> Manifest:
        """The manifest, from the records of the parts this process finished or found finished (one rank:
        all of them), uploaded last."""
        return _merge_in_bucket(self.url, [self.records[number] for number in range(self.plan["jobs"])])

    def _mine(self, number: int) -> bool:
        return number % self.world_size == self.rank


def _remote_listed(url: str) -> set[str]:
    """The shard and index names of the manifest in the bucket at `url` (empty when it is unreadable)."""
    try:
        return {name for shard in read_remote_manifest(url).shards for name in (shard.tar, shard.index)}
    except DataError:
        return set()


def _check_outside_source(source: str, out_dir: Path) -> None:
    """ConfigError when `out_dir` is the folder `source` or inside it: its shards (and anything written beside
    them) would be read back as images by the next prepare."""
    root = Path(source).expanduser()
    if not root.is_dir():
        return
    root, out = root.resolve(), out_dir.resolve()
    if out == root or root in out.parents:
        raise ConfigError(f"{out_dir} is inside the source {source}: its shards would become inputs of the next "
                          f"prepare; write them to a folder outside {source}")


def _our_files(out_dir: Path, parts: int, mine: Callable[[int], bool]) -> Callable[[str], bool]:
    """Which files named as shards (or their records and temps) in `out_dir` an earlier prepare wrote: those its
    manifest lists, those of the parts its unfinished plan numbers, and its hidden records and temps. ConfigError
    naming the first file that is not, among the `parts` parts of `mine` this prepare will write, or when
    manifest.json is not one cgan-pipe wrote: prepare never replaces or deletes what it did not write."""
    resumable = _parts(out_dir)
    present = resumable.files(mine)  # listed before the evidence is read: another rank's plan precedes its shards
    manifest = out_dir / MANIFEST_NAME
    listed: set[str] = set()
    if manifest.exists() or manifest.is_symlink():
        listed = _listed_in_manifest(manifest)
    try:
        planned = json.loads((out_dir / _PLAN_NAME).read_text())["jobs"]
    except (OSError, ValueError, KeyError, TypeError):
        planned = 0

    def owned(name: str) -> bool:
        number = resumable.number(name)
        return name in listed or name.startswith(".") or (number is not None and number < planned)

    foreign = [path for path in present if not owned(path.name) and resumable.number(path.name) < parts]
    if foreign:
        raise ConfigError(f"{foreign[0]}: a file cgan-pipe did not write (no manifest or unfinished prepare in "
                          f"{out_dir} lists it) is where prepare would write a shard; prepare into another folder, "
                          f"or move it away")
    return owned


def _listed_in_manifest(path: Path) -> set[str]:
    """The shard and index names the manifest at `path` lists, read leniently (an older format, or shards
    missing); ConfigError when it is not a manifest cgan-pipe wrote."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or "format_version" not in data or not isinstance(data.get("shards"), list):
        raise ConfigError(f"{path}: not a manifest cgan-pipe wrote, so {path.parent} holds another program's "
                          f"files; prepare into another folder, or move it away")
    return {shard[key] for shard in data["shards"] if isinstance(shard, dict)
            for key in ("tar", "index") if isinstance(shard.get(key), str)}


def recorded_settings(data: DataConfig, seed: int) -> dict[str, Any]:
    """The settings as a manifest records them, with the content hash of the source's files: as
    JSON gives them back, so that a rerun compares equal."""
    fingerprint = source_fingerprint(data.source, default_cache_dir())
    values = {key: getattr(data, key, None) for key in RECORDED_KEYS}
    values.update(seed=seed, shard_bytes=_shard_bytes(data))
    return json.loads(json.dumps({"source": data.source, "source_sha256": fingerprint, **values}))


def prepare_status(data: DataConfig, out_dir: Path, seed: int = 0) -> tuple[str, str]:
    """What `prepare` would do in `out_dir`, without doing it: ('up to date' | 'resume' | 'run', why)."""
    source = data.source
    out_dir = Path(out_dir)
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        manifest = None
    recorded = recorded_settings(data, seed)
    if recorded["source_sha256"] is None:
        return "run", f"the data source {source} does not exist: prepare will fail"
    if manifest is not None and manifest.settings == recorded:
        return "up to date", f"{out_dir / MANIFEST_NAME} was made from this source with these settings"
    if manifest is not None:
        changed = sorted(k for k in recorded.keys() | manifest.settings.keys()
                         if recorded.get(k) != manifest.settings.get(k))
        if changed == ["source_sha256"] and "source_sha256" not in manifest.settings:
            return "run", (f"{out_dir / MANIFEST_NAME} records no content hash of its source (an older cgan-pipe "
                           f"made it): prepare runs again to record one; the later stages run only if the shards "
                           f"come out different")
        if changed == ["source_sha256"]:
            return "run", (f"the files of {source} changed since the shards were made (sha256 "
                           f"{manifest.settings['source_sha256'][:12]}..., now {recorded['source_sha256'][:12]}...)")
        return "run", f"the shards were made with other data settings ({', '.join(changed)})"
    if (out_dir / _PLAN_NAME).exists():
        return "resume", f"a prepare stopped midway in {out_dir}; its finished shards are kept if its settings match"
    return "run", f"no shard set in {out_dir} yet"


def merge_shards(out_dir: Path | str) -> Manifest:
    """Write the manifest of an unfinished prepare whose shards are all written (by any ranks), in a folder
    or, uploaded last, in a bucket prefix.

    Raises DataError naming the missing shards when some rank has not finished.
    """
    if is_url(out_dir):
        return _merge_in_bucket(str(out_dir).rstrip("/"))
    out_dir = Path(out_dir)
    try:
        plan = json.loads((out_dir / _PLAN_NAME).read_text())
    except (OSError, ValueError):
        raise DataError(f"{out_dir}: no unfinished prepare to merge (no {_PLAN_NAME}); "
                        f"run `cgan-pipe prepare` there first") from None
    with folder_lock(out_dir):
        done = _parts(out_dir).done()
        missing = [SHARD_NAME.format(i) for i in range(plan["jobs"]) if i not in done]
        if missing:
            raise DataError(f"{out_dir}: {len(missing)} of {plan['jobs']} shards are not written yet "
                            f"(e.g. {', '.join(missing[:5])}); finish every rank, then merge")
        manifest = _planned_manifest(plan, [done[i] for i in range(plan["jobs"])])
        write_manifest(out_dir, manifest)
        _parts(out_dir).finish()
        for path in out_dir.iterdir():  # a decompressed source, or a killed run's temp of it
            if is_decompressed_name(path.name):
                path.unlink()
        return manifest


def _merge_in_bucket(url: str, records: list[dict[str, Any]] | None = None) -> Manifest:
    """`merge_shards` for a bucket prefix: the manifest from the done records of all parts (`records`, else
    read from the bucket), uploaded last, then the records and the plan removed."""
    parts = BucketParts(url, _parts(staging_dir(url)))
    plan = parts.plan()
    if plan is None:
        raise DataError(f"{url}: no unfinished prepare to merge (no {_PLAN_NAME}); run `cgan-pipe prepare` "
                        f"there first")
    manifest = _planned_manifest(plan, records if records is not None else parts.records(plan, plan["jobs"]))
    with tempfile.TemporaryDirectory(prefix="cgan-pipe-manifest-") as folder:
        upload_file(write_manifest(Path(folder), manifest), f"{url}/{MANIFEST_NAME}")
    parts.finish(plan["jobs"])
    return manifest


def _planned_manifest(plan: dict[str, Any], results: list[dict[str, Any]]) -> Manifest:
    """The manifest of the prepare `plan` from the records of all its parts, in order; DataError when no
    input could be used."""
    settings, class_names = plan["settings"], plan["class_names"]
    shards = [ShardInfo(**r["shard"]) for r in results if r["shard"] is not None]
    unusable = [entry for r in results for entry in r["skipped"]]
    skipped = list(plan["rejected"]) + unusable
    if not shards:
        kinds = counts_text(count_by_kind(skipped))
        raise DataError(f"{settings['source']}: none of its {plan['files']} files could be used ({kinds}; e.g. "
                        f"{skipped[0]['source']}: {skipped[0]['reason']})" if skipped else
                        f"{settings['source']}: no images")
    kept = plan["inputs"] - len(unusable)
    inputs = {"files": plan["files"], "kept": kept, "skipped": len(skipped),
              "beyond_limit": plan["files"] - kept - len(skipped)}
    classes, qualities = Counter(), Counter()
    for r in results:
        classes.update(r["classes"])
        qualities.update(r["qualities"])
    return Manifest(
        created_by="prepare", source=settings["source"], settings=settings, resolution=settings["resolution"],
        image_format=settings["format"], class_names=class_names, shards=shards,
        class_histogram={name: classes[name] for name in class_names},
        quality_histogram=dict(sorted(qualities.items())), skipped=skipped, inputs=inputs,
    )


_PROBE_INPUTS = 256  # inputs encoded to size shards by bytes
_COUNT_EVERY = 64  # images between progress reports of a worker
_images_done = None  # per process: the shared count of images written, for the progress bar


def _count_into(counter: Any) -> None:
    """Make this process add the images it writes to `counter` (a shared integer), or stop (None)."""
    global _images_done
    _images_done = counter


def _count_done(n: int) -> None:
    if _images_done is not None:
        with _images_done.get_lock():
            _images_done.value += n


@contextlib.contextmanager
def _start_pool(workers: int, counter: Any) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` spawned processes, started at once, that count the images they write
    into `counter`."""
    with process_pool(workers, _count_into, counter) as pool:
        pool.submit(os.getpid)  # a pool starts its processes on the first task
        yield pool


@contextlib.contextmanager
def _progress_bar(counter: Any, total: int, enabled: bool) -> Iterator[None]:
    """Show a bar of `counter` (images written by any process) out of `total`, refreshed from a thread."""
    bar = tqdm(total=total, desc="prepare", unit="img", disable=not enabled, dynamic_ncols=True)
    stop = threading.Event()

    def refresh() -> None:
        while True:
            bar.update(counter.value - bar.n)
            if stop.wait(0.25):
                return

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(counter.value - bar.n)
        bar.close()


def _shard_bytes(data: DataConfig) -> int | None:
    return parse_byte_size(data.shard_bytes) if data.shard_bytes is not None else None


def _inputs_per_shard(data: DataConfig, input_bytes: float | None) -> int:
    """Inputs per shard: from `shard_size` samples, or, with `shard_bytes`, from the mean tar bytes of an
    input's samples (`input_bytes`), so shards come out near it."""
    variants = _variants_per_input(data)
    if data.shard_bytes is None or not input_bytes:
        return max(1, data.shard_size // variants)
    return max(1, int(_shard_bytes(data) / input_bytes))


def _probe_input_bytes(listing: Listing, inputs: int, reader: ItemReader, class_names: list[str],
                       data: DataConfig, seed: int) -> float | None:
    """The mean tar bytes of the samples of one input, from up to 256 inputs spread evenly over the (seeded)
    order and encoded as prepare will; None when none of them can be used."""
    sizes = []
    for position in range(0, inputs, max(1, inputs // _PROBE_INPUTS))[:_PROBE_INPUTS]:
        item, duplicate = listing.entry(int(shuffled_positions(position, 1, len(listing), seed)[0]))
        if duplicate:
            continue
        try:
            samples = encode_for_shard(reader.read(item), item, class_names, data,
                                       _qualities_for(data, seed, position))
        except (images.BadImage, DataError):
            continue
        sizes.append(sum(len(tars.member_bytes(name, content))
                         for image, ext, meta in samples
                         for name, content in sample_files(ShardSample(f"{position:08d}", image, ext, item.label,
                                                                       meta))))
    return sum(sizes) / len(sizes) if sizes else None


@dataclass
class _ShardJob:
    """One shard's worth of inputs, written by one worker: positions first_key .. first_key + count - 1
    of the seeded order of the listing."""

    index: int
    first_key: int
    count: int
    listing: Listing
    reader: ItemReader
    data: DataConfig
    seed: int
    class_names: list[str]
    out_dir: Path


def _write_job(job: _ShardJob) -> dict[str, Any]:
    """Encode and write one shard (in a worker); record it as done; return its record."""
    classes, qualities = Counter(), Counter()
    skipped: list[dict[str, str]] = []
    order = shuffled_positions(job.first_key, job.count, len(job.listing), job.seed)
    with ShardWriter(job.out_dir, job.count * _variants_per_input(job.data), first_index=job.index) as writer, \
            warnings.catch_warnings():
        # Pillow warns about oddities of files it still decodes (corrupt EXIF, a malformed MPO): lines by
        # the thousand on a large archive, about images kept all the same
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for start in range(0, job.count, _COUNT_EVERY):
            chunk = order[start:start + _COUNT_EVERY]
            for position, listed in enumerate(chunk.tolist(), job.first_key + start):  # position: in the order
                item, duplicate = job.listing.entry(listed)
                if duplicate:
                    skipped.append(left_out(item.path, DUPLICATE, "the first copy is used"))
                    continue
                try:
                    variants = encode_for_shard(job.reader.read(item), item, job.class_names, job.data,
                                                _qualities_for(job.data, job.seed, position))
                except (images.BadImage, DataError) as exc:
                    skipped.append(left_out_because(item.path, exc))
                    continue
                except Exception as exc:  # noqa: BLE001  one odd file never stops an archive's prepare
                    log.warning(f"{item.path}: unexpected {type(exc).__name__} while converting it ({exc}); "
                                f"skipped. Please report it with the file.")
                    skipped.append(left_out(item.path, images.CANNOT_DECODE, f"{type(exc).__name__}: {exc}"))
                    continue
                for variant, (data, ext, meta) in enumerate(variants):
                    key = position * len(variants) + variant
                    writer.add(ShardSample(f"{key:08d}", data, ext, item.label, meta))
                    classes[meta["class"]] += 1
                    qualities[str(meta["quality"])] += 1
            _count_done(len(chunk))
        shards = writer.close()
    record = {"shard": asdict(shards[0]) if shards else None, "skipped": skipped,
              "classes": dict(classes), "qualities": dict(qualities)}
    _parts(job.out_dir).mark_done(job.index, record)
    return record


def _qualities_for(data: DataConfig, seed: int, position: int) -> list[int] | None:
    """The qualities input number `position` is written at: all of `data.qualities`, one of
    them drawn from a generator seeded by (seed, position), or None for the single default sample."""
    if not data.qualities:
        return None
    if data.quality_mode == "all":
        return list(data.qualities)
    return [random.Random(f"{seed}:{position}").choice(data.qualities)]


def _variants_per_input(data: DataConfig) -> int:
    return len(data.qualities) if data.qualities and data.quality_mode == "all" else 1


def _exif_rotated(image: Image.Image) -> bool:
    """Whether the image's EXIF block says the camera's "this side up" is not the stored top (a damaged
    EXIF block says nothing); getexif parses nothing when the file has no EXIF block."""
    if "exif" not in image.info and "Raw profile type exif" not in image.info:  # PNG keeps it in a text chunk
        return False
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001  a damaged EXIF block raises many types
        return False


def encode_for_shard(raw: RawImage, item: SourceItem, class_names: list[str], settings: DataConfig,
                     qualities: list[int] | None = None) -> list[tuple[bytes, str, dict[str, Any]]]:
    """Validate one raw image and return its shard samples as (bytes, member extension, metadata).

    Without `qualities`: one sample. A JPEG already at the target size, in RGB, is
    passed through untouched (no second lossy encode; unless `settings.reencode`),
    its quality estimated from its quantisation tables; anything else is converted
    to RGB, fitted to the resolution and encoded at the configured format and
    quality. With `qualities`: one re-encoded sample per quality. Raises
    images.BadImage when the image cannot be used.
    """
    size = settings.resolution
    # Plain colour JPEGs (most inputs) skip Pillow's header parser: a few microseconds instead of tens.
    header = images.plain_jpeg_header(raw.data) if raw.data is not None else None
    frames = 1
    if header is not None and header.width * header.height <= settings.max_pixels:
        image, source_format = images.decode_plain_jpeg(raw.data, header), "JPEG"
    elif raw.data is not None:
        image, frames = images.decode_first_frame(raw.data, settings.max_pixels)
        source_format = image.format
    else:
        image = Image.fromarray(raw.pixels, "RGB")
        source_format = None
    meta: dict[str, Any] = {
        "source": item.path,
        "class": class_names[item.label] if item.label is not None else None,
        "width": image.width,
        "height": image.height,
    }
    if frames != 1:  # an animation, a multi-page TIFF, ...
        meta.update(frames=frames, frame=0)  # frames: None when a damaged later frame stopped the count
    rotated = _exif_rotated(image)
    stored = images.PIL_FORMATS.get(source_format)
    as_is = image.mode == "RGB" and image.size == (size, size) and not rotated and frames == 1
    may_pass = qualities is None and not settings.reencode and settings.format in ("jpeg", "keep")
    if may_pass and as_is and stored is not None and (settings.format == "keep" or settings.format == stored):
        if stored != "jpeg":
            quality = None
        elif header is not None:
            quality = estimate_jpeg_quality_zigzag(header.luma_table_zigzag)
        else:
            quality = estimate_jpeg_quality(getattr(image, "quantization", None))
        return [(raw.data, images.EXTENSIONS[stored], {**meta, "format": stored, "quality": quality,
                                                        "reencoded": False})]
    if rotated:
        meta["exif_rotated"] = True
    target = "png" if settings.format == "keep" else settings.format  # keep: re-encode losslessly
    upright = ImageOps.exif_transpose(image) if rotated else image
    rgb = images.fit(images.to_rgb(upright), size, settings.resize)
    lossy = target == "jpeg" or (target == "webp" and not settings.webp_lossless)
    out = []
    for quality in qualities or [settings.quality]:
        data = images.encode(rgb, target, quality, subsampling=settings.jpeg_subsampling,
                             compress_level=settings.png_compress_level, lossless=settings.webp_lossless)
        out.append((data, images.EXTENSIONS[target],
                    {**meta, "format": target, "quality": quality if lossy else None, "reencoded": True}))
    return out
