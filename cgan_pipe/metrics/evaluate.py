"""Score a generator against the real shards: classifier-feature metrics, FID/KID/IS and JPEG quality when asked."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..atomic import atomic_path
from ..config import EvalConfig, LoaderConfig, default_cache_dir
from ..data.batch import DatasetInfo, dataset_info
from ..data.loader import first_samples
from ..data.manifest import shard_set_manifest
from ..devices import available_memory, gib
from ..errors import ConfigError
from ..generation import generate, load_generator
from ..images import from_uint8
from ..train.checkpoint import load_checkpoint
from .classifier import NAME as CLASSIFIER_NAME
from .classifier import Classifier, train_classifier
from .inception import CLASSES as INCEPTION_CLASSES, FEATURES as INCEPTION_FEATURES
from .inception import fetch_fid_weights, load_fid_inception
from .quality import (QualityRegressor, block_edge_ratio, block_steps, estimate_pixel_quality, spearman,
                      train_quality_regressor)
from .stats import feature_stats, frechet_distance, inception_score, kernel_inception_distance

log = logging.getLogger(__name__)
INCEPTION_METRICS = ("fid", "kid", "is")


def check_eval_settings(cfg: EvalConfig, info: DatasetInfo) -> None:
    """Reject metric choices this data or this config cannot give, before any training starts."""
    if "classifier" in cfg.metrics and not info.num_classes:
        raise ConfigError("eval.metrics: 'classifier' needs class labels and these shards have none; "
                          "use fid/kid/is with eval.inception_weights, or metrics: []")
    per_image = 4 * ((Classifier.FEATURES + info.num_classes if "classifier" in cfg.metrics else 0)
                     + (INCEPTION_FEATURES + INCEPTION_CLASSES if any(m in INCEPTION_METRICS for m in cfg.metrics)
                        else 0))
    need, free = 2 * per_image * (cfg.n_samples + min(cfg.n_reference, info.num_samples)), \
        available_memory(torch.device("cpu"))  # twice: a batch's features are gathered, then joined
    if need > free:
        raise ConfigError(f"eval.n_samples: {cfg.n_samples:,} generated and up to {cfg.n_reference:,} real images "
                          f"would need {gib(need)} for their features, more than the {gib(free)} of memory free; "
                          f"lower eval.n_samples or eval.n_reference")
    if any(m in INCEPTION_METRICS for m in cfg.metrics) and not inception_weights(cfg).is_file():
        load_fid_inception(cfg.inception_weights)  # raises the message saying where to get it


def inception_weights(cfg: EvalConfig) -> Path:
    """The FID Inception weights file: eval.inception_weights, or the standard one, fetched once into the
    cache folder (before any training: a clear error offline)."""
    if cfg.inception_weights:
        return Path(cfg.inception_weights).expanduser()
    return fetch_fid_weights(_cache_root(cfg))


class Evaluator:
    """Feature extractors and cached reference features for one shard set; call it on a generator."""

    def __init__(self, shards: Path | str, cfg: EvalConfig, loader_cfg: LoaderConfig, device: torch.device,
                 progress: bool = False):
        manifest = shard_set_manifest(shards)
        self.info = dataset_info(manifest)
        check_eval_settings(cfg, self.info)
        self.cfg, self.device = cfg, device
        cache = _cache_root(cfg) / _shard_set_id(manifest)
        # Reals are read as they are: no augmentation, no JPEG distortion.
        plain = dataclasses.replace(loader_cfg, hflip=False, pad_crop=0, resized_crop_min_scale=None,
                                    color_jitter=0.0, jpeg_distort=None)
        self.n_reference = min(cfg.n_reference, manifest.num_samples)
        self.classifier: Classifier | None = None
        self.inception: nn.Module | None = None
        self.quality_regressor: QualityRegressor | None = None
        self.reference: dict[str, np.ndarray] = {}
        if "classifier" in cfg.metrics:
            name = f"{CLASSIFIER_NAME}-{cfg.classifier_steps}"
            self.classifier = _cached_model(
                cache / f"{name}.pt", lambda: Classifier(self.info.num_classes),
                lambda: train_classifier(shards, plain, self.info.num_classes, cfg.classifier_steps, device,
                                         progress=progress), device)
            self.reference.update(_cached_reference(cache / f"reference-{name}-{self.n_reference}.npz", shards,
                                                    plain, self.n_reference, self._classifier_outputs, device))
        if any(m in INCEPTION_METRICS for m in cfg.metrics):
            weights = inception_weights(cfg)  # other weights, other reference features
            self.inception = load_fid_inception(weights).to(device)
            tag = hashlib.sha256(f"{weights.name}:{weights.stat().st_size}".encode()).hexdigest()[:8]
            self.reference.update(_cached_reference(cache / f"reference-inception-{tag}-{self.n_reference}.npz",
                                                    shards, plain, self.n_reference, self._inception_outputs, device))
        if "quality" in cfg.metrics:
            self.quality_regressor = _cached_model(
                cache / f"quality-regressor-{cfg.quality_steps}.pt", QualityRegressor,
                lambda: train_quality_regressor(shards, plain, cfg.quality_steps, device, progress=progress), device)

    @torch.no_grad()
    def __call__(self, generator: nn.Module, z_dim: int, progress: bool = False,
                 qualities: list[int] | None = None) -> dict[str, Any]:
        """Metrics of `generator` (in eval mode) on `cfg.n_samples` images from seeds cfg.seed.., balanced
        over the classes; images are rounded to 8 bits first, as they would be when saved. A quality-
        conditioned generator (trained on `qualities`) is scored at the highest of them, and the
        'quality' metric also asks it for each of cfg.quality_levels."""
        t0 = time.perf_counter()
        cfg = self.cfg
        top = max(qualities) if generator.quality_conditioned else None
        fake = self._generated_outputs(generator, z_dim, cfg.n_samples, top, progress)
        labels_all = self._labels(cfg.n_samples)

        results: dict[str, Any] = {"n_samples": cfg.n_samples, "n_reference": self.n_reference}
        if self.classifier is not None:
            results["classifier_fd"] = frechet_distance(feature_stats(fake["classifier_features"]),
                                                        feature_stats(self.reference["classifier_features"]))
            probabilities = _softmax(fake["classifier_logits"])
            results["classifier_score"] = inception_score(probabilities)
            results["class_accuracy"] = float((probabilities.argmax(1) == labels_all.numpy()).mean())
            results["real_accuracy"] = float(self.reference["classifier_accuracy"])
        if self.inception is not None:
            if "fid" in cfg.metrics:
                results["fid"] = frechet_distance(feature_stats(fake["inception_features"]),
                                                  feature_stats(self.reference["inception_features"]))
            if "kid" in cfg.metrics:
                results["kid"] = kernel_inception_distance(fake["inception_features"],
                                                           self.reference["inception_features"])
            if "is" in cfg.metrics:
                results["inception_score"] = inception_score(_softmax(fake["inception_logits"]))
        if self.quality_regressor is not None:
            results["estimated_quality"] = float(fake["quality_estimates"].mean())
            results["block_edge_ratio"] = block_edge_ratio(fake["block_steps"])
            if generator.quality_conditioned:
                results.update(self._quality_agreement(generator, z_dim, progress))
        results["seconds"] = round(time.perf_counter() - t0, 2)
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}

    def _labels(self, n: int) -> torch.Tensor:
        return torch.arange(n) % max(self.info.num_classes, 1)

    def _generated_outputs(self, generator: nn.Module, z_dim: int, n: int, quality: int | None,
                           progress: bool) -> dict[str, np.ndarray]:
        """The feature outputs of `n` images from seeds cfg.seed.., classes balanced, at `quality`."""
        outputs: dict[str, list[np.ndarray]] = {}
        labels_all = self._labels(n)
        for start in tqdm(range(0, n, self.cfg.batch_size), desc="eval", unit="batch", disable=not progress,
                          leave=False):
            seeds = list(range(self.cfg.seed + start, self.cfg.seed + min(start + self.cfg.batch_size, n)))
            images = from_uint8(generate(generator, z_dim, seeds, labels_all[start:start + len(seeds)],
                                         self.device, quality))
            for key, value in self._outputs(images).items():
                outputs.setdefault(key, []).append(value)
        return {key: np.concatenate(parts) for key, parts in outputs.items()}

    def _quality_agreement(self, generator: nn.Module, z_dim: int, progress: bool) -> dict[str, Any]:
        """Requested vs estimated quality over cfg.quality_levels (the same seeds at every level): Spearman
        correlation over all images, mean absolute error, and per level the mean estimate and the
        block-edge ratio."""
        levels = self.cfg.quality_levels
        per_level = max(self.cfg.n_samples // len(levels), 2)
        outputs = {q: self._generated_outputs(generator, z_dim, per_level, q, progress) for q in levels}
        requested = np.concatenate([np.full(per_level, q, dtype=np.float64) for q in levels])
        estimated = np.concatenate([outputs[q]["quality_estimates"] for q in levels]).astype(np.float64)
        return {"quality_spearman": spearman(requested, estimated),
                "quality_mae": float(np.abs(requested - estimated).mean()),
                "quality_by_level": {str(q): round(float(outputs[q]["quality_estimates"].mean()), 2) for q in levels},
                "block_edge_ratio_by_level": {str(q): round(block_edge_ratio(outputs[q]["block_steps"]), 3)
                                              for q in levels}}

    def _outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.quality_regressor is not None:
            out["quality_estimates"] = estimate_pixel_quality(self.quality_regressor, images)
            out["block_steps"] = block_steps(images)
        if self.classifier is not None:
            out.update(self._classifier_outputs(images))
        if self.inception is not None:
            out.update(self._inception_outputs(images))
        return out

    def _classifier_outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        features = self.classifier.features(images)
        return {"classifier_features": features.cpu().numpy(),
                "classifier_logits": self.classifier.head(features).cpu().numpy()}

    def _inception_outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        features, logits = self.inception(images)
        return {"inception_features": features.cpu().numpy(), "inception_logits": logits.cpu().numpy()}


def _cache_root(cfg: EvalConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def _shard_set_id(manifest: Any) -> str:
    """A name for the shard set's content: its shards' checksums and class names."""
    text = "\n".join([s.sha256 for s in manifest.shards] + list(manifest.class_names))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached_model(path: Path, empty: Callable[[], nn.Module], train: Callable[[], nn.Module],
                  device: torch.device) -> Any:
    """The frozen model cached at `path` (weights loaded into `empty()`), or `train()`'s, then cached there."""
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = empty()
            model.load_state_dict(state["model"])
            log.info(f"using the model cached in {path}")
            return model.to(device).eval().requires_grad_(False)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError):
            pass  # unreadable or from another version: train it again and replace it
    log.info(f"training a model for {path.name} once for this shard set (then cached in {path.parent})")
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict()}, tmp)
    return model.eval().requires_grad_(False)


