"""The phases of a first GPU contact (docs/gpu.md): each runs its steps in order of value, writes every step's
record the moment it ends, and stops itself before its time limit.

    python benchmarks/first_contact.py phase a|b|c --out DIR [--limit SECONDS] [--carry .first-contact]

Phase A (no DALI): unpack the small packages and the data carried in call-a, probe the machine, prepare
shards, then time the cifar preset's training, the torch loader and the export, run the GPU tests that need
no DALI, and time r3gan at 32 and 64 px and torch.compile. Phase B only checks that call A's piece of the DALI
set is still there (the machine stayed warm). Phase C joins and checks the DALI pieces, unpacks them, and
times DALI's decode and training on it and runs the DALI GPU tests. Records go to DIR/first-contact.json (all
phases so far) and each step's output to DIR/first-contact.log. Only the standard library is used here: the
steps run `python -m cgan_pipe` and pytest with the carried packages first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"a": 300.0, "b": 30.0, "c": 240.0}  # seconds a phase may take: call A about five minutes
MARGIN = 10.0  # a phase ends this long before its limit, records written
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_loaders.py", "tests/test_images.py", "tests/test_export.py"]
RECORDS = "first-contact.json"
SPENT = "the phase's time was spent"  # why a step was skipped; phase C runs phase A's such steps after its own
LOG = "first-contact.log"


@dataclass(frozen=True)
class Sizes:
    """How much each step does on a GPU, or (the rehearsal) on a CPU."""

    limit: int | None  # images prepared (None: all)
    train_batches: str  # batch sizes of the preset's timing
    width: int  # the preset's g_width = d_width
    train_steps: int
    loader_batch: int
    loader_batches: int
    checkpoint_steps: int
    export_n: int
    export_batch: int


GPU = Sizes(limit=None, train_batches="64,256", width=128, train_steps=50, loader_batch=256, loader_batches=40,
            checkpoint_steps=200, export_n=5000, export_batch=250)
CPU = Sizes(limit=600, train_batches="16", width=16, train_steps=2, loader_batch=32, loader_batches=3,
            checkpoint_steps=4, export_n=64, export_batch=32)


@dataclass
class Step:
    """One command of a phase and what became of it."""

    phase: str
    step: str
    command: list[str]
    cap: float  # seconds this step may take at most
    figures_from: Path | None = None  # the JSON (or JUnit XML) the command writes its figures to
    needs: str | None = None  # a step whose failure leaves nothing for this one to work on
    rc: int | None = None
    seconds: float | None = None
    skipped: str | None = None
    figures: object = None
    tail: str = ""

    def record(self) -> dict:
        """The step's record in first-contact.json."""
        return {"phase": self.phase, "step": self.step, "rc": self.rc, "seconds": self.seconds,
                "skipped": self.skipped, "figures": self.figures, "command": " ".join(self.command)}


class Phase:
    """Where a phase runs: the carried folder, the work folder, the output folder, its deadline."""

    def __init__(self, name: str, carry: Path, out: Path, limit: float):
        self.name, self.carry, self.out = name, carry, out
        self.site, self.work = carry / "site", carry / "work"
        self.deadline = time.monotonic() + limit - MARGIN
        self.history = carry / "records.json"  # the records of the phases so far, on this machine
        self.records: list[dict] = json.loads(self.history.read_text()) if self.history.exists() else []

    def env(self) -> dict[str, str]:
        """The steps' environment: the carried packages, then this checkout, before whatever PYTHONPATH held."""
        paths = [str(self.site), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
                "CGAN_PIPE_TEST_CIFAR10": str(self.work)}

    def save(self, record: dict) -> None:
        """Add `record` and rewrite the records, here and in the output folder (temp file, then rename)."""
        self.records.append(record)
        for path in (self.history, self.out / RECORDS):
            temp = path.with_name(f".{path.name}.tmp")
            temp.write_text(json.dumps(self.records, indent=2) + "\n")
            temp.replace(path)

    def log(self, text: str) -> None:
        """Append to the output folder's log and print."""
        print(text, flush=True)
        with open(self.out / LOG, "a") as log:
            log.write(text + "\n")

    def run(self, step: Step, failed: set[str] = frozenset()) -> bool:
        """Run `step` within its cap and the phase's deadline, unless the step it needs is among `failed`;
        save its record; whether it succeeded."""
        left = self.deadline - time.monotonic()
        if step.needs in failed:
            step.skipped = f"{step.needs} failed"
        elif left < 5:
            step.skipped = SPENT
        else:
            self.log(f"[{self.name}:{step.step}] {' '.join(step.command)}")
            start = time.monotonic()
            timeout = min(step.cap, left)
            try:
                done = subprocess.run(step.command, cwd=ROOT, env=self.env(), capture_output=True, text=True,
                                      timeout=timeout)
                step.rc, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as exc:
                step.rc, output = 124, f"{_text(exc.stdout)}{_text(exc.stderr)}\n(stopped after {timeout:.0f} s)"
            step.seconds = round(time.monotonic() - start, 1)
            step.tail = output[-3000:]
            step.figures = verdicts(output) if step.figures_from is None and "pytest" in step.command else \
                _figures(step.figures_from)
            self.log(f"{output[-3000:]}\n[{self.name}:{step.step}] rc {step.rc} in {step.seconds} s")
        self.save(step.record())
        return step.rc == 0

    def note(self, step: str, rc: int, figures: object, seconds: float = 0.0, skipped: str | None = None) -> None:
        """Save the record of a step done here, in Python."""
        self.log(f"[{self.name}:{step}] rc {rc}: {json.dumps(figures)}")
        self.save({"phase": self.name, "step": step, "rc": rc, "seconds": round(seconds, 1), "skipped": skipped,
                   "figures": figures, "command": "(in first_contact.py)"})


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _figures(path: Path | None) -> object:
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text())


