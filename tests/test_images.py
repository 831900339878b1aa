"""The fast JPEG header path gives what Pillow's full decode gives, and steps aside otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cgan_pipe import images
from cgan_pipe.compression import estimate_jpeg_quality, estimate_jpeg_quality_zigzag

from conftest import cifar_members


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return list(cifar_members("test", 50).values())


def save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def test_plain_jpegs_decode_to_pillows_pixels_and_quality(jpegs):
    for data in jpegs:
        header = images.plain_jpeg_header(data)
        reference = Image.open(io.BytesIO(data))
        assert (header.width, header.height) == reference.size
        assert np.array_equal(np.asarray(images.decode_plain_jpeg(data, header)),
                              np.asarray(reference.convert("RGB")))
        assert estimate_jpeg_quality_zigzag(header.luma_table_zigzag) == estimate_jpeg_quality(reference.quantization)


def test_progressive_and_444_jpegs_take_the_fast_path(jpegs):
    rgb = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    for options in ({"progressive": True, "quality": 40}, {"subsampling": "4:4:4", "quality": 90}):
        data = save(rgb, "JPEG", **options)
        header = images.plain_jpeg_header(data)
        decoded = images.decode_plain_jpeg(data, header)
        assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(data))))
        assert estimate_jpeg_quality_zigzag(header.luma_table_zigzag) == options["quality"]


def test_other_images_are_left_to_pillow(jpegs):
    rgb = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    for data in (save(rgb, "PNG"), save(rgb.convert("L"), "JPEG"), save(rgb.convert("CMYK"), "JPEG"),
                 save(rgb, "JPEG", exif=exif), b"", b"\xff\xd8\xff", jpegs[0][:100]):
        assert images.plain_jpeg_header(data) is None


def test_a_truncated_or_damaged_plain_jpeg_fails_its_decode(jpegs):
    data = jpegs[0]
    header = images.plain_jpeg_header(data)
    scan = data.index(b"\xff\xda") + 20  # inside the entropy-coded image data
    for broken in (data[:scan + 30], data[:scan] + bytes(len(data) - scan)):
        assert images.plain_jpeg_header(broken) == header  # the header is intact...
        with pytest.raises(images.BadImage, match="cannot decode"):
            images.decode_plain_jpeg(broken, header)  # ...the image data is not


@pytest.mark.parametrize("fmt, options", [("jpeg", {}), ("jpeg", {"subsampling": "4:4:4"}), ("png", {}),
                                          ("webp", {}), ("webp", {"lossless": True})])
def test_batch_encoding_gives_what_encoding_one_by_one_gives(jpegs, fmt, options):
    arrays = np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in jpegs[:8]])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2)  # NCHW view of NHWC memory, as export makes them
    batch = images.encode_batch(pixels, fmt, 90, **options)
    one_by_one = [images.encode(array, fmt, 90, **options) for array in arrays]
    for ours, theirs in zip(batch, one_by_one):
        a = np.asarray(Image.open(io.BytesIO(ours)).convert("RGB"), dtype=np.float32)
        b = np.asarray(Image.open(io.BytesIO(theirs)).convert("RGB"), dtype=np.float32)
        assert np.abs(a - b).mean() <= 1.0  # torchvision's libjpeg-turbo vs Pillow's: within 1/255
    if fmt != "jpeg" or options:
        assert batch == one_by_one  # the same Pillow call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG encode)")
@pytest.mark.parametrize("subsampling, sampling", [("4:2:0", 2), ("4:4:4", 0)])
def test_batch_encoding_on_a_gpu_writes_the_chroma_subsampling_asked_for(jpegs, subsampling, sampling):
    """torchvision's GPU encoder writes 4:4:4 whatever it is asked; encode_batch must not pass it 4:2:0."""
    from PIL import JpegImagePlugin

    arrays = np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in jpegs[:8]])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).cuda()
    for data, array in zip(images.encode_batch(pixels, "jpeg", 90, subsampling=subsampling), arrays):
        decoded = Image.open(io.BytesIO(data))
        assert JpegImagePlugin.get_sampling(decoded) == sampling
        assert np.abs(np.asarray(decoded.convert("RGB"), dtype=np.float32) - array).mean() <= 3.0
