"""Raw inputs (image folder, tar of one, CIFAR-10 python archive) -> labelled image items."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import posixpath
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from ..atomic import TEMP_MARK
from ..errors import DataError
from ..images import EXTENSIONS
from .inputs import (CANNOT_READ, MISSING, NO_IMAGE, NOT_A_FILE, UNSAFE_PATH, count_by_kind, counts_text,
                     left_out, triage)
from .listing import Listing, ListingWriter, SourceItem, listing_base
from .manifest import MANIFEST_NAME, parse_dali_index, read_manifest
from .tars import compression_of, decompress_to, iter_members, read_span

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
DOWNLOAD_PREFIX = "download:"
LIST_SUFFIXES = (".txt", ".lst", ".list")
DECOMPRESSED_PREFIX = ".source-"  # a compressed tar source, decompressed beside the shards while prepare runs
IMAGE_EXTENSIONS = set(EXTENSIONS.values())  # image members of a shard set


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

    Use as a context manager. `items` is a Listing on disk, in a stable order
    (archive order, sorted folder walk, list-file order, ...), written into
    `scratch_dir` (a temporary folder when None); `class_names[label]` names
    each label (empty for unlabelled sources). Every file of the source is
    either an item or in `rejected`, with the reason it is left out.
    """

    description: str
    class_names: list[str]
    items: Listing
    reader: ItemReader
    rejected: list[dict[str, str]]  # inputs left out before reading (see inputs.left_out)

    def __init__(self, scratch_dir: Path | None):
        self._temp_dir = tempfile.TemporaryDirectory(prefix="cgan-pipe-") if scratch_dir is None else None
        self.scratch_dir = Path(self._temp_dir.name) if self._temp_dir else Path(scratch_dir)
        self.rejected = []
        self.items = None

    @property
    def files(self) -> int:
        """Files (archive members, listed paths, samples) in the source: items and rejected ones."""
        return len(self.items) + len(self.rejected)

    def read(self, item: SourceItem) -> RawImage:
        """Return the raw image of `item`."""
        return self.reader.read(item)

    def close(self) -> None:
        """Delete the listing and any temporary files."""
        if self.items is not None:
            self.items.remove()
        if self._temp_dir is not None:
            self._temp_dir.cleanup()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _no_images(self, where: Path, what: str) -> DataError:
        """The error for a source with no image in it, closed: what its files are instead."""
        self.close()
        example = f"; e.g. {self.rejected[0]['source']}: {self.rejected[0]['reason']}" if self.rejected else ""
        kinds = counts_text(count_by_kind(self.rejected)) or "none"
        return DataError(f"{where}: no images among its {len(self.rejected)} {what} ({kinds}{example}); "
                         f"docs/own-data.md says what prepare reads")

    def _write_listing(self, entries: Iterable[tuple[str, int | None, tuple[int, int] | None]], *,
                       by_folder: bool, find_duplicates: bool = False,
                       class_names: list[str] | None = None) -> None:
        """List (path, label, span) entries. With `by_folder`, labels are ignored and come from the
        image-folder layout of the paths instead (see label_folders)."""
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        writer = ListingWriter(listing_base(self.scratch_dir), find_duplicates)
        folders: dict[str, int] = {}  # folder -> group id (by_folder), else label -> group id
        try:
            for path, label, span in entries:
                key = path.rpartition("/")[0] if by_folder else label
                writer.add(path, folders.setdefault(key, len(folders)), span)
            if by_folder:
                self.class_names, labels = label_folders(list(folders))
                self.items = writer.finish([labels[f] for f in folders])
            else:
                self.class_names = list(class_names or [])
                self.items = writer.finish(list(folders))
        except BaseException:
            writer.abandon()
            raise


def open_source(spec: str, split: str = "train", download_dir: str = "~/.cache/cgan-pipe",
                scratch_dir: Path | None = None) -> Source:
    """Open the raw image source named by `spec` (a path, or 'download:cifar10').

    A compressed tar is first decompressed once into `scratch_dir` (a temporary
    folder when None), since reading members of a gzip stream in shuffled order
    would decompress it again and again. Raises DataError naming the path when
    it is missing or of an unknown kind.
    """
    if spec.startswith(DOWNLOAD_PREFIX):
        return _download(spec[len(DOWNLOAD_PREFIX):], split, Path(download_dir).expanduser(), scratch_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {spec!r} does not exist. Give an image folder, a tar of one or the "
            f"CIFAR-10 python archive (data.source or --set data.source=PATH), or "
            f"'download:cifar10' to fetch CIFAR-10 with torchvision."
        )
    if path.is_dir():
        if (path / "batches.meta").exists():
            return CifarPythonSource(path, split, scratch_dir)
        if (path / MANIFEST_NAME).exists():
            return ShardSetSource(path, scratch_dir)
        return FolderSource(path, scratch_dir)
    if path.suffix.lower() in LIST_SUFFIXES:
        return ListSource(path, scratch_dir)
    if _is_cifar_archive(path):
        return CifarPythonSource(path, split, scratch_dir)
    if tarfile.is_tarfile(path):
        return TarSource(path, scratch_dir)
    raise DataError(f"data source {spec!r} is neither a folder, a tar archive, a list file "
                    f"({', '.join(LIST_SUFFIXES)}) nor a CIFAR-10 archive")


