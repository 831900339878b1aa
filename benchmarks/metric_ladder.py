"""The degradation ladder: does the built-in classifier metric move the right way, monotonically, when real
images are made worse step by step?

    python benchmarks/metric_ladder.py SHARDS HELD_OUT [--n 10000] [--json ladder.json]

SHARDS is a prepared training shard set (the classifier and the reference features are those `eval` uses,
trained and cached once per shard set); HELD_OUT a tar or folder of other real images of the same classes
(`<class>/<image>`, e.g. ../shared/data/cifar10/test.tar). Each ladder degrades the held-out images further
at each rung: Gaussian blur, Gaussian noise, JPEG at falling quality, fewer classes (mode collapse), fewer
distinct images repeated (memorisation), a colour shift. Prints classifier_fd and class accuracy per rung;
exits 1 when a ladder's classifier_fd does not rise at every rung.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from cgan_pipe import images as image_io
from cgan_pipe.config import EvalConfig, LoaderConfig
from cgan_pipe.data.sources import open_source
from cgan_pipe.metrics.evaluate import Evaluator
from cgan_pipe.metrics.stats import feature_stats, frechet_distance


def held_out(source: str, class_names: list[str], n: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `n` images of `source` as a float batch in [-1, 1] and their class ids (by class name)."""
    pixels, labels = [], []
    with open_source(source) as src:
        ids = {name: class_names.index(name) for name in src.class_names}
        for item in src.items:
            image = image_io.fit(image_io.to_rgb(image_io.decode(src.read(item).data)), resolution, "crop")
            pixels.append(np.asarray(image))
            labels.append(ids[src.class_names[item.label]])
            if len(pixels) == n:
                break
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return batch, torch.tensor(labels)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        array = image.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        decoded = Image.open(io.BytesIO(image_io.encode(array, "jpeg", quality))).convert("RGB")
        out.append(torch.from_numpy(np.array(decoded)).permute(2, 0, 1))
    return torch.stack(out).float().div(127.5).sub(1)


Batch = tuple[torch.Tensor, torch.Tensor]  # images in [-1, 1], their class ids


def repeated(images: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor) -> Batch:
    """The images at the indices `chosen`, with their labels, repeated to as many images as before."""
    picks = chosen[torch.arange(len(images)) % len(chosen)]
    return images[picks], labels[picks]


JPEG_QUALITIES = (90, 70, 60, 20, 10, 5)  # 25-55 are not rungs: docs/benchmarks.md says why


def ladders(images: torch.Tensor, labels: torch.Tensor,
            jpeg_qualities: tuple[int, ...] = JPEG_QUALITIES) -> dict[str, list[tuple[str, Callable[[], Batch]]]]:
    """Each ladder's rungs, from mild to severe: (name, a function giving the degraded batch)."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # every class in any prefix
    return {
        "blur": [(f"sigma {s}", lambda s=s: (TF.gaussian_blur(images, 9, s), labels)) for s in (0.5, 1.0, 1.5, 2.0)],
        "noise": [(f"sigma {s}", lambda s=s: ((images + s * noise).clamp(-1, 1), labels))
                  for s in (0.05, 0.1, 0.2, 0.4)],
        "jpeg": [(f"quality {q}", lambda q=q: (jpeg(images, q), labels)) for q in jpeg_qualities],
        "classes": [(f"{k} classes", lambda k=k: repeated(images, labels, torch.nonzero(labels < k).flatten()))
                    for k in (8, 5, 3, 1)],
        "distinct": [(f"{d} distinct", lambda d=d: repeated(images, labels, order[:d])) for d in (2000, 500, 100, 10)],
        "colour": [(f"shift {s}", lambda s=s: ((images + s * shift).clamp(-1, 1), labels))
                   for s in (0.05, 0.1, 0.2, 0.4)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("held_out")
    parser.add_argument("--n", type=int, default=10_000, help="held-out images per rung")
    parser.add_argument("--classifier-steps", type=int, default=EvalConfig().classifier_steps)
    parser.add_argument("--jpeg-qualities", default=",".join(map(str, JPEG_QUALITIES)),
                        help="the JPEG ladder's rungs, comma-separated, from mild to severe")
    parser.add_argument("--ladders", default="blur,noise,jpeg,classes,distinct,colour",
                        help="which ladders to climb, comma-separated")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cpu")
    evaluator = Evaluator(args.shards, EvalConfig(metrics=["classifier"], classifier_steps=args.classifier_steps),
                          LoaderConfig(), device, progress=True)
    reference = feature_stats(evaluator.reference["classifier_features"])
    images, labels = held_out(args.held_out, list(evaluator.info.class_names), args.n, evaluator.info.resolution)

    @torch.no_grad()
    def score(batch: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
        features = torch.cat([evaluator.classifier.features(part) for part in batch.split(500)])
        accuracy = (evaluator.classifier.head(features).argmax(1) == truth).float().mean()
        return {"classifier_fd": round(frechet_distance(feature_stats(features.numpy()), reference), 3),
                "class_accuracy": round(float(accuracy), 4)}

    clean = score(images, labels)
    report, failed = {"clean": clean, "ladders": {}}, []
    print(f"{'ladder':<10} {'rung':<14} {'classifier_fd':>14} {'class acc':>10}")
    print(f"{'clean':<10} {'held-out':<14} {clean['classifier_fd']:>14.3f} {clean['class_accuracy']:>10.1%}")
    qualities = tuple(int(q) for q in args.jpeg_qualities.split(","))
    chosen = args.ladders.split(",")
    for name, rungs in ladders(images, labels, qualities).items():
        if name not in chosen:
            continue
        scores = []
        for rung, degrade in rungs:
            scores.append({"rung": rung, **score(*degrade())})
            print(f"{name:<10} {rung:<14} {scores[-1]['classifier_fd']:>14.3f} {scores[-1]['class_accuracy']:>10.1%}")
        report["ladders"][name] = scores
        values = [clean["classifier_fd"]] + [s["classifier_fd"] for s in scores]
        if any(b <= a for a, b in zip(values, values[1:])):
            failed.append(name)
    report["not_monotonic"] = failed
    print("every ladder rises at every rung" if not failed else f"not monotonic: {', '.join(failed)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
