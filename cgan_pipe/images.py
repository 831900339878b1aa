"""Image encode/decode helpers shared by prepare and export (Pillow; torchvision for batches)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where used: prepare's worker processes never need it
    import torch

# Member-name extension written into shards for each output format.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# Pillow's name of each format we store.
PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
# Any of them, in the `a;b;c` form that webdataset and DALI readers take for one component.
ANY_IMAGE_EXTENSION = ";".join(sorted(EXTENSIONS.values()))



def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (floats, NCHW) as 8-bit pixels, rounded: how generated images become pixels."""
    return images.add(1).mul(127.5).round().clamp(0, 255).byte()


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit pixels as float32 images in [-1, 1]: the inverse of to_uint8 (up to its rounding)."""
    return pixels.float().div(127.5).sub(1)


def shard_extensions(shard_format: str) -> list[str]:
    """Member extensions an image can have in shards of `shard_format` ('keep' stores any of them)."""
    return sorted(EXTENSIONS.values()) if shard_format == "keep" else [EXTENSIONS[shard_format]]


# Kinds of reason an input image is skipped for (BadImage.kind), counted per kind in summaries.
NOT_AN_IMAGE = "not an image"
EMPTY_FILE = "empty file"
CANNOT_DECODE = "cannot decode"
TOO_LARGE = "too large"
UNSUPPORTED = "unsupported by this Pillow build"
WRONG_SIZE = "wrong size"


class BadImage(ValueError):
    """An input image that cannot be used: `kind` (one of the kinds above) groups it, the message says why."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def decode(data: bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Fully decode image bytes of any format this Pillow reads, judged by content, not name (the first
    frame of a multi-frame file), so truncated or corrupt files fail here, not later.

    Images over `max_pixels` are refused from their header, before any pixel is decoded; so are
    images nested in a container (an ICNS or ICO icon) that decode to more than twice that (Pillow's
    own check, which warns between once and twice the limit). BadImage says why an image cannot be used.
    """
    if not data:
        raise BadImage(EMPTY_FILE)
    # Every plugin registered, in Pillow's order: with only some loaded, a plugin that has no signature
    # test (TGA) can claim another format's file first, so the verdict would hang on what ran before.
    Image.init()
    Image.MAX_IMAGE_PIXELS = None  # Pillow's limit is global; the outer image is checked below, by name
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(*describe_unknown(data)) from None
    except Exception as exc:  # a plugin that knows the format but not these bytes raises anything  # noqa: BLE001
        raise BadImage(CANNOT_DECODE, _damaged(data, _message(exc))) from None
    if image.width * image.height > max_pixels:
        raise BadImage(TOO_LARGE, f"{image.width}x{image.height} is over the limit of {max_pixels} pixels "
                                  f"(data.max_pixels)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # for images nested in this one, which only Pillow sees
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise BadImage(TOO_LARGE, f"{image.format} data: {exc}") from None
    except Exception as exc:  # damaged data surfaces as many exception types  # noqa: BLE001
        raise BadImage(*_load_failure(image, exc)) from None
    if image.width == 0 or image.height == 0:
        raise BadImage(CANNOT_DECODE, f"{image.format} image of {image.width}x{image.height} pixels")
    return image


def decode_first_frame(data: bytes, max_pixels: int = 64_000_000) -> tuple[Image.Image, int | None]:
    """`decode`, and the number of frames in the file: 1 for a still image, None when a later frame is
    too damaged to count (the first frame, decoded again, is still good)."""
    image = decode(data, max_pixels)
    try:
        frames = getattr(image, "n_frames", 1)  # Pillow seeks back to the first frame after counting
        image.seek(0)
        return image, frames
    except Exception:  # noqa: BLE001  (as in decode)
        return decode(data, max_pixels), None


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _load_failure(image: Image.Image, exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of a recognised image whose pixels Pillow cannot decode."""
    message, image_format = _message(exc), image.format
    if image_format == "EPS" and "Ghostscript" in message:
        return UNSUPPORTED, "EPS (Pillow draws PostScript with Ghostscript, which is not installed)"
    if image_format == "WMF":
        return UNSUPPORTED, "WMF/EMF (Pillow draws Windows metafiles only on Windows)"
    if isinstance(image, ImageFile.StubImageFile):  # BUFR, GRIB, HDF5: a handler from another package reads them
        return UNSUPPORTED, f"{image_format} (Pillow reads it only through a handler another package registers)"
    if "not available" in message:  # e.g. "decoder jpeg2k not available": a codec left out of this build
        return UNSUPPORTED, f"{image_format} ({message})"
    return CANNOT_DECODE, f"{image_format} data: {message}" if image_format else message


