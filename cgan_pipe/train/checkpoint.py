"""Checkpoints: one file per save, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..atomic import atomic_path
from ..config import CompressionConfig, ModelConfig, PipelineConfig, config_from_dict, to_dict
from ..data.batch import DatasetInfo
from ..data.epochs import LoaderPosition
from ..errors import ConfigError, DataError
from .ema import OWN_STATISTICS

KIND = "cgan-pipe-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{7})\.pt$")
# what a key older checkpoints lack meant: its default
_DEFAULTS = {"model": to_dict(ModelConfig()), "compression": to_dict(CompressionConfig())}


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(directory) / f"ckpt-{step:07d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int,
                    warn: Callable[[str], None] = lambda message: None) -> Path:
    """Write `state` (state dicts, config, RNG, ...) for `step`; keep it and the newest `keep` - 1 checkpoints
    before it, deleting older ones. Only files that load as checkpoints are ever deleted (whatever else carries
    a checkpoint's name is left alone), and what already holds this step's name but is not a checkpoint is
    moved aside (reported through `warn`), not replaced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    if (path.exists() or path.is_symlink()) and not _holds_checkpoint(path, step):
        aside = _free_name(path.with_name(f"{path.name}.unreadable"))
        path.rename(aside)
        warn(f"{path} was not a readable checkpoint; it was moved to {aside.name} and the checkpoint of step "
             f"{step} written in its place")
    with atomic_path(path) as tmp:
        try:
            torch.save({"kind": KIND, "version": VERSION, "step": step, **state}, tmp)
        except RuntimeError as exc:  # torch's zip writer words a failed write (a full disk) this way
            raise DataError(f"{path}: could not write the checkpoint ({str(exc).splitlines()[0]}); is the disk "
                            f"full? The checkpoints before it are kept: free some space and rerun the same "
                            f"command to resume") from None
    older = [p for p in list_checkpoints(directory) if _step(p) < step and _holds_checkpoint(p, _step(p))]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink()
    return path


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _holds_checkpoint(path: Path, step: int) -> bool:
    """Whether the file `path` is a cgan-pipe checkpoint of `step`, by its contents (mapped, not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  anything that does not load is not a checkpoint to delete
        return False
    return isinstance(state, dict) and state.get("kind") == KIND and state.get("step") == step


def _free_name(path: Path) -> Path:
    """`path`, or `path` with a number added, whichever names nothing yet."""
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        candidate, number = path.with_name(f"{path.name}-{number}"), number + 1
    return candidate


def training_state(cfg: PipelineConfig, networks: tuple[nn.Module, nn.Module, nn.Module],
                   optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], info: DatasetInfo,
                   qualities: list[int] | None, shards_sha256: str, device: torch.device, seconds: float,
                   data_position: list[dict] | None = None) -> dict:
    """What a training checkpoint holds: G, D and G_ema, their optimisers, the config, the data's shape and
    classes (and trained qualities), the shard set's hash, the RNG states, the training time so far, and
    each rank's loader position (`data_position`, data/epochs.py), when known."""
    (G, D, G_ema), (opt_g, opt_d) = networks, optimizers
    return {
        "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
        "config": to_dict(cfg),
        "dataset": {"resolution": info.resolution, "channels": info.channels,
                    "class_names": list(info.class_names), "qualities": qualities},
        "shards_sha256": shards_sha256,
        "rng": rng_state(device),
        "train_seconds": seconds,
        "ema_batchnorm": OWN_STATISTICS,
        **({"data_position": data_position} if data_position is not None else {}),
    }


def data_position(state: dict, rank: int, world: int, estimate: int) -> LoaderPosition:
    """Where rank `rank` of `world` resumes reading the data from the checkpoint `state`: its loader's
    recorded position; for a checkpoint without one (older, or written by another number of ranks), the
    start of epoch `estimate` (how many epochs its step amounts to)."""
    positions = state.get("data_position")
    if isinstance(positions, list) and len(positions) == world:
        position = LoaderPosition.from_dict(positions[rank])
        if position is not None:
            return position
    return LoaderPosition(estimate, ())


def load_weights(module: nn.Module, state: dict, key: str, path: Path | str) -> None:
    """Load network `key` ("G", "D" or "G_ema") of the checkpoint `state` read from `path` into `module`;
    DataError naming the file when the shapes differ (a checkpoint of a network made another way, e.g. by a
    cgan-pipe whose channel plan for this family and resolution was another)."""
    try:
        module.load_state_dict(state[key])
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "Missing" in line),
                     str(exc).splitlines()[0])
        raise DataError(f"{path}: its {key} does not fit the network this config builds ({first}); it was made "
                        f"with other model settings or by an older cgan-pipe: train in a new run_dir") from None


