"""Every file of a source is kept or reported: generated folders, tars and list files mixing real JPEGs,
other formats Pillow writes, text, empty and broken files; each format's pixels survive prepare."""

from __future__ import annotations

from dataclasses import replace
import io
import json
import os
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cgan_pipe.data.inputs import IMAGE_SUFFIXES, count_by_kind
from cgan_pipe.config import DataConfig
from cgan_pipe.data.shards import prepare
from cgan_pipe.data.verify import inspect_shards

from conftest import cifar_members, write_tar

# Pillow 12 deprecates reading and writing its own IM format; files in it are still taken while it reads them
pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
RNG = np.random.default_rng(0)
# a smooth picture with some noise, 48x40: what photos compress like
PICTURE = Image.fromarray(np.clip(
    np.linspace(0, 255, 48)[None, :, None] * [1, 0.5, 0.2] + np.linspace(0, 120, 40)[:, None, None]
    + RNG.normal(0, 12, (40, 48, 3)), 0, 255).astype(np.uint8))
JPEGS = list(cifar_members("test", 3).values())


def _written(fmt: str, image: Image.Image, **options) -> bytes | None:
    """`image` saved by Pillow as `fmt`, or None when this Pillow cannot write and read it back."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Pillow 12 deprecates its IM format
        try:
            image.save(out, format=fmt, **options)
            with Image.open(io.BytesIO(out.getvalue())) as back:
                back.load()
        except Exception:  # noqa: BLE001  a codec this build lacks
            return None
    return out.getvalue()


# (name, Pillow format, mode written, save options): every still format this Pillow can write and read
CANDIDATES = [
    ("tiff", "TIFF", "RGB", {}), ("tiff-lzw", "TIFF", "RGB", {"compression": "tiff_lzw"}),
    ("gif", "GIF", "RGB", {}), ("tga", "TGA", "RGB", {}), ("ppm", "PPM", "RGB", {}), ("pgm", "PPM", "L", {}),
    ("pbm", "PPM", "1", {}), ("bmp", "BMP", "RGB", {}), ("ico", "ICO", "RGB", {}), ("jp2", "JPEG2000", "RGB", {}),
    ("j2k", "JPEG2000", "RGB", {"no_jp2": True}), ("webp", "WEBP", "RGB", {}), ("avif", "AVIF", "RGB", {}),
    ("sgi", "SGI", "RGB", {}), ("pcx", "PCX", "RGB", {}), ("dds", "DDS", "RGB", {}), ("blp", "BLP", "P", {}),
    ("qoi", "QOI", "RGB", {}), ("im", "IM", "RGB", {}), ("msp", "MSP", "1", {}), ("xbm", "XBM", "1", {}),
    ("spider", "SPIDER", "L", {}), ("png-grey", "PNG", "L", {}), ("jpeg-cmyk", "JPEG", "CMYK", {}),
    ("mpo", "MPO", "RGB", {}), ("icns", "ICNS", "RGB", {}), ("png", "PNG", "RGB", {}),
]
FORMATS = {name: data for name, fmt, mode, options in CANDIDATES
           if (data := _written(fmt, PICTURE.convert(mode), **options)) is not None}


def pillow_decodes(data: bytes) -> bool:
    """The oracle: Pillow opens and fully decodes the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001  whatever Pillow raises for bytes it cannot decode
        return False


def kept_sources(shards: Path) -> dict[str, dict]:
    """The `.json` of every sample in a shard set, by its source path."""
    found = {}
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found[meta["source"]] = meta
    return found


# A file of a generated source: (what it holds, its folder, how it is named)
CONTENTS = st.sampled_from(["jpeg", *FORMATS, "text", "empty", "truncated", "random", "ds_store", "boxes", "json"])
NAMING = st.sampled_from(["right", "wrong", "none"])  # its extension: its format's, another image's, none
FILES = st.lists(st.tuples(CONTENTS, st.sampled_from(["cat", "dog", "bird"]), NAMING, st.integers(0, 10**6)),
                 min_size=1, max_size=14)


