"""What each file of a raw source is: an image to read, or an input left out with a reason a user
understands. Every file of a source ends up as one or the other, never neither."""

from __future__ import annotations

import io
import posixpath
import warnings
from collections import Counter
from typing import Callable, Iterable

from PIL import Image, UnidentifiedImageError

from .. import images

# Kinds of reason, beside those of images.BadImage, that an input is left out for.
COMPANION = "companion file"
DUPLICATE = "duplicate name"
NOT_A_FILE = "not a regular file"
UNSAFE_PATH = "unsafe member path"
MISSING = "listed file does not exist"
CANNOT_READ = "cannot read"
NO_IMAGE = "sample without an image"

_COMPANION_NAMES = {  # lower-cased file name -> what it is
    ".ds_store": "macOS folder metadata",
    "thumbs.db": "Windows thumbnail cache",
    "ehthumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
    ".directory": "KDE folder settings",
}
_SIDECAR_SUFFIXES = (".txt", ".json", ".xml", ".csv", ".tsv", ".yaml", ".yml", ".md", ".cls", ".mat", ".npy")


def _pillow_suffixes() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


# File name endings of formats this Pillow opens: such files are taken to the decoder without a look
# at their content here (the decoder judges them). Files named otherwise are identified by content.
IMAGE_SUFFIXES = _pillow_suffixes()


def left_out(source: str, kind: str, detail: str = "") -> dict[str, str]:
    """The manifest's record of an input left out: its path, the kind of reason, and the reason."""
    return {"source": source, "kind": kind, "reason": f"{kind}: {detail}" if detail else kind}


def left_out_because(source: str, error: Exception) -> dict[str, str]:
    """The record of an input whose reading or decoding raised `error` (images.BadImage or DataError)."""
    return {"source": source, "kind": getattr(error, "kind", CANNOT_READ), "reason": str(error)}


def triage(path: str, size: int, read_head: Callable[[int], bytes]) -> dict[str, str] | None:
    """None when the file at `path` (of `size` bytes) is to be decoded as an image, else its record of
    being left out. A name ending in an extension Pillow reads goes to the decoder, which has the last
    word; any other file is decoded only when Pillow recognises its content (`read_head(n)`: its
    first n bytes, or OSError), and is otherwise a known companion (.DS_Store, *_boxes.txt, .json sidecars, ...)
    or described by what its content is ("text file", "a PDF document", "HEIF", ...)."""
    if size == 0:
        return left_out(path, images.EMPTY_FILE)
    name = posixpath.basename(path)
    if posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES:
        return None
    try:
        head = read_head(min(size, _HEAD_BYTES))
    except OSError as exc:
        return left_out(path, CANNOT_READ, exc.strerror or str(exc))
    if _pillow_recognises(head):
        return None
    companion = _companion(name)
    if companion is not None:
        return left_out(path, COMPANION, companion)
    return left_out(path, *images.describe_unknown(head))


_HEAD_BYTES = 16 << 20  # enough to identify any image by its header (TIFF may keep its directory far in)


def _pillow_recognises(head: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's notes on odd headers: the decoder reports what matters
        try:
            with Image.open(io.BytesIO(head)):
                return True
        except UnidentifiedImageError:
            return False
        except Exception:  # noqa: BLE001  a format recognised, its header damaged: the decoder says how
            return True


def _companion(name: str) -> str | None:
    lower = name.lower()
    if lower in _COMPANION_NAMES:
        return f"{_COMPANION_NAMES[lower]} ({name})"
    if lower.startswith("._"):
        return "macOS resource fork (AppleDouble '._' file)"
    if lower.endswith("_boxes.txt"):
        return "bounding boxes (*_boxes.txt)"
    if lower.endswith(_SIDECAR_SUFFIXES):
        return f"sidecar metadata ({posixpath.splitext(lower)[1]})"
    return None


def kind_of(entry: dict[str, str]) -> str:
    """The kind of reason of a left-out input (entries of older manifests have none: their reason)."""
    return entry.get("kind", entry["reason"])


def count_by_kind(entries: Iterable[dict[str, str]]) -> dict[str, int]:
    """Number of left-out inputs per kind of reason, most first."""
    return dict(Counter(kind_of(entry) for entry in entries).most_common())


def counts_text(counts: dict[str, int]) -> str:
    """Counts per kind as a reader meets them: '3 not an image, 1 empty file' ('' for none)."""
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())
