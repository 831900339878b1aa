"""Typed pipeline configuration: YAML file + `--set` overrides -> validated dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
ImageFormat = Literal["jpeg", "png", "webp"]
ShardFormat = Literal["jpeg", "png", "webp", "keep"]


# ---------------------------------------------------------------------------
# Field helpers: every field carries a help text (shown in docs) and an optional check.


def default_cache_dir() -> Path:
    """Where cgan-pipe caches what it computed once (trained classifiers, checked shards):
    $XDG_CACHE_HOME/cgan-pipe, or ~/.cache/cgan-pipe."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cgan-pipe"


def _opt(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


def _required(help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=None, metadata={"help": help, "check": check, "required": True})


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


def _resolution(value: int) -> str | None:
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


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


# ---------------------------------------------------------------------------
# The schema. One dataclass per concern; unknown keys are rejected.


@dataclass
class DataConfig:
    """Where the raw images come from and how they are written into shards."""

    source: str = _required(
        "Raw images: an image-folder tree (class = folder name), a tar/tar.gz of one, a list file "
        "(.txt/.lst/.list, one path per line), an existing shard set (to re-shard or re-encode), the "
        "official CIFAR-10 python archive (cifar-10-python.tar.gz or its cifar-10-batches-py "
        "folder), or 'download:cifar10' to fetch CIFAR-10 with torchvision. "
        "Relative paths are taken from the current directory; ${VAR:-default} is expanded.",
        _non_empty,
    )
    split: Literal["train", "test"] = _opt(
        "train", "Which split of a CIFAR-10 python archive or download to use."
    )
    resolution: int = _opt(32, "Side of the square training images, in pixels.", _resolution)
    format: ShardFormat = _opt(
        "jpeg",
        "Image format inside the shards. JPEG inputs already at the resolution are copied "
        "byte for byte (no second lossy encode); everything else is re-encoded. 'keep' copies "
        "every 8-bit RGB JPEG/PNG/WebP at the resolution and re-encodes the rest as PNG.",
    )
    quality: int = _opt(95, "JPEG/WebP quality (1-100) for re-encoded images.", _quality)
    qualities: Optional[list[int]] = _opt(
        None, "Write every image re-encoded at each of these qualities (e.g. [10, 30, 50, 75, 95]), "
        "recording the quality in its .json: data for quality conditioning. null: one sample per image."
    )
    quality_mode: Literal["all", "random"] = _opt(
        "all", "With qualities: 'all' writes one sample per quality, 'random' one seeded-random quality per image."
    )
    shard_size: int = _opt(5000, "Samples per shard.", _positive)
    shard_bytes: Optional[str] = _opt(
        None, "Aim shards at about this size instead (e.g. '256MB', '1GiB'): the samples per shard are "
        "set from the mean size of 256 encoded images spread over the input. null: use shard_size.", _byte_size
    )
    reencode: bool = _opt(
        False, "Re-encode JPEGs that could be copied byte for byte (at the resolution, 8-bit RGB) at the "
        "configured format and quality too."
    )
    limit: Optional[int] = _opt(
        None, "Use at most this many images (a seeded random subset); null for all.", _positive
    )
    resize: Literal["crop", "pad", "reject"] = _opt(
        "crop", "Images not at the resolution: 'crop' (shorter side, centre crop), 'pad' (longer side, "
        "black borders) or 'reject' (skipped and listed)."
    )
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = _opt("4:2:0", "Chroma subsampling of re-encoded JPEGs.")
    png_compress_level: int = _opt(6, "zlib level (0-9) of written PNGs.", _png_level)
    webp_lossless: bool = _opt(False, "Write lossless WebP (quality is then ignored).")
    max_pixels: int = _opt(
        64_000_000, "Images with more pixels are skipped unread (decompression-bomb limit).", _positive
    )
    workers: Optional[int] = _opt(
        None, "Processes writing shards; null for one per core. The shards do not depend on it.", _positive
    )
    download_dir: str = _opt(
        "~/.cache/cgan-pipe", "Where 'download:cifar10' keeps the downloaded archive."
    )


@dataclass
class LoaderConfig:
    """How shards stream into training batches."""

    shards: Optional[str] = _opt(
        None, "Shard set `cgan-pipe train` reads instead of run_dir/shards: a folder, or for the torch "
        "backend a URL (http(s):// through curl; s3://, gs://, ... where webdataset and fsspec can open them)."
    )
    backend: Literal["dali", "torch"] = _opt(
        "dali", "'dali' (NVIDIA DALI pipeline) or 'torch' (webdataset + torchvision decode)."
    )
    device: Device = _opt(
        "auto",
        "Where images are decoded: 'cuda' (DALI mixed/nvJPEG), 'cpu', or 'auto' (cuda when "
        "a GPU is present).",
    )
    threads: int = _opt(2, "DALI CPU threads, or DataLoader workers for the torch backend.", _positive)
    shuffle_buffer: int = _opt(
        4096, "Samples held in the shuffle buffer (shards are also shuffled when written).", _positive
    )
    hflip: bool = _opt(True, "Random horizontal flip.")
    pad_crop: int = _opt(
        0, "Pad each side by this many pixels (black), then crop a random window of the resolution. 0: off.",
        _non_negative,
    )
    resized_crop_min_scale: Optional[float] = _opt(
        None, "Random resized crop: a random window of this fraction of the area up to all of it (aspect "
        "3/4..4/3), resized to the resolution. null: off.", _scale
    )
    color_jitter: float = _opt(
        0.0, "Random brightness, contrast and saturation factors in [1 - s, 1 + s]. 0: off.", _unit_interval
    )
    jpeg_distort: Optional[list[int]] = _opt(
        None, "[lo, hi]: JPEG-compress every image on the fly, after the crops and colour jitter (before the flip, "
        "which keeps the 8x8 block grid in place), at a quality drawn uniformly from lo..hi (DALI's "
        "jpeg_compression_distortion; the torch backend encodes with libjpeg, decoding on the CPU then); that "
        "quality is the sample's quality for compression.mode. null: off (samples keep their recorded quality).",
        _quality_range,
    )


@dataclass
class ModelConfig:
    """Generator and discriminator."""

    arch: Literal["dcgan", "resnet"] = _opt(
        "dcgan", "Network family: 'dcgan' (strided convs, projection D) or 'resnet' (SNGAN/BigGAN-style residual "
        "blocks, class-conditional BatchNorm in G with a shared class embedding, projection D)."
    )
    z_dim: int = _opt(128, "Latent size.", _positive)
    g_width: int = _opt(128, "Channels of the generator's first (4x4) feature map (resnet: of every block; "
                        "256+ on a GPU).", _positive)
    d_width: int = _opt(128, "Channels of the discriminator's last (4x4) feature map (resnet: of every block; "
                        "256+ on a GPU).", _positive)


@dataclass
class TrainConfig:
    """The GAN training loop."""

    steps: int = _opt(5000, "Generator steps to train for.", _positive)
    batch_size: int = _opt(64, "Images per batch.", _positive)
    loss: Literal["hinge", "nonsaturating"] = _opt("hinge", "GAN loss.")
    diffaugment: str = _opt(
        "", "DiffAugment transforms applied to every image D sees, real or fake, e.g. "
        "'color,translation,cutout' (differentiable, on the training device). '': none.", _diffaugment_policy
    )
    lr_g: float = _opt(2e-4, "Generator Adam learning rate.", _positive)
    lr_d: float = _opt(4e-4, "Discriminator Adam learning rate (twice G's: TTUR).", _positive)
    beta1: float = _opt(0.0, "Adam beta1 (0.5 made the DCGAN ignore z on CIFAR-10 here).", _unit_interval)
    beta2: float = _opt(0.999, "Adam beta2.", _unit_interval)
    n_dis: int = _opt(1, "Discriminator steps per generator step.", _positive)
    r1_gamma: float = _opt(
        0.0, "Weight of the R1 gradient penalty on real images (Mescheder et al. 2018); 0: off.", _non_negative
    )
    r1_every: int = _opt(16, "Apply R1 every this many steps, scaled up to match (lazy regularisation).", _positive)
    ema_decay: float = _opt(0.999, "Decay of the generator's exponential moving average.", _unit_interval)
    ema_warmup: int = _opt(
        10, "EMA warm-up: the decay used at step s is min(ema_decay, (1 + s) / (ema_warmup + s)); 0: none.",
        _non_negative,
    )
    max_minutes: Optional[float] = _opt(
        None, "Wall-clock budget of training, over all resumes (evaluations not counted): training stops "
        "cleanly at it (final checkpoint; export and eval still run). null: no budget.", _positive
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "auto", "Autocast precision: 'auto' is bf16 where the device runs it natively (CUDA GPUs that "
        "support it; CPUs with AVX512-BF16 or AMX), else fp32; fp16 (with loss scaling) needs CUDA."
    )
    compile: bool = _opt(False, "torch.compile the generator and discriminator (first steps are slower; the "
                         "R1 penalty runs through the uncompiled discriminator, as compiled graphs have no "
                         "double backward).")
    channels_last: bool = _opt(False, "Channels-last memory format for networks and batches (faster convs on "
                               "recent GPUs).")
    on_nonfinite: Literal["stop", "skip"] = _opt(
        "stop", "A step whose loss is NaN/inf is not applied (decided on the device, with no host sync per step); "
        "at the next metrics row, sample grid or checkpoint, 'stop' ends training naming the step (the last "
        "checkpoint stays the last good one), 'skip' counts such steps (training stops after 50 in a row)."
    )
    log_every: int = _opt(50, "Steps between metrics.jsonl rows.", _positive)
    sample_every: int = _opt(500, "Steps between sample grids.", _positive)
    checkpoint_every: int = _opt(500, "Steps between checkpoints.", _positive)
    keep_checkpoints: int = _opt(3, "How many of the newest checkpoints are kept; older ones are deleted.", _positive)
    device: Device = _opt("auto", "Training device: 'cuda', 'cpu' or 'auto'.")


@dataclass
class CompressionConfig:
    """JPEG compression as a signal: condition the GAN on quality, or learn clean images from compressed ones."""

    mode: Literal["none", "condition", "ambient"] = _opt(
        "none", "'none': plain GAN. 'condition': G and D are conditioned on each real sample's JPEG quality (from "
        "its .json, or loader.jpeg_distort), so `generate --quality-cond Q` asks for a quality. 'ambient': G makes "
        "clean images; each fake is JPEG-compressed (differentiably) at a real sample's quality before D sees it, "
        "so a clean generator is learned from compressed data only."
    )
    ambient_null_weight: float = _opt(
        1.0, "ambient mode: weight of a penalty on the part of each fake that its JPEG measurement discards "
        "(mean squared difference between the fake and its compressed self, in [-1, 1] units). D never sees that "
        "part (fine chroma under 4:2:0, high frequencies under coarse quantisation), so without the penalty G "
        "fills it with noise: the smallest-energy image among those that compress alike is chosen. 0: off.",
        _non_negative,
    )
    ambient_d_quality: bool = _opt(
        False, "ambient mode: D is told the quality each image it judges was compressed at (by projection, as "
        "in condition mode), so it can hold the high-quality samples to more detail than the low ones. G is "
        "unchanged: clean and unconditioned."
    )
    ambient_recode_reals: bool = _opt(
        False, "ambient mode: pass each real image through the same differentiable codec, at its own quality, "
        "before D sees it, so that D compares simulated JPEG with simulated JPEG and cannot tell fakes by how "
        "the simulation differs from libjpeg."
    )
    ambient_rounding: Literal["smooth", "straight_through"] = _opt(
        "smooth", "ambient mode: the gradient G gets through the codec's rounding of DCT coefficients. 'smooth': "
        "kornia's polynomial rounding, whose slope 3*(x - round(x))**2 is near 0 for every coefficient that "
        "rounds to a whole number; 'straight_through': the same images, with the slope of rounding taken as 1."
    )
    condition_mismatch_weight: float = _opt(
        0.5, "condition mode: weight of an extra loss in which D sees each real image paired with a wrong quality, "
        "a trained one at least 10 points from its own, and must judge the pair fake (the mismatched pairs of Reed "
        "et al. 2016). Without it D ignored the quality, and a 'learned' G did not follow it in 3,000 CPU steps. "
        "0: off.",
        _non_negative,
    )
    condition_output: Literal["jpeg", "learned"] = _opt(
        "jpeg", "condition mode: 'jpeg' ends G with the differentiable JPEG codec at the requested quality, so "
        "G(z, class, q) = JPEG_q(net(z, class, q)): the artefacts are JPEG's own and G learns the content; "
        "'learned' leaves the artefacts for G to learn from D's conditioning alone (with condition_mismatch_weight "
        "0.5 it followed the requested quality after 5,000 CPU steps, not yet after 3,000: docs/compression.md)."
    )


_METRICS = ("classifier", "fid", "kid", "is", "quality")


def _metric_names(value: list[str]) -> str | None:
    unknown = [m for m in value if m not in _METRICS]
    return f"unknown metric {unknown[0]!r}; choose from {', '.join(_METRICS)}" if unknown else None


@dataclass
class EvalConfig:
    """Sample-quality metrics, during training and in `cgan-pipe eval`."""

    metrics: list[str] = _opt(
        ["classifier"], "Any of 'classifier' (Frechet distance in the features of a small classifier cgan-pipe "
        "trains on the real shards, its Inception-style score, the class accuracy of conditional samples; no "
        "download), 'fid', 'kid', 'is' (FID Inception weights: inception_weights), 'quality' (JPEG quality "
        "estimated from the pixels of the samples by a regressor trained on the real shards, and their "
        "block-edge ratio, 1.0 with no JPEG block structure; for a quality-conditioned model, also how well it "
        "matches the requested quality).",
        _metric_names
    )
    every: Optional[int] = _opt(
        None, "Steps between evaluations of the EMA generator during training (rows in eval.jsonl); null: "
        "only after training.", _positive
    )
    n_samples: int = _opt(10000, "Generated images per evaluation.", _positive)
    n_reference: int = _opt(10000, "Real images the reference statistics come from (at most all of them).", _positive)
    classifier_steps: int = _opt(
        1000, "Batches of 256 the feature classifier trains for (1000: five passes over 50,000 images); trained "
        "once per shard set and cached.", _positive
    )
    inception_weights: Optional[str] = _opt(
        None, "Local path of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception-v3 weights), for "
        "fid/kid/is; null: downloaded once from pytorch-fid's releases into the cache folder (checksum-checked), "
        "when fid/kid/is are asked for."
    )
    cache_dir: Optional[str] = _opt(
        None, "Where classifiers and reference features are cached per shard set; null: $XDG_CACHE_HOME/cgan-pipe "
        "or ~/.cache/cgan-pipe."
    )
    quality_levels: list[int] = _opt(
        [10, 30, 50, 75, 95], "Qualities a quality-conditioned model is asked for by the 'quality' metric "
        "(n_samples split evenly over them).", _qualities
    )
    quality_steps: int = _opt(
        1000, "Batches of 128 the quality regressor trains for; trained once per shard set and cached.", _positive
    )
    seed: int = _opt(0, "First latent seed of the evaluated samples (fixed, so evaluations compare).", _non_negative)
    batch_size: int = _opt(250, "Images per generator call.", _positive)


@dataclass
class ExportConfig:
    """Generated images written back out as compressed files and shards."""

    n: Optional[int] = _opt(
        None, "Images to generate; null: 1000, or the sum of the counts when classes is a mapping.", _positive
    )
    format: ImageFormat = _opt("jpeg", "Output format.")
    quality: int = _opt(95, "JPEG/WebP quality (1-100).", _quality)
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = _opt("4:2:0", "Chroma subsampling of JPEG output.")
    png_compress_level: int = _opt(6, "zlib level (0-9) of PNG output.", _png_level)
    webp_lossless: bool = _opt(False, "Write lossless WebP (quality is then ignored).")
    classes: Optional[Union[list[str], dict[str, int]]] = _opt(
        None, "Which classes: null for all, balanced; a list of names, round robin; or a mapping "
        "name: count (that many images of each, in that order).", _export_classes
    )
    seed: int = _opt(0, "First seed; image i uses seed + i, so a seed range is reproducible.", _non_negative)
    truncation: Optional[float] = _opt(
        None, "Truncation trick: latent components beyond +-truncation are redrawn, for more typical but "
        "less varied images (at least 0.05); null: off.", _truncation
    )
    batch_size: int = _opt(250, "Images per generator call.", _positive)
    shard_size: int = _opt(5000, "Images per exported shard (and per unit of work a rerun resumes from).", _positive)
    output: Literal["files", "shards", "both"] = _opt(
        "both", "files: a folder per class; shards: webdataset shards + manifest + DALI index; both."
    )
    ema: bool = _opt(True, "Use the EMA generator (else the raw one).")
    quality_cond: Optional[int] = _opt(
        None, "For a quality-conditioned model: the JPEG quality (1-100) the images are asked to look like (100: "
        "clean); null: the highest quality it was trained on.", _quality
    )


@dataclass
class PipelineConfig:
    """One pipeline: source -> shards -> loader -> trainer -> export."""

    name: str = _required("Pipeline name; the default run directory is runs/<name>.", _non_empty)
    run_dir: Optional[str] = _opt(None, "Where every output goes; null for runs/<name>.")
    seed: int = _opt(0, "Seed for shard shuffling, initialisation and training.", _non_negative)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    loader: LoaderConfig = field(default_factory=LoaderConfig, metadata={"help": LoaderConfig.__doc__})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": ModelConfig.__doc__})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": TrainConfig.__doc__})
    compression: CompressionConfig = field(default_factory=CompressionConfig,
                                           metadata={"help": CompressionConfig.__doc__})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": EvalConfig.__doc__})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": ExportConfig.__doc__})

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
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read pipeline file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    locate = _Locator(str(path), lines)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, locate)
    return _check_together(_build(PipelineConfig, raw, "", locate), locate)


