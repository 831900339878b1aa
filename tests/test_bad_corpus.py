"""A generated corpus of broken images mixed into real CIFAR-10 JPEGs: prepare skips exactly the ones
Pillow cannot decode in full (each with its reason), the result verifies, and a GAN trains on it."""

from __future__ import annotations

import io
import random
import struct
from collections import Counter

import pytest
from PIL import Image

from cgan_pipe.config import DataConfig
from cgan_pipe.schema import key_default

from cgan_pipe.data.shards import prepare
from cgan_pipe.data.verify import verify_shards
from cgan_pipe.train.loop import train

from conftest import cifar_members, small_config, write_tar

MAX_PIXELS = key_default(DataConfig, "max_pixels")


def truncated(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(2, len(data) - 2)]


def bit_flipped(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 40)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def wrong_magic(data: bytes, rng: random.Random) -> bytes:
    magic = rng.choice([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"%PDF-1.4", b"\x00\x00\x00\x00"])
    return magic + data[len(magic):]


def huge_dimensions(data: bytes, rng: random.Random) -> bytes:
    """The JPEG's frame header (SOF0) rewritten to claim up to 65535 x 65535 pixels."""
    at = data.index(b"\xff\xc0")
    side = rng.randrange(20_000, 65_536)
    return data[:at + 5] + struct.pack(">HH", side, side) + data[at + 9:]


def zero_bytes(data: bytes, rng: random.Random) -> bytes:
    return b""


DAMAGE = [truncated, bit_flipped, wrong_magic, huge_dimensions, zero_bytes]


def pillow_decodes(data: bytes) -> bool:
    """The oracle: Pillow opens and fully decodes the bytes, within the pixel limit."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return False
            image.load()
        return True
    except Exception:  # whatever Pillow raises for broken data  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 real train JPEGs plus 100 damaged copies of others (20 of each kind), shuffled into one tar;
    returns (tar, the names Pillow cannot decode, the kind of damage of each damaged name)."""
    rng = random.Random(7)
    real = cifar_members("train", 40)  # 400 images: 300 kept whole, 100 damaged
    names = sorted(real)
    rng.shuffle(names)
    members, kinds = {}, {}
    for i, name in enumerate(names):
        if i < 300:
            members[name] = real[name]
        else:
            damage = DAMAGE[i % len(DAMAGE)]
            broken = name.replace(".jpg", f"-{damage.__name__}.jpg")
            members[broken], kinds[broken] = damage(real[name], rng), damage.__name__
    order = list(members)
    rng.shuffle(order)
    root = tmp_path_factory.mktemp("corpus")
    tar = write_tar(root / "mixed.tar", {name: members[name] for name in order})
    bad = {name for name, data in members.items() if not pillow_decodes(data)}
    return tar, bad, kinds


def test_prepare_skips_exactly_the_undecodable_images_with_reasons_and_the_result_verifies(corpus, tmp_path):
    tar, bad, kinds = corpus
    assert bad <= set(kinds) and len(bad) >= 60  # no real image is bad; most damage is fatal (not every bit flip)
    print(Counter(kinds[name] for name in bad), "undecodable of 20 each")
    manifest, _ = prepare(DataConfig(str(tar), shard_size=150, workers=2), tmp_path / "shards", progress=False)
    skipped = {entry["source"]: entry["reason"] for entry in manifest.skipped}
    assert set(skipped) == bad
    assert all(reason.strip() for reason in skipped.values())
    assert manifest.num_samples == 400 - len(bad)
    report = verify_shards(tmp_path / "shards")
    assert report.ok, report.problems
    result = train(small_config(tmp_path / "run", steps=2), tmp_path / "shards", tmp_path / "run", progress=False)
    assert result.steps == 2