def label_folders(folders: list[str]) -> tuple[list[str], dict[str, int | None]]:
    """Class names, and the class id of each folder, from an image-folder layout.

    The folder directly below the folders' common root names the class; class
    ids follow the sorted class names. Images all at the root are unlabelled
    (None). A leading './' is ignored.
    """
    norms = {folder: posixpath.normpath(folder) for folder in folders}
    root = posixpath.commonpath(list(norms.values())) if norms else ""
    class_of: dict[str, str | None] = {}
    for folder, norm in norms.items():
        rel = norm if not root else "" if norm == root else norm[len(root) + 1:]
        class_of[folder] = rel.split("/", 1)[0] if rel not in ("", ".") else None
    named = sorted({name for name in class_of.values() if name is not None})
    if not named:
        return [], dict.fromkeys(folders)
    if None in class_of.values():
        raise DataError(
            f"images are both at the top of {root or 'the source'!r} and in class folders "
            f"(e.g. {named[0]!r}); put every image in a class folder, or none"
        )
    ids = {name: i for i, name in enumerate(named)}
    return named, {folder: ids[name] for folder, name in class_of.items()}


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
    """An image-folder tree on disk: ROOT/<class>/<image>, walked in sorted order. Every file under
    it is judged by inputs.triage; links to folders are not followed (and are reported)."""

    def __init__(self, root: Path, scratch_dir: Path | None = None):
        super().__init__(scratch_dir)
        self.reader = FileReader(root)
        self.description = f"image folder {root}"
        self._write_listing(((path, None, None) for path in self._images(root)), by_folder=True)
        if not len(self.items):
            raise self._no_images(root, "files")

    def _images(self, root: Path) -> Iterator[str]:
        """Paths (relative, '/'-separated) of the files under `root` that triage takes, folders and files
        in sorted order; every other entry is rejected with its reason."""
        pending = [""]
        while pending:
            rel = pending.pop()
            try:
                with os.scandir(root / rel) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as exc:
                self.rejected.append(left_out(rel or ".", CANNOT_READ, f"cannot list the folder ({exc.strerror})"))
                continue
            folders = []
            for entry in entries:
                path = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(path)
                        continue
                    verdict = self._judge(entry, path)
                except OSError as exc:  # gone or unreadable since the folder was listed
                    verdict = left_out(path, CANNOT_READ, exc.strerror or str(exc))
                if verdict is None:
                    yield path
                else:
                    self.rejected.append(verdict)
            pending.extend(reversed(folders))  # depth first, in sorted order

    @staticmethod
    def _judge(entry: os.DirEntry, path: str) -> dict[str, str] | None:
        """None for a file to read as an image, else its record of being left out."""
        if entry.is_dir():
            return left_out(path, NOT_A_FILE, "a link to a folder (not followed)")
        if not entry.is_file():
            return left_out(path, NOT_A_FILE, "a broken link" if entry.is_symlink() else "a device, pipe or socket")
        return triage(path, entry.stat().st_size, functools.partial(_read_head, entry.path))