def config_from_dict(raw: dict, origin: str = "config") -> PipelineConfig:
    """Validate a plain dict (e.g. the config stored in a checkpoint) into a PipelineConfig."""
    locate = _Locator(origin, {})
    return _check_together(_build(PipelineConfig, raw, "", locate), locate)


def to_dict(cfg: Any) -> dict:
    """The config as plain Python data (for YAML/JSON/checkpoints)."""
    return dataclasses.asdict(cfg)


@dataclass(frozen=True)
class KeyDoc:
    """One leaf config key, for documentation."""

    key: str
    type_name: str
    default: Any
    help: str
    required: bool


def describe_keys(cls: type = PipelineConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema, in schema order."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, key + "."))
            continue
        required = bool(f.metadata.get("required"))
        default = None if required else _default_of(f)
        rows.append(KeyDoc(key, _type_name(tp), default, f.metadata.get("help", ""), required))
    return rows


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
    for doc in describe_keys():
        shown = "(required)" if doc.required else f"`{json.dumps(doc.default)}`"
        type_name = doc.type_name.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| `{doc.key}` | {type_name} | {shown} | {doc.help} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Internals.


class _Locator:
    """Turns a dotted key into 'file:line: key' for error messages."""

    def __init__(self, origin: str, lines: dict[str, int], overridden: set[str] | None = None):
        self.origin = origin
        self.lines = lines
        self.overridden = overridden if overridden is not None else set()

    def __call__(self, key: str) -> str:
        if key in self.overridden:
            return f"--set {key}"
        line = self.lines.get(key)
        return f"{self.origin}:{line}: {key}" if line else f"{self.origin}: {key}"


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted keys of a composed YAML mapping to their 1-based line numbers."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _apply_override(raw: dict, item: str, locate: _Locator) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=300")
    cls: Any = PipelineConfig
    parts = key.split(".")
    target = raw
    for depth, part in enumerate(parts):
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            known = ".".join(parts[:depth])
            raise ConfigError(f"--set {key}: unknown key {part!r}{_suggest(part, names)}"
                              + (f" in section {known!r}" if known else ""))
        if depth == len(parts) - 1:
            break
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a section")
        sub = target.get(part)
        if sub is None:
            sub = target[part] = {}
        elif not isinstance(sub, dict):
            raise ConfigError(f"{locate('.'.join(parts[:depth + 1]))}: expected a mapping")
        target = sub
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    target[parts[-1]] = value
    locate.overridden.add(key)


