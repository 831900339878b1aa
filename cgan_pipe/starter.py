"""`cgan-pipe init`: survey a user's image source and write a starter pipeline YAML, every key commented."""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic import write_text_atomic
from .config import PipelineConfig, config_from_dict, load_pipeline
from .schema import describe_keys
from .data.inputs import count_by_kind, counts_text
from .data.sources import open_source
from .errors import ConfigError

SAMPLED = 256  # images opened to learn sizes and formats


@dataclass
class Survey:
    """What a source holds: its images, their classes, and the sizes and formats of a sample."""

    source: str
    images: int
    class_counts: dict[str, int]  # class name -> images (empty for unlabelled sources)
    sizes: list[tuple[int, int]]  # (width, height) of each sampled image that opened
    formats: Counter  # Pillow format name of each sampled image ('array' for decoded sources)
    unreadable: int  # sampled images that did not open
    left_out: dict[str, int]  # files of the source that are not images, per kind of reason (see data/inputs.py)


def survey_source(spec: str, sampled: int = SAMPLED, seed: int = 0) -> Survey:
    """List the source `spec` and open a seeded sample of its images (headers only)."""
    with open_source(spec) as src:
        labels = Counter(item.label for item in src.items)
        counts = {name: labels.get(i, 0) for i, name in enumerate(src.class_names)}
        positions = random.Random(seed).sample(range(len(src.items)), min(sampled, len(src.items)))
        sizes, formats, unreadable = [], Counter(), 0
        for position in positions:
            raw = src.read(src.items[position])
            if raw.pixels is not None:
                sizes.append((raw.pixels.shape[1], raw.pixels.shape[0]))
                formats["array"] += 1
                continue
            try:
                with Image.open(io.BytesIO(raw.data)) as image:
                    sizes.append(image.size)
                    formats[image.format or "unknown"] += 1
            except Exception:  # whatever Pillow raises for a file it cannot open  # noqa: BLE001
                unreadable += 1
        return Survey(spec, len(src.items), counts, sizes, formats, unreadable, count_by_kind(src.rejected))


@dataclass(frozen=True)
class Machine:
    """Where training will run: a CUDA GPU or the CPU, and the memory it has there."""

    cuda: bool
    memory_bytes: int  # the GPU's memory, or the host's RAM for a CPU
    name: str  # e.g. 'NVIDIA H200' or 'a CPU with 2 cores'


def this_machine() -> Machine:
    """The machine `init` runs on: its first CUDA GPU if there is one, else its CPU and RAM."""
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0)
        return Machine(True, gpu.total_memory, gpu.name)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Machine(False, ram, f"a CPU with {os.cpu_count()} cores")


# Training memory per image of the batch at width 128 (bf16, channels-last), MiB: the peak resident memory of
# `cgan-pipe bench train` on the CPU at batch 64 (16 for resnet and r3gan at 256 px, which do not fit 24 GiB at
# 64) less the process's 0.8 GiB without a batch, over the batch (docs/benchmarks.md, "Training speed per
# family and resolution on the CPU"). Activations, and so this, grow about linearly with the width. An
# estimate, within about 20% (dcgan at 256 px: 258 MiB an image at batch 64, 211 at batch 16).
MIB_PER_IMAGE = {
    32: {"dcgan": 3.2, "resnet": 9.6, "r3gan": 17.6},
    64: {"dcgan": 19, "resnet": 110, "r3gan": 139},
    128: {"dcgan": 67, "resnet": 214, "r3gan": 275},
    256: {"dcgan": 258, "resnet": 565, "r3gan": 894},
}
BASE_MIB = 800
MEMORY_SHARE = 0.6  # of the machine's memory a suggested run may use: the rest for the loader, the OS, ...
CPU_FAMILY = "dcgan"  # after 15 CPU minutes the best at 64 px, and by class accuracy at 32 px (docs/benchmarks.md)

# What a GPU run gets, after R3GAN (Huang et al. 2024): its loss and penalties, the R1/R2 weight of its
# presets at each resolution (CIFAR-10 0.05, ImageNet-64 1, FFHQ-256 150; 128 px between 64 and 256, on a
# geometric scale), and its schedules' ends over 20 million images.
R3GAN_GAMMA = {32: 0.05, 64: 1.0, 128: 12.0, 256: 150.0}


