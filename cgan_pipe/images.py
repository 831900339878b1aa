"""Image encode/decode helpers shared by prepare and export (Pillow)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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
