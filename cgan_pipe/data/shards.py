"""Prepare: raw images -> shuffled webdataset tar shards, a DALI index per shard, a manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image
from tqdm import tqdm

from .. import images
from ..atomic import TEMP_MARK, remove_stale_temps
from ..compression import estimate_jpeg_quality
from ..errors import DataError
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest
from .sources import RawImage, SourceItem, open_source

SHARD_NAME = "shard-{:06d}"
DALI_INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class PrepareSettings:
    """How `prepare` turns raw images into shards (recorded in the manifest)."""

    resolution: int = 32
    format: str = "jpeg"
    quality: int = 95
    shard_size: int = 5000
    limit: int | None = None
    seed: int = 0
    split: str = "train"


@dataclass
class ShardSample:
    """One sample as stored: `<key>.<ext>` image bytes, `<key>.cls`, `<key>.json`."""

    key: str
    image: bytes
    ext: str
    label: int | None
    meta: dict[str, Any]


class ShardWriter:
    """Writes samples into numbered tar shards of `shard_size` samples.

    Each shard is written under a temp name and renamed, with its DALI index,
    only once complete. Use as a context manager: on error the open shard is
    deleted, so no partial shard ever carries a final name.
    """

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def add(self, sample: ShardSample) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if self._tar is None:
            name = SHARD_NAME.format(len(self.shards)) + ".tar"
            self._tmp = self.out_dir / f".{name}{TEMP_MARK}{os.getpid()}"
            # Write USTAR explicitly: DALI has failed on Python's default PAX headers, and
            # webdataset's TarWriter (1.0.2) computes a format but never passes it on.
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        members = {sample.ext: sample.image, "json": json.dumps(sample.meta, sort_keys=True).encode()}
        if sample.label is not None:
            members["cls"] = str(sample.label).encode()
        for ext in sorted(members):  # the files of one sample stay adjacent
            data = members[ext]
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: reproducible bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.shard_size:
            self._finish_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and return every shard written."""
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        base = SHARD_NAME.format(len(self.shards))
        tar_path, index_path = self.out_dir / f"{base}.tar", self.out_dir / f"{base}.idx"
        index_tmp = self.out_dir / f".{base}.idx{TEMP_MARK}{os.getpid()}"
        index_tmp.write_text(dali_index(self._tmp))
        os.replace(index_tmp, index_path)
        os.replace(self._tmp, tar_path)
        self.shards.append(ShardInfo(
            tar=tar_path.name, index=index_path.name, samples=self._count,
            bytes=tar_path.stat().st_size, sha256=file_sha256(tar_path),
        ))


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """Group a shard's files into samples: (key, members) for each run of adjacent files
    sharing the name before the first dot of their base name (the webdataset rule)."""
    key, members = None, []
    for member in tar:
        if not member.isfile():
            continue
        slash = member.name.rfind("/") + 1
        dot = member.name.find(".", slash)
        base = member.name[:dot]
        if dot < 0 or not base or base.endswith("/"):
            continue  # no extension, or a hidden file: not part of any sample
        if base != key and members:
            yield key, members
            members = []
        key = base
        members.append(member)
    if members:
        yield key, members


def member_extension(member: tarfile.TarInfo) -> str:
    """The extension of a shard member: everything after the first dot of its base name."""
    slash = member.name.rfind("/") + 1
    return member.name[member.name.find(".", slash) + 1:]


