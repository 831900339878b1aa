"""Verify a shard set: checksums, counts, sample structure, and a DALI decode of every image."""

from __future__ import annotations

import json
import logging
import tarfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..atomic import atomic_path, write_text_atomic
from ..errors import DataError
from ..images import decode, shard_extensions
from ..processes import process_pool
from .inputs import count_by_kind
from ..locations import is_url
from .bucket import UPLOAD_THREADS, local_copies, object_sizes
from .manifest import Manifest, ShardInfo, read_dali_index, shard_set_manifest
from .digest import file_identity, file_sha256
from .shard_format import dali_index, member_extension, sample_members

log = logging.getLogger(__name__)
DECODE_BATCH = 256


@dataclass
class Problem:
    """One thing wrong with a shard set: where (shard, sample key) and what."""

    shard: str
    key: str | None
    problem: str


@dataclass
class VerifyReport:
    """The outcome of `verify_shards`."""

    shards: int
    samples: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def verify_shards(where: Path | str, progress: bool = False) -> VerifyReport:
    """Check every shard listed in the manifest of the shard set at `where` (a folder or a URL, whose
    shards are downloaded one at a time).

    Checks each shard's sha256 and sample count against the manifest, its DALI
    index against the tar, that every sample has its image, `.cls` (a known
    class id, for labelled sets) and `.json`, and decodes every image with the
    DALI CPU decoder the loader uses, at the manifest's resolution. Raises
    DataError when the manifest itself is missing or unusable.
    """
    manifest = shard_set_manifest(where)
    present = object_sizes(str(where)) if is_url(where) else None
    report = VerifyReport(shards=len(manifest.shards), samples=0)
    bar = tqdm(total=manifest.num_samples, desc="verify", unit="img", disable=not progress, dynamic_ncols=True)
    with _IsolatedDecoder() as decoder, local_copies(where) as local:
        for shard in manifest.shards:
            missing = [name for name in (shard.tar, shard.index) if present is not None and name not in present]
            if missing:
                report.problems.append(Problem(shard.tar, None, f"{' and '.join(missing)} missing from the bucket"))
            else:
                _verify_shard(local(shard.tar), local(shard.index), shard, manifest, decoder, report)
                local.release(shard.tar)  # a bucket's shards are downloaded one at a time
            bar.update(shard.samples)
    bar.close()
    return report


def _verify_shard(tar_path: Path, index_path: Path, shard: ShardInfo, manifest: Manifest,
                  decoder: "_IsolatedDecoder", report: VerifyReport) -> None:
    """Check one shard, appending what is wrong to `report`."""

    def add(key: str | None, problem: str) -> None:
        report.problems.append(Problem(shard.tar, key, problem))

    if file_sha256(tar_path) != shard.sha256:
        add(None, "sha256 differs from the manifest (the shard changed after it was written)")
    try:
        images = list(_check_samples(tar_path, manifest, add))
        if index_path.read_text() != dali_index(tar_path):
            add(None, f"DALI index {shard.index} does not match the tar")
    except (tarfile.TarError, OSError, EOFError) as exc:
        add(None, f"unreadable tar ({exc})")
        return
    if len(images) != shard.samples:
        add(None, f"{len(images)} samples, the manifest says {shard.samples}")
    for key, problem in decoder.check(images, manifest.resolution):
        add(key, problem)
    report.samples += len(images)


def _check_samples(tar_path: Path, manifest: Manifest,
                   add: Callable[[str | None, str], None]) -> Iterator[tuple[str, bytes]]:
    """Yield (key, image bytes) per sample, reporting structural problems through `add`."""
    allowed = shard_extensions(manifest.image_format)
    with tarfile.open(tar_path) as tar:
        for key, members in sample_members(tar):
            by_ext, image = _files_of(members, allowed)
            if "json" not in by_ext:
                add(key, "no .json metadata")
            if manifest.labelled:
                cls = tar.extractfile(by_ext["cls"]).read() if "cls" in by_ext else None
                text = cls.decode("ascii", "replace").strip() if cls is not None else ""
                if not text.isdigit() or int(text) >= len(manifest.class_names):
                    add(key, f"bad class id {cls!r} (expected 0..{len(manifest.class_names) - 1})")
            if image is None:
                add(key, f"no {' or '.join('.' + e for e in allowed)} image")
                yield key, b""
                continue
            yield key, tar.extractfile(image).read()