def build_source(root: Path, files: list[tuple[str, str, str, int]]) -> dict[str, bytes]:
    """Write the files into class folders under `root` (plus one real JPEG, so that prepare has an
    image); return {relative path: bytes}."""
    written = {"cat/first.jpg": JPEGS[0]}
    for number, (content, folder, naming, seed) in enumerate(files):
        rng = np.random.default_rng(seed)
        data, suffix = {
            "jpeg": (JPEGS[seed % len(JPEGS)], ".jpg"), "text": (b"a caption\n", ".txt"), "empty": (b"", ".png"),
            "truncated": (JPEGS[seed % len(JPEGS)][:int(rng.integers(2, 300))], ".jpg"),
            "random": (rng.integers(0, 256, int(rng.integers(1, 600)), dtype=np.uint8).tobytes(), ".bin"),
            "ds_store": (b"\x00\x00\x00\x01Bud1" + bytes(40), ""), "boxes": (b"n01_0.JPEG 1 2 3 4\n", ".txt"),
            "json": (b'{"caption": "a cat"}', ".json"),
        }.get(content, (FORMATS.get(content), f".{content.split('-')[0]}"))
        if naming == "wrong":
            suffix = ".png" if suffix != ".png" else ".tif"
        elif naming == "none":
            suffix = ""
        name = {"ds_store": ".DS_Store", "boxes": f"n{number}_boxes.txt"}.get(content, f"{number}-{content}{suffix}")
        written[f"{folder}/{name}"] = data
    for path, data in written.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return written


def check_accounting(manifest, shards: Path, written: dict[str, bytes], strip: str = "") -> None:
    """Every file is a sample or a skipped entry, never both, never neither; every file Pillow
    decodes is kept."""
    kept = {path.removeprefix(strip) for path in kept_sources(shards)}
    skipped = {entry["source"].removeprefix(strip): entry for entry in manifest.skipped}
    assert manifest.inputs == {"files": len(written), "kept": len(kept), "skipped": len(skipped), "beyond_limit": 0}
    assert kept | set(skipped) == set(written) and not kept & set(skipped)
    assert {p for p, data in written.items() if pillow_decodes(data)} == kept, {p: skipped[p] for p in skipped}
    assert all(entry["reason"].startswith(entry["kind"]) for entry in skipped.values())


PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(FILES)
def test_every_file_of_a_folder_is_kept_or_reported(files):
    with tempfile.TemporaryDirectory() as tmp:
        written = build_source(Path(tmp) / "src", files)
        manifest, _ = prepare(replace(SETTINGS, source=str(Path(tmp) / "src")), Path(tmp) / "out", progress=False)
        check_accounting(manifest, Path(tmp) / "out", written)


@PROPERTY
@given(FILES)
def test_every_member_of_a_tar_is_kept_or_reported(files):
    with tempfile.TemporaryDirectory() as tmp:
        written = build_source(Path(tmp) / "src", files)
        source = write_tar(Path(tmp) / "src.tar", {f"src/{p}": data for p, data in written.items()})
        manifest, _ = prepare(replace(SETTINGS, source=str(source)), Path(tmp) / "out", progress=False)
        check_accounting(manifest, Path(tmp) / "out", written, strip="src/")


@PROPERTY
@given(FILES, st.lists(st.sampled_from(["missing.jpg", "cat"]), max_size=2, unique=True))
def test_every_line_of_a_list_file_is_kept_or_reported(files, extra):
    with tempfile.TemporaryDirectory() as tmp:
        written = build_source(Path(tmp), files)
        listed = [*written, *extra]  # a missing file, and a folder, are reported too
        (Path(tmp) / "list.txt").write_text("\n".join(listed) + "\n")
        manifest, _ = prepare(replace(SETTINGS, source=str(Path(tmp) / "list.txt")), Path(tmp) / "out",
                              progress=False)
        assert manifest.inputs["files"] == len(listed)
        extras = {entry["source"]: entry["kind"] for entry in manifest.skipped if entry["source"] in extra}
        assert extras == {name: EXTRA_KINDS[name] for name in extra}
        manifest.skipped = [entry for entry in manifest.skipped if entry["source"] not in extra]
        manifest.inputs = {**manifest.inputs, "files": len(written), "skipped": len(manifest.skipped)}
        check_accounting(manifest, Path(tmp) / "out", written)