def dali_index(tar_path: Path) -> str:
    """The DALI webdataset index (format v1.2, as DALI's wds2idx writes it) of a tar shard.

    One line per sample: `ext offset size name` for each of its files, where
    offset is the position of the file's data in the tar.
    """
    with tarfile.open(tar_path) as tar:
        lines = [
            " ".join(f"{member_extension(m)} {m.offset_data} {m.size} {m.name}" for m in members) + "\n"
            for _, members in sample_members(tar)
        ]
    if not lines:
        raise DataError(f"{tar_path}: empty shard")
    return f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(lines)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(source: str, out_dir: Path, settings: PrepareSettings, *,
            download_dir: str = "~/.cache/cgan-pipe", progress: bool = True) -> tuple[Manifest, bool]:
    """Turn the raw images at `source` into a complete shard set in `out_dir`.

    Images are shuffled (seeded) before writing, since DALI only shuffles within
    a buffer. Undecodable images are skipped and listed with the reason. Returns
    the manifest and whether the existing shards were already up to date (in
    which case nothing is written).
    """
    out_dir = Path(out_dir)
    recorded = {"source": source, **asdict(settings)}
    if (out_dir / MANIFEST_NAME).exists():
        try:
            existing = read_manifest(out_dir)
            if existing.settings == recorded:
                return existing, True
        except DataError:
            pass  # unusable manifest: rebuild below
    with open_source(source, settings.split, download_dir) as src:
        # only now that the source is known to be readable may an old shard set be removed
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear_shard_set(out_dir)
        order = list(src.items)
        random.Random(settings.seed).shuffle(order)
        if settings.limit is not None:
            order = order[: settings.limit]
        classes, qualities = Counter(), Counter()
        skipped: list[dict[str, str]] = []
        written = 0
        bar = tqdm(order, desc="prepare", unit="img", disable=not progress, dynamic_ncols=True)
        with ShardWriter(out_dir, settings.shard_size) as writer:
            for item in bar:
                try:
                    data, ext, meta = encode_for_shard(src.read(item), item, src.class_names, settings)
                except (images.BadImage, DataError) as exc:
                    skipped.append({"source": item.path, "reason": str(exc)})
                    continue
                writer.add(ShardSample(f"{written:08d}", data, ext, item.label, meta))
                written += 1
                classes[meta["class"]] += 1
                qualities[str(meta["quality"])] += 1
            shards = writer.close()
        if not shards:
            raise DataError(f"{source}: none of the {len(order)} images could be used "
                            f"(first problem: {skipped[0]['reason'] if skipped else 'no images'})")
        manifest = Manifest(
            created_by="prepare", source=source, settings=recorded, resolution=settings.resolution,
            image_format=settings.format, class_names=src.class_names, shards=shards,
            class_histogram={name: classes[name] for name in src.class_names},
            quality_histogram=dict(sorted(qualities.items())), skipped=skipped,
        )
    write_manifest(out_dir, manifest)
    return manifest, False


def encode_for_shard(raw: RawImage, item: SourceItem, class_names: list[str],
                     settings: PrepareSettings) -> tuple[bytes, str, dict[str, Any]]:
    """Validate one raw image and return (bytes, member extension, metadata) for its shard sample.

    A JPEG already at the target size, in RGB, is passed through untouched (no
    second lossy encode); its quality is estimated from its quantisation tables.
    Anything else is converted to RGB, resized and centre-cropped, and encoded
    at the configured format and quality. Raises images.BadImage when undecodable.
    """
    size = settings.resolution
    if raw.data is not None:
        image = images.decode(raw.data)
        source_format = image.format
    else:
        image = Image.fromarray(raw.pixels, "RGB")
        source_format = None
    meta: dict[str, Any] = {
        "source": item.path,
        "class": class_names[item.label] if item.label is not None else None,
        "width": image.width,
        "height": image.height,
        "format": settings.format,
    }
    if (settings.format == "jpeg" and source_format == "JPEG" and image.mode == "RGB"
            and image.size == (size, size)):
        meta.update(quality=estimate_jpeg_quality(getattr(image, "quantization", None)), reencoded=False)
        return raw.data, images.EXTENSIONS["jpeg"], meta
    rgb = images.resize_center_crop(images.to_rgb(image), size)
    data = images.encode(rgb, settings.format, settings.quality)
    meta.update(quality=settings.quality if settings.format != "png" else None, reencoded=True)
    return data, images.EXTENSIONS[settings.format], meta


def _clear_shard_set(out_dir: Path) -> None:
    """Remove a previous (stale or partial) shard set of ours from `out_dir`."""
    remove_stale_temps(out_dir)
    for path in list(out_dir.glob("shard-*.tar")) + list(out_dir.glob("shard-*.idx")):
        path.unlink()
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
