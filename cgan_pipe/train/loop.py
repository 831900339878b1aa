"""The training loop: one function that reads as an outline (data, networks, D phase, G phase, EMA, ticks)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from ..atomic import atomic_path, write_text_atomic
from ..augment import diff_augment, parse_policy
from ..config import PipelineConfig, to_dict
from ..data.loader import DatasetInfo, dataset_info, open_loader, shard_set_manifest
from ..devices import resolve_device
from ..distributed import require_one_process
from ..errors import DataError
from ..models import build_networks
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .ema import update_ema
from .losses import discriminator_loss, generator_loss

KEEP_CHECKPOINTS = 3


@dataclass
class TrainResult:
    """Where training left its outputs, and how fast it ran."""

    checkpoint: Path
    steps: int
    images_per_s: float | None  # real images per second over this session's steps (None if none ran)
    data_wait: float | None  # fraction of step time spent waiting for the loader
    metrics: Path
    samples: Path
    resumed_from: int


def train(cfg: PipelineConfig, shards: Path | str, run_dir: Path, progress: bool = True) -> TrainResult:
    """Train the configured GAN on the shard set in `shards` (a folder, or a URL for the torch
    loader), writing under `run_dir`.

    Resumes from the newest checkpoint in `run_dir/checkpoints` when there is one;
    returns at once when that checkpoint already reached `cfg.train.steps`.
    """
    require_one_process("train")
    tc = cfg.train
    device = resolve_device(tc.device, "train.device")
    ckpt_dir, samples_dir = run_dir / "checkpoints", run_dir / "samples"
    metrics_path = run_dir / "metrics.jsonl"
    samples_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # The newest complete checkpoint, if any: a finished run returns before any set-up.
    info = dataset_info(shard_set_manifest(shards))
    existing = list_checkpoints(ckpt_dir)
    state = load_checkpoint(existing[-1], map_location=device) if existing else None
    if state is not None:
        _check_compatible(state, cfg, info, existing[-1])
    start = state["step"] if state is not None else 0
    if start >= tc.steps:
        return TrainResult(existing[-1], start, None, None, metrics_path, samples_dir, start)

    # Data: an endless stream of batches on the training device.
    loader = open_loader(shards, cfg.loader, tc.batch_size, cfg.seed, device)

    # Networks (built from the data's shape and classes), EMA generator, optimisers.
    G, D = build_networks(cfg.model, info)
    G, D = G.to(device), D.to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=tc.lr_g, betas=(tc.beta1, tc.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=tc.lr_d, betas=(tc.beta1, tc.beta2))
    if state is not None:
        for module, key in ((G, "G"), (D, "D"), (G_ema, "G_ema"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            module.load_state_dict(state[key])
        torch.set_rng_state(state["rng"]["torch"])

    # Rows logged after the checkpoint we resume from (by a killed run) would be repeated: drop them.
    if metrics_path.exists():
        kept = [json.dumps(row) + "\n" for row in read_metrics(metrics_path) if row["step"] <= start]
        write_text_atomic(metrics_path, "".join(kept))

    def checkpoint_state() -> dict:
        return {
            "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "config": to_dict(cfg),
            "dataset": {"resolution": info.resolution, "channels": info.channels,
                        "class_names": list(info.class_names)},
            "rng": {"torch": torch.get_rng_state()},
        }

    fixed_z, fixed_labels = _grid_inputs(info, cfg.model.z_dim, cfg.seed, device)
    batches = iter(loader)
    n_classes = max(info.num_classes, 1)
    window_start, window_wait, window_images = time.perf_counter(), 0.0, 0
    total_time, total_wait, total_images = 0.0, 0.0, 0
    path = existing[-1] if existing else None
    policy = parse_policy(tc.diffaugment)  # the same random transforms for every image D sees

    def augment(images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, policy)

    bar = tqdm(range(start + 1, tc.steps + 1), initial=start, total=tc.steps, desc="train",
               unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        # D phase: real batch vs. fakes of the same classes.
        for _ in range(tc.n_dis):
            t0 = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - t0
            window_images += batch.images.shape[0]
            with torch.no_grad():
                fake = G(torch.randn(batch.images.shape[0], cfg.model.z_dim, device=device), batch.labels)
            loss_d = discriminator_loss(tc.loss, D(augment(batch.images), batch.labels), D(augment(fake), batch.labels))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        # G phase: fresh latents, uniformly drawn classes.
        labels = torch.randint(0, n_classes, (tc.batch_size,), device=device)
        fake = G(torch.randn(tc.batch_size, cfg.model.z_dim, device=device), labels)
        loss_g = generator_loss(tc.loss, D(augment(fake), labels))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        # EMA of G.
        update_ema(G_ema, G, tc.ema_decay, step)

        # Ticks: metrics row, sample grid, checkpoint.
        last = step == tc.steps
        if step % tc.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            row = {
                "step": step, "kimg": round(step * tc.n_dis * tc.batch_size / 1000, 3),
                # epochs of this rank's share of the data (full batches counted; an epoch's last may be smaller)
                "epoch": round(step * tc.n_dis * tc.batch_size / loader.samples_per_epoch, 3),
                "loss_d": round(loss_d.item(), 5), "loss_g": round(loss_g.item(), 5),
                "images_per_s": round(window_images / elapsed, 1),
                "data_wait": round(window_wait / elapsed, 4), "time": round(time.time(), 3),
            }
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            bar.set_postfix(img_s=row["images_per_s"], wait=f"{row['data_wait']:.0%}",
                            loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}")
            total_time, total_wait, total_images = total_time + elapsed, total_wait + window_wait, \
                total_images + window_images
            window_start, window_wait, window_images = time.perf_counter(), 0.0, 0
        if step % tc.sample_every == 0 or last:
            _save_grid(G_ema, fixed_z, fixed_labels, samples_dir / f"step-{step:07d}.png")
        if step % tc.checkpoint_every == 0 or last:
            path = save_checkpoint(ckpt_dir, step, checkpoint_state(), keep=KEEP_CHECKPOINTS)
    bar.close()
    return TrainResult(path, tc.steps, total_images / total_time, total_wait / total_time,
                       metrics_path, samples_dir, start)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file; a last line cut short by a killed run is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _check_compatible(state: dict, cfg: PipelineConfig, info: DatasetInfo, path: Path) -> None:
    stored = state["config"]
    if stored.get("model") != to_dict(cfg.model) or state["dataset"]["class_names"] != list(info.class_names) \
            or state["dataset"]["resolution"] != info.resolution:
        raise DataError(
            f"{path}: this checkpoint was made with a different model or dataset; "
            f"to start afresh use a new run_dir (or delete {path.parent})"
        )


def _grid_inputs(info: DatasetInfo, z_dim: int, seed: int, device: torch.device,
                 per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed latents for sample grids: one row per class (8 rows when unlabelled)."""
    rows = info.num_classes or 8
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows * per_class, z_dim, generator=generator)
    labels = torch.arange(rows).repeat_interleave(per_class) if info.num_classes else torch.zeros(rows * per_class)
    return z.to(device), labels.to(device, torch.int64)


@torch.no_grad()
def _save_grid(G: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    images = G(z, labels).float().add(1).div(2).clamp(0, 1)
    with atomic_path(path) as tmp:
        save_image(images, tmp, nrow=10, padding=1, format="png")
