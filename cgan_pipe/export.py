"""Generate -> encode -> write: images from a checkpoint as JPEG/PNG/WebP files and shards."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import images
from .atomic import TEMP_MARK, write_text_atomic
from .config import config_from_dict
from .data.loader import DatasetInfo
from .data.manifest import Manifest, write_manifest
from .data.shards import ShardSample, ShardWriter, file_sha256
from .errors import ConfigError
from .models import build_networks
from .train.checkpoint import load_checkpoint

RECORD_NAME = "export.json"
UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class ExportSettings:
    """What to generate and how to write it."""

    n: int = 1000
    format: str = "jpeg"
    quality: int = 95
    classes: tuple[str, ...] | None = None  # None: all classes, balanced
    seed: int = 0  # image i uses seed + i
    batch_size: int = 250
    shard_size: int = 5000
    ema: bool = True
    quality_cond: int | None = None  # quality-conditioned models: the requested quality (None: highest trained)


@dataclass
class ExportResult:
    """Where the export went and how fast it ran."""

    out_dir: Path
    shards: Path
    n: int
    images_per_s: float | None  # None when the export was already up to date
    up_to_date: bool


def load_generator(state: dict, ema: bool, device: torch.device) -> tuple[nn.Module, DatasetInfo, int]:
    """Build the (EMA or raw) generator stored in a checkpoint; returns (G, dataset info, z_dim)."""
    cfg = config_from_dict(state["config"], origin="checkpoint config")
    ds = state["dataset"]
    info = DatasetInfo(ds["resolution"], ds["channels"], tuple(ds["class_names"]), 0)
    generator, _ = build_networks(cfg.model, info, cfg.compression)
    generator.load_state_dict(state["G_ema" if ema else "G"])
    return generator.to(device).eval().requires_grad_(False), info, cfg.model.z_dim


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
    """Reject an unknown format or out-of-range value before any work is done."""
    if settings.format not in images.EXTENSIONS:
        raise ConfigError(f"export format {settings.format!r} is not one of {', '.join(images.EXTENSIONS)}")
    if not 1 <= settings.quality <= 100:
        raise ConfigError(f"export quality {settings.quality} must be between 1 and 100")
    if settings.quality_cond is not None and not 1 <= settings.quality_cond <= 100:
        raise ConfigError(f"quality condition {settings.quality_cond} must be between 1 and 100 (100: clean images)")
    for name in ("n", "batch_size", "shard_size"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"export {name} must be > 0 (got {getattr(settings, name)})")
    if settings.seed < 0:
        raise ConfigError(f"export seed must be >= 0 (got {settings.seed})")


def export(checkpoint: Path, out_dir: Path, settings: ExportSettings, *, device: torch.device,
           overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Generate `settings.n` images from `checkpoint` into `out_dir`.

    Writes `<class>/seed<seed>-c<class id>-q<quality>.<ext>` files, the same images as
    webdataset shards in `out_dir/shards` (manifest + DALI index, loadable like
    `prepare`'s), and `export.json`. The whole folder is built under a temp name
    and renamed when complete. A finished export with the same inputs is kept as is.
    """
    check_settings(settings)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = load_checkpoint(checkpoint, map_location=device)
    G, info, z_dim = load_generator(state, settings.ema, device)
    labels = _labels_for(settings, info)
    quality_cond = requested_quality(state, settings.quality_cond, checkpoint)
    record = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), **asdict(settings),
              "quality_cond": quality_cond}
    if settings.classes is not None:
        record["classes"] = list(settings.classes)
    if _up_to_date(out_dir, record):
        return ExportResult(out_dir, out_dir / "shards", settings.n, None, True)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / RECORD_NAME).exists() and not overwrite:
        raise ConfigError(f"{out_dir} exists and holds other files; choose a new folder or pass --overwrite")

    work = out_dir.with_name(f".{out_dir.name}{TEMP_MARK}export")
    shutil.rmtree(work, ignore_errors=True)  # leftovers of a killed export
    (work / "shards").mkdir(parents=True)
    ext = images.EXTENSIONS[settings.format]
    quality = settings.quality if settings.format != "png" else None
    names = info.class_names or (UNLABELLED,)
    histogram = {name: 0 for name in names}
    start = time.perf_counter()
    bar = tqdm(total=settings.n, desc="export", unit="img", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor() as pool, ShardWriter(work / "shards", settings.shard_size) as writer:
        for first in range(0, settings.n, settings.batch_size):
            seeds = list(range(settings.seed + first, settings.seed + min(first + settings.batch_size, settings.n)))
            batch_labels = labels[first:first + len(seeds)]
            pixels = generate(G, z_dim, seeds, batch_labels, device, quality_cond)
            encoded = pool.map(lambda p: images.encode(p, settings.format, settings.quality), pixels)
            for seed, label, data in zip(seeds, batch_labels.tolist(), encoded):
                name = names[label]
                asked = f"-qc{quality_cond}" if quality_cond is not None else ""
                file = work / name / f"seed{seed:07d}-c{label}-q{quality or 0}{asked}.{ext}"
                file.parent.mkdir(exist_ok=True)
                file.write_bytes(data)
                meta = {"source": f"{checkpoint.name}:seed{seed}", "seed": seed, "class": name,
                        "quality": quality, "format": settings.format,
                        "checkpoint_sha256": record["checkpoint_sha256"]}
                if quality_cond is not None:
                    meta["quality_cond"] = quality_cond
                writer.add(ShardSample(f"{seed:08d}", data, ext, label if info.class_names else None, meta))
                histogram[name] += 1
            bar.update(len(seeds))
        shards = writer.close()
    bar.close()
    seconds = time.perf_counter() - start
    write_manifest(work / "shards", Manifest(
        created_by="export", source=str(checkpoint), settings=record, resolution=info.resolution,
        image_format=settings.format, class_names=list(info.class_names), shards=shards,
        class_histogram=histogram, quality_histogram={str(quality): settings.n},
    ))
    write_text_atomic(work / RECORD_NAME, json.dumps({**record, "images": settings.n}, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return ExportResult(out_dir, out_dir / "shards", settings.n, settings.n / seconds, False)


@torch.no_grad()
def generate(G: nn.Module, z_dim: int, seeds: list[int], labels: torch.Tensor, device: torch.device,
             quality: int | torch.Tensor | None = None) -> np.ndarray:
    """Images for the given seeds and class ids as an (N, H, W, 3) uint8 array; a quality-conditioned
    G is asked for JPEG `quality` (1-100: one for all, or one per image).

    Each image's latent comes from its own seed, so an image does not depend on
    the batch it was generated in.
    """
    z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    if quality is not None:
        quality = torch.as_tensor(quality, dtype=torch.float32).expand(len(seeds)).div(100).to(device)
    out = G(z.to(device), labels.to(device), quality).float()
    return out.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _labels_for(settings: ExportSettings, info: DatasetInfo) -> torch.Tensor:
    """Class id of each image: the requested classes (or all), round robin."""
    if not info.class_names:
        if settings.classes:
            raise ConfigError("export classes: this model is unconditional; give no classes")
        return torch.zeros(settings.n, dtype=torch.int64)
    wanted = list(settings.classes) if settings.classes else list(info.class_names)
    unknown = [c for c in wanted if c not in info.class_names]
    if unknown:
        raise ConfigError(f"export classes: unknown {', '.join(map(repr, unknown))}; "
                          f"the model knows {', '.join(info.class_names)}")
    ids = torch.tensor([info.class_names.index(c) for c in wanted])
    return ids.repeat(settings.n // len(ids) + 1)[: settings.n]


def _up_to_date(out_dir: Path, record: dict) -> bool:
    try:
        done = json.loads((out_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return False
    done.pop("images", None)
    return done == record
