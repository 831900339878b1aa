"""Raw inputs (image folder, tar of one, CIFAR-10 python archive) -> labelled image items."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from ..errors import DataError
from ..images import EXTENSIONS
from .manifest import MANIFEST_NAME, parse_dali_index, read_manifest
from .tars import compression_of, decompress_to, list_members, read_span

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
DOWNLOAD_PREFIX = "download:"
LIST_SUFFIXES = (".txt", ".lst", ".list")
DECOMPRESSED_PREFIX = ".source-"  # a compressed tar source, decompressed beside the shards while prepare runs
IMAGE_EXTENSIONS = set(EXTENSIONS.values())  # image members of a shard set


class SourceItem(NamedTuple):  # a tuple: cheap to hold and to send to workers by the million
    """One input image: where it lives (recorded as `source` in shards), its class id, and
    for images inside an archive file, the (offset, size) of its bytes there."""

    path: str
    label: int | None
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class RawImage:
    """What reading an item gives: encoded file bytes, or decoded HxWx3 uint8 pixels."""

    data: bytes | None = None
    pixels: np.ndarray | None = None


class ItemReader(Protocol):
    """Reads the raw image of an item without listing the source again; small and picklable,
    so worker processes get one instead of re-opening the source."""

    def read(self, item: SourceItem) -> RawImage:
        """Return the raw image of `item`."""


class Source:
    """A set of labelled images that can be listed, then read item by item.

    Use as a context manager; `items` is in a stable (sorted) order and
    `class_names[label]` names each label (empty for unlabelled sources).
    """

    description: str
    class_names: list[str]
    items: list[SourceItem]
    reader: ItemReader
    rejected: list[dict[str, str]] = []  # inputs left out before reading: {"source", "reason"}

    def read(self, item: SourceItem) -> RawImage:
        """Return the raw image of `item`."""
        return self.reader.read(item)

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(spec: str, split: str = "train", download_dir: str = "~/.cache/cgan-pipe",
                scratch_dir: Path | None = None) -> Source:
    """Open the raw image source named by `spec` (a path, or 'download:cifar10').

    A compressed tar is first decompressed once into `scratch_dir` (a temporary
    folder when None), since reading members of a gzip stream in shuffled order
    would decompress it again and again. Raises DataError naming the path when
    it is missing or of an unknown kind.
    """
    if spec.startswith(DOWNLOAD_PREFIX):
        return _download(spec[len(DOWNLOAD_PREFIX):], split, Path(download_dir).expanduser())
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {spec!r} does not exist. Give an image folder, a tar of one or the "
            f"CIFAR-10 python archive (data.source or --set data.source=PATH), or "
            f"'download:cifar10' to fetch CIFAR-10 with torchvision."
        )
    if path.is_dir():
        if (path / "batches.meta").exists():
            return CifarPythonSource(path, split)
        if (path / MANIFEST_NAME).exists():
            return ShardSetSource(path)
        return FolderSource(path)
    if path.suffix.lower() in LIST_SUFFIXES:
        return ListSource(path)
    if _is_cifar_archive(path):
        return CifarPythonSource(path, split)
    if tarfile.is_tarfile(path):
        return TarSource(path, scratch_dir)
    raise DataError(f"data source {spec!r} is neither a folder, a tar archive, a list file "
                    f"({', '.join(LIST_SUFFIXES)}) nor a CIFAR-10 archive")


def label_items(paths: list[str], spans: dict[str, tuple[int, int]] | None = None
                ) -> tuple[list[str], list[SourceItem]]:
    """Assign stable class ids to image paths from an image-folder layout.

    The folder directly below the paths' common root names the class; class ids
    follow the sorted class names. Images all at the root are unlabelled. `spans`
    gives each path's place in an archive file, when the paths are archive members.
    """
    paths = sorted(paths)
    spans = spans or {}
    # classes are decided per folder (few) rather than per path (many); normpath drops a leading './'
    folders = {folder: posixpath.normpath(folder) for folder in {p.rpartition("/")[0] for p in paths}}
    root = posixpath.commonpath(list(folders.values())) if folders else ""
    class_of = {}  # folder -> class name, or None for the root itself
    for folder, norm in folders.items():
        rel = norm if not root else "" if norm == root else norm[len(root) + 1:]
        class_of[folder] = rel.split("/", 1)[0] if rel not in ("", ".") else None
    at_root = [p for p in paths if class_of[p.rpartition("/")[0]] is None]
    if len(at_root) == len(paths):
        return [], [SourceItem(p, None, spans.get(p)) for p in paths]
    if at_root:
        raise DataError(
            f"images are both at the top of {root or 'the source'!r} (e.g. {at_root[0]!r}) and in "
            f"class folders; put every image in a class folder, or none"
        )
    class_names = sorted(set(class_of.values()))
    ids = {name: i for i, name in enumerate(class_names)}
    folder_ids = {folder: ids[name] for folder, name in class_of.items()}
    return class_names, [SourceItem(p, folder_ids[p.rpartition("/")[0]], spans.get(p)) for p in paths]


@dataclass(frozen=True)
class FileReader:
    """Reads items that are image files at paths relative to `root`."""

    root: Path

    def read(self, item: SourceItem) -> RawImage:
        """Return the bytes of the file."""
        try:
            return RawImage(data=(self.root / item.path).read_bytes())
        except OSError as exc:
            raise DataError(f"cannot read {self.root / item.path} ({exc.strerror})") from None


@dataclass(frozen=True)
class SpanReader:
    """Reads items stored as byte spans of one archive file (an uncompressed tar)."""

    archive: Path

    def read(self, item: SourceItem) -> RawImage:
        """Return the bytes of the item's span."""
        return RawImage(data=read_span(self.archive, *item.span))


