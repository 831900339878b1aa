"""What a path or URL argument names: a local path, or a shard set's URL (s3://bucket/prefix, ...) checked
for the command that takes it, so that a URL never silently becomes a local path."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

READ_SCHEMES = ("s3", "gs", "http", "https")  # shard sets read through fsspec (gs:// needs gcsfs; untested)
WRITE_SCHEMES = ("s3",)  # where prepare and generate write
# A scheme of two letters or more (so not a drive letter, C:/), then ':/': also catches s3:/x, a URL whose // was lost
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
# S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_url(location: Path | str) -> bool:
    """Whether `location` names a place by URL (s3://, https://, ...) rather than a local path."""
    return _SCHEME.match(str(location)) is not None and not str(location).startswith("file:")


def refused_url(text: str | Path) -> str | None:
    """Why `text` cannot be given where a local path is taken (it is a URL), or None when it can."""
    if not is_url(text):
        return None
    return (f"{text} is a URL; this takes a local path only (shard sets can be read from and written to s3:// "
            f"buckets, see docs/own-data.md)")


def local_path(text: str | Path, what: str) -> Path:
    """`text` as a local path; ConfigError (exit 2) when it is a URL, which `what` (a command's argument or a
    config key) cannot take, rather than a folder named after the URL."""
    refusal = refused_url(text)
    if refusal:
        raise ConfigError(f"{what}: {refusal}")
    return Path(text)


def location(text: str | Path, what: str, write: bool = False) -> Path | str:
    """A local folder (Path) or a checked URL (str, no trailing slash) that `what` can read, or write with
    `write`; ConfigError (exit 2) for a malformed URL or a scheme `what` does not support."""
    if not is_url(text):
        return Path(text)
    text = str(text)
    scheme = _SCHEME.match(text).group(1).lower()
    schemes = WRITE_SCHEMES if write else READ_SCHEMES
    if scheme not in schemes:
        raise ConfigError(f"{what}: {text}: {scheme}:// is not supported here; use a local folder or "
                          f"{' or '.join(s + '://' for s in schemes)}")
    if not text.startswith(f"{scheme}://") or not text[len(scheme) + 3:].split("/")[0]:
        raise ConfigError(f"{what}: {text} is not a URL of the form {scheme}://BUCKET/PREFIX")
    if scheme in ("s3", "gs"):
        bucket = text.split("/")[2]
        if not _BUCKET.match(bucket):
            raise ConfigError(f"{what}: {text}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, "
                              f"dots and hyphens, starting and ending with a letter or digit)")
    return text.rstrip("/")


def join(base: Path | str, name: str) -> Path | str:
    """`name` inside the folder or URL `base`."""
    return f"{base}/{name}" if isinstance(base, str) else Path(base) / name
