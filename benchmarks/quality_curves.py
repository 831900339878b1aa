"""Quality over training: train a pipeline's preset for several seeds (and settings), score every checkpoint,
plot the curves.

Each run is step-bounded, so its result does not depend on the machine's load: a budget in minutes becomes
steps through the setting's speed, measured once on this machine with every core and nothing else running
(`--steps-per-minute` gives it instead). Every checkpoint (one per `--every` minutes) is scored with the
built-in metric (classifier Frechet distance, class accuracy), the within-class diversity of
benchmarks/class_diversity.py, and the discriminator's mean logit on training images, held-out images and
fakes: a discriminator that overfits scores the training images higher than held-out ones, and the sign
of its logits on training images (StyleGAN2-ADA's r_t) moves towards 1.

    python benchmarks/quality_curves.py pipelines/cifar.yaml [--shards SHARDS] [--held-out TEST_SHARDS] \\
        --seeds 0,1,2 --minutes 60 --every 2.5 --work curves --out curves.json --plot curves.png \\
        [--setting "diffaugment: train.diffaugment=color,translation,cutout"] [--jobs 2]

Without --shards, the pipeline's data is prepared into WORK/shards first (once).

Settings are "NAME: key=value; key=value" (the preset's own run is "preset", always included unless
--no-preset). Runs go to WORK/NAME/seedS and resume when the command is run again; a checkpoint scored
once is not scored again (WORK/NAME/seedS/scores.jsonl). --score-only scores what is there now and plots.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from class_diversity import class_diversity
from cgan_pipe.config import EvalConfig, LoaderConfig, config_from_dict, load_pipeline
from cgan_pipe.data.shards import prepare
from cgan_pipe.data.loader import first_samples
from cgan_pipe.generation import checkpoint_dataset, load_generator
from cgan_pipe.metrics.evaluate import Evaluator
from cgan_pipe.models import build_networks
from cgan_pipe.train.checkpoint import load_checkpoint, load_weights

CPU = torch.device("cpu")
PER_CLASS = 20  # images per class for the within-class diversity
LOGIT_IMAGES = 2000  # images per group for the discriminator's mean logits


@dataclass(frozen=True)
class Setting:
    """A named list of --set overrides of the pipeline."""

    name: str
    sets: tuple[str, ...]


def parse_setting(text: str) -> Setting:
    """'NAME: key=value; key=value' -> Setting."""
    name, _, rest = text.partition(":")
    sets = tuple(part.strip() for part in rest.split(";") if part.strip())
    if not name.strip() or any("=" not in part for part in sets):
        raise SystemExit(f"--setting {text!r}: expected 'NAME: key=value; key=value'")
    return Setting(name.strip(), sets)


def train_command(pipeline: Path, shards: Path, run: Path, seed: int, steps: int, every: int,
                  setting: Setting) -> list[str]:
    """The step-bounded `cgan-pipe train` of one run, a checkpoint (and a sample grid) every `every` steps, all kept."""
    sets = [f"run_dir={run}", f"loader.shards={shards}", f"seed={seed}", f"train.steps={steps}",
            "train.max_minutes=null", f"train.checkpoint_every={every}", f"train.sample_every={every}",
            "train.keep_checkpoints=100000", "eval.metrics=[]", *setting.sets]
    return [sys.executable, "-m", "cgan_pipe", "train", str(pipeline), "-q"] + \
        [arg for item in sets for arg in ("--set", item)]


def measure_speed(pipeline: Path, shards: Path, work: Path, setting: Setting) -> float:
    """Steps per minute of `setting` on this machine: 500 steps with every core, mean of the rows after step 100.
    Cached in WORK/NAME/speed.json."""
    cached = work / setting.name / "speed.json"
    if cached.is_file():
        return json.loads(cached.read_text())["steps_per_minute"]
    run = work / setting.name / "speed-run"
    subprocess.run(train_command(pipeline, shards, run, 0, 500, 100000, setting), check=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    images_per_s = statistics.mean(row["images_per_s"] for row in rows if row["step"] > 100)
    batch = config_from_dict(load_checkpoint(next((run / "checkpoints").glob("*.pt")), CPU)["config"],
                             origin="checkpoint").train.batch_size
    speed = images_per_s * 60 / batch
    cached.write_text(json.dumps({"steps_per_minute": speed, "images_per_s": images_per_s}))
    return speed


class Scorer:
    """Scores checkpoints of one shard set: built-in metric, within-class diversity, D's logits."""

    def __init__(self, shards: Path, held_out: Path | None, cfg: EvalConfig):
        plain = LoaderConfig(backend="dali", device="cpu", hflip=False)
        self.evaluator = Evaluator(shards, cfg, plain, CPU)
        self.train_reals = _reals(shards, plain, LOGIT_IMAGES)
        self.held_out = _reals(held_out, plain, LOGIT_IMAGES) if held_out else None
        classes = max(self.evaluator.info.num_classes, 1)
        many = _reals(shards, plain, max(5000, 60 * classes))
        self.real_diversity = class_diversity(*many, PER_CLASS)  # the first PER_CLASS of each class

    @torch.no_grad()
    def __call__(self, checkpoint: Path) -> dict:
        state = load_checkpoint(checkpoint, map_location=CPU)
        G_ema, info, z_dim = load_generator(state, ema=True, device=CPU)
        row = {"step": state["step"], **self.evaluator(G_ema, z_dim)}
        labels = torch.arange(max(info.num_classes, 1)).repeat(PER_CLASS)
        z = torch.randn(len(labels), z_dim, generator=torch.Generator().manual_seed(0))
        row["class_diversity"] = class_diversity(G_ema(z, labels, None).float(), labels, PER_CLASS)
        row["real_class_diversity"] = self.real_diversity
        row.update(_discriminator_logits(state, self.train_reals, self.held_out))
        return row


