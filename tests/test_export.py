"""Export: files and shards per format, reproducible seeds, round trip through the loader."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cgan_pipe import images
from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.export import ExportSettings, export, generate, load_generator
from cgan_pipe.train.checkpoint import load_checkpoint

CPU = torch.device("cpu")


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_export_writes_files_and_loadable_shards(checkpoint, tmp_path, fmt):
    out = tmp_path / "out"
    result = export(checkpoint, out, ExportSettings(n=25, format=fmt, quality=90, batch_size=8, shard_size=10),
                    device=CPU, progress=False)
    assert result.n == 25 and not result.up_to_date
    ext = images.EXTENSIONS[fmt]
    files = sorted(out.glob(f"*/*.{ext}"))
    assert len(files) == 25
    q = 0 if fmt == "png" else 90
    assert out / "airplane" / f"seed0000000-c0-q{q}.{ext}" in files
    assert out / "cat" / f"seed0000013-c3-q{q}.{ext}" in files  # class round robin: seed 13 -> class 3
    for path in files:
        assert Image.open(path).size == (32, 32)
    manifest = read_manifest(out / "shards")
    assert manifest.created_by == "export" and manifest.num_samples == 25
    assert [s.samples for s in manifest.shards] == [10, 10, 5]
    with tarfile.open(out / "shards" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("00000003.json").read())
        assert int(tar.extractfile("00000003.cls").read()) == 3
    assert meta["seed"] == 3 and meta["class"] == "cat" and meta["quality"] == (None if fmt == "png" else 90)
    batch = next(iter(open_loader(out / "shards", LoaderConfig(threads=1, hflip=False), 25, 0, CPU)))
    assert batch.images.shape == (25, 3, 32, 32)
    assert sorted(batch.labels.tolist()) == sorted([i % 10 for i in range(25)])


def test_seeds_reproduce_the_same_images_whatever_the_batch(checkpoint):
    G, info, z_dim = load_generator(load_checkpoint(checkpoint), ema=True, device=CPU)
    labels = torch.arange(6) % 10
    whole = generate(G, z_dim, list(range(100, 106)), labels, CPU)
    split = np.concatenate([generate(G, z_dim, [100, 101], labels[:2], CPU),
                            generate(G, z_dim, [102, 103, 104, 105], labels[2:], CPU)])
    assert np.array_equal(whole, split)
    assert whole.dtype == np.uint8 and whole.shape == (6, 32, 32, 3)


def test_exported_jpeg_is_faithful_to_a_pil_encode(checkpoint, tmp_path):
    export(checkpoint, tmp_path / "o", ExportSettings(n=4, quality=95), device=CPU, progress=False)
    G, _, z_dim = load_generator(load_checkpoint(checkpoint), ema=True, device=CPU)
    pixels = generate(G, z_dim, [2], torch.tensor([2]), CPU)[0]
    reference = io.BytesIO()
    Image.fromarray(pixels).save(reference, "JPEG", quality=95)
    ours = np.asarray(Image.open(tmp_path / "o" / "bird" / "seed0000002-c2-q95.jpg"), dtype=np.float32)
    theirs = np.asarray(Image.open(reference), dtype=np.float32)
    assert np.abs(ours - theirs).mean() <= 1.0


def test_rerun_is_a_no_op_and_classes_are_honoured(checkpoint, tmp_path):
    settings = ExportSettings(n=6, classes=("cat", "ship"))
    export(checkpoint, tmp_path / "o", settings, device=CPU, progress=False)
    assert sorted(p.parent.name for p in (tmp_path / "o").glob("*/*.jpg")) == ["cat"] * 3 + ["ship"] * 3
    again = export(checkpoint, tmp_path / "o", settings, device=CPU, progress=False)
    assert again.up_to_date


def test_bad_requests_fail_before_any_work(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="format 'gif'"):
        export(checkpoint, tmp_path / "a", ExportSettings(format="gif"), device=CPU, progress=False)
    with pytest.raises(ConfigError, match="quality 0"):
        export(checkpoint, tmp_path / "a", ExportSettings(quality=0), device=CPU, progress=False)
    with pytest.raises(ConfigError, match="unknown 'unicorn'"):
        export(checkpoint, tmp_path / "a", ExportSettings(classes=("unicorn",)), device=CPU, progress=False)
    with pytest.raises(DataError, match="checkpoint not found"):
        export(tmp_path / "none.pt", tmp_path / "a", ExportSettings(), device=CPU, progress=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds other files"):
        export(checkpoint, tmp_path / "busy", ExportSettings(n=2), device=CPU, progress=False)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


def test_a_quality_conditioned_model_exports_the_requested_quality_and_records_it(quality_checkpoint, tmp_path):
    asked = export(quality_checkpoint, tmp_path / "q10", ExportSettings(n=4, quality_cond=10), device=CPU,
                   progress=False)
    assert (asked.out_dir / "airplane" / "seed0000000-c0-q95-qc10.jpg").exists()
    with tarfile.open(asked.shards / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("00000001.json").read())["quality_cond"] == 10
    default = export(quality_checkpoint, tmp_path / "top", ExportSettings(n=4), device=CPU, progress=False)
    assert (default.out_dir / "airplane" / "seed0000000-c0-q95-qc90.jpg").exists()  # the highest trained quality
    low = Image.open(asked.out_dir / "airplane" / "seed0000000-c0-q95-qc10.jpg")
    top = Image.open(default.out_dir / "airplane" / "seed0000000-c0-q95-qc90.jpg")
    assert np.asarray(low).tobytes() != np.asarray(top).tobytes()


def test_asking_for_a_quality_the_model_cannot_give_is_refused_before_any_work(checkpoint, quality_checkpoint,
                                                                              tmp_path):
    with pytest.raises(ConfigError, match=r"trained without quality conditioning \(compression.mode: none\).*"
                                          r"leave out --quality-cond"):
        export(checkpoint, tmp_path / "a", ExportSettings(n=2, quality_cond=10), device=CPU, progress=False)
    for bad in (0, 101):
        with pytest.raises(ConfigError, match=f"quality condition {bad} must be between 1 and 100"):
            export(quality_checkpoint, tmp_path / "a", ExportSettings(n=2, quality_cond=bad), device=CPU,
                   progress=False)
    assert not (tmp_path / "a").exists()