def _read_head(path: str, size: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


class ListSource(Source):
    """A text file naming one image path per line (relative to the file's folder; '#' comments),
    listed in file order; a path listed again is skipped. Classes come from the
    image-folder layout of the listed paths, as for a folder. Each listed file is judged
    by inputs.triage."""

    def __init__(self, path: Path, scratch_dir: Path | None = None):
        super().__init__(scratch_dir)
        self.description = f"list file {path}"
        self.reader = FileReader(path.parent)
        try:
            with open(path, encoding="utf-8") as handle:
                self._write_listing(self._existing(handle, path.parent), by_folder=True, find_duplicates=True)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read list file ({exc})") from None
        if not len(self.items):
            raise self._no_images(path, "listed paths")

    def _existing(self, lines: Iterable[str], root: Path) -> Iterator[tuple[str, None, None]]:
        for line in lines:
            listed = line.strip()
            if not listed or listed.startswith("#"):
                continue
            target = root / listed
            if not target.exists():
                self.rejected.append(left_out(listed, MISSING))
            elif not target.is_file():
                what = "a folder" if target.is_dir() else "a device, pipe or socket"
                self.rejected.append(left_out(listed, NOT_A_FILE, what))
            else:
                verdict = triage(listed, target.stat().st_size, functools.partial(_read_head, str(target)))
                if verdict is None:
                    yield listed, None, None
                else:
                    self.rejected.append(verdict)


class ShardSetSource(Source):
    """An existing shard set (made by prepare or export), to re-shard or re-encode.

    Samples keep their class ids; each is read through its shard's DALI index.
    """

    def __init__(self, path: Path, scratch_dir: Path | None = None):
        super().__init__(scratch_dir)
        self.description = f"shard set {path}"
        self.reader = ShardSpanReader(path)
        manifest = read_manifest(path)
        self._write_listing(self._samples(path, manifest.shards, list(manifest.class_names)), by_folder=False,
                            class_names=list(manifest.class_names))

    def _samples(self, path: Path, shards: list, class_names: list[str]
                 ) -> Iterator[tuple[str, int | None, tuple[int, int]]]:
        for shard in shards:
            tar = path / shard.tar
            with open(tar, "rb") as handle:
                for files in parse_dali_index(path / shard.index):
                    image = next((f for f in files if f.ext in IMAGE_EXTENSIONS), None)
                    cls = next((f for f in files if f.ext == "cls"), None)
                    if image is None:
                        names = ", ".join(f.name for f in files)
                        self.rejected.append(left_out(f"{shard.tar}/{names}", NO_IMAGE))
                        continue
                    label = None
                    if cls is not None and class_names:
                        handle.seek(cls.offset)
                        raw = handle.read(cls.size)
                        if not raw.strip().isdigit() or int(raw) >= len(class_names):
                            raise DataError(f"{tar}: {cls.name} holds {raw!r}, not a class id; "
                                            f"run `cgan-pipe verify {path}`")
                        label = int(raw)
                    yield f"{shard.tar}/{image.name}", label, (image.offset, image.size)


class TarSource(Source):
    """A tar (optionally gzip/bz2/xz) of an image-folder tree, read in place, never extracted.

    A compressed tar is decompressed once into the scratch folder (kept there,
    so a resumed prepare does not redo it; prepare removes it when done).
    """

    def __init__(self, path: Path, scratch_dir: Path | None = None):
        super().__init__(scratch_dir)
        self.path = path
        self.description = f"tar archive {path}"
        archive = path
        if compression_of(path):
            archive = self.scratch_dir / decompressed_name(path)
            if not archive.exists():
                archive.parent.mkdir(parents=True, exist_ok=True)
                decompress_to(path, archive)
        self.reader = SpanReader(archive)
        self._write_listing(self._usable_members(archive), by_folder=True, find_duplicates=True)
        if not len(self.items):
            raise self._no_images(path, "members")

    def _usable_members(self, archive: Path) -> Iterator[tuple[str, None, tuple[int, int]]]:
        """Members that inputs.triage takes; unsafe names and links are left out and reported (and could
        never be written anywhere: members are only read, by offset). Repeated names are flagged in the
        listing."""
        fd = os.open(archive, os.O_RDONLY)
        try:
            for m in iter_members(archive):
                if m.is_dir:
                    continue
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    self.rejected.append(left_out(m.name, UNSAFE_PATH, "absolute, or with '..'"))
                elif not m.is_file:
                    self.rejected.append(left_out(m.name, NOT_A_FILE, "a link or device"))
                else:
                    verdict = triage(m.name, m.size, lambda n, m=m: os.pread(fd, min(n, m.size), m.offset))
                    if verdict is None:
                        yield m.name, None, (m.offset, m.size)
                    else:
                        self.rejected.append(verdict)
        finally:
            os.close(fd)


def is_decompressed_name(name: str) -> bool:
    """Whether `name` is that of a source `decompressed_name` made, or of its temp file (a killed run's)."""
    pattern = rf"\.?{re.escape(DECOMPRESSED_PREFIX)}[0-9a-f]{{12}}\.tar(?:{re.escape(TEMP_MARK)}\d+)?"
    return re.fullmatch(pattern, name) is not None


def decompressed_name(path: Path) -> str:
    """The file name a compressed tar is decompressed to: hidden, and tied to the archive's
    path, size and modification time so that a changed archive is decompressed afresh."""
    stat = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{DECOMPRESSED_PREFIX}{tag}.tar"  # (its temp name while written: '.' + this + a temp mark)


class CifarPythonSource(Source):
    """The official CIFAR-10 python archive (cifar-10-python.tar.gz) or its extracted folder."""

    def __init__(self, path: Path, split: str, scratch_dir: Path | None = None):
        super().__init__(scratch_dir)
        self.description = f"CIFAR-10 python archive {path} ({split})"
        self.reader = CifarReader(path, split)
        self._write_listing(_load_cifar(path, split)[0], by_folder=False, class_names=CIFAR10_CLASSES)

    def close(self) -> None:
        super().close()
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


def _download(name: str, split: str, root: Path, scratch_dir: Path | None) -> Source:
    if name != "cifar10":
        raise DataError(f"cannot download {name!r}: only 'download:cifar10' is supported")
    from torchvision.datasets import CIFAR10  # only needed here

    try:
        CIFAR10(root=str(root), train=split == "train", download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"downloading CIFAR-10 into {root} failed ({exc}); give a local path instead") from None
    return CifarPythonSource(root / "cifar-10-batches-py", split, scratch_dir)
