"""Raw inputs (image folder, tar of one, CIFAR-10 python archive) -> labelled image items."""

from __future__ import annotations

import io
import pickle
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..errors import DataError
from ..images import EXTENSIONS
from .manifest import MANIFEST_NAME, parse_dali_index, read_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
DOWNLOAD_PREFIX = "download:"
LIST_SUFFIXES = (".txt", ".lst", ".list")
IMAGE_EXTENSIONS = set(EXTENSIONS.values())  # image members of a shard set


@dataclass(frozen=True)
class SourceItem:
    """One input image: where it lives (recorded as `source` in shards) and its class id."""

    path: str
    label: int | None


@dataclass(frozen=True)
class RawImage:
    """What reading an item gives: encoded file bytes, or decoded HxWx3 uint8 pixels."""

    data: bytes | None = None
    pixels: np.ndarray | None = None


class Source:
    """A set of labelled images that can be listed, then read item by item.

    Use as a context manager; `items` is in a stable (sorted) order and
    `class_names[label]` names each label (empty for unlabelled sources).
    """

    description: str
    class_names: list[str]
    items: list[SourceItem]
    rejected: list[dict[str, str]] = []  # inputs left out before reading: {"source", "reason"}

    def read(self, item: SourceItem) -> RawImage:
        """Return the raw image of `item`."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(spec: str, split: str = "train", download_dir: str = "~/.cache/cgan-pipe") -> Source:
    """Open the raw image source named by `spec` (a path, or 'download:cifar10').

    Raises DataError naming the path when it is missing or of an unknown kind.
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
        return TarSource(path)
    raise DataError(f"data source {spec!r} is neither a folder, a tar archive, a list file "
                    f"({', '.join(LIST_SUFFIXES)}) nor a CIFAR-10 archive")


def label_items(paths: list[str]) -> tuple[list[str], list[SourceItem]]:
    """Assign stable class ids to image paths from an image-folder layout.

    The folder directly below the paths' common root names the class; class ids
    follow the sorted class names. Images all at the root are unlabelled.
    """
    paths = sorted(paths)
    if not paths:
        return [], []
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if len(paths) > 1 else posixpath.dirname(paths[0])
    rel = [posixpath.relpath(p, root) if root else p for p in paths]
    at_root = [r for r in rel if "/" not in r]
    if len(at_root) == len(rel):
        return [], [SourceItem(p, None) for p in paths]
    if at_root:
        raise DataError(
            f"images are both at the top of {root or 'the source'!r} (e.g. {at_root[0]!r}) and in "
            f"class folders; put every image in a class folder, or none"
        )
    class_names = sorted({r.split("/", 1)[0] for r in rel})
    ids = {name: i for i, name in enumerate(class_names)}
    return class_names, [SourceItem(p, ids[r.split("/", 1)[0]]) for p, r in zip(paths, rel)]


class _FilesUnderRoot(Source):
    """A source whose items are image files on disk at paths relative to `root`."""

    root: Path

    def read(self, item: SourceItem) -> RawImage:
        try:
            return RawImage(data=(self.root / item.path).read_bytes())
        except OSError as exc:
            raise DataError(f"cannot read {self.root / item.path} ({exc.strerror})") from None


class FolderSource(_FilesUnderRoot):
    """An image-folder tree on disk: ROOT/<class>/<image>."""

    def __init__(self, root: Path):
        self.root = root
        self.description = f"image folder {root}"
        files = [
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
        self.class_names, self.items = label_items(files)
        if not self.items:
            raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")


class ListSource(_FilesUnderRoot):
    """A text file naming one image path per line (relative to the file's folder; '#' comments).

    Classes come from the image-folder layout of the listed paths, as for a folder.
    """

    def __init__(self, path: Path):
        self.description = f"list file {path}"
        self.root = path.parent
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read list file ({exc})") from None
        listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        self.rejected = [{"source": p, "reason": "listed file does not exist"}
                         for p in listed if not (self.root / p).is_file()]
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
        manifest = read_manifest(path)
        self.class_names = list(manifest.class_names)
        self._where: dict[str, tuple[Path, int, int]] = {}
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
                    item_path = f"{shard.tar}/{image.name}"
                    self._where[item_path] = (tar, image.offset, image.size)
                    self.items.append(SourceItem(item_path, label))

    def read(self, item: SourceItem) -> RawImage:
        tar, offset, size = self._where[item.path]
        with open(tar, "rb") as handle:
            handle.seek(offset)
            return RawImage(data=handle.read(size))


class TarSource(Source):
    """A tar (optionally gzip/bz2/xz) of an image-folder tree."""

    def __init__(self, path: Path):
        self.path = path
        self.description = f"tar archive {path}"
        try:
            self._tar = tarfile.open(path)
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read tar archive ({exc})") from None
        # Members are only ever read, never extracted, so no name can write outside a folder;
        # unsafe names, links and duplicates are still left out and reported.
        self._members: dict[str, tarfile.TarInfo] = {}
        self.rejected = []
        for m in members:
            if posixpath.splitext(m.name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts:
                self.rejected.append({"source": m.name, "reason": "unsafe member path (absolute or '..')"})
            elif not m.isfile():
                self.rejected.append({"source": m.name, "reason": "not a regular file (link or device)"})
            elif m.name in self._members:
                self.rejected.append({"source": m.name, "reason": "duplicate member name; the first copy is used"})
            else:
                self._members[m.name] = m
        self.class_names, self.items = label_items(list(self._members))
        if not self.items:
            raise DataError(f"{path}: no images found in the archive")

    def read(self, item: SourceItem) -> RawImage:
        try:
            handle = self._tar.extractfile(self._members[item.path])
            return RawImage(data=handle.read() if handle else b"")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{self.path}: cannot read member {item.path!r} ({exc})") from None

    def close(self) -> None:
        self._tar.close()


class CifarPythonSource(Source):
    """The official CIFAR-10 python archive (cifar-10-python.tar.gz) or its extracted folder."""

    def __init__(self, path: Path, split: str):
        self.description = f"CIFAR-10 python archive {path} ({split})"
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        blobs = _read_cifar_members(path, names)
        pixels, labels, self.items = [], [], []
        for name in names:
            batch = _safe_unpickle(blobs[name], f"{path}:{name}")
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                batch_labels = [int(v) for v in batch[b"labels"]]
                files = [f.decode() if isinstance(f, bytes) else str(f) for f in batch[b"filenames"]]
            except (KeyError, ValueError, TypeError) as exc:
                raise DataError(f"{path}:{name}: not a CIFAR-10 batch ({exc})") from None
            pixels.append(data.transpose(0, 2, 3, 1))
            labels.extend(batch_labels)
            self.items.extend(SourceItem(f"{name}/{f}", y) for f, y in zip(files, batch_labels))
        self.class_names = list(CIFAR10_CLASSES)
        self._pixels = np.concatenate(pixels)
        self._index = {item.path: i for i, item in enumerate(self.items)}

    def read(self, item: SourceItem) -> RawImage:
        return RawImage(pixels=self._pixels[self._index[item.path]])


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
