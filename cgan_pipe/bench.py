"""Benchmarks behind `cgan-pipe bench`: our stages timed beside the plain way of doing the same work."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from . import images
from .config import DataConfig, ExportConfig, LoaderConfig
from .data.shards import prepare
from .data.sources import open_source
from .processes import child_initializer, run_tied
from .errors import DataError
from .locations import is_url


class _Timed:
    """What every bench record has: `images` handled in `seconds` (fields of the dataclasses below),
    under a `label` for the printed table."""

    images: int
    seconds: float
    label: str

    @property
    def images_per_s(self) -> float:
        """Throughput."""
        return self.images / self.seconds

    def to_dict(self) -> dict[str, object]:
        """The record as written by `--json`."""
        return {**asdict(self), "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 1)}

    def line(self) -> str:
        """One line of the printed table."""
        return f"{self.label:32s} {self.images:8d} images {self.seconds:8.2f} s {self.images_per_s:10.0f} img/s"


@dataclass(frozen=True)
class BenchRecord(_Timed):
    """One timed method: how many images it handled in how many seconds."""

    method: str
    images: int
    seconds: float

    @property
    def label(self) -> str:
        """The method's name."""
        return self.method


def bench_prepare(source: Path, *, quality: int = 90, workers: int | None = None, limit: int | None = None,
                  dataset_tool: Path | None = None, echo: Callable[[str], None] = print) -> list[BenchRecord]:
    """Time, on the images of the tar `source`: prepare `--format keep` and prepare re-encoding to
    JPEG at `quality` (both with `workers`), a single-process Pillow loop doing the same re-encode
    into a tar, and, when given the path of StyleGAN2-ADA's `dataset_tool.py`, that tool
    converting the same images from an extracted folder. Fresh output folders each time; the
    source is read once first so every method starts from a warm page cache. Echoes a line per
    method, then the ratios."""
    if not tarfile.is_tarfile(source):
        raise DataError(f"{source}: bench prepare takes a tar of an image-folder tree")
    with open_source(str(source)) as src:
        count = min(len(src.items), limit or len(src.items))
    source.read_bytes()  # warm the page cache for everyone
    records = []
    with tempfile.TemporaryDirectory(prefix="cgan-pipe-bench-") as tmp:
        scratch = Path(tmp)
        for method, data in [("prepare-keep", DataConfig(str(source), format="keep", limit=limit, workers=workers)),
                             (f"prepare-jpeg-q{quality}", DataConfig(str(source), quality=quality, reencode=True,
                                                                     limit=limit, workers=workers))]:
            start = time.perf_counter()
            manifest, _ = prepare(data, scratch / method, progress=False)
            records.append(BenchRecord(method, manifest.num_samples, time.perf_counter() - start))
            echo(records[-1].line())
        start = time.perf_counter()
        done = pil_reencode_loop(source, scratch / "pil.tar", quality, count)
        records.append(BenchRecord(f"pil-loop-jpeg-q{quality}", done, time.perf_counter() - start))
        echo(records[-1].line())
        if dataset_tool is not None:
            folder = scratch / "extracted"
            with tarfile.open(source) as tar:
                tar.extractall(folder, filter="data")
            start = time.perf_counter()
            run_tied([sys.executable, str(dataset_tool), f"--source={folder}", f"--dest={scratch / 'dt.zip'}",
                            *([f"--max-images={limit}"] if limit else [])], check=True, capture_output=True)
            records.append(BenchRecord("stylegan2-ada-dataset_tool", count, time.perf_counter() - start))
            echo(records[-1].line())
    rate = {r.method: r.images_per_s for r in records}
    encode = f"prepare-jpeg-q{quality}", f"pil-loop-jpeg-q{quality}"
    echo(f"re-encode: prepare / Pillow loop = {rate[encode[0]] / rate[encode[1]]:.2f}x")
    if "stylegan2-ada-dataset_tool" in rate:
        echo(f"keep: prepare / dataset_tool = {rate['prepare-keep'] / rate['stylegan2-ada-dataset_tool']:.2f}x")
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


@dataclass(frozen=True)
class LoaderRecord(_Timed):
    """One timed loader: backend ('dali', 'dali+jpeg_distort', 'torch', 'baseline'), decode device, images,
    seconds."""

    backend: str
    device: str
    images: int
    seconds: float

    @property
    def label(self) -> str:
        """Backend and decode device."""
        return f"{self.backend} {self.device}"


