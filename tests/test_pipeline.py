"""`cgan-pipe run` stage selection and its plan: --only, --from and --dry-run say what runs and why."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cgan_pipe.cli import main
from cgan_pipe.config import config_from_dict
from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.pipeline import plan_pipeline, run_pipeline, select_stages


def test_stage_selection():
    assert select_stages() == ("prepare", "train", "eval", "export")
    assert select_stages(("export", "train")) == ("train", "export")
    assert select_stages(start="eval") == ("eval", "export")
    with pytest.raises(ConfigError, match="unknown stage 'deploy'; the stages are prepare, train, eval, export"):
        select_stages(("deploy",))
    with pytest.raises(ConfigError, match="--only or --from, not both"):
        select_stages(("train",), "eval")


def _config(tmp_path, small_tar, **export):
    return config_from_dict({
        "name": "p", "run_dir": str(tmp_path / "run"), "data": {"source": str(small_tar), "shard_size": 100},
        "loader": {"threads": 1}, "model": {"z_dim": 32, "g_width": 32, "d_width": 32}, "eval": {"metrics": []},
        "train": {"steps": 2, "batch_size": 16, "log_every": 1, "sample_every": 2, "checkpoint_every": 2,
                  "device": "cpu"},
        "export": {"n": 20, "shard_size": 10, **export},
    })


def test_the_plan_follows_the_run_stage_by_stage(small_tar, tmp_path):
    cfg = _config(tmp_path, small_tar)
    actions = lambda plan: [(stage, action) for stage, action, _ in plan]  # noqa: E731
    assert actions(plan_pipeline(cfg)) == [("prepare", "run"), ("train", "run"), ("eval", "up to date"),
                                           ("export", "run")]
    run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("prepare",))
    assert not (tmp_path / "run" / "summary.json").exists()
    assert actions(plan_pipeline(cfg)) == [("prepare", "up to date"), ("train", "run"), ("eval", "up to date"),
                                           ("export", "run")]
    with pytest.raises(DataError, match="no checkpoint; run the train stage first"):
        run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("export",))
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None, stages=("train",))
    assert {k: v["status"] for k, v in summary["stages"].items()} == {
        "prepare": "not selected", "train": "ran", "eval": "not selected", "export": "not selected"}
    assert summary["export_dir"] is None and (tmp_path / "run" / "report.html").is_file()
    plan = plan_pipeline(cfg, select_stages(start="eval"))
    assert actions(plan) == [("prepare", "not selected"), ("train", "not selected"), ("eval", "up to date"),
                             ("export", "run")]
    assert plan[3][2] == f"nothing exported in {tmp_path / 'run' / 'export'} yet"
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None, stages=select_stages(start="eval"))
    assert summary["stages"]["export"]["status"] == "ran" and summary["export_images"] == 20
    assert actions(plan_pipeline(cfg)) == [("prepare", "up to date"), ("train", "up to date"),
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
    assert "  export   not selected after training" in result.output
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(main, ["run", str(pipeline), "--from", "deploy"])
    assert bad.exit_code == 2 and "unknown stage 'deploy'" in bad.output