@dataclass(frozen=True)
class ShardSpanReader:
    """Reads items of a shard set: byte spans of the shard named by the item path's first part."""

    root: Path

    def read(self, item: SourceItem) -> RawImage:
        """Return the bytes of the item's span in its shard."""
        return RawImage(data=read_span(self.root / item.path.split("/", 1)[0], *item.span))


class FolderSource(Source):
    """An image-folder tree on disk: ROOT/<class>/<image>."""

    def __init__(self, root: Path):
        self.reader = FileReader(root)
        self.description = f"image folder {root}"
        files = [
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
        self.class_names, self.items = label_items(files)
        if not self.items:
            raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")


class ListSource(Source):
    """A text file naming one image path per line (relative to the file's folder; '#' comments).

    Classes come from the image-folder layout of the listed paths, as for a folder.
    """

    def __init__(self, path: Path):
        self.description = f"list file {path}"
        self.reader = FileReader(path.parent)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read list file ({exc})") from None
        listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        self.rejected = [{"source": p, "reason": "listed file does not exist"}
                         for p in listed if not (path.parent / p).is_file()]
        missing = {r["source"] for r in self.rejected}
        self.class_names, self.items = label_items(sorted({p for p in listed if p not in missing}))
        if not self.items:
            raise DataError(f"{path}: lists no existing image")


class ShardSetSource(Source):
    """An existing shard set (made by prepare or export), to re-shard or re-encode.

    Samples keep their class ids; each is read through its shard's DALI index.
    """

    def __init__(self, path: Path):
        self.description = f"shard set {path}"
        self.reader = ShardSpanReader(path)
        manifest = read_manifest(path)
        self.class_names = list(manifest.class_names)
        self.items = []
        for shard in manifest.shards:
            tar = path / shard.tar
            with open(tar, "rb") as handle:
                for files in parse_dali_index(path / shard.index):
                    image = next((f for f in files if f.ext in IMAGE_EXTENSIONS), None)
                    cls = next((f for f in files if f.ext == "cls"), None)
                    if image is None:
                        continue
                    label = None
                    if cls is not None and self.class_names:
                        handle.seek(cls.offset)
                        raw = handle.read(cls.size)
                        if not raw.strip().isdigit() or int(raw) >= len(self.class_names):
                            raise DataError(f"{tar}: {cls.name} holds {raw!r}, not a class id; "
                                            f"run `cgan-pipe verify {path}`")
                        label = int(raw)
                    self.items.append(SourceItem(f"{shard.tar}/{image.name}", label, (image.offset, image.size)))


class TarSource(Source):
    """A tar (optionally gzip/bz2/xz) of an image-folder tree, read in place, never extracted.

    A compressed tar is decompressed once into `scratch_dir` (kept there, so a
    resumed prepare does not redo it; the caller removes it) or, when None, into
    a temporary folder removed on close.
    """

    def __init__(self, path: Path, scratch_dir: Path | None = None):
        self.path = path
        self.description = f"tar archive {path}"
        self._temp_dir = None
        archive = path
        if compression_of(path):
            if scratch_dir is None:
                self._temp_dir = tempfile.TemporaryDirectory(prefix="cgan-pipe-")
                scratch_dir = Path(self._temp_dir.name)
            archive = Path(scratch_dir) / decompressed_name(path)
            if not archive.exists():
                archive.parent.mkdir(parents=True, exist_ok=True)
                decompress_to(path, archive)
        self.reader = SpanReader(archive)
        # Unsafe names, links and duplicates are left out and reported (and could never be
        # written anywhere: members are only read, by offset).
        members: dict[str, tuple[int, int]] = {}
        self.rejected = []
        for m in list_members(archive):
            if posixpath.splitext(m.name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts:
                self.rejected.append({"source": m.name, "reason": "unsafe member path (absolute or '..')"})
            elif not m.is_file:
                self.rejected.append({"source": m.name, "reason": "not a regular file (link or device)"})
            elif m.name in members:
                self.rejected.append({"source": m.name, "reason": "duplicate member name; the first copy is used"})
            else:
                members[m.name] = (m.offset, m.size)
        self.class_names, self.items = label_items(list(members), members)
        if not self.items:
            raise DataError(f"{path}: no images found in the archive")

    def close(self) -> None:
        if self._temp_dir is not None:
            self._temp_dir.cleanup()


def decompressed_name(path: Path) -> str:
    """The file name a compressed tar is decompressed to: hidden, and tied to the archive's
    path, size and modification time so that a changed archive is decompressed afresh."""
    stat = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{DECOMPRESSED_PREFIX}{tag}.tar"  # (its temp name while written: '.' + this + a temp mark)


class CifarPythonSource(Source):
    """The official CIFAR-10 python archive (cifar-10-python.tar.gz) or its extracted folder."""

    def __init__(self, path: Path, split: str):
        self.description = f"CIFAR-10 python archive {path} ({split})"
        self.reader = CifarReader(path, split)
        self.items = list(_load_cifar(path, split)[0])
        self.class_names = list(CIFAR10_CLASSES)

    def close(self) -> None:
        _load_cifar.cache_clear()


@dataclass(frozen=True)
class CifarReader:
    """Reads items of a CIFAR-10 python archive (loaded once per process)."""

    path: Path
    split: str

    def read(self, item: SourceItem) -> RawImage:
        """Return the item's 32x32x3 pixels."""
        _, pixels, index = _load_cifar(self.path, self.split)
        return RawImage(pixels=pixels[index[item.path]])


@functools.lru_cache(maxsize=1)
def _load_cifar(path: Path, split: str) -> tuple[list[SourceItem], np.ndarray, dict[str, int]]:
    """(items, pixels NxHxWx3, item path -> row) of one split of a CIFAR-10 python archive."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    blobs = _read_cifar_members(path, names)
    pixels, items = [], []
    for name in names:
        batch = _safe_unpickle(blobs[name], f"{path}:{name}")
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = [int(v) for v in batch[b"labels"]]
            files = [f.decode() if isinstance(f, bytes) else str(f) for f in batch[b"filenames"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{path}:{name}: not a CIFAR-10 batch ({exc})") from None
        pixels.append(data.transpose(0, 2, 3, 1))
        items.extend(SourceItem(f"{name}/{f}", y) for f, y in zip(files, labels))
    return items, np.concatenate(pixels), {item.path: i for i, item in enumerate(items)}


def _is_cifar_archive(path: Path) -> bool:
    try:
        with tarfile.open(path) as tar:
            first = tar.next()
            return first is not None and first.name.split("/")[0] == "cifar-10-batches-py"
    except (tarfile.TarError, OSError, EOFError):
        return False


def _read_cifar_members(path: Path, names: list[str]) -> dict[str, bytes]:
    if path.is_dir():
        try:
            return {n: (path / n).read_bytes() for n in names}
        except OSError as exc:
            raise DataError(f"{path}: missing CIFAR-10 batch file ({exc})") from None
    out = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if base in names and member.isfile():
                    out[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read CIFAR-10 archive ({exc})") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise DataError(f"{path}: CIFAR-10 archive lacks {', '.join(missing)}")
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without running arbitrary code: only numpy arrays are allowed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _safe_unpickle(blob: bytes, where: str) -> dict:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types for bad input
        raise DataError(f"{where}: not a valid CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__})")
    return batch


def _download(name: str, split: str, root: Path) -> Source:
    if name != "cifar10":
        raise DataError(f"cannot download {name!r}: only 'download:cifar10' is supported")
    from torchvision.datasets import CIFAR10  # only needed here

    try:
        CIFAR10(root=str(root), train=split == "train", download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"downloading CIFAR-10 into {root} failed ({exc}); give a local path instead") from None
    return CifarPythonSource(root / "cifar-10-batches-py", split)
