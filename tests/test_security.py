"""Security: no code runs from a pipeline file or a checkpoint, archive member names never choose where
files go, no shell sees a user's string, and every file is written with the user's umask."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cgan_pipe.config import DataConfig, load_pipeline
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.data.shards import prepare
from cgan_pipe.errors import ConfigError

from conftest import cifar_members

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cgan-pipe"))


def test_a_pipeline_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\ndata: {{source: a.tar}}\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="p.yaml"):
        load_pipeline(path)
    assert not marker.exists()


def test_archive_members_never_choose_where_files_go(tmp_path):
    jpeg = cifar_members("test", 1)["test/cat/0000.jpg"]
    outside = tmp_path / "outside"
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for name in ("data/cat/ok.jpg", "data/dog/ok.jpg", str(outside / "abs.jpg"), "data/../../outside/up.jpg",
                     "data/cat/../../../outside/deep.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))
        for kind, name in ((tarfile.SYMTYPE, "data/cat/sym.jpg"), (tarfile.LNKTYPE, "data/cat/hard.jpg")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "../../../etc/passwd"
            tar.addfile(link)
    before = set(tmp_path.rglob("*"))
    manifest, _ = prepare(DataConfig(str(tmp_path / "evil.tar")), tmp_path / "shards", progress=False)
    assert manifest.num_samples == 2 and manifest.class_names == ["cat", "dog"]
    assert {entry["source"] for entry in manifest.skipped} >= {str(outside / "abs.jpg"), "data/../../outside/up.jpg",
                                                                "data/cat/../../../outside/deep.jpg"}
    created = set(tmp_path.rglob("*")) - before
    assert all(path.is_relative_to(tmp_path / "shards") for path in created) and not outside.exists()


def test_no_shell_and_no_eval_in_the_code():
    risky = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|(?<![.\w])eval\(|(?<![.\w])exec\("
                       r"|yaml\.load\(|pickle\.loads?\(")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sorted((ROOT / "cgan_pipe").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1) if risky.search(line)]
    assert found == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_written_with_the_users_umask(small_tar, checkpoint, tmp_path, umask):
    def run(*args: str) -> None:
        subprocess.run([CLI, *args, "-q"], check=True, capture_output=True, preexec_fn=lambda: os.umask(umask))

    run("prepare", str(small_tar), str(tmp_path / "shards"), "--workers", "2")
    run("generate", str(checkpoint), str(tmp_path / "export"), "--n", "20", "--shard-size", "8")
    read_manifest(tmp_path / "shards")
    wrong = []
    for path in [*(tmp_path / "shards").rglob("*"), *(tmp_path / "export").rglob("*"), tmp_path / "export"]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        if path.stat().st_mode & 0o777 != expected:
            wrong.append(f"{path.relative_to(tmp_path)}: {oct(path.stat().st_mode & 0o777)}")
    assert wrong == []