# How much R1 + R2 raise the memory per image: their step keeps D's graphs of the reals and the fakes alive for a
# second backward pass. Measured per family on the CPU at 32 and 64 px (benchmarks/penalty_memory.py,
# docs/benchmarks.md, "Memory of the R1 and R2 penalties"), the larger of the two, rounded up; dcgan's marginal
# memory per image is small beside the noise of a peak RSS, so its factor is the least certain.
PENALTY_FACTOR = {"dcgan": 4.5, "resnet": 1.9, "r3gan": 1.45}
# On a GPU: the CUDA context (about 0.5 GiB with lazy module loading), cuBLAS and cuDNN workspaces and the
# caching allocator's slack. An allowance, not a measurement: the first GPU contact's probe measures the context.
CUDA_ALLOWANCE_MIB = 2048


def training_memory_mib(arch: str, resolution: int, width: int, batch: int, *, penalties: bool = False,
                        cuda: bool = False) -> float:
    """Estimated peak memory of training `arch` at `resolution`, `width` and `batch` (MiB), with R1 + R2
    (`penalties`); on a GPU (`cuda`), the networks' weights, gradients and Adam moments and the CUDA
    allowance take the place of the CPU process's base."""
    per_image = MIB_PER_IMAGE[resolution][arch] * width / 128 * (PENALTY_FACTOR[arch] if penalties else 1)
    if not cuda:
        return BASE_MIB + per_image * batch
    return CUDA_ALLOWANCE_MIB + _training_weights_mib(arch, resolution, width) + per_image * batch


@functools.lru_cache(maxsize=None)
def _training_weights_mib(arch: str, resolution: int, width: int) -> float:
    """MiB of the networks' weights, gradients, Adam moments and EMA copy (1,000 classes), for every batch tried."""
    from .config import ModelConfig
    from .data.batch import DatasetInfo
    from .models import weight_bytes

    model = ModelConfig(arch=arch, g_width=width, d_width=width)
    _, weights = weight_bytes(model, DatasetInfo(resolution, 3, tuple(map(str, range(1000))), 0), None, True)
    return weights / 2**20


def model_and_batch(arch: str, resolution: int, machine: Machine) -> tuple[int, int, str]:
    """(width, batch, why): the widest of the family's widths for the machine, then the largest batch, whose
    estimated training memory fits MEMORY_SHARE of the machine's."""
    budget = machine.memory_bytes / 2**20 * MEMORY_SHARE
    widths = (512, 256, 128, 64) if machine.cuda and arch == "r3gan" else (256, 128, 64) if machine.cuda \
        else (128, 64)
    batches = (128, 64, 32, 16) if machine.cuda else (64, 32, 16)
    for width in widths:
        for batch in batches:  # init's GPU runs are R3GAN's, with R1 and R2
            need = training_memory_mib(arch, resolution, width, batch, penalties=machine.cuda, cuda=machine.cuda)
            if need <= budget:
                return width, batch, (f"about {need / 1024:.1f} GiB to train, within {MEMORY_SHARE:.0%} of the "
                                      f"{machine.memory_bytes / 2**30:.0f} GiB of {machine.name}")
    return widths[-1], batches[-1], (f"the smallest settings; they may not fit the {machine.memory_bytes / 2**30:.0f}"
                                     f" GiB of {machine.name}")