_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_OLE = ("an OLE compound document (Thumbs.db, an Office file, or a FlashPix or MIC image, which Pillow reads "
        "only with the olefile package)")
_OTHER_FILES = [  # (leading bytes, what such a file is), for files no image format matches
    (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip file"),
    (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"), (b"\xd0\xcf\x11\xe0", _OLE),
    (b"SQLite format 3", "an SQLite database"), (b"\x7fELF", "a program"), (b"RIFF", "a RIFF file (audio/video)"),
]


def describe_unknown(data: bytes) -> tuple[str, str]:
    """(kind, detail) of bytes that no image format of this Pillow matches: an image whose header is
    damaged, an image format this build cannot read (HEIF, JPEG XL, ...), or what the file is
    instead (text, a PDF, an archive, ...)."""
    head = data[:4096]
    claimed = _formats_claiming(head)
    if claimed:
        return CANNOT_DECODE, _naming(claimed, "its header is unreadable")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return (UNSUPPORTED, "AVIF") if not _pillow_reads("avif") else (CANNOT_DECODE, "AVIF data Pillow rejects")
        if brand in _HEIF_BRANDS:
            return UNSUPPORTED, "HEIF/HEIC (Pillow has no HEIF decoder; convert these files to PNG or JPEG)"
        return NOT_AN_IMAGE, f"an ISO media file (brand {brand.decode('latin-1')!r}: video or audio)"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return UNSUPPORTED, "JPEG XL (Pillow has no JPEG XL decoder)"
    for magic, what in _OTHER_FILES:
        if head.startswith(magic):
            return NOT_AN_IMAGE, what
    if _is_text(head):
        if b"<svg" in head[:1024].lower():
            return NOT_AN_IMAGE, "an SVG vector drawing (rasterise it to PNG first)"
        return NOT_AN_IMAGE, "text file"
    return NOT_AN_IMAGE, "no image format this Pillow reads matches its content"


def _is_text(head: bytes) -> bool:
    """Whether the first bytes of a file are UTF-8 text (ASCII included)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # only a character cut by the end of the sample
    return True


def _formats_claiming(head: bytes) -> list[str]:
    """The formats whose signature the first bytes carry (Pillow's own test of each plugin)."""
    Image.init()
    claimed = []
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head[:16]):
                claimed.append(name)
        except Exception:  # noqa: BLE001  a plugin's test failing on odd bytes claims nothing
            continue
    return claimed


def _damaged(data: bytes, message: str) -> str:
    """A decoding failure's detail, naming the format whose signature `data` starts with, if any."""
    return _naming(_formats_claiming(data[:16]), message)


def _naming(formats: list[str], message: str) -> str:
    return f"{'/'.join(formats)} data: {message}" if formats else message


def _pillow_reads(feature: str) -> bool:
    from PIL import features

    return bool(features.check(feature))


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
        raise BadImage(CANNOT_DECODE, f"JPEG data: {_message(exc)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB image, from any pixel mode Pillow decodes to (docs/own-data.md): transparency
    is composited over white; 16/32-bit integer greyscale keeps its top 8 of 16 bits (values over 65535
    are white, below 0 black); everything else converts as Pillow converts it to RGB. BadImage for a
    mode Pillow cannot convert."""
    if image.mode == "RGB" and "transparency" not in image.info:  # an RGB colour key is transparency too
        return image
    try:
        return _convert_to_rgb(image)
    except (ValueError, OSError) as exc:
        raise BadImage(CANNOT_DECODE, f"{image.mode} pixels cannot be converted to RGB ({_message(exc)})") from None


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        wide = np.asarray(image).astype(np.int64)
        return Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:
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
        raise BadImage(WRONG_SIZE, f"{image.width}x{image.height} is not {size}x{size} (resize policy 'reject')")
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
    elif image.info:  # a source's ICC profile, EXIF, colour key, ... would be written along: samples are plain RGB
        image = image.copy()
        image.info = {}
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
