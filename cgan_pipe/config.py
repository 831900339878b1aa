"""The pipeline's settings: a dataclass section per stage, each key with its default, help and check;
load_pipeline reads a YAML into them (schema.py does the building and the error messages)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .errors import ConfigError
from .locations import is_url, location, refused_url
from .schema import Where, describe_keys, from_dict, from_yaml, option, required

Device = Literal["auto", "cpu", "cuda"]
ImageFormat = Literal["jpeg", "png", "webp"]
ShardFormat = Literal["jpeg", "png", "webp", "keep"]
ScheduledKey = Literal["lr_g", "lr_d", "r1_gamma", "r2_gamma", "beta2", "augment_p"]  # the keys schedule_to may name


# ---------------------------------------------------------------------------
# Checks of single keys (schema.option's `check`): None when the value is fine, else what is wrong.


def default_cache_dir() -> Path:
    """Where cgan-pipe caches what it computed once (trained classifiers, checked shards):
    $XDG_CACHE_HOME/cgan-pipe, or ~/.cache/cgan-pipe."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cgan-pipe"


def _positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _quality(value: int) -> str | None:
    return None if 1 <= value <= 100 else "must be between 1 and 100"


def _quality_range(value: list[int]) -> str | None:
    if len(value) != 2 or not all(1 <= q <= 100 for q in value) or value[0] > value[1]:
        return "must be [lo, hi] with 1 <= lo <= hi <= 100"
    return None


def _qualities(value: list[int]) -> str | None:
    if not value:
        return "must not be empty"
    return None if all(1 <= q <= 100 for q in value) else "every quality must be between 1 and 100"


def _png_level(value: int) -> str | None:
    return None if 0 <= value <= 9 else "must be between 0 and 9"


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def _probability(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def _export_classes(value: list[str] | dict[str, int]) -> str | None:
    if not value:
        return "must not be empty (null: all classes)"
    if isinstance(value, dict) and not all(count > 0 for count in value.values()):
        return "every count must be > 0"
    return None


def _truncation(value: float) -> str | None:
    return None if value >= 0.05 else "must be at least 0.05 (smaller thresholds redraw almost every component)"


def _diffaugment_policy(value: str) -> str | None:
    from .augment import parse_policy

    try:
        parse_policy(value)
    except ValueError as exc:
        return str(exc)
    return None


def _scale(value: float | None) -> str | None:
    return None if value is None or 0.0 < value <= 1.0 else "must be in (0, 1]"


def resolution_problem(value: int) -> str | None:
    """What is wrong with `value` as the side of a shard set's square images (None when nothing): the
    networks are built for powers of two from 8 to 1024. data.resolution's check, and every manifest's."""
    ok = 8 <= value <= 1024 and value & (value - 1) == 0
    return None if ok else "must be a power of two between 8 and 1024"


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BYTE_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """Bytes in a size such as '500000', '256MB' or '1GiB' (k/M/G: powers of 1000, KiB/MiB/GiB: of 1024).

    Raises ValueError for anything else, or a size under 1 byte.
    """
    match = _BYTE_SIZE.fullmatch(str(text))
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 500000, 256MB, 1GiB)")
    size = int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])
    if size < 1:
        raise ValueError(f"{text!r} is not a size of at least one byte")
    return size


def _byte_size(value: Any) -> str | None:
    if value is None:
        return None
    try:
        parse_byte_size(value)
    except ValueError as exc:
        return str(exc)
    return None


