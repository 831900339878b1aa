"""Pack what a first GPU contact carries into folders of the repo, one per device call, each small enough
to travel with the tracked tree (docs/gpu.md, "A first contact with a lent GPU").

    python benchmarks/first_contact_pack.py [--python 3.12] [--data TAR] [--call-mib 60] [--out .first-contact]

Call A's folder holds the small packages (webdataset, braceexpand), the gzipped data tar and the first piece
of the DALI set; calls B and C hold the rest of it. The DALI set (DALI, nvImageCodec, nvJPEG and the small
packages DALI imports) is taken from this interpreter's installed distributions, keeping only the target
Python's extension modules and dropping headers and bytecode, then tar'd and xz-compressed into one stream
that is split at the call boundaries. A distribution installed here without the target Python's build
(optree, for a 3.12 target from a 3.11 machine) comes from a wheel in --wheels, or pip downloads one.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cgan_pipe.data.digest import file_sha256

ROOT = Path(__file__).resolve().parents[1]
SMALL_SET = ("webdataset", "braceexpand")
# what `import nvidia.dali` and its PyTorch plugin load (six and packaging are on the device image already)
DALI_SET = ("nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "astunparse", "gast", "optree")
CALLS = ("a", "b", "c")
MANIFEST = "manifest.json"
EXTENSION = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$|\.abi3\.so$")


@dataclass(frozen=True)
class Member:
    """One file of a packed set: its path under site-packages and where its bytes come from."""

    path: str
    read: object  # () -> bytes


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels with every call: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed
               if name and (root / name.decode()).is_file() and not (root / name.decode()).is_symlink())


def keep(path: str, python_tag: str) -> bool:
    """Whether a site-packages file belongs in the pack for CPython `python_tag` (e.g. '312')."""
    if "__pycache__" in path or path.endswith((".pyc", ".h", ".hpp", ".cuh")) or "/include/" in f"/{path}":
        return False
    if path.startswith("..") or path.startswith("/"):  # scripts installed outside site-packages
        return False
    extension = EXTENSION.search(path)
    return extension is None or extension.group(1) in (None, python_tag)


def _compiled_for_others_only(paths: list[str], python_tag: str) -> bool:
    tags = {m.group(1) for m in map(EXTENSION.search, paths) if m and m.group(1)}
    return bool(tags) and python_tag not in tags


def installed_members(name: str, python_tag: str) -> list[Member] | None:
    """The files of installed distribution `name` for `python_tag`; None where it is compiled here for other
    Pythons only."""
    dist = importlib.metadata.distribution(name)
    paths = [str(f) for f in dist.files or []]
    if _compiled_for_others_only(paths, python_tag):
        return None
    base = Path(dist.locate_file(""))
    return [Member(p, (lambda p=p: (base / p).read_bytes())) for p in paths
            if keep(p, python_tag) and (base / p).is_file()]


def wheel_members(wheel: Path, python_tag: str) -> list[Member]:
    """The files of a wheel for `python_tag`."""
    archive = zipfile.ZipFile(wheel)
    return [Member(n, (lambda n=n: archive.read(n))) for n in archive.namelist()
            if not n.endswith("/") and keep(n, python_tag)]


def find_wheel(name: str, wheels: Path | None, python: str, cache: Path) -> Path:
    """A wheel of `name` for CPython `python` (x86-64 Linux): from `wheels`, else downloaded into `cache`."""
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for folder in (wheels, cache):
        if folder and folder.is_dir():
            for wheel in sorted(folder.glob("*.whl")):
                if wheel.name.lower().startswith(f"{stem}-") and f"cp{python.replace('.', '')}" in wheel.name:
                    return wheel
    cache.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (28, 27, 17)] + ["--platform=manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", f"--python-version={python}", "--implementation=cp", *platforms,
               "-d", str(cache), name]
    if subprocess.run(command).returncode != 0:
        sys.exit(f"first_contact_pack: no {name} built for CPython {python} is installed here and pip could not "
                 f"download one; put its wheel in --wheels DIR")
    return find_wheel(name, None, python, cache)


def members(names: tuple[str, ...], python: str, wheels: Path | None, cache: Path) -> list[Member]:
    """Every file of distributions `names` for CPython `python`."""
    tag = python.replace(".", "")
    found = []
    for name in names:
        try:
            installed = installed_members(name, tag)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        found += installed if installed is not None else wheel_members(find_wheel(name, wheels, python, cache), tag)
    return found


# `nvidia` spans the carried packages and the interpreter's own (torch's CUDA libraries): as a pkgutil-style
# namespace it finds both, whichever of them comes first on sys.path and whether or not the other has an __init__
NAMESPACE = b"__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


def namespaced(files: list[Member]) -> list[Member]:
    """`files` with each copy of `nvidia/__init__.py` replaced by one pkgutil-style namespace `__init__`."""
    rest = [member for member in files if member.path != "nvidia/__init__.py"]
    return rest + ([Member("nvidia/__init__.py", lambda: NAMESPACE)] if len(rest) < len(files) else [])


def tar_xz(files: list[Member], target: Path) -> None:
    """`files` as one xz-compressed tar at `target` (xz's own threads where the command exists)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as temp:
        plain = Path(temp) / "pack.tar"
        with tarfile.open(plain, "w") as tar:
            for member in files:
                data = member.read()
                info = tarfile.TarInfo(member.path)
                info.size, info.mode, info.mtime = len(data), 0o755 if member.path.endswith(".so") else 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        if shutil.which("xz"):
            subprocess.run(["xz", "-6", "-T0", "-k", str(plain)], check=True)
            Path(f"{plain}.xz").replace(target)
        else:
            import lzma

            with open(plain, "rb") as source, lzma.open(target, "wb", preset=6) as sink:
                shutil.copyfileobj(source, sink, 1 << 20)


def pack(out: Path, data: Path, python: str, call_bytes: int, wheels: Path | None = None) -> dict:
    """Fill out/call-a, call-b, call-c (replacing them) and return the manifest written into each."""
    out.mkdir(parents=True, exist_ok=True)
    tree = tree_bytes()
    room = call_bytes - tree
    staging = out / ".packing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    cache = out / "wheels" / python
    tar_xz(members(SMALL_SET, python, wheels, cache), staging / "site.tar.xz")
    with open(data, "rb") as source, gzip.open(staging / "data.tar.gz", "wb", compresslevel=9) as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    first_room = room - (staging / "site.tar.xz").stat().st_size - (staging / "data.tar.gz").stat().st_size - 4096
    if first_room <= 0:
        sys.exit(f"first_contact_pack: the tree ({tree / 2**20:.1f} MiB), the small packages and the data "
                 f"leave no room in a call of {call_bytes / 2**20:.0f} MiB; raise --call-mib")
    dali = staging / "dali.tar.xz"
    tar_xz(namespaced(members(DALI_SET, python, wheels, cache)), dali)
    bounds, size = [], dali.stat().st_size
    start = 0
    for index, _ in enumerate(CALLS):
        end = min(size, start + (first_room if index == 0 else room - 4096))
        bounds.append((start, end))
        start = end
    if start < size:
        sys.exit(f"first_contact_pack: the DALI set is {size / 2**20:.1f} MiB, more than three calls of "
                 f"{call_bytes / 2**20:.0f} MiB carry beside a {tree / 2**20:.1f} MiB tree")
    manifest = {"python": python, "call_bytes": call_bytes, "tree_bytes": tree,
                "dali": {"sha256": file_sha256(dali), "bytes": size,
                         "pieces": [f"call-{call}/dali.tar.xz.{index:02d}" for index, call in enumerate(CALLS)]},
                "site": "call-a/site.tar.xz", "data": "call-a/data.tar.gz"}
    folders = {call: staging / f"call-{call}" for call in CALLS}
    for call, folder in folders.items():
        folder.mkdir()
    (staging / "site.tar.xz").replace(folders["a"] / "site.tar.xz")
    (staging / "data.tar.gz").replace(folders["a"] / "data.tar.gz")
    with open(dali, "rb") as whole:
        for index, (call, (start, end)) in enumerate(zip(CALLS, bounds)):
            whole.seek(start)
            (folders[call] / f"dali.tar.xz.{index:02d}").write_bytes(whole.read(end - start))
    dali.unlink()
    for call, folder in folders.items():
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out / f"call-{call}", ignore_errors=True)
        folder.replace(out / f"call-{call}")
    staging.rmdir()
    return manifest


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    """Parse the arguments, pack, print each call's size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the device interpreter's version [3.12]")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "test.tar",
                        help="the image tar phase A prepares shards from [../shared/data/cifar10/test.tar]")
    parser.add_argument("--call-mib", type=float, default=60, help="MiB one call may carry, tree included [60]")
    parser.add_argument("--wheels", type=Path, default=None, help="wheels to use before downloading any")
    parser.add_argument("--out", type=Path, default=ROOT / ".first-contact")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"first_contact_pack: {args.data} is not a file; give the image tar with --data")
    manifest = pack(args.out.resolve(), args.data, args.python, int(args.call_mib * 2**20), args.wheels)
    for call in CALLS:
        size = folder_bytes(args.out / f"call-{call}") + manifest["tree_bytes"]
        print(f"call {call.upper()}: carry {args.out / f'call-{call}'}: {size / 2**20:.1f} MiB with the tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