def _files_of(members: list[tarfile.TarInfo],
              allowed: list[str]) -> tuple[dict[str, tarfile.TarInfo], tarfile.TarInfo | None]:
    """A sample's files by extension, and its image file (the first allowed extension present)."""
    by_ext = {member_extension(m): m for m in members}
    return by_ext, next((by_ext[ext] for ext in allowed if ext in by_ext), None)


class _IsolatedDecoder:
    """DALI's CPU image decoder, run in a child process over batches of encoded images.

    DALI has crashed this process outright (a segfault, seen here) on garbage
    bytes, and verify must report bad samples, not die of them: a batch whose
    child crashes is split in halves and retried in fresh children until the
    crashing image is named. Use as a context manager.
    """

    def __enter__(self) -> "_IsolatedDecoder":
        self._pool = self._new_pool()
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown()

    @staticmethod
    def _new_pool() -> ProcessPoolExecutor:
        return process_pool(1)

    def check(self, images: list[tuple[str, bytes]], resolution: int) -> Iterator[tuple[str, str]]:
        """Yield (key, problem) for every image DALI cannot decode or that has the wrong size."""
        for first in range(0, len(images), DECODE_BATCH):
            yield from self._check(images[first:first + DECODE_BATCH], resolution)

    def _check(self, chunk: list[tuple[str, bytes]], resolution: int) -> list[tuple[str, str]]:
        try:
            return self._pool.submit(_decode_in_child, chunk, resolution).result()
        except BrokenProcessPool:
            self._pool = self._new_pool()
            if len(chunk) == 1:
                return [(chunk[0][0], "DALI crashed decoding it (the decoder process died)")]
            half = len(chunk) // 2
            return self._check(chunk[:half], resolution) + self._check(chunk[half:], resolution)


_PIPELINES: dict[int, object] = {}  # per child process: batch size -> built DALI pipeline


def _decode_in_child(chunk: list[tuple[str, bytes]], resolution: int) -> list[tuple[str, str]]:
    """Decode a batch with DALI (in the child); an invalidated pipeline is rebuilt and the
    batch retried image by image to name the bad ones."""
    problems = []
    try:
        shapes = _dali_decode([data for _, data in chunk])
    except RuntimeError:
        _PIPELINES.pop(DECODE_BATCH, None)  # DALI invalidates a pipeline after a failed decode
        shapes = []
        for key, data in chunk:
            try:
                shapes += _dali_decode([data])
            except RuntimeError as exc:
                _PIPELINES.pop(DECODE_BATCH, None)
                shapes.append(None)
                problems.append((key, f"DALI cannot decode it ({_first_line(exc)})"))
    for (key, _), shape in zip(chunk, shapes):
        if shape is not None and tuple(shape) != (resolution, resolution, 3):
            problems.append((key, f"decoded shape {tuple(shape)}, expected {(resolution, resolution, 3)}"))
    return problems


def _dali_decode(encoded: list[bytes]) -> list[tuple[int, ...]]:
    if any(len(data) == 0 for data in encoded):
        raise RuntimeError("empty image")
    if DECODE_BATCH not in _PIPELINES:
        from nvidia.dali import fn, pipeline_def, types  # DALI is imported only when verifying

        @pipeline_def(batch_size=DECODE_BATCH, num_threads=2, device_id=None,
                      exec_async=False, exec_pipelined=False)
        def decode():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(data, device="cpu", output_type=types.RGB)

        _PIPELINES[DECODE_BATCH] = pipeline = decode()
        pipeline.build()
    pipeline = _PIPELINES[DECODE_BATCH]
    pipeline.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in encoded])
    (out,) = pipeline.run()
    return [out.at(i).shape for i in range(len(out))]


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if "failure" in line or "error" in line.lower()]
    return (lines[-1] if lines else str(exc).splitlines()[0]).strip()