def _cached_reference(path: Path, shards: Path | str, loader_cfg: LoaderConfig, n: int, extract: Any,
                      device: torch.device) -> dict[str, np.ndarray]:
    """Features of the first `n` real images of the (seeded) stream, and the classifier's accuracy on them."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                log.info(f"using the reference features cached in {path}")
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, EOFError):
            pass  # cut short or corrupt: compute it again
    features: dict[str, list[np.ndarray]] = {}
    correct, seen = 0, 0
    with torch.no_grad():
        for batch in first_samples(shards, loader_cfg, n, device):
            for key, value in extract(batch.images).items():
                if key.endswith("_features"):
                    features.setdefault(key, []).append(value)
                elif key == "classifier_logits":
                    correct += int((value.argmax(1) == batch.labels.cpu().numpy()).sum())
            seen += len(batch.labels)
    arrays = {key: np.concatenate(parts).astype(np.float32) for key, parts in features.items()}
    if "classifier_features" in arrays:
        arrays["classifier_accuracy"] = np.array(correct / seen)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return arrays


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def evaluate_checkpoint(checkpoint: Path, shards: Path | str, cfg: EvalConfig, loader_cfg: LoaderConfig,
                        device: torch.device, ema: bool = True, progress: bool = False) -> dict[str, Any]:
    """Metrics of the (EMA) generator in `checkpoint` against the real shard set `shards`."""

    state = load_checkpoint(checkpoint, map_location=device)
    generator, info, z_dim = load_generator(state, ema, device)
    evaluator = Evaluator(shards, cfg, loader_cfg, device, progress=progress)
    if evaluator.info.class_names != info.class_names:
        raise ConfigError(f"{checkpoint}: trained on classes {list(info.class_names)[:4]}..., but {shards} "
                          f"holds {list(evaluator.info.class_names)[:4]}...; give the shards it was trained on")
    scores = evaluator(generator, z_dim, progress=progress, qualities=state["dataset"].get("qualities"))
    return {"checkpoint": str(checkpoint), "step": state["step"], **scores}
