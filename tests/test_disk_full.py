"""A disk that fills up during prepare, generate or train, for real: a size-limited tmpfs, mounted in a
user namespace. Each stops with exit 1 and a message that says what to do, lists no half-written file,
and completes when rerun after space is freed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cgan_pipe.atomic import TEMP_MARK
from cgan_pipe.export import WORK_NAME

from conftest import UNSHARE, can_mount

CLI = str(Path(sys.executable).with_name("cgan-pipe"))
pytestmark = pytest.mark.skipif(not can_mount(), reason="needs unprivileged user namespaces to mount a "
                                "small tmpfs (unshare --user --map-root-user --mount); the ENOSPC path is also "
                                "tested by simulation in test_export.py")


def _fill_then_free(mount: Path, small: str, command: list[str], after: Path) -> dict:
    """Run `command` with `mount` a tmpfs of `small` size, record what it left, grow the tmpfs, run it
    again, and copy the result to `after` (the tmpfs goes with the namespace)."""
    mount.mkdir()
    run = " ".join(map(shlex.quote, command))
    script = f"""
        mount -t tmpfs -o size={small} tmpfs {mount}
        {run} > {after}.out1 2> {after}.err1; echo $? > {after}.rc1
        find {mount} -name '*' > {after}.left
        mount -o remount,size=256m {mount}
        {run} > {after}.out2 2> {after}.err2; echo $? > {after}.rc2
        cp -a {mount} {after}
    """
    subprocess.run([*UNSHARE, "sh", "-c", script], check=True, timeout=600)
    read = lambda suffix: Path(f"{after}.{suffix}").read_text()  # noqa: E731
    return {"rc1": int(read("rc1")), "err1": read("err1"), "left": read("left").split(), "rc2": int(read("rc2")),
            "err2": read("err2")}


def test_prepare_on_a_full_disk_explains_keeps_no_half_shard_and_resumes(small_tar, tmp_path):
    mount = tmp_path / "mnt"
    result = _fill_then_free(mount, "300k", [CLI, "prepare", str(small_tar), str(mount / "shards"), "--shard-size",
                                             "40", "--format", "png", "--workers", "1", "-q"], tmp_path / "after")
    assert result["rc1"] == 1 and "no space left on the device; finished shards are kept" in result["err1"]
    assert "Traceback" not in result["err1"]
    assert not [p for p in result["left"] if TEMP_MARK in p or p.endswith("manifest.json")]
    assert result["rc2"] == 0, result["err2"]
    manifest = json.loads((tmp_path / "after" / "shards" / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 200


def test_generate_on_a_full_disk_explains_keeps_no_half_shard_and_resumes(checkpoint, tmp_path):
    mount = tmp_path / "mnt"
    # 3.5 MB: more than the least 1,000 images take (3.1 MB: refused up front below that), less than they do take
    result = _fill_then_free(mount, "3500k", [CLI, "generate", str(checkpoint), str(mount / "out"), "--seeds", "0-999",
                                              "--shard-size", "100", "--device", "cpu", "-q"], tmp_path / "after")
    assert result["rc1"] == 1 and "no space left on the device; finished parts of the export are kept" \
        in result["err1"] and "Traceback" not in result["err1"]
    work = str(mount / "out" / WORK_NAME)  # the unfinished export, kept to resume from
    assert work in result["left"]
    assert not [p for p in result["left"] if p != work and TEMP_MARK in Path(p).name or p.endswith("manifest.json")
                or p.endswith("export.json")]
    assert result["rc2"] == 0, result["err2"]
    manifest = json.loads((tmp_path / "after" / "out" / "shards" / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 1000
    assert len(list((tmp_path / "after" / "out" / "files").rglob("*.jpg"))) == 1000


def test_train_on_a_full_disk_explains_keeps_its_checkpoints_and_resumes(small_shards, tmp_path):
    mount = tmp_path / "mnt"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "full", "run_dir": str(mount / "run"), "data": {"source": "unused"},
        "loader": {"threads": 1, "shards": str(small_shards)}, "eval": {"metrics": []},
        "model": {"g_width": 64, "d_width": 64},
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "sample_every": 2, "checkpoint_every": 2,
                  "device": "cpu"},
    }))
    result = _fill_then_free(mount, "1m", [CLI, "train", str(pipeline), "-q"], tmp_path / "after")
    assert result["rc1"] == 1 and "is the disk full?" in result["err1"] and "Traceback" not in result["err1"]
    assert not [p for p in result["left"] if TEMP_MARK in p]
    assert result["rc2"] == 0, result["err2"]
    assert sorted(p.name for p in (tmp_path / "after" / "run" / "checkpoints").iterdir()) == [
        "ckpt-0000002.pt", "ckpt-0000004.pt"]
