"""Content hashes of a stage's inputs (a raw source, a shard set), so that a rerun can tell changed inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import write_text_atomic
from .digest import file_identity, file_sha256
from .manifest import Manifest
from .sources import DOWNLOAD_PREFIX, LIST_SUFFIXES

log = logging.getLogger(__name__)
FINGERPRINTS = "fingerprints"  # in the cache folder: one JSON per source, each file's hash by its identity


def source_fingerprint(spec: str, cache_dir: Path) -> str | None:
    """sha256 over the bytes of every file the raw source `spec` is read from, each with its path
    relative to the source: a folder's files (hidden ones aside), a list file and the files it
    names, or a single archive. None when `spec` does not exist. Each file's hash is remembered
    in `cache_dir` by its size, times and inode, so an unchanged source is read only once;
    a 'download:' source is named by its spec alone (the download is checked on its own)."""
    if spec.startswith(DOWNLOAD_PREFIX):
        return hashlib.sha256(spec.encode()).hexdigest()
    root = Path(spec).expanduser()
    if root.is_dir():
        names = list(_files_under(root))
    elif root.is_file():
        names = [root.name] + (_listed_files(root) if root.suffix.lower() in LIST_SUFFIXES else [])
        root = root.parent
    else:
        return None
    digests = _file_hashes(root, names, cache_dir / FINGERPRINTS / f"{_key(root.resolve())}.json")
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def shard_set_fingerprint(manifest: Manifest) -> str:
    """sha256 of a shard set's contents as its manifest records them: each shard's name and sha256,
    and the class names (the loader checks that the shard files still match those sums)."""
    record = [[shard.tar, shard.sha256] for shard in manifest.shards] + [list(manifest.class_names)]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def _files_under(root: Path):
    """Relative '/'-separated paths of the regular files under `root`, hidden files and folders left out."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        rel = Path(folder).relative_to(root).as_posix()
        for name in files:
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)):
                yield name if rel == "." else f"{rel}/{name}"


def _listed_files(list_file: Path) -> list[str]:
    """The existing files a list file names, relative to its folder (unreadable lists: none)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    listed = (line.strip() for line in lines)
    return [name for name in listed if name and not name.startswith("#") and (list_file.parent / name).is_file()]


def _file_hashes(root: Path, names: list[str], record: Path) -> dict[str, str]:
    """{name: sha256} of the files `names` under `root`, reusing the hashes in `record` of files whose
    size, times and inode are unchanged (`digest.file_identity`), and storing the new ones there."""
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    stats = {name: file_identity(root / name) for name in names}
    todo = [name for name in names if known.get(name, [None])[:-1] != stats[name]]
    log.info(f"{root}: content hash of {len(names)} files, {len(todo)} read now, the rest unchanged since hashed")
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib hashes without the GIL
        for name, digest in zip(todo, pool.map(lambda name: file_sha256(root / name), todo)):
            known[name] = [*stats[name], digest]
    if todo:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps({name: known[name] for name in names}))
        except OSError:
            pass  # a read-only cache: hash again next time
    return {name: known[name][-1] for name in names}


def _key(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:20]
