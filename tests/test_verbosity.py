"""-q and -v: what each level prints, and where (results on stdout; progress and detail on stderr;
no colour off a terminal)."""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cgan_pipe.cli import main

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


@pytest.fixture(autouse=True)
def _restore_logging():
    ours, root = logging.getLogger("cgan_pipe"), logging.getLogger()
    saved = ours.handlers[:], ours.level, ours.propagate, root.handlers[:], root.level
    yield
    ours.handlers[:], ours.level, ours.propagate = saved[0], saved[1], saved[2]
    root.handlers[:], root.level = saved[3], saved[4]


def _pipeline(tmp_path, small_tar):
    path = tmp_path / "p.yaml"
    path.write_text(f"""name: p
run_dir: {tmp_path / 'run'}
data: {{source: {small_tar}, shard_size: 100}}
loader: {{threads: 1}}
model: {{z_dim: 32, g_width: 32, d_width: 32}}
eval: {{metrics: []}}
train: {{steps: 2, batch_size: 16, log_every: 1, sample_every: 2, checkpoint_every: 2, device: cpu}}
export: {{n: 20, shard_size: 10}}
""")
    return str(path)


def test_run_at_each_level(small_tar, tmp_path):
    pipeline = _pipeline(tmp_path, small_tar)
    quiet = CliRunner().invoke(main, ["run", pipeline, "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout.splitlines() == [f"done: {tmp_path / 'run' / 'summary.json'} "
                                         f"({quiet.stdout.split('(')[1].split(' img/s')[0]} img/s training)"]
    assert quiet.stderr == ""

    default = CliRunner().invoke(main, ["run", pipeline])  # every stage up to date now
    assert default.exit_code == 0, default.output
    assert [line.split(":")[0] for line in default.stdout.splitlines()] == [
        "prepare", "train", "export", "report", "done"]
    assert "[up to date]" in default.stdout and "[pipeline]" not in default.output

    verbose = CliRunner().invoke(main, ["run", pipeline, "-v", "--set", "export.quality=80"])
    assert verbose.exit_code == 0, verbose.output
    detail = verbose.stderr
    assert "[pipeline] plan: prepare up to date: " in detail
    assert "[pipeline] plan: train up to date: ckpt-0000002.pt is at step 2 of 2" in detail
    assert f"[pipeline] plan: export run: the export in {tmp_path / 'run' / 'export'} was made with other " \
           f"settings (quality)" in detail
    assert "[export] " in detail and "[pipeline] seconds per stage: prepare " in detail
    assert "[pipeline]" not in verbose.stdout  # detail never mixes into the results


def test_q_and_v_together_is_a_usage_error(small_tar, tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path), "-q", "-v"])
    assert result.exit_code == 2 and "give -q or -v, not both" in result.output


def test_prepare_counts_skipped_inputs_per_reason_or_with_v_lists_all(small_tar, tmp_path):
    source = tmp_path / "images"
    with tarfile.open(small_tar) as tar:
        tar.extractall(source, members=tar.getmembers()[:40], filter="data")
    folder = next(source.rglob("*.jpg")).parent
    for i in range(11):
        (folder / f"broken-{i:02d}.jpg").write_bytes(b"not a jpeg")
    (folder / "truncated.jpg").write_bytes(next(folder.glob("0*.jpg")).read_bytes()[:300])
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
    default = CliRunner().invoke(main, ["prepare", str(source), str(tmp_path / "a")])
    assert default.exit_code == 0, default.output
    assert "53 files in the source: 40 kept, 13 skipped" in default.stdout
    assert f"       11  not an image, e.g. {folder.relative_to(source)}/broken-00.jpg: text file" in default.stdout
    assert "        1  cannot decode, e.g. " in default.stdout and "        1  companion file, e.g. " in default.stdout
    assert default.stderr.count("  skipped ") == 0 and "-v lists every skipped file" in default.stderr
    verbose = CliRunner().invoke(main, ["prepare", str(source), str(tmp_path / "b"), "-v"])
    assert verbose.stderr.count("  skipped ") == 13 and "-v lists" not in verbose.stderr
    assert f"[data.fingerprint] {source}: content hash of 53 files" in verbose.stderr
    assert f"[data.shards] image folder {source}: 52 of its 53 files to read into 1 shards of up to 5000 images " \
           f"(1 left out unread)" in verbose.stderr


def test_vv_turns_on_debug_detail(small_tar, tmp_path):
    result = CliRunner().invoke(main, ["run", _pipeline(tmp_path, small_tar), "--only", "prepare,train", "-vv"])
    assert result.exit_code == 0, result.output
    assert f"[train.loop] wrote {tmp_path / 'run' / 'checkpoints' / 'ckpt-0000002.pt'}" in result.stderr
    assert logging.getLogger().level == logging.DEBUG  # libraries' debug records too


def test_no_colour_codes_off_a_terminal(tmp_path):
    """Errors are red on a terminal only: piped, as here, they are plain text."""
    result = subprocess.run([CLI, "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "\x1b[" not in result.stderr + result.stdout
