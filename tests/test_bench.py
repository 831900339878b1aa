"""`cgan-pipe bench prepare|loader|train|export` run every method on the same data and report consistent records."""

from __future__ import annotations

import json
import re
import tarfile

from click.testing import CliRunner

from cgan_pipe.bench import pil_reencode_loop
from cgan_pipe.cli import main


def test_bench_prepare_times_each_method_and_writes_json(small_tar, tmp_path):
    result = CliRunner().invoke(main, ["bench", "prepare", str(small_tar), "--workers", "1",
                                       "--json", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in records] == ["prepare-keep", "prepare-jpeg-q90", "pil-loop-jpeg-q90"]
    for record in records:
        assert record["images"] == 200 and record["seconds"] > 0
        assert abs(record["images_per_s"] - record["images"] / record["seconds"]) < 0.05 * record["images_per_s"]
    assert "re-encode: prepare / Pillow loop" in result.output


def test_the_pillow_baseline_writes_every_image_reencoded(small_tar, tmp_path):
    assert pil_reencode_loop(small_tar, tmp_path / "out.tar", 90, limit=50) == 50
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert len(tar.getmembers()) == 50


def test_bench_loader_times_every_backend_on_the_same_shards(small_shards, tmp_path):
    result = CliRunner().invoke(main, ["bench", "loader", str(small_shards), "--batch-size", "16", "--batches", "3",
                                       "--workers", "1", "--json", str(tmp_path / "loader.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "loader.json").read_text())
    on_cpu = [(r["backend"], r["device"]) for r in records if r["device"] == "cpu"]  # (+ dali/cuda on a GPU)
    assert on_cpu == [("dali", "cpu"), ("torch", "cpu"), ("baseline", "cpu")]
    assert all(r["images"] == 48 and r["images_per_s"] > 0 for r in records)
    assert "dali/cpu:" in result.output and "x the baseline" in result.output
    torch_only = CliRunner().invoke(main, ["bench", "loader", str(small_shards), "--batch-size", "16", "--batches",
                                           "1", "--workers", "1", "--backends", "torch", "--json",
                                           str(tmp_path / "torch.json")])  # what runs where DALI is not installed
    assert torch_only.exit_code == 0, torch_only.output
    assert [r["backend"] for r in json.loads((tmp_path / "torch.json").read_text())] == ["torch"]
    bad = CliRunner().invoke(main, ["bench", "loader", str(small_shards), "--backends", "ffcv"])
    assert bad.exit_code == 2 and "'--backends': 'ffcv': expected some of dali, torch, baseline" in bad.output


def test_each_loader_row_decodes_on_the_device_it_names(small_shards, monkeypatch):
    """A torch-backend row labelled cpu once kept loader.device 'auto' (nvJPEG where a GPU is present) with
    batches on the CPU, so on a GPU host it decoded serially in the main process and timed neither path."""
    import cgan_pipe.data.loader as loader_module
    from cgan_pipe.bench import bench_loader

    opened, open_loader = [], loader_module.open_loader

    def recording(shards, cfg, batch_size, seed, device, **kwargs):
        opened.append((cfg.backend, cfg.device, device.type))
        return open_loader(shards, cfg, batch_size, seed, device, **kwargs)

    monkeypatch.setattr(loader_module, "open_loader", recording)
    records = bench_loader(small_shards, batch_size=16, batches=1, warmup=1, workers=1, jpeg_distort=(10, 40),
                           echo=lambda line: None)
    timed = [(r.backend.removesuffix("+jpeg_distort"), r.device, r.device) for r in records if r.backend != "baseline"]
    assert opened == timed and ("torch", "cpu", "cpu") in opened


def test_bench_loader_times_the_on_the_fly_jpeg_distortion_and_reports_its_cost(small_shards, tmp_path):
    result = CliRunner().invoke(main, ["bench", "loader", str(small_shards), "--batch-size", "16", "--batches", "3",
                                       "--workers", "1", "--jpeg-distort", "10,40", "--json", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "l.json").read_text())
    assert [r["backend"] for r in records if r["device"] == "cpu"] == ["dali", "dali+jpeg_distort", "torch",
                                                                       "torch+jpeg_distort", "baseline"]
    assert "jpeg_distort on dali/cpu costs" in result.output and "jpeg_distort on torch/cpu costs" in result.output
    bad = CliRunner().invoke(main, ["bench", "loader", str(small_shards), "--jpeg-distort", "40,10"])
    assert bad.exit_code == 2 and "'--jpeg-distort': '40,10': expected 2 comma-separated numbers" in bad.output


def test_bench_train_times_each_setting_after_a_warm_up(small_shards, tmp_path):
    result = CliRunner().invoke(main, ["bench", "train", str(small_shards), "--arch", "dcgan", "--batch-size", "8,16",
                                       "--precision", "fp32,bf16", "--compile", "off", "--channels-last", "both",
                                       "--steps", "2", "--width", "16", "--device", "cpu",
                                       "--json", str(tmp_path / "train.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "train.json").read_text())
    assert [(r["batch_size"], r["precision"], r["channels_last"]) for r in records] == [
        (b, p, c) for b in (8, 16) for p in ("fp32", "bf16") for c in (False, True)]
    assert "dcgan b16 bf16 channels-last " in result.output
    assert all(r["images"] == 2 * r["batch_size"] and r["images_per_s"] > 0 and 0 <= r["data_wait"] < 1
               and r["peak_memory_mib"] is None and r["host_syncs_per_step"] is None and r["device"] == "cpu"
               for r in records)
    bad = CliRunner().invoke(main, ["bench", "train", str(small_shards), "--precision", "fp8", "--device", "cpu"])
    assert bad.exit_code == 2 and "'--precision': 'fp8': expected some of fp32, bf16, fp16" in bad.output


def test_bench_train_times_the_penalty_steps_and_writes_each_record_as_it_is_made(small_shards, tmp_path):
    import cgan_pipe.bench as bench
    from cgan_pipe.train import loop

    penalised, written = [], []
    real_train = loop.train

    def spy(cfg, *args, **kwargs):  # what each timed run trains with
        penalised.append((cfg.train.loss, cfg.train.r1_gamma, cfg.train.r2_gamma, cfg.train.r1_every))
        return real_train(cfg, *args, **kwargs)

    loop.train = spy
    try:
        records = bench.bench_train(small_shards, archs=("dcgan", "r3gan"), batch_sizes=(8,), precisions=("fp32",),
                                    compiles=(False,), steps=2, width=16, device="cpu", loader_backend="torch",
                                    loss="rpgan", r1_gamma=0.5, r2_gamma=0.25, r1_every=1, echo=lambda line: None,
                                    on_record=lambda so_far: written.append([r.arch for r in so_far]))
    finally:
        loop.train = real_train
    assert penalised == [("rpgan", 0.5, 0.25, 1)] * 2
    assert written == [["dcgan"], ["dcgan", "r3gan"]]
    assert all((r.loss, r.r1_gamma, r.r2_gamma, r.r1_every, r.resolution, r.width) == ("rpgan", 0.5, 0.25, 1, 32, 16)
               for r in records)
    assert records[0].label == "dcgan b8 fp32 R1 R2"


def test_bench_export_times_the_export_beside_a_plain_pillow_loop(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["bench", "export", str(checkpoint), "--n", "60", "--batch-size", "16",
                                       "--device", "cpu", "--scratch", str(tmp_path), "--json",
                                       str(tmp_path / "export.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "export.json").read_text())
    assert [r["method"] for r in records] == ["plain", "generate-plain", "generate", "export", "export-shards",
                                             "export-444"]
    assert all(r["images"] == 60 and r["seconds"] > 0 and r["images_per_s"] > 0 for r in records)
    assert "export / plain = " in result.output and "encoding and writing add" in result.output
    difference = re.search(r"mean absolute difference ([0-9.]+)/255", result.output)
    assert difference and float(difference.group(1)) <= 1.0  # faithful to Pillow's encode of the same images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json"]  # its scratch folders are gone