def bench_loader(shards: Path | str, *, batch_size: int = 256, batches: int = 100, warmup: int = 10,
                 workers: int | None = None, jpeg_distort: tuple[int, int] | None = None,
                 backends: tuple[str, ...] = ("dali", "torch", "baseline"), bucket_reads: str | None = None,
                 settings: LoaderConfig | None = None, echo: Callable[[str], None] = print) -> list[LoaderRecord]:
    """Time `batches` batches (after `warmup`) of each loader on the shard set `shards`, all with a
    random horizontal flip and normalisation to [-1, 1]: DALI and the torch backend, each decoding on
    the CPU with batches on the CPU, and, when there is a GPU, decoding there (DALI `mixed`, nvJPEG
    through torchvision) with batches on the GPU; then the baseline (webdataset + Pillow +
    torchvision transforms in a DataLoader, batches on the CPU). Each uses `workers`
    threads/processes (default: `settings.threads` when given, else one per core). With `jpeg_distort`
    (lo, hi), each loader is timed again with on-the-fly JPEG distortion at a quality drawn from lo..hi
    ('dali+jpeg_distort', ...).
    `backends` picks which of 'dali', 'torch' and 'baseline' run (DALI is imported only for its rows). A shard
    set at a URL is read as training reads it (DALI as `bucket_reads` says); the baseline reads folders only.
    The loaders take every other setting from `settings` (default: the defaults)."""
    import torch

    from .data.loader import open_loader

    workers = workers or (settings.threads if settings else os.cpu_count() or 1)
    settings = settings or LoaderConfig()

    def loader(backend: str, device: str, distort: list[int] | None) -> Callable[[], Iterator[object]]:
        cfg = dataclasses.replace(settings, backend=backend, device=device, threads=workers, jpeg_distort=distort,
                                  bucket_reads=bucket_reads or settings.bucket_reads)
        return lambda: iter(open_loader(shards, cfg, batch_size, 0, torch.device(device), with_quality=bool(distort)))

    runs: list[tuple[str, str, Callable[[], Iterator[object]]]] = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for backend in (b for b in ("dali", "torch") if b in backends):
            runs.append((backend, device, loader(backend, device, None)))
            if jpeg_distort:
                runs.append((f"{backend}+jpeg_distort", device, loader(backend, device, list(jpeg_distort))))
    if "baseline" in backends and is_url(shards):
        echo(f"baseline: left out, it reads shard folders only, not {shards}")
    elif "baseline" in backends:
        runs.append(("baseline", "cpu", lambda: _baseline_batches(shards, batch_size, workers)))
    records = []
    for backend, device, start_loader in runs:
        batches_iter = start_loader()
        for _ in range(warmup):
            next(batches_iter)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            next(batches_iter)
        if device == "cuda":
            torch.cuda.synchronize()
        records.append(LoaderRecord(backend, device, batches * batch_size, time.perf_counter() - start))
        echo(records[-1].line())
        del batches_iter
    baseline = next((r.images_per_s for r in records if r.backend == "baseline"), None)
    for record in records if baseline else []:
        echo(f"{record.backend}/{record.device}: {record.images_per_s / baseline:.2f}x the baseline")
    for record in (r for r in records if r.backend.endswith("+jpeg_distort")):
        backend = record.backend.removesuffix("+jpeg_distort")
        plain = next(r for r in records if r.backend == backend and r.device == record.device)
        echo(f"jpeg_distort on {backend}/{record.device} costs {1 - record.images_per_s / plain.images_per_s:.1%} "
             f"of its throughput")
    return records


def _baseline_batches(shards: Path, batch_size: int, workers: int) -> Iterator[object]:
    """What a user writes without cgan-pipe: webdataset decoding with Pillow, torchvision
    transforms (flip, to tensor, normalise), a DataLoader with a worker per core; endless."""
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from .data.manifest import read_manifest

    manifest = read_manifest(shards)
    transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.5] * 3)])
    dataset = (wds.WebDataset([str(shards / s.tar) for s in manifest.shards], shardshuffle=len(manifest.shards),
                              nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
               .shuffle(4096).decode("pil").to_tuple("jpg;png;webp", "cls").map_tuple(transform, int))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True, persistent_workers=True,
                        worker_init_fn=child_initializer())
    while True:
        for batch_images, labels in loader:
            yield batch_images, torch.as_tensor(labels)


@dataclass(frozen=True)
class TrainRecord(_Timed):
    """Training throughput of one architecture/batch/precision/memory-format/compile setting."""

    arch: str
    batch_size: int
    precision: str
    compile: bool
    channels_last: bool
    device: str
    images: int
    seconds: float
    data_wait: float
    peak_memory_mib: float | None  # CUDA memory allocated at most (None on the CPU)
    host_syncs_per_step: float | None = None  # on CUDA, uncompiled: torch's synchronising calls per step
    resolution: int | None = None  # of the shard set's images
    width: int | None = None  # g_width = d_width
    loss: str = "hinge"
    r1_gamma: float = 0.0  # the penalties' weights (0: off), applied every r1_every steps
    r2_gamma: float = 0.0
    r1_every: int = 16

    @property
    def label(self) -> str:
        """The setting, for the printed table."""
        penalties = "".join(f" {name}" for name, gamma in (("R1", self.r1_gamma), ("R2", self.r2_gamma)) if gamma)
        return (f"{self.arch} b{self.batch_size} {self.precision}{' channels-last' if self.channels_last else ''}"
                f"{' compile' if self.compile else ''}{penalties}")


