"""The training loop: one function that reads as an outline (data, networks, D phase, R1, G phase, EMA, ticks)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from ..atomic import atomic_path, remove_stale_temps, write_text_atomic
from ..compression import trained_qualities
from ..config import PipelineConfig, TrainConfig
from ..data.fingerprint import shard_set_fingerprint
from ..data.batch import DatasetInfo, dataset_info
from ..data.epochs import LoaderPosition
from ..data.loader import open_loader
from ..data.manifest import shard_set_manifest
from ..devices import has_fast_bf16, resolve_device
from ..distributed import all_ranks, any_rank, broadcast_module, rank_and_world, wait_for_all_ranks
from ..errors import ConfigError, DataError, Interrupted, TrainingError
from ..interrupts import StopRequest, stop_requests
from ..lock import folder_lock
from ..metrics.evaluate import Evaluator, check_eval_settings
from ..models import build_networks, check_fits
from .checkpoint import (check_compatible, checkpoint_path, data_position, load_weights, newest_checkpoint,
                         restore_rng, save_checkpoint, trained_on_other_shards, training_state)
from .curves import plot_curves
from .ema import recompute_batchnorm, standing_inputs, update_ema
from .guard import GuardReport, StepGuard, load_optimizer_state, make_adam
from .loss import GANLoss
from .schedule import kimg_trained, optimiser_settings, penalised, set_optimisers, values_at

log = logging.getLogger(__name__)
MAX_SKIPPED_IN_A_ROW = 50
GRID_ROWS = 20  # classes shown in a sample grid, at most
SUPERSEDED = "superseded"  # in a run folder: outputs of trainings on earlier shard sets, one folder each
TRAINING_OUTPUTS = ("checkpoints", "samples", "tensorboard", "curves.png", "metrics.jsonl", "eval.jsonl", "eval.json",
                    "export", "summary.json", "report.html")


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
    weights_sha256: str | None = None  # of G, D and EMA-G's parameters: equal on every rank of a torchrun job


def train(cfg: PipelineConfig, shards: Path | str, run_dir: Path, progress: bool = True,
          warn: Callable[[str], None] | None = None) -> TrainResult:
    """Train the configured GAN on the shard set in `shards` (a folder, or a URL for the torch
    loader), writing under `run_dir`.

    Resumes from the newest readable checkpoint in `run_dir/checkpoints` (an unreadable one is
    reported through `warn` and the one before it is used); returns at once when that checkpoint
    already reached `cfg.train.steps` or spent `cfg.train.max_minutes`. Under torchrun every rank
    calls this inside its process group: each reads its own part of the shards, gradients are
    averaged over ranks, and only rank 0 writes files, holding the run folder's lock (BusyError
    when another process holds it). SIGINT or SIGTERM ends training after the step under way, with a
    checkpoint of it, by raising Interrupted; a second signal ends it at once.
    """
    with folder_lock(run_dir) if rank_and_world()[0] == 0 else contextlib.nullcontext(), \
            stop_requests() as stop:
        return _train(cfg, shards, Path(run_dir), progress, warn, stop)


def _train(cfg: PipelineConfig, shards: Path | str, run_dir: Path, progress: bool,
           warn: Callable[[str], None] | None, stop: StopRequest) -> TrainResult:
    """The training loop of `train`, in the order of a training's outline."""
    t_session = time.perf_counter()
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    tc = cfg.train
    rank, world = rank_and_world()
    lead = rank == 0
    device = resolve_device(tc.device, "train.device")
    dtype = _autocast_dtype(tc.precision, device)
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size: {tc.batch_size} does not split evenly over {world} ranks")
    ckpt_dir, samples_dir = run_dir / "checkpoints", run_dir / "samples"
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if lead:
        samples_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, ckpt_dir, samples_dir):  # a killed run's half-written checkpoint, grid, ...
            if folder.is_dir():
                remove_stale_temps(folder)

    # The newest usable checkpoint, if any: a finished run returns before any set-up.
    manifest = shard_set_manifest(shards)
    info = dataset_info(manifest)
    if cfg.eval.every:
        check_eval_settings(cfg.eval, info)
    shards_sha256 = shard_set_fingerprint(manifest)
    path, state = _checkpoint_to_resume(cfg, run_dir, info, shards_sha256, warn, world)
    start = state["step"] if state is not None else 0
    spent = state.get("train_seconds", 0.0) if state is not None else 0.0
    budget = tc.max_minutes * 60 if tc.max_minutes else None
    if state is not None and _finished(state, tc):
        return TrainResult(path, start, None, None, metrics_path, samples_dir, start)
    log.info(f"training on {device} ({'fp32' if dtype is None else dtype}), {world} rank(s), batch {tc.batch_size}, "
             + (f"resuming from {path} (step {start}, {spent / 60:.1f} minutes spent)" if state is not None
                else "from scratch"))

    check_fits(cfg.model, info, cfg.compression, device, training=True)  # before a mistyped width takes it all

    # Data: an endless stream of this rank's batches on the training device, each epoch in its own seeded
    # order. A resumed run goes on within the epoch its checkpoint recorded (data/epochs.py): each of its
    # loader's streams skips the shards it had started, so no sample is seen twice in that epoch.
    mode = cfg.compression.mode  # condition / ambient: every real batch carries its JPEG qualities
    resume_at = data_position(state, rank, world, _epochs_done(start, tc, world, manifest.num_samples)) \
        if state is not None else None
    loader = open_loader(shards, cfg.loader, tc.batch_size // world, cfg.seed, device,
                         with_quality=mode != "none", start=resume_at)
    position = resume_at if resume_at is not None and len(resume_at.started) == loader.streams \
        else LoaderPosition(resume_at.epoch if resume_at else 0, (0,) * loader.streams)
    if resume_at is not None:
        log.info(f"the data goes on in epoch {position.epoch}, each of the loader's {loader.streams} streams past "
                 f"the shards it had started ({', '.join(map(str, position.started))})")

    # Networks (built from the data's shape and classes, identical on every rank), EMA generator, optimisers.
    torch.manual_seed(cfg.seed)
    G, D = build_networks(cfg.model, info, cfg.compression)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    g_settings, d_settings = optimiser_settings(tc, values_at(tc, 0.0))
    penalty_steps = penalised(tc)  # whether the R1/R2 step runs at all
    opt_g, opt_d = make_adam(G, *g_settings), make_adam(D, *d_settings)
    if state is not None:  # read on the CPU: load_state_dict copies each tensor to where its module lives
        for module, key in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
            load_weights(module, state, key, path)
        load_optimizer_state(opt_g, state["opt_g"])
        load_optimizer_state(opt_d, state["opt_d"])
        restore_rng(state["rng"], device, cfg.seed + start)
    for module in (G, D, G_ema):
        broadcast_module(module, world)
    if rank:  # other ranks draw other latents (on every device)
        torch.manual_seed(cfg.seed + 1_000_003 * rank + start)
    G_train, D_train = (torch.compile(G), torch.compile(D)) if tc.compile else (G, D)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    guard = StepGuard(device, world, scaler)  # skips steps whose loss is not finite; read at ticks

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    # Rows logged after the checkpoint we resume from (by a killed run) would be repeated: drop them.
    if lead:
        for rows_path in (metrics_path, eval_path):
            if rows_path.exists():
                kept = [json.dumps(row) + "\n" for row in read_metrics(rows_path) if row["step"] <= start]
                write_text_atomic(rows_path, "".join(kept))

    board = _tensorboard_writer(run_dir / "tensorboard") if lead else None
    qualities = trained_qualities(manifest, cfg.loader) if mode != "none" else None
    fixed_z, fixed_labels, fixed_quality = _grid_inputs(info, cfg.model.z_dim, cfg.seed, device,
                                                        qualities if mode == "condition" else None)
    batches = iter(loader)
    local_batch = tc.batch_size // world
    standing = standing_inputs(G, info.num_classes, local_batch, cfg.seed, device, qualities)
    loss = GANLoss(cfg, G, D, G_train, D_train, info.num_classes, qualities, device, autocast, memory_format)
    window_start, window_wait, window_images = time.perf_counter(), 0.0, 0
    total_time, total_wait, total_images = 0.0, 0.0, 0
    eval_seconds = 0.0
    evaluator: Evaluator | None = None

    bar = tqdm(range(start + 1, tc.steps + 1), initial=start, total=tc.steps, desc="train",
               unit="step", disable=not (progress and lead), dynamic_ncols=True)
    step, interrupted = start, False
    for step in bar:
        # The scheduled values of this step: learning rates, betas, penalty weights, augmentation probability.
        loss.now = values_at(tc, kimg_trained(tc, step - 1))
        set_optimisers(tc, loss.now, opt_g, opt_d)

        # D phase: n_dis updates, each on the next real batch and fakes of its classes (and qualities).
        for _ in range(tc.n_dis):
            t0 = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - t0
            if batch.mark is not None:
                position = position.after(batch.mark)
            window_images += batch.images.shape[0] * world
            loss_d, reals, fakes = loss.discriminator_main(batch)
            guard.step(loss_d, D, opt_d, "the discriminator loss", step)

        # R1 on the last reals and R2 on their fakes, every r1_every steps (lazy regularisation).
        if penalty_steps and step % tc.r1_every == 0:
            guard.step(loss.penalties(reals, fakes, batch.labels, batch.quality), D, opt_d, "the R1/R2 penalty", step)

        # G phase, with D frozen: classes and qualities come from the last real batch (see generator_main).
        D.requires_grad_(False)
        loss_g = loss.generator_main(local_batch, batch, reals)
        guard.step(loss_g, G, opt_g, "the generator loss", step)
        D.requires_grad_(True)
        guard.end_step()

        # EMA of G.
        update_ema(G_ema, G, tc.ema_decay, step, tc.ema_warmup)

        # Ticks: the guard's counts (the one host read), metrics row, evaluation, sample grid and curves,
        # checkpoint. All ranks agree on stopping at the budget: each step on one rank, at ticks on several.
        seconds = spent + time.perf_counter() - t_session - eval_seconds
        tick = step % tc.log_every == 0 or step % tc.sample_every == 0 or step % tc.checkpoint_every == 0 or \
            bool(cfg.eval.every and step % cfg.eval.every == 0)
        out_of_time = any_rank(budget is not None and seconds >= budget, world, device) if world == 1 or tick \
            else False
        interrupted = any_rank(stop.signal is not None, world, device) if world == 1 or tick else False
        last = step == tc.steps or out_of_time or interrupted
        if not (tick or last):
            continue
        report, (d_value, g_value) = guard.read(loss_d, loss_g)
        _check_guard(report, tc.on_nonfinite, step, path)
        kimg = round(kimg_trained(tc, step), 3)
        if step % tc.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            row = {
                "step": step, "kimg": kimg,
                # epochs of this rank's share of the data (full batches counted; an epoch's last may be smaller)
                "epoch": round(step * tc.n_dis * local_batch / loader.samples_per_epoch, 3),
                "loss_d": round(d_value, 5), "loss_g": round(g_value, 5),
                "images_per_s": round(window_images / elapsed, 1),
                "data_wait": round(window_wait / elapsed, 4), "skipped": report.skipped,
                "minutes": round(seconds / 60, 3), "time": round(time.time(), 3),
                **({key: float(f"{getattr(loss.now, key):.6g}") for key in tc.schedule_to} if tc.schedule_to else {}),
            }
            if lead:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                _log_scalars(board, "train", row)
            bar.set_postfix(img_s=row["images_per_s"], wait=f"{row['data_wait']:.0%}",
                            loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}")
            total_time, total_wait, total_images = total_time + elapsed, total_wait + window_wait, \
                total_images + window_images
            window_start, window_wait, window_images = time.perf_counter(), 0.0, 0
        evaluating = bool(cfg.eval.every and step % cfg.eval.every == 0)
        sampling = lead and (step % tc.sample_every == 0 or last)
        saving = lead and (step % tc.checkpoint_every == 0 or last)
        if lead and (evaluating or sampling or saving):
            recompute_batchnorm(G_ema, standing)  # the EMA's own statistics, for evaluation, grids and checkpoints
        if evaluating:
            t0 = time.perf_counter()
            if lead:
                evaluator = evaluator or Evaluator(shards, cfg.eval, cfg.loader, device)
                row = {"step": step, "kimg": kimg, **evaluator(G_ema, cfg.model.z_dim, qualities=qualities)}
                with open(eval_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                _log_scalars(board, "eval", row)
            any_rank(False, world, device)  # the other ranks wait here for rank 0's evaluation
            window_start += time.perf_counter() - t0
            eval_seconds += time.perf_counter() - t0
        if sampling:
            _save_grid(G_ema, fixed_z, fixed_labels, fixed_quality, samples_dir / f"step-{step:07d}.png")
        if lead and (evaluating or last):  # a drawing takes ~0.5 s: not at every sample grid (TensorBoard is live)
            plot_curves(read_metrics(metrics_path), read_metrics(eval_path), run_dir / "curves.png")
        positions = all_ranks(position.to_dict(), world) if step % tc.checkpoint_every == 0 or last else None
        if saving:
            trained = training_state(cfg, (G, D, G_ema), (opt_g, opt_d), info, qualities, shards_sha256, device,
                                     seconds, positions)
            path = save_checkpoint(ckpt_dir, step, trained, keep=tc.keep_checkpoints, warn=warn)
            log.debug(f"wrote {path}")
        if last:
            break
    bar.close()
    if board is not None:
        board.close()
    path = path if lead else checkpoint_path(ckpt_dir, step)
    if interrupted:
        raise Interrupted(stop.signal or signal.SIGTERM, f"training stopped at step {step} and wrote {path}")
    return TrainResult(path, step, total_images / total_time, total_wait / total_time,
                       metrics_path, samples_dir, start, _weights_sha256(G, D, G_ema))


def _checkpoint_to_resume(cfg: PipelineConfig, run_dir: Path, info: DatasetInfo, shards_sha256: str,
                          warn: Callable[[str], None], world: int) -> tuple[Path | None, dict | None]:
    """The newest readable checkpoint in run_dir/checkpoints and its state, or (None, None) to start afresh.
    One trained on other shards is not resumed: rank 0 moves its run's outputs aside (`supersede`); one of
    another model or dataset is refused (DataError)."""
    path, state = newest_checkpoint(run_dir / "checkpoints", warn)
    if state is not None and trained_on_other_shards(state, shards_sha256):
        if world > 1:
            wait_for_all_ranks()  # every rank has read the old checkpoint before rank 0 moves it
        if rank_and_world()[0] == 0:
            moved = supersede(run_dir)
            (run_dir / "samples").mkdir(parents=True)
            warn(f"the shards changed since {path} was trained; the outputs trained on the old ones were moved to "
                 f"{moved}, and training starts afresh")
        if world > 1:
            wait_for_all_ranks()
        return None, None
    if state is not None:
        check_compatible(state, cfg, info, path)
    return path, state


def _epochs_done(step: int, tc: TrainConfig, world: int, samples: int) -> int:
    """Whole epochs of a rank's share of `samples` that `step` steps amount to (for a checkpoint that records
    no loader position)."""
    return step * tc.n_dis * (tc.batch_size // world) * world // max(1, samples)


def _weights_sha256(*modules: nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for tensor in module.parameters():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (or eval.jsonl) file; a last line cut short by a killed run is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _tensorboard_writer(directory: Path):
    """A TensorBoard SummaryWriter into `directory` when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: pip install tensorboard (or cgan-pipe[tensorboard])
        return None
    return SummaryWriter(str(directory))


def _log_scalars(board, group: str, row: dict) -> None:
    if board is None:
        return
    for key, value in row.items():
        if key not in ("step", "time") and isinstance(value, (int, float)):
            board.add_scalar(f"{group}/{key}", value, row["step"])
    board.flush()


def train_status(cfg: PipelineConfig, run_dir: Path, shards: Path | str) -> tuple[str, str]:
    """What `train` would do in `run_dir` on the shard set `shards`, without doing it:
    ('up to date' | 'resume' | 'run', why)."""
    path, state = newest_checkpoint(run_dir / "checkpoints", lambda message: None)
    budget = f" or {cfg.train.max_minutes} minutes" if cfg.train.max_minutes else ""
    if state is None:
        return "run", f"no checkpoint yet: {cfg.train.steps} steps{budget} from scratch"
    if trained_on_other_shards(state, shard_set_fingerprint(shard_set_manifest(shards))):
        return "run", (f"the shards changed since {path.name} was trained: its outputs will be moved to "
                       f"{run_dir / SUPERSEDED}/, then {cfg.train.steps} steps{budget} from scratch")
    finished = _finished(state, cfg.train)
    if finished:
        return "up to date", f"{path.name} {finished}"
    return "resume", f"from {path.name} (step {state['step']} of {cfg.train.steps})"


def supersede(run_dir: Path) -> Path:
    """Move everything in `run_dir` that a training produced (checkpoints, samples, curves, metrics,
    scores, export, summary, report) into run_dir/superseded/<UTC time>/, and return that folder."""
    target = run_dir / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    for name in TRAINING_OUTPUTS:
        if (run_dir / name).exists():
            (run_dir / name).rename(target / name)
    return target


def _finished(state: dict, tc: TrainConfig) -> str | None:
    """Why the training that saved `state` is complete for `tc` (its steps or its time budget), or None."""
    if state["step"] >= tc.steps:
        return f"is at step {state['step']} of {tc.steps}"
    if tc.max_minutes and state.get("train_seconds", 0.0) >= tc.max_minutes * 60:
        return f"spent the {tc.max_minutes}-minute budget (step {state['step']})"
    return None


def trained_so_far(run_dir: Path) -> TrainResult:
    """What an earlier training left in `run_dir`: its newest checkpoint (DataError when there is none)."""
    path, state = newest_checkpoint(Path(run_dir) / "checkpoints", lambda message: None)
    if state is None:
        raise DataError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint; run the train stage first")
    return TrainResult(path, state["step"], None, None, Path(run_dir) / "metrics.jsonl", Path(run_dir) / "samples",
                       state["step"])


def _check_guard(report: GuardReport, on_nonfinite: str, step: int, path: Path | None) -> None:
    """Stop training as train.on_nonfinite says, from what the step guard saw (a skipped update changed no
    weight, so the last checkpoint is still good)."""
    kept = f"the last good checkpoint is {path}" if path else "no checkpoint was written yet"
    if on_nonfinite == "stop" and report.first is not None:
        bad_step, what, value = report.first
        raise TrainingError(f"{what} became {value} at step {bad_step}; training stopped and {kept}. "
                            f"Lower train.lr_d/lr_g, add train.r1_gamma, or set train.on_nonfinite: skip")
    if report.longest_run >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingError(f"{report.longest_run} steps in a row had non-finite losses (by step {step}); "
                            f"training stopped and {kept}")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision on `device` (None: full fp32, no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _grid_inputs(info: DatasetInfo, z_dim: int, seed: int, device: torch.device, qualities: list[int] | None,
                 per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fixed inputs for sample grids: one row per class, or per GRID_ROWS classes spread evenly over the labels
    when there are more (8 rows when unlabelled). For a quality-conditioned G, a row is one latent at 10
    qualities from the lowest to the highest trained, left to right."""
    classes = torch.linspace(0, info.num_classes - 1, min(info.num_classes, GRID_ROWS)).round().long() \
        if info.num_classes else torch.zeros(8, dtype=torch.long)
    rows = len(classes)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows * per_class, z_dim, generator=generator)
    labels = classes.repeat_interleave(per_class)
    quality = None
    if qualities is not None:
        z = z[::per_class].repeat_interleave(per_class, dim=0)
        quality = torch.linspace(min(qualities), max(qualities), per_class).round().div(100).repeat(rows).to(device)
    return z.to(device), labels.to(device, torch.int64), quality


@torch.no_grad()
def _save_grid(G: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None,
               path: Path) -> None:
    images = G(z, labels, quality).float().add(1).div(2).clamp(0, 1)
    with atomic_path(path) as tmp:
        save_image(images, tmp, nrow=10, padding=1, format="png")
