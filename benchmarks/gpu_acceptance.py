"""Every GPU figure cgan-pipe records, from one command, into one JSON (benchmarks/gpu_acceptance.sh installs first).

Runs, in order, each step with its own time limit, and rewrites the JSON after each, so a run cut short
still leaves what it measured: prepare shards from the CIFAR-10 test tar; the torch backend's figures
(loader images/s, training kimg/s per architecture with torch.compile off and on, data wait, host syncs per
step, peak memory), a short training for a checkpoint, export images/s (JPEG 4:2:0 and 4:4:4); the tests
marked gpu (train, kill -9, resume on both backends in bf16 and fp16, compiled or not; GPU decode; export
subsampling); training kimg/s of every family at 64 and 128 px (the same images upscaled); then, where DALI
is installed, DALI's loader and training figures. Without a GPU the same
steps run on the CPU (the figures then say cpu). `--dry-run` writes the plan with the same JSON schema and
runs nothing; `--small` runs every step at a tiny size (the test suite does, on the CPU).

    python benchmarks/gpu_acceptance.py --data ../shared/data/cifar10/test.tar --out gpu-acceptance.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cgan_pipe"]
FAMILIES = "dcgan,resnet,r3gan"
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_loaders.py", "tests/test_images.py", "tests/test_export.py"]


@dataclass
class Step:
    """One command of the run: what it records (`kind` names the JSON list its records join)."""

    name: str
    command: list[str]
    kind: str | None = None  # 'loader' | 'train' | 'export' | 'tests' | None
    records: Path | None = None  # where the command writes its records
    backend: str | None = None  # the loader backend of a train step's records
    resolution: int = 32  # of a train step's images
    rc: int | None = None
    seconds: float | None = None
    skipped: str | None = None  # why it did not run
    output_tail: str = ""


@dataclass
class Sizes:
    """How much each step does: the full run, or `--small`."""

    shard_size: int = 1000
    limit: int | None = None
    loader_batch: int = 256
    loader_batches: int = 50
    train_batch: int = 256
    train_steps: int = 50
    width: int = 256
    checkpoint_steps: int = 300
    export_n: int = 10_000
    export_batch: int = 250
    tests_marker: str = "gpu"
    tests_keyword: str | None = None


SMALL = Sizes(shard_size=100, limit=300, loader_batch=16, loader_batches=2, train_batch=16, train_steps=2, width=16,
              checkpoint_steps=4, export_n=40, export_batch=16, tests_marker="gpu or not gpu",
              tests_keyword="batch_encoding_gives or parse_ascii")  # two quick tests, to show the plumbing


def plan(data: Path, work: Path, sizes: Sizes, cuda: bool, dali: bool) -> list[Step]:
    """The steps, in order: the torch backend's figures first, so that a machine without DALI (or a run cut
    short) still yields most of the JSON."""
    shards, records = work / "shards", work / "records"
    compiles = "both" if cuda else "off"  # inductor's C++ build on a CPU takes minutes per setting
    pipeline = work / "checkpoint.yaml"
    checkpoint = work / "run" / "checkpoints" / f"ckpt-{sizes.checkpoint_steps:07d}.pt"
    keywords = [k for k in (sizes.tests_keyword, None if dali else "not dali") if k]

    def bench(kind: str, name: str, *args: str, backend: str | None = None, resolution: int = 32) -> Step:
        path = records / f"{name}.json"
        return Step(name, CLI + ["bench", kind, *args, "--json", str(path)], kind, path, backend, resolution)

    def larger(resolution: int) -> list[Step]:  # every family's training speed on the images upscaled
        upscaled = work / f"shards-{resolution}"
        return [Step(f"prepare-{resolution}", CLI + ["prepare", str(data), str(upscaled), "--resolution",
                                                     str(resolution), "--limit", str(sizes.limit or 2000), "-q"]),
                bench("train", f"train-torch-{resolution}", str(upscaled), "--backend", "torch", "--arch", FAMILIES,
                      "--compile", compiles, *train, backend="torch", resolution=resolution)]

    loader = ["--batch-size", str(sizes.loader_batch), "--batches", str(sizes.loader_batches),
              "--jpeg-distort", "10,40"]
    train = ["--batch-size", str(sizes.train_batch), "--precision", "bf16", "--steps", str(sizes.train_steps),
             "--width", str(sizes.width)]
    steps = [
        Step("prepare", CLI + ["prepare", str(data), str(shards), "--shard-size", str(sizes.shard_size), "-q",
                               *(["--limit", str(sizes.limit)] if sizes.limit else [])]),
        bench("loader", "loader-torch", str(shards), "--backends", "torch,baseline", *loader),
        bench("train", "train-torch", str(shards), "--backend", "torch", "--arch", FAMILIES, "--compile",
              compiles, *train, backend="torch"),
        Step("checkpoint", CLI + ["train", str(pipeline), "-q"]),
        bench("export", "export", str(checkpoint), "--n", str(sizes.export_n), "--batch-size", str(sizes.export_batch),
              "--scratch", str(work)),
        Step("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", sizes.tests_marker,
                       *(["-k", " and ".join(f"({k})" for k in keywords)] if keywords else []),
                       "--junitxml", str(records / "tests.xml"), *GPU_TEST_FILES], "tests", records / "tests.xml"),
        *larger(64),
        *larger(128),
        bench("loader", "loader-dali", str(shards), "--backends", "dali", *loader),
        bench("train", "train-dali", str(shards), "--backend", "dali", "--arch", "dcgan", "--compile", "off", *train,
              backend="dali"),
    ]
    for step in steps:
        if step.name.endswith("-dali") and not dali:
            step.skipped = "DALI is not installed"
    return steps


def write_checkpoint_pipeline(work: Path, sizes: Sizes) -> None:
    """The pipeline of the 'checkpoint' step: a short training on the torch backend, on the GPU if any."""
    (work / "checkpoint.yaml").write_text(json.dumps({
        "name": "acceptance", "run_dir": str(work / "run"), "data": {"source": "unused"},
        "loader": {"backend": "torch", "threads": min(8, os.cpu_count() or 1)}, "eval": {"metrics": []},
        "model": {"g_width": sizes.width, "d_width": sizes.width},
        "train": {"steps": sizes.checkpoint_steps, "batch_size": sizes.train_batch, "log_every": 50,
                  "sample_every": 10_000, "checkpoint_every": 10_000},
    }))
    (work / "run").mkdir(exist_ok=True)
    if not (work / "run" / "shards").exists():
        (work / "run" / "shards").symlink_to(work / "shards")


def result(steps: list[Step], device: str, dry_run: bool, small: bool, dali: bool) -> dict:
    """The JSON: the device, versions, each step, and every record the steps wrote."""
    import torch
    import torchvision

    out = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "dry_run": dry_run, "small": small,
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "dali": _dali_version() if dali else None,
                        "cgan_pipe": _git_revision()},
           "steps": [{k: v for k, v in asdict(s).items() if k not in ("records", "backend", "kind")} | {
               "command": " ".join(s.command)} for s in steps],
           "loader": [], "train": [], "export": [], "tests": None}
    for step in steps:
        if step.records is None or not step.records.exists():
            continue
        if step.kind == "tests":
            out["tests"] = _junit_counts(step.records)
            continue
        for record in json.loads(step.records.read_text()):
            if step.kind == "train":
                record = {**record, "backend": step.backend, "resolution": step.resolution,
                          "kimg_per_s": round(record["images_per_s"] / 1000, 3)}
            out[step.kind].append(record)
    return out


def main() -> int:
    """Parse the arguments, run (or plan) the steps, write the JSON; 1 if any step failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "test.tar",
                        help="the CIFAR-10 test tar (or any image-folder tar)")
    parser.add_argument("--out", type=Path, default=Path("gpu-acceptance.json"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--step-timeout", type=float, default=300, help="seconds allowed to one step")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole run; later steps skip")
    parser.add_argument("--dry-run", action="store_true", help="write the plan only, run nothing")
    parser.add_argument("--small", action="store_true", help="every step at a tiny size")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    dali = importlib.util.find_spec("nvidia.dali") is not None
    sizes = SMALL if args.small else Sizes()
    with tempfile.TemporaryDirectory(prefix="cgan-pipe-acceptance-") as temp:
        work = (args.work or Path(temp)).resolve()
        (work / "records").mkdir(parents=True, exist_ok=True)
        steps = plan(args.data.resolve(), work, sizes, cuda, dali)
        print(f"device: {device}; DALI: {'yes' if dali else 'no'}; {len(steps)} steps", flush=True)
        env = {**os.environ, "CGAN_PIPE_TEST_CIFAR10": str(args.data.resolve().parent), "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        for step in steps:
            print(f"[{step.name}] {' '.join(step.command)}", flush=True)
            if args.dry_run:
                step.skipped = step.skipped or "dry run"
            elif step.skipped is None:
                left = args.budget - (time.monotonic() - started)
                if left < 10:
                    step.skipped = "time budget spent"
                else:
                    _run(step, env, min(args.step_timeout, left), work, sizes)
                    print(f"[{step.name}] rc {step.rc} in {step.seconds:.1f} s", flush=True)
            _write_json(args.out, result(steps, device, args.dry_run, args.small, dali))
    return 1 if any(step.rc not in (None, 0) for step in steps) else 0


def _run(step: Step, env: dict, timeout: float, work: Path, sizes: Sizes) -> None:
    if step.name == "checkpoint":
        write_checkpoint_pipeline(work, sizes)
    start = time.monotonic()
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        step.rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        step.rc = 124
        output = f"{_text(exc.stdout)}{_text(exc.stderr)}\n(stopped after {timeout:.0f} s)"
    step.seconds = round(time.monotonic() - start, 1)
    step.output_tail = output[-2000:]
    print(output[-1500:], flush=True)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _junit_counts(path: Path) -> dict[str, int]:
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def _dali_version() -> str | None:
    try:
        from nvidia import dali
    except ImportError:
        return None
    return dali.__version__


def _git_revision() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def _write_json(path: Path, data: dict) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    temp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