VERDICT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


def verdicts(output: str) -> dict:
    """Each test's verdict from `pytest -v` output, as far as it got: {verdict: count}, the failed tests' names,
    and whether pytest reached its summary."""
    found = VERDICT.findall(output)
    counts: dict = {}
    for _, verdict in found:
        counts[verdict.lower()] = counts.get(verdict.lower(), 0) + 1
    return {**counts, "failed_tests": [name for name, verdict in found if verdict in ("FAILED", "ERROR")],
            "finished": bool(re.search(r"^=+ .*\bin [\d.]+s", output, re.MULTILINE))}


def cli(*args: str) -> list[str]:
    """A cgan-pipe command under this interpreter."""
    return [sys.executable, "-m", "cgan_pipe", *args]


def pytest(keyword: str) -> list[str]:
    """The GPU tests whose names match `keyword`, one verdict a line."""
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", "-k", keyword,
            *GPU_TEST_FILES]


def unpack(archive: Path, into: Path) -> int:
    """Extract a tar (any compression tarfile reads) into `into`; the number of files."""
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
        return sum(1 for member in tar.getmembers() if member.isfile())


def probe_command(records: Path) -> list[str]:
    """The probe: interpreter, torch, the GPU and its memory, the CUDA context's memory, whether the interpreter's
    site-packages is writable, and the r3gan width and batch the project's estimator picks at 32 and 64 px."""
    code = f"""
import json, os, sys, sysconfig, torch, torchvision
from cgan_pipe.starter import Machine, model_and_batch, this_machine
found = {{"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
         "torchvision": torchvision.__version__, "cuda": torch.cuda.is_available(),
         "site_writable": os.access(sysconfig.get_paths()["purelib"], os.W_OK)}}
if found["cuda"]:
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    found.update(gpu=torch.cuda.get_device_name(0), gpu_mib=total // 2**20, cuda_context_mib=(total - free) // 2**20)
machine = this_machine()
found["r3gan"] = {{str(r): dict(zip(("width", "batch"), model_and_batch("r3gan", r, machine)[:2])) for r in (32, 64)}}
json.dump(found, open({str(records)!r}, "w"))
print(json.dumps(found))
"""
    return [sys.executable, "-c", code]


