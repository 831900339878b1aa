"""`cgan-pipe init`: survey a user's image source and write a starter pipeline YAML, every key commented."""

from __future__ import annotations

import io
import json
import random
import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic import write_text_atomic
from .config import PipelineConfig, load_pipeline
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


def suggest(survey: Survey, cuda: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings for a first run on this data and this machine: {key: value}, and why, per key."""
    short_sides = sorted(min(size) for size in survey.sizes) or [32]
    median = short_sides[len(short_sides) // 2]
    resolution = 2 ** max(5, min(8, median.bit_length() - 1))  # the largest power of two that fits, 32..256
    why = {"data.resolution": f"the median image's short side is {median} px"}
    if not cuda and resolution > 64:
        resolution, why["data.resolution"] = 64, f"{why['data.resolution']}; 64 at most on a CPU"
    stored = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
    common = survey.formats.most_common(1)[0][0] if survey.formats else "JPEG"
    values = {
        "data.resolution": resolution,
        "data.format": stored.get(common, "jpeg"),
        "model.g_width": 256 if cuda else 128,
        "model.d_width": 256 if cuda else 128,
        "train.batch_size": (128 if resolution <= 64 else 64) if cuda else (64 if resolution <= 32 else 32),
        "train.max_minutes": 60 if cuda else 15,
        "train.steps": 100_000,
    }
    why["data.format"] = f"most sampled images are {common}"
    machine = "a CUDA GPU" if cuda else "a CPU only"
    for key in ("model.g_width", "model.d_width", "train.batch_size", "train.max_minutes"):
        why[key] = f"this machine has {machine}"
    why["train.steps"] = "an upper bound: train.max_minutes ends the run first"
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


def write_starter(source: str, path: Path, name: str, *, cuda: bool, force: bool = False) -> tuple[Survey, dict]:
    """Survey `source` and write the starter pipeline `name` to `path` (refused when it exists, unless
    `force`), checked to load; returns the survey and the settings chosen."""
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; choose another --out, or pass --force to overwrite it")
    if not source.startswith("download:"):  # the file may be run from another folder
        source = str(Path(source).expanduser().resolve())
    survey = survey_source(source)
    values, why = suggest(survey, cuda)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, starter_yaml(name, survey, values, why))
    load_pipeline(path)  # what was written must load
    return survey, values