def bench_train(shards: Path, *, archs: tuple[str, ...] = ("dcgan", "resnet"), batch_sizes: tuple[int, ...] = (64, 256),
                precisions: tuple[str, ...] = ("fp32", "bf16"), compiles: tuple[bool, ...] = (False, True),
                channels_lasts: tuple[bool, ...] = (False,), steps: int = 50, width: int = 256, device: str = "auto",
                loader_backend: str = "dali", loss: str = "hinge", r1_gamma: float = 0.0, r2_gamma: float = 0.0,
                r1_every: int = 16, echo: Callable[[str], None] = print,
                on_record: Callable[[list[TrainRecord]], None] = lambda records: None) -> list[TrainRecord]:
    """Train each combination for 2 x `steps` steps on `shards` and time the second half (the first
    warms up: compilation, cuDNN autotuning, loader start); returns one record per combination, and
    hands the records so far to `on_record` as each one is made. With `r1_gamma` (and `r2_gamma`) the
    penalty steps, every `r1_every` steps, are timed with the rest. Each
    combination compiles afresh (dynamo is reset). On CUDA, uncompiled combinations also count the
    host syncs per step: torch's synchronising calls (torch.cuda.set_sync_debug_mode) in a run of
    2 x `steps` steps less those in a run of `steps`, over `steps` (set-up and the last tick cancel;
    the one metrics row between them is counted)."""
    import torch

    from .config import config_from_dict
    from .data.manifest import read_manifest
    from .devices import resolve_device
    from .train.loop import read_metrics, train

    resolved = resolve_device(device, "--device")
    resolution = read_manifest(shards).resolution
    records = []
    settings = itertools.product(archs, batch_sizes, precisions, channels_lasts, compiles)
    for arch, batch_size, precision, channels_last, compiled in settings:
        def run(total_steps: int, run_dir: str) -> None:
            cfg = config_from_dict({
                "name": "bench", "run_dir": run_dir, "data": {"source": "unused"},
                "loader": {"backend": loader_backend, "device": device},
                "model": {"arch": arch, "g_width": width, "d_width": width},
                "eval": {"metrics": []},
                "train": {"steps": total_steps, "batch_size": batch_size, "precision": precision,
                          "compile": compiled, "channels_last": channels_last, "log_every": steps,
                          "loss": loss, "r1_gamma": r1_gamma, "r2_gamma": r2_gamma, "r1_every": r1_every,
                          "sample_every": 10 * steps,
                          "checkpoint_every": 10 * steps, "device": device},
            }, origin="bench train")
            train(cfg, shards, Path(run_dir), progress=False)

        torch.compiler.reset()  # no graphs, nor recompilation budget, left from the last setting
        with tempfile.TemporaryDirectory() as run_dir:
            if resolved.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run(2 * steps, run_dir)
            timed = read_metrics(Path(run_dir) / "metrics.jsonl")[-1]
            memory = torch.cuda.max_memory_allocated() / 2**20 if resolved.type == "cuda" else None
        syncs = None
        if resolved.type == "cuda" and not compiled:
            counts = []
            for total_steps in (steps, 2 * steps):
                with tempfile.TemporaryDirectory() as run_dir:
                    counts.append(count_cuda_syncs(lambda: run(total_steps, run_dir)))
            syncs = (counts[1] - counts[0]) / steps
        images = steps * batch_size
        record = TrainRecord(arch, batch_size, precision, compiled, channels_last, resolved.type, images,
                             images / timed["images_per_s"], timed["data_wait"], memory, syncs, resolution, width,
                             loss, r1_gamma, r2_gamma, r1_every)
        echo(f"{record.line()}  data wait {record.data_wait:.1%}"
             + (f"  host syncs/step {syncs:.2f}" if syncs is not None else ""))
        records.append(record)
        on_record(records)
    return records


