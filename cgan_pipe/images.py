"""Image encode/decode helpers shared by prepare and export (Pillow; torchvision for batches)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where used: prepare's worker processes never need it
    import torch

# Member-name extension written into shards for each output format.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# Pillow's name of each format we store.
PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
# Any of them, in the `a;b;c` form that webdataset and DALI readers take for one component.
ANY_IMAGE_EXTENSION = ";".join(sorted(EXTENSIONS.values()))


def shard_extensions(shard_format: str) -> list[str]:
    """Member extensions an image can have in shards of `shard_format` ('keep' stores any of them)."""
    return sorted(EXTENSIONS.values()) if shard_format == "keep" else [EXTENSIONS[shard_format]]


class BadImage(ValueError):
    """An input image that cannot be used; the message says why."""


# Pillow's own bomb check warns below 2x its limit and is global; `decode` applies ours instead.
Image.MAX_IMAGE_PIXELS = None


def decode(data: bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Fully decode image bytes with Pillow (so truncated or corrupt files fail here, not later).

    Images over `max_pixels` are refused from their header, before any pixel is decoded.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise BadImage(f"image too large: {image.width}x{image.height} is over the limit of {max_pixels} pixels")
        image.load()
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot decode ({exc})") from None
    return image


@dataclass(frozen=True)
class JpegHeader:
    """What prepare needs from a plain colour JPEG: its size, and its luminance table in zigzag order."""

    width: int
    height: int
    luma_table_zigzag: bytes | None


_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman frames


def plain_jpeg_header(data: bytes) -> JpegHeader | None:
    """Parse the header of an 8-bit, 3-component (YCbCr) JPEG without EXIF or Adobe markers.

    Returns None for anything else (other JPEGs, other formats, damaged headers):
    those go through Pillow's full `decode`. Walking the markers here takes a few
    microseconds where Pillow's header parser takes tens, which matters at
    thousands of images per second.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end = 2, len(data) - 4
    size, luma = None, None
    while pos < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xDA:  # start of scan: the header is over
            return JpegHeader(size[0], size[1], luma) if size else None
        if marker in _SOF_PLAIN:
            if len(segment) < 6 or segment[0] != 8 or segment[5] != 3:
                return None
            size = (segment[3] << 8 | segment[4], segment[1] << 8 | segment[2])
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # lossless, hierarchical or arithmetic-coded frames
        elif marker == 0xDB:
            i = 0
            while i < len(segment):
                if segment[i] >> 4:  # 16-bit table
                    return None
                if segment[i] & 0x0F == 0:
                    luma = bytes(segment[i + 1:i + 65])
                i += 65
        elif (marker == 0xE1 and segment.startswith(b"Exif")) or marker == 0xEE:
            return None  # orientation to apply, or an Adobe colour transform to honour
        pos += 2 + length
    return None


def decode_plain_jpeg(data: bytes, header: JpegHeader) -> Image.Image:
    """Fully decode a JPEG whose `plain_jpeg_header` is `header` (libjpeg through Pillow's
    decoder, without its header parser); BadImage when the data is truncated or corrupt."""
    try:
        return Image.frombytes("RGB", (header.width, header.height), data, "jpeg", "RGB", "")
    except (OSError, ValueError) as exc:
        raise BadImage(f"cannot decode ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB image; transparency is composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16/32-bit greyscale: keep the top 8 bits rather than clip
        wide = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fit(image: Image.Image, size: int, policy: str) -> Image.Image:
    """Make an image `size`x`size` by `policy`: 'crop' (shorter side to size, centre crop),
    'pad' (longer side to size, centred on black) or 'reject' (BadImage unless already that size)."""
    if image.size == (size, size):
        return image
    if policy == "reject":
        raise BadImage(f"{image.width}x{image.height} is not {size}x{size} (resize policy 'reject')")
    if policy == "pad":
        scale = size / max(image.width, image.height)
        inner = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    return resize_center_crop(image, size)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (Lanczos), then crop the centre square."""
    if image.size == (size, size):
        return image
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def encode(image: Image.Image | np.ndarray, fmt: str, quality: int, *, subsampling: str = "4:2:0",
           compress_level: int = 6, lossless: bool = False) -> bytes:
    """Encode an RGB image (PIL or HxWx3 uint8 array) as 'jpeg', 'png' or 'webp' bytes.

    `quality` applies to JPEG and lossy WebP; `subsampling` ('4:2:0' or '4:4:4') to
    JPEG chroma; `compress_level` (0-9) to PNG; `lossless` to WebP.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    out = io.BytesIO()
    if fmt == "jpeg":
        image.save(out, format="JPEG", quality=quality, subsampling=subsampling)
    elif fmt == "png":
        image.save(out, format="PNG", compress_level=compress_level)
    elif fmt == "webp":
        image.save(out, format="WEBP", quality=quality, lossless=lossless)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return out.getvalue()


def encode_batch(pixels: torch.Tensor, fmt: str, quality: int, *, subsampling: str = "4:2:0",
                 compress_level: int = 6, lossless: bool = False) -> list[bytes]:
    """Encode a batch of uint8 RGB images, NCHW, on the CPU or a GPU, like `encode` does one.

    Each JPEG request goes to an encoder that honours its chroma subsampling. 4:2:0 is torchvision's
    batched libjpeg-turbo encoder on the CPU (decoding to within 1/255 of Pillow's output,
    tests/test_images.py), after one copy of the batch from a GPU: torchvision's GPU encoder writes 4:4:4
    whatever is asked (NVJPEG_CSS_444 in its encode_jpegs_cuda.cpp). 4:4:4 is that nvJPEG encoder for
    images on a GPU, Pillow for images on the CPU. PNG and WebP go through Pillow, one image at a time.
    """
    import torch
    from torchvision.io import encode_jpeg

    if fmt == "jpeg" and subsampling == "4:4:4" and pixels.is_cuda:
        # nvJPEG reads the images on a stream of its own, which does not wait for the one that made them
        torch.cuda.current_stream(pixels.device).synchronize()
        encoded = encode_jpeg([image.contiguous() for image in pixels], quality=quality)  # planar input
        sizes = [len(e) for e in encoded]
        return [bytes(b) for b in np.split(torch.cat(encoded).cpu().numpy(), np.cumsum(sizes)[:-1])]
    if fmt == "jpeg" and subsampling == "4:2:0":
        return [encoded.numpy().tobytes() for encoded in encode_jpeg(list(pixels.cpu()), quality=quality)]
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [encode(a, fmt, quality, subsampling=subsampling, compress_level=compress_level, lossless=lossless)
            for a in arrays]