def suggest(survey: Survey, machine: Machine) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings for a first run on this data and this machine: {key: value}, and why, per key."""
    short_sides = sorted(min(size) for size in survey.sizes) or [32]
    median = short_sides[len(short_sides) // 2]
    resolution = 2 ** max(5, min(8, median.bit_length() - 1))  # the largest power of two that fits, 32..256
    why = {"data.resolution": f"the median image's short side is {median} px"}
    if not machine.cuda and resolution > 64:
        resolution, why["data.resolution"] = 64, f"{why['data.resolution']}; 64 at most on a CPU"
    stored = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
    common = survey.formats.most_common(1)[0][0] if survey.formats else "JPEG"
    arch = "r3gan" if machine.cuda else CPU_FAMILY
    width, batch, fits = model_and_batch(arch, resolution, machine)
    values: dict[str, Any] = {
        "data.resolution": resolution,
        "data.format": stored.get(common, "jpeg"),
        "model.arch": arch,
        "model.g_width": width,
        "model.d_width": width,
        "train.batch_size": batch,
        "train.max_minutes": 60 if machine.cuda else 15,
        "train.steps": 100_000,
    }
    why["data.format"] = f"most sampled images are {common}"
    why["model.arch"] = ("R3GAN's architecture, loss and schedules, the strongest baseline given time on a GPU"
                         if machine.cuda else "the family that does most in 15 minutes on a CPU (docs/models.md)")
    for key in ("model.g_width", "model.d_width", "train.batch_size"):
        why[key] = fits
    why["train.max_minutes"] = f"this machine has {'a CUDA GPU' if machine.cuda else 'a CPU only'}"
    why["train.steps"] = "an upper bound: train.max_minutes ends the run first"
    if arch == "r3gan":
        gamma = R3GAN_GAMMA[resolution]
        values.update({"train.loss": "rpgan", "train.r1_gamma": gamma, "train.r2_gamma": gamma,
                       "train.lr_g": 2e-4, "train.lr_d": 2e-4, "train.beta2": 0.9, "train.schedule_kimg": 20_000,
                       "train.schedule_to": {"lr_g": 5e-5, "lr_d": 5e-5, "r1_gamma": gamma / 10,
                                             "r2_gamma": gamma / 10, "beta2": 0.99}})
        for key in ("train.loss", "train.r1_gamma", "train.r2_gamma", "train.lr_g", "train.lr_d", "train.beta2",
                    "train.schedule_kimg", "train.schedule_to"):
            why[key] = f"R3GAN's setting for {resolution} px"
    return values, why


def starter_yaml(name: str, survey: Survey, values: dict[str, Any], why: dict[str, str]) -> str:
    """The pipeline file: a summary of the survey, then every key of the schema with its meaning as
    a comment, at its default unless `values` sets it (with the reason)."""
    sizes = Counter(survey.sizes).most_common(3)
    header = [
        f"# Starter pipeline written by `cgan-pipe init {survey.source}`.",
        f"# Found {survey.images} images, {len(survey.class_counts) or 'no'} classes"
        + (f" ({', '.join(f'{k}: {v}' for k, v in list(survey.class_counts.items())[:10])}"
           f"{', ...' if len(survey.class_counts) > 10 else ''})" if survey.class_counts else " (unlabelled)") + ".",
        f"# Sampled {len(survey.sizes) + survey.unreadable}: sizes "
        + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes)
        + f"; formats {', '.join(f'{k} ({v})' for k, v in survey.formats.most_common())}"
        + (f"; {survey.unreadable} did not open (prepare will skip them, with reasons)" if survey.unreadable else "")
        + ".",
        *([f"# Left out: {counts_text(survey.left_out)} (prepare lists each "
           f"file, with its reason, in the manifest)."] if survey.left_out else []),
        "# Run it:  cgan-pipe run THIS_FILE     Every key: docs/config.md",
    ]
    values = {"name": name, "data.source": survey.source, **values}
    lines = [line for text in header for line in textwrap.wrap(text, 100, subsequent_indent="#   ")]
    section = None
    for doc in describe_keys(PipelineConfig):
        parent, _, leaf = doc.key.rpartition(".")
        if parent != section:
            section = parent
            lines += ["", f"{parent}:"] if parent else [""]
        indent = "  " if parent else ""
        note = doc.help + (f" Set by init: {why[doc.key]}." if doc.key in why else "")
        lines += textwrap.wrap(note, 100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        lines.append(f"{indent}{leaf}: {json.dumps(values.get(doc.key, doc.default))}")
    return "\n".join(lines) + "\n"


def pipeline_name(spec: str) -> str:
    """A pipeline name from a source path: its file or folder name, without archive suffixes."""
    stem = Path(spec.rstrip("/")).name
    for suffix in (".gz", ".tgz", ".tar", ".zip", ".txt", ".lst", ".list"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "my-images"


def write_starter(source: str, path: Path, name: str, *, machine: Machine, force: bool = False) -> tuple[Survey, dict]:
    """Survey `source` and write the starter pipeline `name` to `path` (refused when it exists, unless
    `force`), checked to load; returns the survey and the settings chosen."""
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; choose another --out, or pass --force to overwrite it")
    config_from_dict({"name": name, "data": {"source": source}}, origin="init --name")  # before any file is written
    if not source.startswith("download:"):  # the file may be run from another folder
        source = str(Path(source).expanduser().resolve())
    survey = survey_source(source)
    values, why = suggest(survey, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, starter_yaml(name, survey, values, why))
    load_pipeline(path)  # what was written must load
    return survey, values