def _check_together(cfg: PipelineConfig, locate: _Locator) -> PipelineConfig:
    """Checks that involve more than one key."""
    if cfg.export.quality_cond is not None and cfg.compression.mode != "condition":
        raise ConfigError(f"{locate('export.quality_cond')}: asks for a JPEG quality, which only a model trained "
                          f"with compression.mode: condition can give (it is {cfg.compression.mode!r}); set it to null")
    counts = cfg.export.classes if isinstance(cfg.export.classes, dict) else None
    if counts and cfg.export.n is not None and cfg.export.n != sum(counts.values()):
        raise ConfigError(f"{locate('export.n')}: {cfg.export.n} images, but the counts in export.classes add up to "
                          f"{sum(counts.values())}; set n to null (or to that sum)")
    return cfg


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(choices)})"


def _build(cls: Any, raw: Any, prefix: str, locate: _Locator) -> Any:
    section = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{locate(section)}: expected a mapping, got {_kind(raw)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{locate(prefix + str(key))}: unknown key{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):  # an absent section still has its required keys checked
            kwargs[name] = _build(tp, raw[name] if raw.get(name) is not None else {}, key + ".", locate)
            continue
        if name not in raw:
            if f.metadata.get("required"):
                raise ConfigError(f"{locate(section)}: missing required key {key!r} ({f.metadata['help']})")
            continue
        value = _coerce(tp, raw[name], key, locate)
        check = f.metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"{locate(key)}: {problem} (got {value!r})")
        kwargs[name] = value
    return cls(**kwargs)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str, key: str, locate: _Locator) -> str:
    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{locate(key)}: environment variable {name} is not set and has no default")

    return _ENV.sub(replace, text)


def _coerce(tp: Any, value: Any, key: str, locate: _Locator) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) > 1:  # e.g. a list or a mapping: the one whose shape the value has
            shape = dict if isinstance(value, dict) else list if isinstance(value, list) else None
            args = [a for a in args if get_origin(a) is shape]
            if not args:
                raise ConfigError(f"{locate(key)}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")
        return _coerce(args[0], value, key, locate)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{locate(key)}: must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{locate(key)}: expected a list, got {_kind(value)}")
        (item_type,) = get_args(tp)
        return [_coerce(item_type, v, f"{key}[{i}]", locate) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{locate(key)}: expected a mapping, got {_kind(value)}")
        key_type, value_type = get_args(tp)
        return {_coerce(key_type, k, f"{key}.{k}", locate): _coerce(value_type, v, f"{key}.{k}", locate)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _expand_env(str(value), key, locate)
    raise ConfigError(f"{locate(key)}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Union:
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is dict:
        return f"mapping[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return "null" if tp is type(None) else tp.__name__


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]