def count_cuda_syncs(run: Callable[[], None]) -> int:
    """How many synchronising CUDA calls torch makes while `run` runs (torch.cuda.set_sync_debug_mode:
    one warning each; calls outside torch, such as a decoder library's own, are not seen)."""
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def bench_export(checkpoint: Path, *, n: int = 10_000, batch_size: int = 250, quality: int = 95,
                 device: str = "auto", scratch: Path | None = None,
                 echo: Callable[[str], None] = print) -> list[BenchRecord]:
    """Time JPEG export of `n` images from `checkpoint`, with the same seeds and batches throughout:
    `plain`, the generator as trained followed by Pillow's `Image.save` per image into files;
    `generate-plain` and `generate`, the generator as trained and the export's generator
    (`models.for_inference`) alone, nothing encoded or written; `export`, the project's
    export writing files (JPEG 4:2:0: libjpeg-turbo on the CPU, from a GPU after a copy);
    `export-shards`, writing shards only; `export-444`, files in JPEG 4:4:4 (nvJPEG on a GPU,
    Pillow on the CPU). Imports and first calls are
    warmed up beforehand (importing torchvision takes ~1.5 s once per process, docs/benchmarks.md).
    Output goes to fresh folders under `scratch` (default: a temp folder; pick one on the disk
    you care about), removed at the end."""
    import torch

    from .devices import resolve_device
    from .export import export, image_classes
    from .generation import generate, load_generator, requested_quality
    from .train.checkpoint import load_checkpoint

    resolved = resolve_device(device, "--device")
    state = load_checkpoint(checkpoint, map_location=resolved)
    records = []

    def timed(method: str, run: Callable[[], None]) -> None:
        if resolved.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if resolved.type == "cuda":
            torch.cuda.synchronize()
        records.append(BenchRecord(method, n, time.perf_counter() - start))
        echo(records[-1].line())

    with tempfile.TemporaryDirectory(prefix="cgan-pipe-bench-", dir=scratch) as tmp:
        out = Path(tmp)
        fast, info, z_dim = load_generator(state, ema=True, device=resolved)
        plain, _, _ = load_generator(state, ema=True, device=resolved, fast=False)
        labels = image_classes(ExportConfig(n=n), info)
        quality_cond = requested_quality(state, None, checkpoint)
        batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
        # warm-up: each method's first batch, and the imports and first calls of both encoders
        warm = generate(fast, z_dim, batches[0], labels[:len(batches[0])], resolved, quality_cond)
        images.encode_batch(warm, "jpeg", quality)
        warm = generate(plain, z_dim, batches[0], labels[:len(batches[0])], resolved, quality_cond)
        Image.fromarray(warm[0].permute(1, 2, 0).cpu().numpy()).save(io.BytesIO(), "JPEG", quality=quality)

        def plain_loop() -> None:
            (out / "plain").mkdir()
            for seeds in batches:
                pixels = generate(plain, z_dim, seeds, labels[seeds[0]:seeds[-1] + 1], resolved, quality_cond)
                for seed, image in zip(seeds, pixels.permute(0, 2, 3, 1).cpu().numpy()):
                    Image.fromarray(image).save(out / "plain" / f"seed{seed:07d}.jpg", quality=quality)

        def generate_only(generator: torch.nn.Module) -> None:
            for seeds in batches:
                generate(generator, z_dim, seeds, labels[seeds[0]:seeds[-1] + 1], resolved, quality_cond).cpu()

        timed("plain", plain_loop)
        timed("generate-plain", lambda: generate_only(plain))
        timed("generate", lambda: generate_only(fast))
        for method, output, subsampling in (("export", "files", "4:2:0"), ("export-shards", "shards", "4:2:0"),
                                            ("export-444", "files", "4:4:4")):
            settings = ExportConfig(n=n, quality=quality, batch_size=batch_size, output=output,
                                    jpeg_subsampling=subsampling)
            timed(method, lambda: export(checkpoint, out / method, settings, device=resolved, progress=False))
        difference = _decoded_difference(sorted((out / "plain").iterdir()),
                                         sorted((out / "export" / "files").rglob("*.jpg")))
        echo(f"export vs plain, decoded: mean absolute difference {difference * 255:.3f}/255 per pixel value")
    rate = {r.method: r.images_per_s for r in records}
    seconds = {r.method: r.seconds for r in records}
    echo(f"export / plain = {rate['export'] / rate['plain']:.2f}x; export-shards / plain = "
         f"{rate['export-shards'] / rate['plain']:.2f}x; generator: {rate['generate'] / rate['generate-plain']:.2f}x")
    echo(f"encoding and writing add {seconds['export'] / seconds['generate'] - 1:.0%} (files) and "
         f"{seconds['export-shards'] / seconds['generate'] - 1:.0%} (shards) to generation")
    return records


def _decoded_difference(first: list[Path], second: list[Path]) -> float:
    """Mean absolute difference, in [0, 1], between the decoded images of two equally long lists of
    files, paired by the seed in their names."""
    import numpy as np

    def by_seed(paths: list[Path]) -> list[Path]:
        return sorted(paths, key=lambda path: int(path.name[4:11]))  # seed0000123...

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.float32)

    total = sum(np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(by_seed(first), by_seed(second), strict=True))
    return float(total) / len(first) / 255
