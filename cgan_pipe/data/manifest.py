"""The shard-set manifest: what shards exist, how they were made, what they hold."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..config import resolution_problem
from ..errors import DataError
from ..locations import is_url
from .bucket import ObjectMissing, read_bytes

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    """One complete shard: its tar, its DALI index, and what it holds."""

    tar: str
    index: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Everything a loader or a rerun needs to know about a shard set.

    A shard that is not listed here does not exist.
    """

    created_by: str  # "prepare" or "export"
    source: str  # what the samples were made from
    settings: dict[str, Any]  # the settings that made the shards (compared on rerun)
    resolution: int
    image_format: str  # "jpeg" | "png" | "webp", or "keep" for a mix of them (see images.shard_extensions)
    class_names: list[str]
    shards: list[ShardInfo]
    class_histogram: dict[str, int] = field(default_factory=dict)
    quality_histogram: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # inputs left out: {"source", "kind", "reason"}
    # Where every file of the source went: {"files", "kept", "skipped", "beyond_limit"}, with
    # kept + skipped + beyond_limit == files (empty in manifests of older versions and of export).
    inputs: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return sum(s.samples for s in self.shards)

    @property
    def labelled(self) -> bool:
        """Whether samples carry a `.cls` class id."""
        return bool(self.class_names)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into `directory` atomically (temp file + rename)."""
    path = directory / MANIFEST_NAME
    data = asdict(manifest)
    data["num_samples"] = manifest.num_samples
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


def read_manifest(directory: Path) -> Manifest:
    """Read and check the manifest of a shard set; DataError naming the file when it is unusable."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(
            f"{path}: no manifest, so {directory} is not a complete shard set "
            f"(make one with `cgan-pipe prepare SOURCE {directory}`)"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    manifest = parse_manifest(text, str(path))
    for shard in manifest.shards:
        for name in (shard.tar, shard.index):
            if not (path.parent / name).is_file():
                raise DataError(f"{path}: lists {name!r}, which is missing from {directory}")
    return manifest


def read_remote_manifest(url: str) -> Manifest:
    """Read and check the manifest of a shard set at a URL (s3://, https://, ...); DataError naming the URL
    when it cannot be read."""
    where = f"{url}/{MANIFEST_NAME}"
    try:
        text = read_bytes(where).decode("utf-8")
    except ObjectMissing:
        raise DataError(f"{where}: no manifest, so {url} is not a complete shard set (make one with "
                        f"`cgan-pipe prepare SOURCE {url}`)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: unreadable manifest ({exc})") from None
    return parse_manifest(text, where)


def parse_manifest(text: str, where: str) -> Manifest:
    """The Manifest in `text` (read from `where`), checked; DataError naming `where` when unusable."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: malformed manifest (expected a JSON object)")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where}: manifest format {data.get('format_version')!r} is not {FORMAT_VERSION}")
    data.pop("num_samples", None)
    _check_fields(data, _MANIFEST_FIELDS, where, "manifest")
    for shard in data["shards"]:
        _check_fields(shard, _SHARD_FIELDS, where, "shard entry")
    try:
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        manifest = Manifest(**data)
    except TypeError as exc:  # a missing or unknown field
        raise DataError(f"{where}: malformed manifest ({exc})") from None
    for shard in manifest.shards:
        for name in (shard.tar, shard.index):
            if "/" in name or name.startswith("."):
                raise DataError(f"{where}: lists {name!r}, which is not a file name in the shard folder")
    if resolution_problem(manifest.resolution):
        raise DataError(f"{where}: resolution {manifest.resolution} is not a power of two between 8 and 1024, as "
                        f"every shard set cgan-pipe writes has; prepare the shards again (data.resolution)")
    return manifest


# The JSON type of each field (bool is not taken for int), and what every item of a list or dict holds.
_MANIFEST_FIELDS = {"created_by": (str, None), "source": (str, None), "settings": (dict, None),
                    "resolution": (int, None), "image_format": (str, None), "class_names": (list, str),
                    "shards": (list, dict), "class_histogram": (dict, int), "quality_histogram": (dict, int),
                    "skipped": (list, dict), "inputs": (dict, int), "format_version": (int, None)}
_SHARD_FIELDS = {"tar": (str, None), "index": (str, None), "samples": (int, None), "bytes": (int, None),
                 "sha256": (str, None)}


def _check_fields(data: Any, fields: dict[str, tuple[type, type | None]], where: str, what: str) -> None:
    """DataError naming `where` unless `data` is a JSON object whose known fields have their types."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: malformed manifest ({what} is not a JSON object)")
    for name, (kind, item) in fields.items():
        if name not in data:
            continue  # missing required fields are reported when the object is built
        value = data[name]
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        wrong = not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0))
        if wrong or (item is not None and any(not isinstance(v, item) or isinstance(v, bool) for v in items)):
            raise DataError(f"{where}: malformed manifest ({what} field {name!r} is not a valid "
                            f"{kind.__name__}{f' of {item.__name__}' if item else ''}: {value!r:.80})")


@dataclass(frozen=True)
class IndexEntry:
    """One file of a sample as a DALI index lists it: where its bytes are in the tar."""

    ext: str
    offset: int
    size: int
    name: str


def parse_dali_index(path: Path | str, text: str | None = None) -> list[list[IndexEntry]]:
    """The samples of a DALI v1.2 index file (read from `path`, or given as `text` read from there), each
    as the list of its files; DataError naming the line that is not one."""
    samples = []
    for number, line in enumerate((Path(path).read_text() if text is None else text).splitlines()[1:], start=2):
        fields = line.split()
        try:
            files = [IndexEntry(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                     for i in range(0, len(fields) - 3, 4)]
        except ValueError:
            files = None
        if files is None or len(fields) % 4 or any(f.offset < 0 or f.size < 0 for f in files):
            raise DataError(f"{path}:{number}: not a DALI index line (ext offset size name, per file): {line!r:.80}")
        samples.append(files)
    return samples


def read_dali_index(where: Path | str, name: str) -> list[list[IndexEntry]]:
    """The samples of the index file `name` of the shard set at `where` (a folder, or a URL read whole)."""
    if is_url(where):
        url = f"{where}/{name}"
        return parse_dali_index(url, read_bytes(url).decode(errors="replace"))
    return parse_dali_index(Path(where) / name)


def shard_set_manifest(shards: Path | str) -> Manifest:
    """The checked manifest of the shard set in a folder or at a URL."""
    return read_remote_manifest(str(shards).rstrip("/")) if is_url(shards) else read_manifest(Path(shards))
