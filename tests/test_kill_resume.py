"""kill -9 at random moments, then rerun the same command: prepare and generate end exactly as an
uninterrupted run, train continues its step count, no checkpoint is ever unreadable, no temp file is left."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from cgan_pipe.atomic import TEMP_MARK
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.config import DataConfig, ExportConfig
from cgan_pipe.data.shards import prepare
from cgan_pipe.export import WORK_NAME, export
from cgan_pipe.train.checkpoint import list_checkpoints, load_checkpoint


CLI = str(Path(sys.executable).with_name("cgan-pipe"))
SEEDS = [0, 1, 2]  # each seed picks another kill point
KILLS: list[dict] = []  # what each test killed, for docs/reliability.md (printed with -s)


def _kill_at_random(command: list[str], progress: Callable[[], int], most: int, seed: int) -> dict:
    """Run `command`, SIGKILL it once `progress()` reaches a random count in 0..most-1 plus a random
    few milliseconds, and say where it was killed (or that it finished first)."""
    rng = random.Random(seed)
    target, extra = rng.randrange(most), rng.uniform(0, 0.05)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while progress() < target and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra)
    reached = progress()
    finished = process.poll() is not None
    process.kill()
    process.wait()
    kill = {"command": command[1], "seed": seed, "target": target, "progress_at_kill": reached,
            "finished_first": finished}
    KILLS.append(kill)
    print(json.dumps(kill))
    return kill


def _leftovers(*folders: Path) -> list[Path]:
    """Temp files, plans and done records anywhere under `folders` or beside them."""
    found = []
    for folder in folders:
        found += [p for p in folder.rglob("*") if TEMP_MARK in p.name or p.name.endswith(".done.json")]
        found += [p for p in folder.parent.glob(f".{folder.name}{TEMP_MARK}*")]
    return found


@pytest.fixture(scope="module")
def clean_prepare(cifar_tar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shards"  # 16 shards of 50
    prepare(DataConfig(str(cifar_tar), shard_size=50, format="png", workers=1), out, progress=False)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_prepare_killed_anywhere_reruns_to_the_uninterrupted_result(cifar_tar, clean_prepare, tmp_path, seed):
    out = tmp_path / "out"
    command = [CLI, "prepare", str(cifar_tar), str(out), "--shard-size", "50", "--format", "png",
               "--workers", str(1 + seed % 2), "-q"]
    _kill_at_random(command, lambda: len(list(out.glob(".shard-*.done.json"))), 16, seed)
    finished = {f"{p.name[1:].split('.')[0]}.tar" for p in out.glob(".shard-*.done.json")}
    kept = {name: (out / name).stat().st_mtime_ns for name in finished}
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert [s.sha256 for s in read_manifest(out).shards] == [s.sha256 for s in read_manifest(clean_prepare).shards]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean_prepare.iterdir())
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # finished shards are not redone
    assert _leftovers(out) == []


@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_anywhere_keeps_every_checkpoint_readable_and_continues_its_steps(small_shards, tmp_path, seed):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "shards").symlink_to(small_shards)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "kill", "run_dir": str(run_dir), "data": {"source": "unused"}, "loader": {"threads": 1},
        "model": {"z_dim": 32, "g_width": 32, "d_width": 32}, "eval": {"metrics": []},
        "train": {"steps": 40, "batch_size": 16, "log_every": 2, "sample_every": 20, "checkpoint_every": 4,
                  "device": "cpu"},
    }))
    command = [CLI, "train", str(pipeline), "-q"]
    _kill_at_random(command, lambda: len(list_checkpoints(run_dir / "checkpoints")), 6, seed)
    saved = [load_checkpoint(path)["step"] for path in list_checkpoints(run_dir / "checkpoints")]  # all load
    rerun = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    if saved and saved[-1] < 40:
        assert f"step 40 (resumed from step {saved[-1]})" in rerun.stdout  # the count continues from there
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 41, 2))  # each step logged once, in order
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["step"] == 40
    assert _leftovers(run_dir / "checkpoints") == []


@pytest.mark.parametrize("seed", SEEDS)
def test_generate_killed_anywhere_reruns_to_the_uninterrupted_result(checkpoint, tmp_path, seed):
    out = tmp_path / "out"
    work = out / WORK_NAME
    command = [CLI, "generate", str(checkpoint), str(out), "--seeds", "0-1999", "--batch-size", "10",
               "--shard-size", "100", "--device", "cpu", "-q"]
    kill = _kill_at_random(command, lambda: len(list(work.glob(".part-*.done.json"))), 20, seed)
    assert kill["finished_first"] or not (out / "export.json").exists()  # nothing looks complete before it is
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    clean = export(checkpoint, tmp_path / "clean", ExportConfig(n=2000, batch_size=10, shard_size=100),
                   device=torch.device("cpu"), progress=False).out_dir

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.name not in ("export.json", "manifest.json")}

    assert tree(out) == tree(clean)  # no seed missing, none twice, the same bytes
    assert _leftovers(out) == [] and not work.exists()
