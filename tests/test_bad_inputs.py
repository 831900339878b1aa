"""Awkward real-world inputs: each is converted correctly or skipped with a reason, and the
result always verifies (every sample decodes with DALI at the right size)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.config import DataConfig
from cgan_pipe.data.shards import prepare
from cgan_pipe.data.verify import verify_shards

from conftest import cifar_members
from test_shards import read_samples

JPEG_CAT = cifar_members("test", 1)["test/cat/0000.jpg"]


def rgb() -> Image.Image:
    return Image.open(io.BytesIO(JPEG_CAT)).convert("RGB")


def save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(image, "JPEG", quality=95, exif=exif)


def huge_png_header() -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims 100000x100000 pixels."""
    data = bytearray(save(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def build_archive(path) -> None:
    wide = rgb().resize((32, 48))
    sixteen_bit = Image.fromarray(np.asarray(rgb().convert("L"), dtype=np.uint16) * 257)  # mode I;16
    palette = rgb().convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    files = {
        "data/cat/ok.jpg": JPEG_CAT,
        "data/cat/cmyk.jpg": save(rgb().convert("CMYK"), "JPEG"),
        "data/cat/grey.jpg": save(rgb().convert("L"), "JPEG"),
        "data/cat/alpha.png": save(rgb().convert("RGBA"), "PNG"),
        "data/cat/palette.png": save(palette, "PNG"),
        "data/cat/sixteen.png": save(sixteen_bit, "PNG"),
        "data/cat/rotated.jpg": with_orientation(wide, 6),
        "data/cat/upside-down.jpg": with_orientation(rgb(), 3),
        "data/cat/chat-noir-é.jpg": JPEG_CAT,
        "data/dog/huge.png": huge_png_header(),
        "data/dog/empty.jpg": b"",
        "data/dog/truncated.jpg": JPEG_CAT[:400],
        "data/dog/text.png": b"not an image at all",
        "data/dog/bitflip.jpg": JPEG_CAT[:200] + bytes(b ^ 0xFF for b in JPEG_CAT[200:260]) + JPEG_CAT[260:],
        "/abs/cat/escape.jpg": JPEG_CAT,
        "data/../../cat/escape.jpg": JPEG_CAT,
    }
    with tarfile.open(path, "w") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        dup = tarfile.TarInfo("data/cat/ok.jpg")
        dup.size = len(JPEG_CAT)
        tar.addfile(dup, io.BytesIO(JPEG_CAT))
        link = tarfile.TarInfo("data/cat/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    build_archive(root / "messy.tar")
    manifest, _ = prepare(DataConfig(str(root / "messy.tar")), root / "shards", progress=False)
    samples = {json.loads(s["json"])["source"]: s for s in read_samples(root / "shards" / "shard-000000.tar").values()}
    return root, manifest, samples


def test_each_bad_input_is_skipped_with_its_reason(prepared):
    root, manifest, _ = prepared
    reasons = {entry["source"]: entry["reason"] for entry in manifest.skipped}
    assert "too large: 100000x100000" in reasons["data/dog/huge.png"]
    assert reasons["data/dog/empty.jpg"] == "empty file"
    assert reasons["data/dog/text.png"] == "not an image: text file"
    for name in ("truncated.jpg", "bitflip.jpg"):
        assert reasons[f"data/dog/{name}"].startswith("cannot decode"), name
    assert reasons["/abs/cat/escape.jpg"] == reasons["data/../../cat/escape.jpg"] == \
        "unsafe member path: absolute, or with '..'"
    assert reasons["data/cat/link.jpg"].startswith("not a regular file")
    assert reasons["data/cat/ok.jpg"].startswith("duplicate name")
    assert len(manifest.skipped) == 9 and manifest.num_samples == 9
    assert manifest.inputs == {"files": 18, "kept": 9, "skipped": 9, "beyond_limit": 0}
    assert not (root / "abs").exists() and not (root.parent / "cat").exists()


def test_awkward_images_are_converted_to_rgb_at_size(prepared):
    _, _, samples = prepared
    for name in ("cmyk.jpg", "grey.jpg", "alpha.png", "palette.png", "sixteen.png", "rotated.jpg", "upside-down.jpg"):
        sample = samples[f"data/cat/{name}"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.mode == "RGB" and image.size == (32, 32), name
        assert json.loads(sample["json"])["reencoded"] is True, name
    assert samples["data/cat/ok.jpg"]["jpg"] == JPEG_CAT  # the first copy, passed through
    assert samples["data/cat/chat-noir-é.jpg"]["jpg"] == JPEG_CAT  # unicode names are fine


def test_exif_orientation_is_applied(prepared):
    _, _, samples = prepared
    assert json.loads(samples["data/cat/rotated.jpg"]["json"])["exif_rotated"] is True
    upside = np.asarray(Image.open(io.BytesIO(samples["data/cat/upside-down.jpg"]["jpg"])), dtype=np.float32)
    reference = np.asarray(rgb().rotate(180), dtype=np.float32)
    assert np.abs(upside - reference).mean() < 6  # rotated back, up to two JPEG encodes
    assert np.abs(upside - np.asarray(rgb(), dtype=np.float32)).mean() > 20


def test_sixteen_bit_greyscale_keeps_its_tones(prepared):
    _, _, samples = prepared
    image = np.asarray(Image.open(io.BytesIO(samples["data/cat/sixteen.png"]["jpg"])).convert("L"), dtype=np.float32)
    assert np.abs(image - np.asarray(rgb().convert("L"), dtype=np.float32)).mean() < 4


def test_the_result_verifies(prepared):
    root, _, _ = prepared
    report = verify_shards(root / "shards")
    assert report.ok, report.problems
    assert read_manifest(root / "shards").num_samples == report.samples == 9


def test_the_decompression_bomb_limit_is_configurable(tmp_path):
    source = tmp_path / "s.tar"
    with tarfile.open(source, "w") as tar:
        info = tarfile.TarInfo("d/cat/a.jpg")
        info.size = len(JPEG_CAT)
        tar.addfile(info, io.BytesIO(JPEG_CAT))
        info.name = "d/dog/b.jpg"
        tar.addfile(info, io.BytesIO(JPEG_CAT))
    with pytest.raises(Exception, match="too large: 32x32 is over the limit of 1000 pixels"):
        prepare(DataConfig(str(source), max_pixels=1000), tmp_path / "o", progress=False)


def test_names_that_are_not_utf8_pass_through_prepare_run_and_export_as_escapes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    source = tmp_path / "latin.tar"  # names written as latin-1 bytes, as an old archiver would
    with tarfile.open(source, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        for i, (name, data) in enumerate(cifar_members("test", 3).items()):
            cls = "caf\xe9" if name.split("/")[1] == "cat" else name.split("/")[1]
            for member, content in ((f"{cls}/photo-{i}-\xe9t\xe9.jpg", data),
                                    (f"{cls}/not-an-image-{i}\xe9.txt", b"x")):
                info = tarfile.TarInfo(member)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "latin", "run_dir": str(tmp_path / "run"), "data": {"source": str(source)},
        "loader": {"threads": 1}, "model": {"z_dim": 16, "g_width": 32, "d_width": 32}, "eval": {"metrics": []},
        "train": {"steps": 2, "batch_size": 10, "device": "cpu"}, "export": {"n": 20},
    }))
    cli = str(Path(sys.executable).with_name("cgan-pipe"))
    strict = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # a terminal that takes UTF-8 and nothing else
    for command in (["prepare", str(source), str(tmp_path / "shards"), "-v"], ["inspect", str(tmp_path / "shards")],
                    ["run", str(pipeline), "-v"]):
        result = subprocess.run([cli, *command], capture_output=True, text=True, env=strict, timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
        assert command[0] == "run" or "caf\\udce9" in result.stdout + result.stderr, command  # shown as an escape
    assert "caf\\udce9" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert b"caf\xe9" in os.listdir(os.fsencode(tmp_path / "run" / "export" / "files"))  # the name's own bytes
    assert read_manifest(tmp_path / "shards").class_names[3] == "caf\udce9"