def list_checkpoints(directory: Path) -> list[Path]:
    """The files in `directory` named as checkpoints, oldest first (temp files, folders and links are never
    listed); what each holds is checked when it is loaded (`load_checkpoint`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p.is_file() and not p.is_symlink())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only; no code runs).

    Raises DataError naming the file when it is missing, unreadable or not ours.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # what torch.save writes
            raise DataError(f"{path}: not a checkpoint (not a file written by torch.save)") from None
        raise DataError(f"{path}: refused to load: it holds objects other than tensors and plain data, which could "
                        f"run code; cgan-pipe checkpoints never do") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise DataError(f"{path}: not a cgan-pipe checkpoint")
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')!r}, this cgan-pipe reads {VERSION}")
    problem = _incomplete(state)
    if problem:
        raise DataError(f"{path}: incomplete checkpoint ({problem}); it was not written whole by cgan-pipe")
    return state


# What every checkpoint holds, by type (what `training_state` writes, plus kind, version and step).
_PARTS = {"step": int, "G": dict, "D": dict, "G_ema": dict, "opt_g": dict, "opt_d": dict, "config": dict,
          "dataset": dict, "rng": dict}
_DATASET = {"resolution": int, "channels": int, "class_names": list}


def _incomplete(state: dict) -> str | None:
    """What a loaded checkpoint lacks, or holds in a shape no training writes; None when it is whole."""
    for parts, where in ((_PARTS, ""), (_DATASET, "dataset.")):
        holder = state if not where else state["dataset"]
        for key, kind in parts.items():
            if not isinstance(holder.get(key), kind) or isinstance(holder.get(key), bool):
                article = "an" if kind.__name__[0] in "aeiou" else "a"
                return f"{where}{key} is {'missing' if key not in holder else f'not {article} {kind.__name__}'}"
    for network in ("G", "D", "G_ema"):
        if not all(isinstance(value, torch.Tensor) for value in state[network].values()):
            return f"{network} holds values that are not tensors"
    for optimiser in ("opt_g", "opt_d"):
        if not {"state", "param_groups"} <= state[optimiser].keys():
            return f"{optimiser} is not an optimiser's state"
    dataset, rng = state["dataset"], state["rng"].get("torch")
    if state["step"] < 0 or not all(isinstance(name, str) for name in dataset["class_names"]):
        return "its step or class names are not valid"
    if not isinstance(dataset.get("qualities"), (list, type(None))):
        return "its trained qualities are not a list"
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        return "its random number state is not a byte tensor"
    try:
        config_from_dict(state["config"], origin="its config")
    except ConfigError as exc:
        return str(exc)
    return None


def trained_on_other_shards(state: dict, shards_sha256: str) -> bool:
    """Whether the checkpoint `state` was trained on a shard set other than the one hashing to
    `shards_sha256` (checkpoints from before the hash was recorded are taken as trained on it)."""
    return state.get("shards_sha256", shards_sha256) != shards_sha256


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random number generators' states to checkpoint: the CPU's, and the training GPU's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device, fallback_seed: int) -> None:
    """Restore the states `_rng_state` saved (CPU tensors). A checkpoint without the training GPU's (one
    made on the CPU) seeds it with `fallback_seed`, so a resumed run does not draw the first run's latents."""
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda":
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        else:
            torch.cuda.manual_seed(fallback_seed)


def newest_checkpoint(directory: Path, warn: Callable[[str], None]) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, read on the CPU (the RNG states must be CPU tensors, and module
    and optimizer states are copied to their device as they are loaded); unreadable newer ones are
    reported and passed over."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except DataError as exc:
            warn(f"{exc}; resuming from the checkpoint before it")
    return None, None


def check_compatible(state: dict, cfg: PipelineConfig, info: DatasetInfo, path: Path) -> None:
    """Refuse to resume from a checkpoint of another model or dataset, naming what differs."""
    differences = []
    shaped_by = ["mode", "condition_output", "ambient_d_quality"]  # the compression keys that change G or D
    for section, keys in (("model", list(_DEFAULTS["model"])), ("compression", shaped_by)):
        stored, ours = state["config"].get(section, {}), to_dict(getattr(cfg, section))
        differences += [f"{section}.{key}: {stored.get(key, '(unset)')!r} in the checkpoint, {ours[key]!r} now"
                        for key in keys if stored.get(key, _DEFAULTS[section][key]) != ours[key]]
    dataset = state["dataset"]
    if dataset["class_names"] != list(info.class_names):
        differences.append(f"classes: {len(dataset['class_names'])} in the checkpoint, {info.num_classes} now")
    if dataset["resolution"] != info.resolution:
        differences.append(f"resolution: {dataset['resolution']} in the checkpoint, {info.resolution} now")
    if differences:
        raise DataError(f"{path}: this checkpoint was made with a different model or dataset "
                        f"({'; '.join(differences)}); to start afresh use a new run_dir (or delete {path.parent})")
