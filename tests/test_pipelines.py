"""The pipelines shipped in pipelines/: each loads, the 128 and 256 px ones run on upscaled images, and the
64 px Tiny ImageNet one runs end to end with R3GAN (with ../shared)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cgan_pipe.config import load_pipeline
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.errors import ConfigError
from cgan_pipe.pipeline import run_pipeline
from cgan_pipe.train.checkpoint import load_checkpoint

from conftest import ROOT

PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))
TINY_IMAGENET = Path(os.environ.get("CGAN_PIPE_TEST_TINYIMAGENET",
                                    ROOT.parent / "shared" / "data" / "tinyimagenet100" / "train.tar"))
SMALL_RUN = ["loader.threads=1", "train.max_minutes=null", "train.log_every=1", "train.sample_every=2",
             "train.checkpoint_every=2", "train.steps=2", "train.batch_size=8", "eval.metrics=[]", "export.n=8",
             "export.batch_size=8"]


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_pipeline_loads(path, monkeypatch):
    monkeypatch.setenv("CGAN_PIPE_IMAGES", "photos")
    cfg = load_pipeline(path)
    assert cfg.name == path.stem and cfg.data.resolution in (32, 64, 128, 256)


def test_the_folder_pipelines_say_where_the_images_must_be_given(monkeypatch):
    monkeypatch.delenv("CGAN_PIPE_IMAGES", raising=False)
    with pytest.raises(ConfigError, match="images128.yaml:14: data.source: environment variable CGAN_PIPE_IMAGES is "
                                          "not set"):
        load_pipeline(ROOT / "pipelines" / "images128.yaml")
    assert load_pipeline(ROOT / "pipelines" / "images128.yaml", ["data.source=~/photos"]).data.source == "~/photos"


@pytest.mark.parametrize("resolution", [128, 256])
def test_the_128_and_256_px_pipelines_train_and_export_on_upscaled_images(small_tar, tmp_path, resolution):
    cfg = load_pipeline(ROOT / "pipelines" / f"images{resolution}.yaml", [
        f"data.source={small_tar}", "data.limit=24", f"run_dir={tmp_path}", "model.g_width=32", "model.d_width=32",
        *SMALL_RUN])
    assert cfg.model.arch == "r3gan" and cfg.train.loss == "rpgan" and cfg.train.schedule_kimg == 20_000
    cfg.train.schedule_kimg = 0.008  # one step of 8 images: the second step runs at the schedules' ends
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None)
    assert read_manifest(tmp_path / "shards").resolution == resolution
    assert load_checkpoint(Path(summary["checkpoint"]))["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (rows[0]["lr_g"], rows[0]["beta2"], rows[-1]["lr_g"], rows[-1]["beta2"]) == (2e-4, 0.9, 5e-5, 0.99)
    files = sorted(Path(summary["export_files"]).glob("*/*.jpg"))
    assert len(files) == 8 and all(Image.open(f).size == (resolution, resolution) for f in files)


@pytest.mark.skipif(not TINY_IMAGENET.exists(), reason=f"needs Tiny ImageNet's train.tar at {TINY_IMAGENET} "
                                                       "(../shared/data/tinyimagenet100)")
def test_the_tiny_imagenet_pipeline_runs_end_to_end_with_r3gan(tmp_path, monkeypatch):
    monkeypatch.setenv("CGAN_PIPE_TINYIMAGENET", str(TINY_IMAGENET))
    cfg = load_pipeline(ROOT / "pipelines" / "tinyimagenet64.yaml", [
        "data.limit=400", "data.shard_size=200", f"run_dir={tmp_path}", "model.arch=r3gan", "model.g_width=32",
        "model.d_width=32", "train.loss=rpgan", "train.r1_gamma=1", "train.r2_gamma=1", "train.r1_every=2",
        *SMALL_RUN, "eval.metrics=[classifier]", "eval.classifier_steps=5", "eval.n_samples=40",
        "eval.n_reference=100", f"eval.cache_dir={tmp_path / 'cache'}"])
    summary = run_pipeline(cfg, progress=False, echo=lambda line: None)
    manifest = read_manifest(tmp_path / "shards")
    assert manifest.num_samples == 400 and manifest.resolution == 64 and manifest.class_names[0] == "n01443537"
    assert load_checkpoint(Path(summary["checkpoint"]))["config"]["model"]["arch"] == "r3gan"
    assert summary["eval"]["classifier_fd"] > 0 and (tmp_path / "report.html").exists()
    assert Image.open(summary["sample_grid"]).size == (10 * 65 + 1, 20 * 65 + 1)  # 20 of the 100 classes
    files = sorted(Path(summary["export_files"]).glob("*/*.jpg"))
    assert len(files) == 8 and all(Image.open(f).size == (64, 64) for f in files)
