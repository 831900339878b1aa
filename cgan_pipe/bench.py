"""Benchmarks behind `cgan-pipe bench`: our stages timed beside the plain way of doing the same work."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .data.shards import PrepareSettings, prepare
from .data.sources import open_source
from .errors import DataError


@dataclass(frozen=True)
class BenchRecord:
    """One timed method: how many images it handled in how many seconds."""

    method: str
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Throughput."""
        return self.images / self.seconds

    def to_dict(self) -> dict[str, object]:
        """The record as written by `--json`."""
        return {**asdict(self), "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 1)}


def bench_prepare(source: Path, *, quality: int = 90, workers: int | None = None, limit: int | None = None,
                  dataset_tool: Path | None = None, echo: Callable[[str], None] = print) -> list[BenchRecord]:
    """Time, on the images of the tar `source`: prepare `--format keep` and prepare re-encoding to
    JPEG at `quality` (both with `workers`), a single-process Pillow loop doing the same re-encode
    into a tar, and, when given the path of StyleGAN2-ADA's `dataset_tool.py`, that tool
    converting the same images from an extracted folder. Fresh output folders each time; the
    source is read once first so every method starts from a warm page cache."""
    if not tarfile.is_tarfile(source):
        raise DataError(f"{source}: bench prepare takes a tar of an image-folder tree")
    with open_source(str(source)) as src:
        count = min(len(src.items), limit or len(src.items))
    source.read_bytes()  # warm the page cache for everyone
    records = []
    with tempfile.TemporaryDirectory(prefix="cgan-pipe-bench-") as tmp:
        scratch = Path(tmp)
        for method, settings in [("prepare-keep", PrepareSettings(format="keep", limit=limit)),
                                 (f"prepare-jpeg-q{quality}", PrepareSettings(quality=quality, reencode=True,
                                                                              limit=limit))]:
            start = time.perf_counter()
            manifest, _ = prepare(str(source), scratch / method, settings, workers=workers, progress=False)
            records.append(BenchRecord(method, manifest.num_samples, time.perf_counter() - start))
            echo(_line(records[-1]))
        start = time.perf_counter()
        done = pil_reencode_loop(source, scratch / "pil.tar", quality, count)
        records.append(BenchRecord(f"pil-loop-jpeg-q{quality}", done, time.perf_counter() - start))
        echo(_line(records[-1]))
        if dataset_tool is not None:
            folder = scratch / "extracted"
            with tarfile.open(source) as tar:
                tar.extractall(folder, filter="data")
            start = time.perf_counter()
            subprocess.run([sys.executable, str(dataset_tool), f"--source={folder}", f"--dest={scratch / 'dt.zip'}",
                            *([f"--max-images={limit}"] if limit else [])], check=True, capture_output=True)
            records.append(BenchRecord("stylegan2-ada-dataset_tool", count, time.perf_counter() - start))
            echo(_line(records[-1]))
    return records


def pil_reencode_loop(source: Path, out: Path, quality: int, limit: int) -> int:
    """The one-off script this project replaces: read a tar member by member, decode with Pillow,
    re-encode as JPEG at `quality`, append to an output tar. Returns the number of images written."""
    written = 0
    with tarfile.open(source) as tar, tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as out_tar:
        for member in tar:
            if written == limit:
                break
            if not member.isfile():
                continue
            image = Image.open(tar.extractfile(member)).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            info = tarfile.TarInfo(f"{written:08d}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            out_tar.addfile(info, buffer)
            written += 1
    return written


def _line(record: BenchRecord) -> str:
    return f"{record.method:32s} {record.images:8d} images {record.seconds:8.2f} s {record.images_per_s:10.0f} img/s"
