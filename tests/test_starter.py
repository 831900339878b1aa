"""`cgan-pipe init`: a starter pipeline from a user's own images, every key commented, that loads and runs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

from cgan_pipe.cli import main
from cgan_pipe.config import PipelineConfig, load_pipeline
from cgan_pipe.schema import describe_keys
from cgan_pipe.starter import (CUDA_ALLOWANCE_MIB, Machine, model_and_batch, pipeline_name, starter_yaml, suggest,
                              survey_source, training_memory_mib)

from conftest import ROOT

GIB = 2**30
GPU_80 = Machine(True, 80 * GIB, "a GPU")
CPU_24 = Machine(False, 24 * GIB, "a CPU with 2 cores")


def test_init_on_a_tar_of_class_folders_writes_a_commented_pipeline_that_loads(small_tar, tmp_path):
    out = tmp_path / "pipelines" / "mine.yaml"
    result = CliRunner().invoke(main, ["init", str(small_tar), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "200 images, 10 classes; resolution 32" in result.output and f"cgan-pipe run {out}" in result.output
    cfg = load_pipeline(out)
    assert cfg.name == "cifar-small" and cfg.data.source == str(small_tar.resolve())
    assert cfg.data.resolution == 32 and cfg.data.format == "jpeg" and cfg.train.max_minutes == 15
    lines = out.read_text().splitlines()
    assert "# Found 200 images, 10 classes (airplane: 20," in "\n".join(lines)
    for doc in describe_keys(PipelineConfig):  # every key, each under a comment saying what it means
        leaf = doc.key.rpartition(".")[2]
        indent = "  " if "." in doc.key else ""
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{indent}{leaf}: "))
        assert lines[at - 1].startswith(f"{indent}# "), doc.key
    again = CliRunner().invoke(main, ["init", str(small_tar), "--out", str(out)])
    assert again.exit_code == 2 and "exists; choose another --out, or pass --force" in again.output
    missing = CliRunner().invoke(main, ["init", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.yaml")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_sizes_formats_and_the_machine_set_the_suggestions(tmp_path):
    for i in range(12):
        folder = tmp_path / "photos" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (150 + i, 100 + i), (i * 20, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "photos" / "dogs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "photos" / "dogs" / "labels.csv").write_text("0.png,dogs\n")
    (tmp_path / "photos" / "notes").write_text("shot in 2019\n")
    survey = survey_source(str(tmp_path / "photos"))
    assert survey.images == 13 and survey.class_counts == {"cats": 6, "dogs": 7} and survey.unreadable == 1
    assert survey.formats == {"PNG": 12} and survey.left_out == {"companion file": 1, "not an image": 1}
    assert "# Left out: 1 not an image, 1 companion file (prepare lists each file" in starter_yaml("p", survey, {}, {})
    on_gpu, why = suggest(survey, GPU_80)
    assert on_gpu["data.resolution"] == 64 and on_gpu["data.format"] == "png"
    assert "short side is 10" in why["data.resolution"]
    big = survey_source(str(tmp_path / "photos"))
    big.sizes = [(600, 400)] * 10
    assert suggest(big, GPU_80)[0]["data.resolution"] == 256
    on_cpu, why = suggest(big, CPU_24)
    assert on_cpu["data.resolution"] == 64 and "64 at most on a CPU" in why["data.resolution"]


def test_the_family_widths_and_batch_follow_the_machine_and_its_memory(tmp_path):
    survey = survey_source(str(_photos(tmp_path, 300)))
    on_cpu, why = suggest(survey, CPU_24)
    assert (on_cpu["model.arch"], on_cpu["model.g_width"], on_cpu["train.batch_size"]) == ("dcgan", 128, 64)
    assert "of the 24 GiB of a CPU with 2 cores" in why["train.batch_size"] and "train.loss" not in on_cpu
    small_cpu, _ = suggest(survey, Machine(False, 2 * GIB, "a small CPU"))
    assert small_cpu["train.batch_size"] < 64 and training_memory_mib(
        "dcgan", 64, small_cpu["model.g_width"], small_cpu["train.batch_size"]) <= 2 * 1024 * 0.6
    on_gpu, why = suggest(survey, GPU_80)  # 256 px on a GPU: R3GAN, with its loss, penalties and schedules
    assert on_gpu["data.resolution"] == 256 and on_gpu["model.arch"] == "r3gan" and on_gpu["train.loss"] == "rpgan"
    assert on_gpu["train.r1_gamma"] == on_gpu["train.r2_gamma"] == 150 and on_gpu["train.schedule_kimg"] == 20_000
    assert on_gpu["train.schedule_to"]["r1_gamma"] == 15
    fits = training_memory_mib("r3gan", 256, on_gpu["model.g_width"], on_gpu["train.batch_size"])
    assert fits <= 80 * 1024 * 0.6
    small_gpu, _ = suggest(survey, Machine(True, 16 * GIB, "a small GPU"))
    assert (small_gpu["model.g_width"], small_gpu["train.batch_size"]) < (on_gpu["model.g_width"],
                                                                          on_gpu["train.batch_size"])
    path = tmp_path / "gpu.yaml"  # what init writes for a GPU loads, schedules included
    path.write_text(starter_yaml("gpu", survey, on_gpu, why))
    cfg = load_pipeline(path)
    assert cfg.train.schedule_to == {"lr_g": 5e-5, "lr_d": 5e-5, "r1_gamma": 15.0, "r2_gamma": 15.0, "beta2": 0.99}


def _photos(tmp_path, side):
    folder = tmp_path / "big" / "things"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (side, side), (i * 50, 0, 0)).save(folder / f"{i}.jpg")
    return tmp_path / "big"


def test_pipeline_names_come_from_the_source():
    assert pipeline_name("/data/My Photos/") == "My-Photos"
    assert pipeline_name("pets.tar.gz") == "pets" and pipeline_name("list.txt") == "list"
    assert pipeline_name("ünïcode.tar") == "n-code" and pipeline_name("...") == "my-images"


H100 = Machine(True, 81559 * 2**20, "NVIDIA H100 80GB HBM3")  # the memory torch reports on one


@pytest.mark.parametrize("preset", ["images128", "images256", "tinyimagenet64", "cifar"])
def test_the_gpu_presets_fit_an_80_gb_h100_by_the_estimate_with_their_penalties(preset, monkeypatch):
    monkeypatch.setenv("CGAN_PIPE_IMAGES", "photos")
    cfg = load_pipeline(ROOT / "pipelines" / f"{preset}.yaml")
    penalties = cfg.train.r1_gamma > 0 or cfg.train.r2_gamma > 0
    need = training_memory_mib(cfg.model.arch, cfg.data.resolution, max(cfg.model.g_width, cfg.model.d_width),
                               cfg.train.batch_size, penalties=penalties, cuda=True)
    assert need <= 0.9 * H100.memory_bytes / 2**20, f"{preset}: {need / 1024:.1f} GiB"


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_inits_gpu_choices_fit_an_h100_counting_r1_r2_and_the_cuda_context(resolution):
    width, batch, why = model_and_batch("r3gan", resolution, H100)
    need = training_memory_mib("r3gan", resolution, width, batch, penalties=True, cuda=True)
    assert need <= 0.6 * H100.memory_bytes / 2**20 and "within 60%" in why
    plain = training_memory_mib("r3gan", resolution, width, batch)
    assert need > plain + CUDA_ALLOWANCE_MIB  # the penalties' graphs and the GPU's own memory are counted