def _reals(shards: Path, cfg: LoaderConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(first_samples(shards, cfg, n, CPU))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def _discriminator_logits(state: dict, train_reals: tuple, held_out: tuple | None) -> dict:
    """D's mean logit on training reals, held-out reals and the raw G's fakes of the same classes, and the
    fraction of positive logits on training reals (StyleGAN2-ADA's overfitting heuristic r_t)."""
    cfg = config_from_dict(state["config"], origin="checkpoint config")
    G, D = build_networks(cfg.model, checkpoint_dataset(state), cfg.compression)
    load_weights(D, state, "D", "the checkpoint")
    load_weights(G, state, "G", "the checkpoint")
    D, G = D.eval(), G.eval()
    images, labels = train_reals
    logits = _batched(D, images, labels)
    z = torch.randn(len(labels), cfg.model.z_dim, generator=torch.Generator().manual_seed(1))
    fakes = torch.cat([G(z[i:i + 250], labels[i:i + 250]) for i in range(0, len(labels), 250)])
    row = {"d_train": logits.mean().item(), "d_fake": _batched(D, fakes, labels).mean().item(),
           "r_t": logits.sign().mean().item()}
    if held_out is not None:
        row["d_held_out"] = _batched(D, *held_out).mean().item()
    return row


def _batched(D: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([D(images[i:i + 250], labels[i:i + 250]) for i in range(0, len(labels), 250)])


def score_run(run: Path, scorer: Scorer, steps_per_minute: float) -> list[dict]:
    """Score each checkpoint of `run` not yet in run/scores.jsonl; returns all its rows, by step."""
    path = run / "scores.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {row["step"] for row in rows}
    for checkpoint in sorted((run / "checkpoints").glob("ckpt-*.pt")):
        step = int(checkpoint.stem.split("-")[1])
        if step in done:
            continue
        row = {**scorer(checkpoint), "minutes": round(step / steps_per_minute, 3)}
        rows.append(row)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{run}: step {step} fd {row['classifier_fd']:.2f} acc {row['class_accuracy']:.3f} "
              f"diversity {row['class_diversity']:.1f} / {row['real_class_diversity']:.1f}", flush=True)
    return sorted(rows, key=lambda row: row["step"])


def plot(results: dict, path: Path) -> None:
    """Distance, class accuracy, within-class diversity and D's logits against minutes: a colour per
    setting, a line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("classifier_fd", "classifier Frechet distance (lower is better)"),
              ("class_accuracy", "class accuracy (real images: dashed)"),
              ("class_diversity", "within-class diversity (real: dashed)"),
              ("d_gap", "D logit: training minus held-out reals")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    axes = axes.flatten()
    for colour, (name, entry) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        for i, (seed, rows) in enumerate(sorted(entry["seeds"].items())):
            minutes = [row["minutes"] for row in rows]
            for ax, (key, _) in zip(axes, panels):
                values = [row["d_train"] - row["d_held_out"] if key == "d_gap" else row[key]
                          for row in rows if key != "d_gap" or "d_held_out" in row]
                if values:
                    ax.plot(minutes[:len(values)], values, color=colour, marker=".", alpha=0.85,
                            label=name if i == 0 else None)
            if rows:
                axes[1].axhline(rows[-1]["real_accuracy"], color="grey", linestyle="--", linewidth=0.8)
                axes[2].axhline(rows[-1]["real_class_diversity"], color="grey", linestyle="--", linewidth=0.8)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training minutes on the 2-core machine")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--shards", type=Path, help="the prepared training shard set (default: WORK/shards, "
                        "prepared from the pipeline's data)")
    parser.add_argument("--held-out", type=Path, help="a shard set of held-out images of the same classes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=2.5, help="minutes between scored checkpoints")
    parser.add_argument("--setting", action="append", default=[], type=parse_setting)
    parser.add_argument("--no-preset", action="store_true")
    parser.add_argument("--steps-per-minute", type=float, help="instead of measuring each setting's speed")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (torch threads split between them)")
    parser.add_argument("--n-samples", type=int, default=EvalConfig.n_samples, help="generated images per score")
    parser.add_argument("--n-reference", type=int, default=EvalConfig.n_reference)
    parser.add_argument("--classifier-steps", type=int, default=EvalConfig.classifier_steps)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--score-only", action="store_true", help="score the checkpoints there now; train nothing")
    args = parser.parse_args()
    settings = ([] if args.no_preset else [Setting("preset", ())]) + args.setting
    if args.shards is None:
        args.shards = args.work / "shards"
        prepare(load_pipeline(args.pipeline).data, args.shards, progress=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    speeds = {s.name: args.steps_per_minute or measure_speed(args.pipeline, args.shards, args.work, s)
              for s in settings}

    if not args.score_only:
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        commands = []
        for s in settings:
            every = max(1, round(args.every * speeds[s.name]))
            steps = every * round(args.minutes / args.every)
            for seed in seeds:
                run = args.work / s.name / f"seed{seed}"
                run.mkdir(parents=True, exist_ok=True)
                commands.append((run, train_command(args.pipeline, args.shards, run, seed, steps, every, s)))
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for run, command in commands:
                pool.submit(_train, run, command, env)

    scorer = Scorer(args.shards, args.held_out, EvalConfig(metrics=["classifier"], n_samples=args.n_samples,
                                                           n_reference=args.n_reference,
                                                           classifier_steps=args.classifier_steps))
    results = {s.name: {"sets": list(s.sets), "steps_per_minute": speeds[s.name],
                        "seeds": {seed: score_run(args.work / s.name / f"seed{seed}", scorer, speeds[s.name])
                                  for seed in seeds if (args.work / s.name / f"seed{seed}").is_dir()}}
               for s in settings}
    args.out.write_text(json.dumps({"pipeline": str(args.pipeline), "machine": _machine(), "settings": results},
                                   indent=1))
    if args.plot:
        plot(results, args.plot)


def _train(run: Path, command: list[str], env: dict) -> None:
    t0 = time.perf_counter()
    with open(run / "train.log", "a") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"{run}: training ended with exit code {code} after {time.perf_counter() - t0:.0f} s", flush=True)


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
