"""`cgan-pipe run` stage selection and its plan: --only, --from and --dry-run say what runs and why."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from click.testing import CliRunner

from cgan_pipe.cli import main
from cgan_pipe.config import config_from_dict
from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.data.fingerprint import shard_set_fingerprint
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.pipeline import EVAL_NAME, _scored_inputs, plan_pipeline, run_pipeline, select_stages


def test_stage_selection():
    assert select_stages() == ("prepare", "train", "eval", "export")
    assert select_stages(("export", "train")) == ("train", "export")
    assert select_stages(start="eval") == ("eval", "export")
    with pytest.raises(ConfigError, match="unknown stage 'deploy'; the stages are prepare, train, eval, export"):
        select_stages(("deploy",))
    with pytest.raises(ConfigError, match="--only or --from, not both"):
        select_stages(("train",), "eval")


def _config(tmp_path, source, metrics=(), **export):
    return config_from_dict({
        "name": "p", "run_dir": str(tmp_path / "run"), "data": {"source": str(source), "shard_size": 100},
        "loader": {"threads": 1}, "model": {"z_dim": 32, "g_width": 32, "d_width": 32},
        "eval": {"metrics": list(metrics)},
        "train": {"steps": 2, "batch_size": 16, "log_every": 1, "sample_every": 2, "checkpoint_every": 2,
                  "device": "cpu"},
        "export": {"n": 20, "shard_size": 10, **export},
    })


def _actions(plan):
    return [(stage, action) for stage, action, _ in plan]


def test_the_plan_follows_the_run_stage_by_stage(small_tar, tmp_path):
    cfg = _config(tmp_path, small_tar)
    assert _actions(plan_pipeline(cfg)) == [("prepare", "run"), ("train", "run"), ("eval", "up to date"),
                                           ("export", "run")]
    run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("prepare",))
    assert not (tmp_path / "run" / "summary.json").exists()
    assert _actions(plan_pipeline(cfg)) == [("prepare", "up to date"), ("train", "run"), ("eval", "up to date"),
                                           ("export", "run")]
    with pytest.raises(DataError, match="no checkpoint; run the train stage first"):
        run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("export",))
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("train",))
    assert {k: v["status"] for k, v in summary["stages"].items()} == {
        "prepare": "not selected", "train": "ran", "eval": "not selected", "export": "not selected"}
    assert summary["export_dir"] is None and (tmp_path / "run" / "report.html").is_file()
    plan = plan_pipeline(cfg, select_stages(start="eval"))
    assert _actions(plan) == [("prepare", "not selected"), ("train", "not selected"), ("eval", "up to date"),
                             ("export", "run")]
    assert plan[3][2] == f"nothing exported in {tmp_path / 'run' / 'export'} yet"
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None, stages=select_stages(start="eval"))
    assert summary["stages"]["export"]["status"] == "ran" and summary["export_images"] == 20
    assert _actions(plan_pipeline(cfg)) == [("prepare", "up to date"), ("train", "up to date"),
                                           ("eval", "up to date"), ("export", "up to date")]
    changed = plan_pipeline(_config(tmp_path, small_tar, quality=80))
    assert changed[3][1:] == ("run", f"the export in {tmp_path / 'run' / 'export'} was made with other settings "
                                     f"(quality)")


def test_dry_run_prints_the_plan_and_changes_nothing(small_tar, tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: p\nrun_dir: {tmp_path / 'run'}\ndata: {{source: {small_tar}}}\n")
    result = CliRunner().invoke(main, ["run", str(pipeline), "--dry-run", "--only", "prepare,train"])
    assert result.exit_code == 0, result.output
    assert "plan:\n  prepare  run          no shard set in" in result.output
    assert "  export   not selected after prepare" in result.output
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(main, ["run", str(pipeline), "--from", "deploy"])
    assert bad.exit_code == 2 and "unknown stage 'deploy'" in bad.output


def test_changed_source_bytes_rerun_every_stage_and_the_old_outputs_are_kept(small_tar, tmp_path):
    source = tmp_path / "images"
    with tarfile.open(small_tar) as tar:
        tar.extractall(source, filter="data")
    cfg = _config(tmp_path, source)
    quiet = dict(progress=False, echo=lambda line: None)
    first = run_pipeline(cfg, **quiet)
    run = tmp_path / "run"
    assert first["source_sha256"] == read_manifest(run / "shards").settings["source_sha256"]
    images = sorted(source.rglob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes())  # written again, the same bytes: nothing to do
    assert {action for _, action in _actions(plan_pipeline(cfg))} == {"up to date"}

    images[0].write_bytes(images[1].read_bytes())  # an image replaced by another
    plan = plan_pipeline(cfg)
    assert _actions(plan) == [("prepare", "run"), ("train", "run"), ("eval", "up to date"), ("export", "run")]
    assert plan[0][2].startswith(f"the files of {source} changed since the shards were made (sha256 ")
    second = run_pipeline(cfg, **quiet)
    assert {stage: v["status"] for stage, v in second["stages"].items()} == {
        "prepare": "ran", "train": "ran", "eval": "up to date", "export": "ran"}
    assert second["source_sha256"] != first["source_sha256"] and second["shards_sha256"] != first["shards_sha256"]
    state = torch.load(second["checkpoint"], weights_only=True)
    assert state["step"] == 2 and state["shards_sha256"] == shard_set_fingerprint(read_manifest(run / "shards"))
    [kept] = (run / "superseded").iterdir()  # the first training's outputs, moved aside whole
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["ckpt-0000002.pt"]
    assert torch.load(kept / "checkpoints" / "ckpt-0000002.pt", weights_only=True)["shards_sha256"] == \
        first["shards_sha256"]
    assert len(list((kept / "export" / "files").rglob("*.jpg"))) == 20 and (kept / "summary.json").is_file()


def test_eval_scores_are_reused_only_for_the_same_checkpoint_bytes(small_tar, tmp_path):
    cfg = _config(tmp_path, small_tar, metrics=["classifier"])
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("prepare", "train"))
    checkpoint, run = summary["checkpoint"], tmp_path / "run"
    # what a finished eval records beside its scores
    (run / EVAL_NAME).write_text(json.dumps({**_scored_inputs(cfg, checkpoint, run / "shards"), "scores": {"x": 1}}))
    assert plan_pipeline(cfg)[2][1] == "up to date"
    state = torch.load(checkpoint, weights_only=True)
    state["train_seconds"] += 1.0  # the same name, other bytes (a training redone in place)
    torch.save(state, checkpoint)
    assert plan_pipeline(cfg)[2][1:] == ("run", "ckpt-0000002.pt is not scored on these shards with these "
                                                "settings yet")