SETTINGS = DataConfig("", resolution=16, format="png", shard_size=64, workers=1)  # + source
EXTRA_KINDS = {"missing.jpg": "listed file does not exist", "cat": "not a regular file"}


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    """Each format written with its own extension, a wrong one and none; prepared as 32 px PNG."""
    root = tmp_path_factory.mktemp("formats")
    files = {}
    for name, data in FORMATS.items():
        ext = name.split("-")[0]
        for path in (f"{name}.{ext}", f"{name}-as-png.png", f"{name}-no-extension"):
            files[f"src/a/{path}"] = data
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    manifest, _ = prepare(DataConfig(str(root / "src"), resolution=32, format="png", workers=1), root / "out",
                          progress=False)
    return root, manifest, files


def expected_pixels(data: bytes, size: int = 32) -> np.ndarray:
    """Pillow's own decode of the file, as RGB, after the documented resize: the shorter side to `size`
    (Lanczos), then the centre square."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def test_the_formats_under_test_are_the_ones_this_pillow_reads():
    assert {"tiff", "gif", "tga", "ppm", "pgm", "pbm", "ico", "bmp", "png", "webp"} <= set(FORMATS)
    assert {".tif", ".gif", ".tga", ".ppm", ".pbm", ".ico", ".jp2", ".sgi", ".dds", ".blp", ".psd"} <= IMAGE_SUFFIXES


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_is_kept_with_its_pixels_whatever_its_name(every_format, name):
    root, manifest, files = every_format
    assert not manifest.skipped
    samples = kept_sources(root / "out")
    with tarfile.open(root / "out" / "shard-000000.tar") as tar:
        by_source = {}
        for member in tar:
            if member.name.endswith(".png"):
                meta = json.loads(tar.extractfile(member.name.replace(".png", ".json")).read())
                by_source[meta["source"]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    for path in [p for p in files if p.startswith(f"src/a/{name}.") or p.startswith(f"src/a/{name}-")]:
        source = path.removeprefix("src/")
        assert source in samples, source
        np.testing.assert_array_equal(by_source[source], expected_pixels(files[path]), err_msg=source)


def animation(fmt: str, frames: int, **options) -> bytes:
    pictures = [Image.fromarray(np.full((24, 24, 3), 40 * i + 20, np.uint8)) for i in range(frames)]
    out = io.BytesIO()
    pictures[0].save(out, format=fmt, save_all=True, append_images=pictures[1:], **options)
    return out.getvalue()


@pytest.mark.parametrize("fmt, ext", [("GIF", "gif"), ("TIFF", "tif"), ("PNG", "png"), ("WEBP", "webp")])
def test_a_multi_frame_file_gives_its_first_frame_and_says_so(tmp_path, fmt, ext):
    data = animation(fmt, 3, **({"lossless": True} if fmt == "WEBP" else {}))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"moving.{ext}").write_bytes(data)
    (tmp_path / "src" / "still.jpg").write_bytes(JPEGS[0])
    prepare(DataConfig(str(tmp_path / "src"), resolution=24, format="png", workers=1), tmp_path / "out", progress=False)
    meta = kept_sources(tmp_path / "out")[f"moving.{ext}"]
    assert (meta["frames"], meta["frame"]) == (3, 0)
    assert "frames" not in kept_sources(tmp_path / "out")["still.jpg"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        pixels = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))) for m in tar
                  if m.name.endswith(".png")]
    assert any(np.abs(p.astype(int) - 20).max() <= 1 for p in pixels)  # the first frame's grey, not 60 or 100


def test_inspect_counts_skipped_inputs_per_reason(tmp_path):
    written = build_source(tmp_path / "src", [("text", "cat", "none", 0), ("empty", "dog", "right", 0),
                                              ("truncated", "dog", "right", 5), ("ds_store", "cat", "none", 0),
                                              ("boxes", "dog", "right", 0), ("jpeg", "dog", "right", 1)])
    prepare(replace(SETTINGS, source=str(tmp_path / "src")), tmp_path / "out", progress=False)
    summary = inspect_shards(tmp_path / "out")
    assert summary["skipped"] == {"companion file": 2, "not an image": 1, "empty file": 1, "cannot decode": 1}
    assert summary["inputs"] == {"files": len(written), "kept": 2, "skipped": 5, "beyond_limit": 0}


def test_count_by_kind_reads_older_manifests_by_reason():
    assert count_by_kind([{"source": "a", "reason": "cannot decode (x)"}, {"source": "b", "kind": "empty file",
                                                                         "reason": "empty file"}]) == {
        "cannot decode (x)": 1, "empty file": 1}


def test_a_limit_leaves_the_rest_counted_as_beyond_it(tmp_path):
    source = write_tar(tmp_path / "s.tar", cifar_members("test", 3))
    manifest, _ = prepare(DataConfig(str(source), limit=7, workers=1), tmp_path / "out", progress=False)
    assert manifest.inputs == {"files": 30, "kept": 7, "skipped": 0, "beyond_limit": 23}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_an_unreadable_file_and_folder_are_reported(tmp_path):
    build_source(tmp_path / "src", [("jpeg", "dog", "right", 1)])
    (tmp_path / "src" / "dog" / "secret.jpg").write_bytes(JPEGS[1])
    (tmp_path / "src" / "dog" / "secret.jpg").chmod(0)
    (tmp_path / "src" / "locked").mkdir()
    (tmp_path / "src" / "locked").chmod(0)
    manifest, _ = prepare(replace(SETTINGS, source=str(tmp_path / "src")), tmp_path / "out", progress=False)
    reasons = {entry["source"]: entry["reason"] for entry in manifest.skipped}
    assert reasons["dog/secret.jpg"].startswith("cannot read") and reasons["locked"].startswith("cannot read")


def test_a_colour_key_is_transparency_and_no_source_metadata_reaches_the_shards(tmp_path):
    keyed = Image.fromarray(np.full((16, 16, 3), (0, 255, 52), np.uint8))
    keyed.putpixel((0, 0), (10, 20, 30))
    (tmp_path / "src").mkdir()
    keyed.save(tmp_path / "src" / "keyed.png", transparency=(0, 255, 52))  # RGB with a tRNS colour key
    PICTURE.save(tmp_path / "src" / "profiled.png", icc_profile=b"not really a profile", dpi=(300, 300))
    prepare(DataConfig(str(tmp_path / "src"), resolution=16, format="png", workers=1), tmp_path / "out", progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        samples = {json.loads(tar.extractfile(m.name.replace(".png", ".json")).read())["source"]:
                   Image.open(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".png")}
    keyed_sample = np.asarray(samples["keyed.png"])
    assert keyed_sample[8, 8].tolist() == [255, 255, 255] and keyed_sample[0, 0].tolist() == [10, 20, 30]
    assert all(not {"transparency", "icc_profile", "dpi"} & set(image.info) for image in samples.values())


def test_an_unexpected_error_on_one_file_skips_it_and_names_it(tmp_path, monkeypatch, caplog):
    from cgan_pipe.data import shards

    real = shards.encode_for_shard

    def failing_on_b(raw, item, *args, **kwargs):
        if item.path == "x/b.jpg":
            raise RuntimeError("a bug met on this file")
        return real(raw, item, *args, **kwargs)

    monkeypatch.setattr(shards, "encode_for_shard", failing_on_b)
    for name in ("a", "b", "c"):
        (tmp_path / "src" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "x" / f"{name}.jpg").write_bytes(JPEGS[0])
    manifest, _ = prepare(replace(SETTINGS, source=str(tmp_path / "src")), tmp_path / "out", progress=False)
    assert manifest.num_samples == 2 and manifest.skipped == [
        {"source": "x/b.jpg", "kind": "cannot decode", "reason": "cannot decode: RuntimeError: a bug met on this file"}]
    assert "x/b.jpg: unexpected RuntimeError" in caplog.text