def inspect_shards(where: Path | str) -> dict:
    """Summarise the shard set at `where` (a folder or a URL): counts, histograms, resolution, format,
    bytes per image.

    Reads the manifest and the DALI index files only (no tar is opened), a few at a time (from a bucket, by
    8 threads, none kept).
    """
    manifest = shard_set_manifest(where)
    allowed = shard_extensions(manifest.image_format)

    def image_bytes_of(index: str) -> int:
        return sum(entry.size for files in read_dali_index(where, index) for entry in files if entry.ext in allowed)

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        image_bytes = sum(pool.map(image_bytes_of, [shard.index for shard in manifest.shards]))
    n = manifest.num_samples
    return {
        "path": str(where),
        "created_by": manifest.created_by,
        "source": manifest.source,
        "samples": n,
        "shards": len(manifest.shards),
        "resolution": manifest.resolution,
        "image_format": manifest.image_format,
        "classes": manifest.class_names,
        "class_histogram": manifest.class_histogram,
        "quality_histogram": manifest.quality_histogram,
        "bytes_per_image": round(image_bytes / n, 1) if n else None,
        "bytes_per_sample_in_tar": round(sum(s.bytes for s in manifest.shards) / n, 1) if n else None,
        "total_bytes": sum(s.bytes for s in manifest.shards),
        "inputs": manifest.inputs,  # where the source's files went (prepared sets)
        "skipped": count_by_kind(manifest.skipped),  # per reason
    }


def contact_sheet(where: Path | str, out: Path, per_class: int = 8) -> Path:
    """Write a PNG with up to `per_class` samples of each class of the shard set at `where` (a folder or a
    URL, whose shards are downloaded only as far as needed), one row per class (8 rows unlabelled)."""
    manifest = shard_set_manifest(where)
    rows = len(manifest.class_names) or 8
    allowed = shard_extensions(manifest.image_format)
    picked: list[list[bytes]] = [[] for _ in range(rows)]
    needed = rows * per_class
    with local_copies(where) as local:
        for shard in manifest.shards:
            with tarfile.open(local(shard.tar)) as tar:
                for _, members in sample_members(tar):
                    by_ext, image = _files_of(members, allowed)
                    if image is None:
                        continue
                    if manifest.labelled and "cls" in by_ext:
                        row = int(tar.extractfile(by_ext["cls"]).read())
                    else:
                        row = sum(map(len, picked)) // per_class
                    if row < rows and len(picked[row]) < per_class:
                        picked[row].append(tar.extractfile(image).read())
                        needed -= 1
                    if needed == 0:
                        break
            if needed == 0:
                break
    size, pad = manifest.resolution, 2
    sheet = Image.new("RGB", (per_class * (size + pad) + pad, rows * (size + pad) + pad), (255, 255, 255))
    for r, row in enumerate(picked):
        for c, data in enumerate(row):
            sheet.paste(decode(data).convert("RGB"), (pad + c * (size + pad), pad + r * (size + pad)))
    with atomic_path(Path(out)) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(out)


def check_checksums(directory: Path, manifest: Manifest, record: Path) -> None:
    """Compare each shard's sha256 with its manifest's, once per shard file: a shard whose size, times and
    inode (`digest.file_identity`) are those of an earlier successful check (kept in the JSON file `record`) is
    trusted. Raises DataError naming the first shard whose bytes changed since it was written,
    before any decoder meets them (DALI's CPU decoder can crash the process on a damaged JPEG)."""
    try:
        known = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        known = {}
    todo = []
    for shard in manifest.shards:
        path = (Path(directory) / shard.tar).resolve()
        seen = [*file_identity(path), shard.sha256]
        if known.get(str(path)) != seen:
            todo.append((shard, path, seen))
    log.info(f"{directory}: sha256 of {len(todo)} shards to check, {len(manifest.shards) - len(todo)} checked before")
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:  # hashlib hashes without the GIL
        digests = list(pool.map(lambda job: file_sha256(job[1]), todo))
    for (shard, path, seen), digest in zip(todo, digests):
        if digest != shard.sha256:
            raise DataError(f"{path}: its bytes changed since it was written (sha256 {digest[:12]}..., the manifest "
                            f"says {shard.sha256[:12]}...); run `cgan-pipe verify {directory}` to find the damaged "
                            f"samples, and prepare the shards again")
        known[str(path)] = seen
    try:
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(record), json.dumps(known))
    except OSError:
        pass  # a read-only cache: check again next time