def phase_a(phase: Phase) -> None:
    """Probe, prepare, and the torch backend's figures, most valuable first."""
    records = phase.work / "records"
    shutil.rmtree(phase.work, ignore_errors=True)
    records.mkdir(parents=True)
    start = time.monotonic()
    files = unpack(phase.carry / "call-a" / "site.tar.xz", phase.site)
    with gzip.open(phase.carry / "call-a" / "data.tar.gz") as source, open(phase.work / "test.tar", "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    phase.note("unpack", 0, {"site_files": files, "site": str(phase.site)}, time.monotonic() - start)
    probe = Step("a", "probe", probe_command(records / "probe.json"), 60, records / "probe.json")
    if not phase.run(probe):
        return
    pipeline = phase.work / "checkpoint.yaml"
    sizes = GPU if probe.figures["cuda"] else CPU
    pipeline.write_text(json.dumps({
        "name": "first-contact", "run_dir": str(phase.work / "run"), "data": {"source": "unused"},
        "loader": {"backend": "torch"}, "eval": {"metrics": []},
        "model": {"g_width": sizes.width, "d_width": sizes.width},
        "train": {"steps": sizes.checkpoint_steps, "batch_size": 64, "log_every": sizes.checkpoint_steps,
                  "sample_every": 10 ** 6, "checkpoint_every": 10 ** 6}}))
    (phase.work / "run").mkdir()
    (phase.work / "run" / "shards").symlink_to(phase.work / "shards")
    failed: set[str] = set()
    for step in torch_steps(phase, probe.figures):
        if not phase.run(step, failed):
            failed.add(step.step)


def torch_steps(phase: Phase, found: dict) -> list[Step]:
    """Phase A's steps after the probe (`found`), in order of value; they need nothing but torch."""
    sizes = GPU if found["cuda"] else CPU
    records, shards = phase.work / "records", phase.work / "shards"
    limit = ["--limit", str(sizes.limit)] if sizes.limit else []

    def bench_train(name: str, cap: float, *args: str, on: Path = shards, needs: str = "prepare") -> Step:
        return Step("a", name, cli("bench", "train", str(on), "--backend", "torch", "--precision", "bf16",
                                   "--steps", str(sizes.train_steps), "-q", "--json", str(records / f"{name}.json"),
                                   *args), cap, records / f"{name}.json", needs)

    preset = ["--arch", "dcgan", "--batch-size", sizes.train_batches, "--width", str(sizes.width),
              "--channels-last", "on", "--r1", "0.05"]

    def r3gan(resolution: int) -> list[str]:
        chosen = found["r3gan"][str(resolution)] if found["cuda"] else {"width": 16, "batch": 8}
        return ["--arch", "r3gan", "--loss", "rpgan", "--r1", "0.05", "--r2", "0.05", "--channels-last", "on",
                "--width", str(chosen["width"]), "--batch-size", str(chosen["batch"])]

    pipeline = phase.work / "checkpoint.yaml"
    checkpoint = phase.work / "run" / "checkpoints" / f"ckpt-{sizes.checkpoint_steps:07d}.pt"
    upscaled = phase.work / "shards-64"
    return [
        Step("a", "prepare", cli("prepare", str(phase.work / "test.tar"), str(shards), "--shard-size", "1000", "-q",
                                 *limit), 90),
        bench_train("train-preset", 90, *preset, "--compile", "off"),
        Step("a", "loader-torch", cli("bench", "loader", str(shards), "--backends", "torch,baseline", "-q",
                                      "--batch-size", str(sizes.loader_batch), "--batches", str(sizes.loader_batches),
                                      "--json", str(records / "loader-torch.json")), 60, records / "loader-torch.json",
             "prepare"),
        Step("a", "checkpoint", cli("train", str(pipeline), "-q"), 60, needs="prepare"),
        Step("a", "export", cli("bench", "export", str(checkpoint), "--n", str(sizes.export_n), "--batch-size",
                                str(sizes.export_batch), "--scratch", str(phase.work), "-q",
                                "--json", str(records / "export.json")), 60, records / "export.json", "checkpoint"),
        Step("a", "tests", pytest("not dali"), 150),
        bench_train("r3gan-32", 60, *r3gan(32), "--compile", "off"),
        Step("a", "prepare-64", cli("prepare", str(phase.work / "test.tar"), str(upscaled), "--resolution", "64",
                                    "--limit", str(sizes.limit or 2000), "-q"), 40),
        bench_train("r3gan-64", 60, *r3gan(64), "--compile", "off", on=upscaled, needs="prepare-64"),
        bench_train("compile", 120, *preset, "--compile", "on"),
    ]


def _pieces(phase: Phase) -> tuple[dict, list[Path]]:
    manifest = json.loads((phase.carry / f"call-{phase.name}" / "manifest.json").read_text())
    return manifest, [phase.carry / piece for piece in manifest["dali"]["pieces"]]


def phase_b(phase: Phase) -> bool:
    """Whether the machine is still the one call A ran on: call A's piece of the DALI set is here."""
    _, pieces = _pieces(phase)
    present = {str(p.relative_to(phase.carry)): p.exists() for p in pieces[:2]}
    warm = all(present.values())
    phase.note("pieces", 0 if warm else 1, present,
               skipped=None if warm else "the machine was started afresh: call A's piece is gone; start again at A")
    return warm


def phase_c(phase: Phase) -> None:
    """Join, check and unpack the DALI set, then DALI's figures and tests."""
    start = time.monotonic()
    manifest, pieces = _pieces(phase)
    missing = [str(p.relative_to(phase.carry)) for p in pieces if not p.exists()]
    shards = phase.work / "shards"
    if missing or not shards.exists():
        phase.note("dali-unpack", 1, {"missing": missing + ([] if shards.exists() else ["work/shards"])},
                   skipped="the machine was started afresh after call A; start again at A")
        return
    joined = phase.carry / "dali.tar.xz"
    digest = hashlib.sha256()
    with open(joined, "wb") as sink:
        for piece in pieces:
            data = piece.read_bytes()
            digest.update(data)
            sink.write(data)
    if digest.hexdigest() != manifest["dali"]["sha256"]:
        phase.note("dali-unpack", 1, {"sha256": digest.hexdigest(), "expected": manifest["dali"]["sha256"]})
        return
    files = unpack(joined, phase.site)
    joined.unlink()
    phase.note("dali-unpack", 0, {"files": files, "bytes": manifest["dali"]["bytes"]}, time.monotonic() - start)
    records = phase.work / "records"
    found = json.loads((records / "probe.json").read_text())
    sizes = GPU if found["cuda"] else CPU
    dali = ("import json, nvidia.dali, nvidia.dali.plugin.pytorch; "
            "found = {'dali': nvidia.dali.__version__, 'at': nvidia.dali.__file__}; "
            f"json.dump(found, open({str(records / 'dali.json')!r}, 'w')); print(found)")
    steps = [
        Step("c", "dali-import", [sys.executable, "-c", dali], 30, records / "dali.json"),
        Step("c", "loader-dali", cli("bench", "loader", str(shards), "--backends", "dali", "-q",
                                     "--batch-size", str(sizes.loader_batch), "--batches", str(sizes.loader_batches),
                                     "--json", str(records / "loader-dali.json")), 60, records / "loader-dali.json",
             "dali-import"),
        Step("c", "train-dali", cli("bench", "train", str(shards), "--backend", "dali", "--precision", "bf16",
                                    "--steps", str(sizes.train_steps), "--arch", "dcgan", "--batch-size",
                                    sizes.train_batches, "--width", str(sizes.width), "--channels-last", "on",
                                    "--r1", "0.05", "--compile", "off", "-q",
                                    "--json", str(records / "train-dali.json")), 90, records / "train-dali.json",
             "dali-import"),
        Step("c", "tests-dali", pytest("dali"), 120, needs="dali-import"),
    ]
    failed: set[str] = set()
    for step in steps + left_for_time(phase, found):
        step.phase = "c"
        if not phase.run(step, failed):
            failed.add(step.step)


def left_for_time(phase: Phase, found: dict) -> list[Step]:
    """Phase A's steps that were skipped because its time was spent, in their order."""
    skipped = {r["step"] for r in phase.records if r["phase"] == "a" and r["skipped"] == SPENT}
    return [step for step in torch_steps(phase, found) if step.step in skipped]


def main() -> int:
    """Run one phase; 1 if any of its steps failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["phase"])
    parser.add_argument("name", choices=sorted(LIMITS))
    parser.add_argument("--out", type=Path, required=True, help="where the records and the log go ($OUT)")
    parser.add_argument("--limit", type=float, default=None, help="seconds the phase may take [a 300, b 30, c 240]")
    parser.add_argument("--carry", type=Path, default=ROOT / ".first-contact", help="the carried folders' parent")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    phase = Phase(args.name, args.carry.resolve(), args.out.resolve(), args.limit or LIMITS[args.name])
    if args.name == "a":
        phase.records = []
        phase.history.unlink(missing_ok=True)
        phase_a(phase)
    elif args.name == "b":
        phase_b(phase)
    else:
        phase_c(phase)
    mine = [r for r in phase.records if r["phase"] == args.name]
    return 1 if any(r["rc"] not in (None, 0) for r in mine) else 0


if __name__ == "__main__":
    sys.exit(main())
