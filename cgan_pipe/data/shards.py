"""Prepare: raw images -> shuffled webdataset tar shards (shard_format.py), a DALI index per shard, a manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import random
import threading
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
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
from .bucket import object_sizes, publish, published, staging_dir
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
    """Turn the raw images at `data.source` into a complete shard set in `out_dir` (a folder, or an
    s3:// URL: see `prepare_into_bucket`).

    Images are shuffled (by `seed`) before writing, since DALI only shuffles within
    a buffer; shard i holds the i-th run of `shard_size` inputs, less the
    undecodable ones, which are skipped and listed with the reason. Shards are
    written by `data.workers` processes (default: all cores) and the result does not
    depend on their number. A killed run rerun with the same settings keeps the
    shards it finished and writes the rest. Returns the manifest and whether the
    existing shard set was already complete (in which case nothing is written).

    With `world_size` > 1 (many machines on a shared folder), this call writes
    only the shards of `rank` (shard i belongs to rank i % world_size) and
    returns no manifest; `merge_shards(out_dir)` writes it once every rank is done.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    if is_url(out_dir):
        if world_size > 1:
            raise ConfigError(f"{out_dir}: several machines cannot prepare into a bucket together; prepare into a "
                              f"shared folder, then copy it to the bucket")
        return prepare_into_bucket(data, str(out_dir), seed=seed, progress=progress)
    out_dir = Path(out_dir)
    _check_outside_source(data.source, out_dir)
    recorded = recorded_settings(data, seed)
    if (out_dir / MANIFEST_NAME).exists():
        try:
            existing = read_manifest(out_dir)
            if existing.settings == recorded:
                return existing, True
        except DataError:
            pass  # unusable manifest: rebuild below

    workers = data.workers or os.cpu_count() or 1
    counter = multiprocessing.get_context("spawn").Value("q", 0)  # images written, by any process
    with contextlib.ExitStack() as held:  # the folder's lock, from the first change to the manifest
        with contextlib.ExitStack() as stack:
            # The pool starts first, so that its processes start up while the source is listed.
            pool = stack.enter_context(_start_pool(workers, counter)) if workers > 1 else None
            if pool is None:  # written here: count here
                _count_into(counter)
                stack.callback(_count_into, None)
            src = stack.enter_context(open_source(data.source, data.split, data.download_dir, scratch_dir=out_dir))
            listing = src.items
            inputs = min(len(listing), data.limit or len(listing))  # the first of the seeded order
            per_shard = _inputs_per_shard(listing, inputs, src.reader, src.class_names, data, seed)
            jobs = [
                _ShardJob(index=i, first_key=first, count=min(per_shard, inputs - first), listing=listing,
                          reader=src.reader, data=data, seed=seed, class_names=src.class_names, out_dir=out_dir)
                for i, first in enumerate(range(0, inputs, per_shard))
            ]
            plan = {"settings": recorded, "jobs": len(jobs), "inputs": inputs, "inputs_per_shard": per_shard,
                    "class_names": src.class_names, "rejected": src.rejected, "files": src.files}
            mine = {job.index for job in jobs if job.index % world_size == rank}
            # Only now that the source is known to be readable may an old shard set be touched, and only the
            # files cgan-pipe wrote: another process's writing, or a user's file in the way, stops it here.
            if rank == 0:
                held.enter_context(folder_lock(out_dir))
            owned = _our_files(out_dir, len(jobs), lambda number: number % world_size == rank)
            done = _parts(out_dir).resume(plan, mine=lambda number: number % world_size == rank, owned=owned)
            if world_size == 1:  # several ranks leave it to the merge, as one may not have read it yet
                (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # it no longer describes the folder
            todo = [job for job in jobs if job.index in mine and job.index not in done]
            log.info(f"{src.description}: {inputs} of its {src.files} files to read into {len(jobs)} shards of up to "
                     f"{per_shard} images ({len(src.rejected)} left out unread); "
                     f"{len(todo)} to write with {workers} worker(s), {len(done)} kept from an earlier run")
            counter.value = sum(jobs[i].count for i in done)
            stack.enter_context(_progress_bar(counter, sum(jobs[i].count for i in mine), progress))
            try:
                with disk_full_explained(out_dir, "finished shards are kept"):
                    results = pool.map(_write_job, todo) if pool else map(_write_job, todo)
                    for job, result in zip(todo, results):
                        done[job.index] = result
            except BrokenProcessPool:
                raise DataError(f"a prepare worker died (out of memory?) while writing {out_dir}; finished shards "
                                f"are kept: rerun the same command to resume, with fewer --workers if memory is short"
                                ) from None

        if world_size > 1:
            return None, False
        with disk_full_explained(out_dir, "the shards are all written, only the manifest is missing"):
            return merge_shards(out_dir), False


def prepare_into_bucket(data: DataConfig, url: str, *, seed: int = 0, progress: bool = True
                        ) -> tuple[Manifest, bool]:
    """`prepare` into the bucket prefix `url`: the shards are written in a local staging folder (where a
    killed run's finished shards wait for its rerun), then uploaded, the manifest last, so the bucket never
    holds a manifest that does not describe it; an upload cut short resumes without sending the finished
    objects again. The staging folder is removed once the bucket is complete."""
    names = object_sizes(url)  # a missing bucket, wrong credentials or endpoint fail here, before any work
    if MANIFEST_NAME in names:
        try:
            existing = read_remote_manifest(url)
            if existing.settings == recorded_settings(data, seed):
                return existing, True
        except DataError:
            pass  # unusable manifest: rebuild below
    staging = staging_dir(url)
    log.info(f"{url}: preparing in {staging}, then uploading")
    with folder_lock(staging):  # one writer per bucket prefix on this machine
        manifest, _ = prepare(data, staging, seed=seed, progress=progress)
        publish(staging, url, last=[MANIFEST_NAME])
        published(staging, url)
    return manifest, False


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


def merge_shards(out_dir: Path) -> Manifest:
    """Write the manifest of an unfinished prepare whose shards are all written (by any ranks).

    Raises DataError naming the missing shards when some rank has not finished.
    """
    out_dir = Path(out_dir)
    try:
        plan = json.loads((out_dir / _PLAN_NAME).read_text())
    except (OSError, ValueError):
        raise DataError(f"{out_dir}: no unfinished prepare to merge (no {_PLAN_NAME}); "
                        f"run `cgan-pipe prepare` there first") from None
    with folder_lock(out_dir):
        return _merge_planned(out_dir, plan)


def _merge_planned(out_dir: Path, plan: dict[str, Any]) -> Manifest:
    done = _parts(out_dir).done()
    missing = [SHARD_NAME.format(i) for i in range(plan["jobs"]) if i not in done]
    if missing:
        raise DataError(f"{out_dir}: {len(missing)} of {plan['jobs']} shards are not written yet "
                        f"(e.g. {', '.join(missing[:5])}); finish every rank, then merge")
    settings, class_names = plan["settings"], plan["class_names"]
    results = [done[i] for i in range(plan["jobs"])]
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
    manifest = Manifest(
        created_by="prepare", source=settings["source"], settings=settings, resolution=settings["resolution"],
        image_format=settings["format"], class_names=class_names, shards=shards,
        class_histogram={name: classes[name] for name in class_names},
        quality_histogram=dict(sorted(qualities.items())), skipped=skipped, inputs=inputs,
    )
    write_manifest(out_dir, manifest)
    _parts(out_dir).finish()
    for path in out_dir.iterdir():  # a decompressed source, or a killed run's temp of it
        if is_decompressed_name(path.name):
            path.unlink()
    return manifest


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


def _inputs_per_shard(listing: Listing, inputs: int, reader: ItemReader, class_names: list[str],
                      data: DataConfig, seed: int) -> int:
    """Inputs per shard: from `shard_size` samples, or, with `shard_bytes`, from the mean tar size of
    the samples of up to 256 inputs spread evenly over the (seeded) order, so shards come out near it."""
    variants = _variants_per_input(data)
    if data.shard_bytes is None:
        return max(1, data.shard_size // variants)
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
        for image, ext, meta in samples:
            files = sample_files(ShardSample(f"{position:08d}", image, ext, item.label, meta))
            sizes.append(sum(len(tars.member_bytes(name, content)) for name, content in files))
    if not sizes:
        return max(1, data.shard_size // variants)
    return max(1, int(_shard_bytes(data) / (sum(sizes) / len(sizes))) // variants)


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
