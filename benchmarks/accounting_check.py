"""Check a prepared shard set against its source, file by file: every file is a sample or a skipped
entry (never both, never neither), and every file Pillow decodes on its own is a sample.

    cgan-pipe prepare SOURCE OUT --format png
    python benchmarks/accounting_check.py SOURCE OUT

SOURCE is an image folder or a tar of one. The oracle is Pillow alone: Image.open + load in this
process, within prepare's pixel limit (data.max_pixels, 64,000,000 by default). Prints a JSON report;
exits 1 when a file is lost or a decodable image is not kept.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

MAX_PIXELS = 64_000_000


def source_files(source: Path) -> Iterator[tuple[str, bytes | None]]:
    """(path as prepare records it, bytes or None for a link or device) of every file of the source."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_symlink() or not path.is_dir():
                regular = path.is_file() and not path.is_symlink()
                yield path.relative_to(source).as_posix(), path.read_bytes() if regular else None
        return
    with tarfile.open(source) as tar:
        for member in tar:
            if not member.isdir():
                yield member.name, tar.extractfile(member).read() if member.isfile() else None


def pillow_decodes(data: bytes | None) -> bool:
    """The oracle: Pillow opens and fully decodes the bytes, within the pixel limit."""
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            if not 0 < image.width * image.height <= MAX_PIXELS:
                return False
            image.load()
        return True
    except Exception:  # noqa: BLE001  whatever Pillow raises for bytes it cannot decode
        return False


def kept_sources(shards: Path) -> set[str]:
    """The source path of every sample in a shard set, from the samples' .json."""
    kept = set()
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    kept.add(json.loads(tar.extractfile(member).read())["source"])
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("shards", type=Path)
    args = parser.parse_args()
    Image.init()  # every plugin, in Pillow's order, as prepare has them
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    warnings.simplefilter("ignore")
    manifest = json.loads((args.shards / "manifest.json").read_text())
    skipped = {entry["source"]: entry for entry in manifest["skipped"]}
    kept = kept_sources(args.shards)
    files, decodable = set(), set()
    for path, data in source_files(args.source):
        files.add(path)
        if pillow_decodes(data):
            decodable.add(path)
    report = {
        "files": len(files), "pillow_decodes": len(decodable), "kept": len(kept), "skipped": len(skipped),
        "manifest_inputs": manifest.get("inputs"),
        "skipped_by_kind": dict(Counter(e.get("kind", e["reason"]) for e in skipped.values()).most_common()),
        "lost (neither kept nor skipped)": sorted(files - kept - set(skipped)),
        "both kept and skipped": sorted(kept & set(skipped)),
        "decodable but not kept": {p: skipped.get(p, {}).get("reason") for p in sorted(decodable - kept)},
        "kept but not decodable": sorted(kept - decodable),
    }
    print(json.dumps(report, indent=2))
    failed = report["lost (neither kept nor skipped)"] or report["decodable but not kept"] or \
        report["both kept and skipped"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