def _run_name(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if value in (".", "..") or any(c in value for c in "/\\\0"):
        return "must be a plain folder name (the run folder is runs/<name>); set run_dir to put the run elsewhere"
    return None


def _local_source(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    return (f"{value} is a URL; raw images are read from local paths only (copy them here first; a shard set "
            f"can be written to a bucket: `cgan-pipe prepare SOURCE s3://BUCKET/PREFIX`)") if is_url(value) else None


def _local_folder(value: str | None) -> str | None:
    return refused_url(value) if value is not None else None


def _shard_set(value: str | None) -> str | None:
    try:
        if value is not None:
            location(value, "loader.shards")
    except ConfigError as exc:
        return str(exc).removeprefix("loader.shards: ")
    return None


# ---------------------------------------------------------------------------
# The schema. One dataclass per concern; unknown keys are rejected.


@dataclass
class DataConfig:
    """Where the raw images come from and how they are written into shards."""

    source: str = required(
        "Raw images: an image-folder tree (class = folder name), a tar/tar.gz of one, a list file "
        "(.txt/.lst/.list, one path per line), an existing shard set (to re-shard or re-encode), the "
        "official CIFAR-10 python archive (cifar-10-python.tar.gz or its cifar-10-batches-py "
        "folder), or 'download:cifar10' to fetch CIFAR-10 with torchvision. "
        "Relative paths are taken from the current directory; ${VAR:-default} is expanded.",
        _local_source,
    )
    split: Literal["train", "test"] = option(
        "train", "Which split of a CIFAR-10 python archive or download to use."
    )
    resolution: int = option(32, "Side of the square training images, in pixels.", resolution_problem)
    format: ShardFormat = option(
        "jpeg",
        "Image format inside the shards. JPEG inputs already at the resolution are copied "
        "byte for byte (no second lossy encode); everything else is re-encoded. 'keep' copies "
        "every 8-bit RGB JPEG/PNG/WebP at the resolution and re-encodes the rest as PNG.",
    )
    quality: int = option(95, "JPEG/WebP quality (1-100) for re-encoded images.", _quality)
    qualities: Optional[list[int]] = option(
        None, "Write every image re-encoded at each of these qualities (e.g. [10, 30, 50, 75, 95]), "
        "recording the quality in its .json: data for quality conditioning. null: one sample per image.", _qualities
    )
    quality_mode: Literal["all", "random"] = option(
        "all", "With qualities: 'all' writes one sample per quality, 'random' one seeded-random quality per image."
    )
    shard_size: int = option(5000, "Samples per shard.", _positive)
    shard_bytes: Optional[str] = option(
        None, "Aim shards at about this size instead (e.g. '256MB', '1GiB'): the samples per shard are "
        "set from the mean size of 256 encoded images spread over the input. null: use shard_size.", _byte_size
    )
    reencode: bool = option(
        False, "Re-encode JPEGs that could be copied byte for byte (at the resolution, 8-bit RGB) at the "
        "configured format and quality too."
    )
    limit: Optional[int] = option(
        None, "Use at most this many images (a seeded random subset); null for all.", _positive
    )
    resize: Literal["crop", "pad", "reject"] = option(
        "crop", "Images not at the resolution: 'crop' (shorter side, centre crop), 'pad' (longer side, "
        "black borders) or 'reject' (skipped and listed)."
    )
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = option("4:2:0", "Chroma subsampling of re-encoded JPEGs.")
    png_compress_level: int = option(6, "zlib level (0-9) of written PNGs.", _png_level)
    webp_lossless: bool = option(False, "Write lossless WebP (quality is then ignored).")
    max_pixels: int = option(
        64_000_000, "Images with more pixels are skipped unread (decompression-bomb limit).", _positive
    )
    workers: Optional[int] = option(
        None, "Processes writing shards; null for one per core. The shards do not depend on it.", _positive
    )
    upload_scratch: str = option(
        "1GB", "Preparing into a bucket: the local disk its shards may take while they wait for their upload "
        "(each is uploaded, then deleted, as soon as it is written). At least one shard must fit.", _byte_size
    )
    download_dir: str = option(
        "~/.cache/cgan-pipe", "Where 'download:cifar10' keeps the downloaded archive.", _local_folder
    )


    def check(self, where: Where) -> None:
        """Keys that must agree: several qualities need a lossy format."""
        if self.qualities and (self.format not in ("jpeg", "webp") or self.webp_lossless):
            lossless = " (lossless)" if self.format == "webp" else ""
            raise ConfigError(f"{where('qualities')}: several qualities need a lossy format (jpeg or lossy webp), "
                              f"not {self.format!r}{lossless}")


@dataclass
class LoaderConfig:
    """How shards stream into training batches."""

    shards: Optional[str] = option(
        None, "Shard set `cgan-pipe train` reads instead of run_dir/shards: a folder, or a URL: s3://BUCKET/PREFIX "
        "(credentials and endpoint from the standard AWS settings, e.g. AWS_PROFILE, AWS_ENDPOINT_URL), "
        "http(s)://, or gs:// (through gcsfs, untested).", _shard_set
    )
    backend: Literal["dali", "torch"] = option(
        "dali", "'dali' (NVIDIA DALI pipeline) or 'torch' (webdataset + torchvision decode)."
    )
    device: Device = option(
        "auto",
        "Where images are decoded: 'cuda' (DALI mixed/nvJPEG), 'cpu', or 'auto' (cuda when "
        "a GPU is present).",
    )
    threads: int = option(2, "DALI CPU threads, or DataLoader workers for the torch backend.", _positive)
    shuffle_buffer: int = option(
        4096, "Samples held in the shuffle buffer (shards are also shuffled when written).", _positive
    )
    bucket_reads: Literal["shards", "samples"] = option(
        "shards", "How the DALI backend reads a shard set in a bucket: 'shards' (whole shards fetched ahead by "
        "cgan-pipe, checked against the manifest, decoded by DALI) or 'samples' (DALI's own S3 client, one ranged "
        "request per file of a sample: s3:// only, and far slower where each request waits on the network)."
    )
    bucket_cache_mb: int = option(
        1024, "Memory for whole shards read ahead from a bucket (loader.bucket_reads: shards; shared by the torch "
        "backend's workers): with DALI a shard set that fits is fetched once; otherwise each shard is fetched "
        "once per epoch, at most 8 ahead (4 per torch worker), and dropped after use.", _positive
    )
    hflip: bool = option(True, "Random horizontal flip.")
    pad_crop: int = option(
        0, "Pad each side by this many pixels (black), then crop a random window of the resolution. 0: off.",
        _non_negative,
    )
    resized_crop_min_scale: Optional[float] = option(
        None, "Random resized crop: a random window of this fraction of the area up to all of it (aspect "
        "3/4..4/3), resized to the resolution. null: off.", _scale
    )
    color_jitter: float = option(
        0.0, "Random brightness, contrast and saturation factors in [1 - s, 1 + s]. 0: off.", _unit_interval
    )
    jpeg_distort: Optional[list[int]] = option(
        None, "[lo, hi]: JPEG-compress every image on the fly, after the crops and colour jitter (before the flip, "
        "which keeps the 8x8 block grid in place), at a quality drawn uniformly from lo..hi (DALI's "
        "jpeg_compression_distortion; the torch backend encodes with libjpeg, decoding on the CPU then); that "
        "quality is the sample's quality for compression.mode. null: off (samples keep their recorded quality).",
        _quality_range,
    )


@dataclass
class ModelConfig:
    """Generator and discriminator."""

    arch: Literal["dcgan", "resnet", "r3gan"] = option(
        "dcgan", "Network family: 'dcgan' (strided convs, projection D), 'resnet' (SNGAN/BigGAN-style residual "
        "blocks, class-conditional BatchNorm in G with a shared class embedding, projection D) or 'r3gan' (R3GAN's "
        "normalisation-free ResNeXt-style blocks, each starting as the identity; train it with train.loss: rpgan, "
        "r1_gamma and r2_gamma)."
    )
    z_dim: int = option(128, "Latent size.", _positive)
    g_width: int = option(
        128, "Channels of the generator's 4x4 feature map, its widest; larger maps get fewer, halving with each "
        "doubling (dcgan: from 8x8 on; resnet: above 32x32), never below 32. 256+ on a GPU.", _positive
    )
    d_width: int = option(
        128, "Channels of the discriminator's 4x4 feature map, narrowing towards the image as g_width does.",
        _positive
    )


@dataclass
class TrainConfig:
    """The GAN training loop."""

    steps: int = option(5000, "Generator steps to train for.", _positive)
    batch_size: int = option(64, "Images per batch.", _positive)
    loss: Literal["hinge", "nonsaturating", "rpgan"] = option(
        "hinge", "GAN loss: 'hinge', 'nonsaturating' (logistic), or 'rpgan', R3GAN's relativistic pairing loss, in "
        "which each fake is judged against a real of its class (use it with r1_gamma and r2_gamma)."
    )
    diffaugment: str = option(
        "", "DiffAugment transforms applied to every image D sees, real or fake, e.g. "
        "'color,translation,cutout' (differentiable, on the training device). '': none.", _diffaugment_policy
    )
    augment_p: float = option(
        1.0, "Probability that each diffaugment transform is applied to an image, drawn per image and transform "
        "(ADA's augmentation probability p); 1: always.", _probability
    )
    mode_seeking: float = option(
        0.0, "Weight of the mode-seeking term (MSGAN, Mao et al. 2019): half of each G batch repeats the other "
        "half's classes with other latents, and G is pushed to keep such pairs as far apart, per unit of latent "
        "distance, as it can; against a generator that gives one image per class whatever z. 0: off.",
        _non_negative,
    )
    class_loss: float = option(
        0.0, "Weight of a class loss through D's class embedding (dual projection, Han et al. 2021): D learns to "
        "name each real image's class with the embedding it judges realness with, and G to make fakes whose class "
        "D names right; stronger class conditioning. Needs class labels. 0: off.", _non_negative,
    )
    lr_g: float = option(2e-4, "Generator Adam learning rate.", _positive)
    lr_d: float = option(4e-4, "Discriminator Adam learning rate (twice G's: TTUR).", _positive)
    beta1: float = option(0.0, "Adam beta1 (GAN practice: 0 or 0.5; docs/benchmarks.md compares them).", _unit_interval)
    beta2: float = option(0.999, "Adam beta2.", _unit_interval)
    n_dis: int = option(1, "Discriminator steps per generator step.", _positive)
    r1_gamma: float = option(
        0.0, "Weight of the R1 gradient penalty on real images (Mescheder et al. 2018); 0: off.", _non_negative
    )
    r1_every: int = option(
        16, "Apply R1 (and R2) every this many steps, as a D update of its own with the penalty scaled up to match; "
        "D's Adam lr and betas are then scaled by r1_every / (r1_every + 1), as in StyleGAN2 (lazy regularisation).",
        _positive,
    )
    r2_gamma: float = option(
        0.0, "Weight of the R2 gradient penalty on generated images (R3GAN: the same as r1_gamma); applied with "
        "R1, every r1_every steps. 0: off.", _non_negative
    )
    ema_decay: float = option(0.999, "Decay of the generator's exponential moving average.", _unit_interval)
    ema_warmup: int = option(
        10, "EMA warm-up: the decay used at step s is min(ema_decay, (1 + s) / (ema_warmup + s)); 0: none.",
        _non_negative,
    )
    schedule_kimg: Optional[float] = option(
        None, "Horizon of the schedules, in thousands of real images: over it each key named in schedule_to moves "
        "from its own value to the one given there along a half cosine, then holds (R3GAN's schedules). The "
        "position is the images trained on, so a resumed run continues its schedules. null: no schedule.", _positive
    )
    schedule_to: Optional[dict[ScheduledKey, float]] = option(
        None, "The values reached at schedule_kimg, for any of lr_g, lr_d, r1_gamma, r2_gamma, beta2 and augment_p, "
        "e.g. {lr_g: 5.0e-5, lr_d: 5.0e-5, r1_gamma: 0.005, r2_gamma: 0.005, beta2: 0.99}; each is checked as its "
        "own key. The values in use are logged in metrics.jsonl. null: every value stays as set."
    )
    max_minutes: Optional[float] = option(
        None, "Wall-clock budget of training, over all resumes (evaluations not counted): training stops "
        "cleanly at it (final checkpoint; export and eval still run). null: no budget.", _positive
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Autocast precision: 'auto' is bf16 where the device runs it natively (CUDA GPUs that "
        "support it; CPUs with AVX512-BF16 or AMX), else fp32; fp16 (with loss scaling) needs CUDA."
    )
    compile: bool = option(False, "torch.compile the generator and discriminator (first steps are slower; the "
                         "R1 penalty runs through the uncompiled discriminator, as compiled graphs have no "
                         "double backward).")
    channels_last: bool = option(False, "Channels-last memory format for networks and batches (faster convs on "
                               "recent GPUs).")
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "A step whose loss is NaN/inf is not applied (decided on the device, with no host sync per step); "
        "at the next metrics row, sample grid or checkpoint, 'stop' ends training naming the step (the last "
        "checkpoint stays the last good one), 'skip' counts such steps (training stops after 50 in a row)."
    )
    log_every: int = option(50, "Steps between metrics.jsonl rows.", _positive)
    sample_every: int = option(500, "Steps between sample grids.", _positive)
    checkpoint_every: int = option(500, "Steps between checkpoints.", _positive)
    keep_checkpoints: int = option(3, "How many of the newest checkpoints are kept; older ones are deleted.", _positive)
    device: Device = option("auto", "Training device: 'cuda', 'cpu' or 'auto'.")

    def check(self, where: Where) -> None:
        """Keys that must agree: a schedule's horizon and end values, the augmentation probability and its
        transforms."""
        if (self.schedule_kimg is None) != (self.schedule_to is None):
            given, missing = ("schedule_to", "schedule_kimg") if self.schedule_kimg is None else \
                ("schedule_kimg", "schedule_to")
            raise ConfigError(f"{where(given)}: a schedule needs both {where.name('schedule_kimg')} (its horizon) and "
                              f"{where.name('schedule_to')} (the values reached there); set {where.name(missing)}")
        checks = {f.name: f.metadata["check"] for f in dataclasses.fields(self)}
        for key, value in (self.schedule_to or {}).items():
            problem = checks[key](value)
            if problem:
                raise ConfigError(f"{where('schedule_to')}.{key}: {problem} (got {value!r})")
        if self.mode_seeking and self.loss == "rpgan":
            raise ConfigError(f"{where('mode_seeking')}: not with {where.name('loss')}: rpgan, whose fakes take "
                              f"their classes from the real batch; use hinge or nonsaturating, or set it to 0")
        if (self.augment_p != 1.0 or "augment_p" in (self.schedule_to or {})) and not self.diffaugment:
            raise ConfigError(f"{where('augment_p')}: an augmentation probability needs transforms to apply; set "
                              f"{where.name('diffaugment')} (e.g. 'color,translation,cutout')")


@dataclass
class CompressionConfig:
    """JPEG compression as a signal: condition the GAN on quality, or learn clean images from compressed ones."""

    mode: Literal["none", "condition", "ambient"] = option(
        "none", "'none': plain GAN. 'condition': G and D are conditioned on each real sample's JPEG quality (from "
        "its .json, or loader.jpeg_distort), so `generate --quality-cond Q` asks for a quality. 'ambient': G makes "
        "clean images; each fake is JPEG-compressed (differentiably) at a real sample's quality before D sees it, "
        "so a clean generator is learned from compressed data only."
    )
    ambient_null_weight: float = option(
        1.0, "ambient mode: weight of a penalty on the part of each fake that its JPEG measurement discards "
        "(mean squared difference between the fake and its compressed self, in [-1, 1] units). D never sees that "
        "part (fine chroma under 4:2:0, high frequencies under coarse quantisation), so without the penalty G "
        "fills it with noise: the smallest-energy image among those that compress alike is chosen. 0: off.",
        _non_negative,
    )
    ambient_d_quality: bool = option(
        False, "ambient mode: D is told the quality each image it judges was compressed at (by projection, as "
        "in condition mode), so it can hold the high-quality samples to more detail than the low ones. G is "
        "unchanged: clean and unconditioned."
    )
    ambient_recode_reals: bool = option(
        False, "ambient mode: pass each real image through the same differentiable codec, at its own quality, "
        "before D sees it, so that D compares simulated JPEG with simulated JPEG and cannot tell fakes by how "
        "the simulation differs from libjpeg."
    )
    ambient_rounding: Literal["smooth", "straight_through"] = option(
        "smooth", "ambient mode: the gradient G gets through the codec's rounding of DCT coefficients. 'smooth': "
        "kornia's polynomial rounding, whose slope 3*(x - round(x))**2 is near 0 for every coefficient that "
        "rounds to a whole number; 'straight_through': the same images, with the slope of rounding taken as 1."
    )
    condition_mismatch_weight: float = option(
        0.5, "condition mode: weight of an extra loss in which D sees each real image paired with a wrong quality, "
        "a trained one at least 10 points from its own, and must judge the pair fake (the mismatched pairs of Reed "
        "et al. 2016): it keeps D from ignoring the quality (docs/compression.md). 0: off.",
        _non_negative,
    )
    condition_output: Literal["jpeg", "learned"] = option(
        "jpeg", "condition mode: 'jpeg' ends G with the differentiable JPEG codec at the requested quality, so "
        "G(z, class, q) = JPEG_q(net(z, class, q)): the artefacts are JPEG's own and G learns the content; "
        "'learned' leaves the artefacts for G to learn from D's conditioning alone, which takes far longer to "
        "follow the requested quality (docs/compression.md)."
    )


METRICS = ("classifier", "fid", "kid", "is", "quality")


def _metric_names(value: list[str]) -> str | None:
    unknown = [m for m in value if m not in METRICS]
    return f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}" if unknown else None


@dataclass
class EvalConfig:
    """Sample-quality metrics, during training and in `cgan-pipe eval`."""

    metrics: list[str] = option(
        ["classifier"], "Any of 'classifier' (Frechet distance in the features of a small classifier cgan-pipe "
        "trains on the real shards, its Inception-style score, the class accuracy of conditional samples; no "
        "download), 'fid', 'kid', 'is' (FID Inception weights: inception_weights), 'quality' (JPEG quality "
        "estimated from the pixels of the samples by a regressor trained on the real shards, and their "
        "block-edge ratio, 1.0 with no JPEG block structure; for a quality-conditioned model, also how well it "
        "matches the requested quality).",
        _metric_names
    )
    every: Optional[int] = option(
        None, "Steps between evaluations of the EMA generator during training (rows in eval.jsonl); null: "
        "only after training.", _positive
    )
    n_samples: int = option(10000, "Generated images per evaluation.", _positive)
    n_reference: int = option(10000, "Real images the reference statistics come from (at most all of them).", _positive)
    classifier_steps: int = option(
        1000, "Batches of 256 the feature classifier trains for (1000: five passes over 50,000 images); trained "
        "once per shard set and cached.", _positive
    )
    inception_weights: Optional[str] = option(
        None, "Local path of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception-v3 weights), for "
        "fid/kid/is; null: downloaded once from pytorch-fid's releases into the cache folder (checksum-checked), "
        "when fid/kid/is are asked for."
    )
    cache_dir: Optional[str] = option(
        None, "Where classifiers and reference features are cached per shard set; null: $XDG_CACHE_HOME/cgan-pipe "
        "or ~/.cache/cgan-pipe."
    )
    quality_levels: list[int] = option(
        [10, 30, 50, 75, 95], "Qualities a quality-conditioned model is asked for by the 'quality' metric "
        "(n_samples split evenly over them).", _qualities
    )
    quality_steps: int = option(
        1000, "Batches of 128 the quality regressor trains for; trained once per shard set and cached.", _positive
    )
    seed: int = option(0, "First latent seed of the evaluated samples (fixed, so evaluations compare).", _non_negative)
    batch_size: int = option(250, "Images per generator call.", _positive)


@dataclass
class ExportConfig:
    """Generated images written back out as compressed files and shards."""

    n: Optional[int] = option(
        None, "Images to generate; null: 1000, or the sum of the counts when classes is a mapping.", _positive
    )
    format: ImageFormat = option("jpeg", "Output format.")
    quality: int = option(95, "JPEG/WebP quality (1-100).", _quality)
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = option("4:2:0", "Chroma subsampling of JPEG output.")
    png_compress_level: int = option(6, "zlib level (0-9) of PNG output.", _png_level)
    webp_lossless: bool = option(False, "Write lossless WebP (quality is then ignored).")
    classes: Optional[Union[list[str], dict[str, int]]] = option(
        None, "Which classes: null for all, balanced; a list of names, round robin; or a mapping "
        "name: count (that many images of each, in that order).", _export_classes
    )
    seed: int = option(0, "First seed; image i uses seed + i, so a seed range is reproducible.", _non_negative)
    truncation: Optional[float] = option(
        None, "Truncation trick: latent components beyond +-truncation are redrawn, for more typical but "
        "less varied images (at least 0.05); null: off.", _truncation
    )
    batch_size: int = option(250, "Images per generator call.", _positive)
    shard_size: int = option(5000, "Images per exported shard (and per unit of work a rerun resumes from).", _positive)
    output: Literal["files", "shards", "both"] = option(
        "both", "files: a folder per class; shards: webdataset shards + manifest + DALI index; both."
    )
    ema: bool = option(True, "Use the EMA generator (else the raw one).")
    quality_cond: Optional[int] = option(
        None, "For a quality-conditioned model: the JPEG quality (1-100) the images are asked to look like (100: "
        "clean); null: the highest quality it was trained on.", _quality
    )


    def check(self, where: Where) -> None:
        """Keys that must agree: per-class counts and n."""
        counts = self.classes if isinstance(self.classes, dict) else None
        if counts and self.n is not None and self.n != sum(counts.values()):
            raise ConfigError(f"{where('n')}: {self.n} images, but the counts in {where.name('classes')} add up to "
                              f"{sum(counts.values())}; leave {where.name('n')} out (or set it to that sum)")


@dataclass
class PipelineConfig:
    """One pipeline: source -> shards -> loader -> trainer -> export."""

    name: str = required("Pipeline name, a plain folder name: the default run directory is runs/<name>.", _run_name)
    run_dir: Optional[str] = option(None, "Where every output goes (a local folder); null for runs/<name>.",
                                    _local_folder)
    seed: int = option(0, "Seed for shard shuffling, initialisation and training.", _non_negative)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    loader: LoaderConfig = field(default_factory=LoaderConfig, metadata={"help": LoaderConfig.__doc__})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": ModelConfig.__doc__})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": TrainConfig.__doc__})
    compression: CompressionConfig = field(default_factory=CompressionConfig,
                                           metadata={"help": CompressionConfig.__doc__})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": EvalConfig.__doc__})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": ExportConfig.__doc__})

    def check(self, where: Where) -> None:
        """Keys of different sections that must agree."""
        if self.export.quality_cond is not None and self.compression.mode != "condition":
            raise ConfigError(f"{where('export.quality_cond')}: asks for a JPEG quality, which only a model trained "
                              f"with compression.mode: condition can give (it is {self.compression.mode!r}); set it "
                              f"to null")

    @property
    def run_path(self) -> Path:
        """The run directory as a path (`run_dir`, or runs/<name>)."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


# ---------------------------------------------------------------------------
# Loading.


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read a pipeline YAML, apply `KEY=VALUE` overrides, validate, and return the config.

    Raises ConfigError naming the file, line and key for any problem.
    """
    return from_yaml(PipelineConfig, path, overrides, what="pipeline")


def config_from_dict(raw: dict, origin: str = "config") -> PipelineConfig:
    """Validate a plain dict (e.g. the config stored in a checkpoint) into a PipelineConfig."""
    return from_dict(PipelineConfig, raw, origin)


def to_dict(cfg: Any) -> dict:
    """The config as plain Python data (for YAML/JSON/checkpoints)."""
    return dataclasses.asdict(cfg)


def reference_markdown() -> str:
    """The pipeline YAML reference (docs/config.md), generated from the schema above."""
    lines = [
        "# Pipeline YAML reference",
        "",
        "Generated from `cgan_pipe/config.py`; do not edit by hand. Regenerate with",
        "`python -c 'from cgan_pipe.config import reference_markdown as r; print(r(), end=\"\")' > docs/config.md`.",
        "",
        "Unknown keys are rejected; any key can be overridden with `--set KEY=VALUE`;",
        "`${VAR}` and `${VAR:-default}` in strings are expanded from the environment.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for doc in describe_keys(PipelineConfig):
        shown = "(required)" if doc.required else f"`{json.dumps(doc.default)}`"
        type_name = doc.type_name.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| `{doc.key}` | {type_name} | {shown} | {doc.help} |")
    return "\n".join(lines) + "\n"
