"""Shard sets in object storage (s3://bucket/prefix): whole-object reads checked against the manifest,
listings, uploads that appear whole or not at all (with their sha256 recorded), staging folders, and errors
that name the bucket and key and say what to do."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import default_cache_dir
from ..errors import ConfigError, DataError
from ..locations import is_url
from .digest import file_sha256

log = logging.getLogger(__name__)

SHA256_KEY = "sha256"  # the object metadata an upload records its content hash under
UPLOAD_THREADS = 8
SINGLE_PUT_BYTES = 64 * 2**20  # larger files are uploaded in parts (by s3fs), each part retried on its own
_clients: dict[tuple[Any, ...], Any] = {}  # (process, AWS settings, timeout, tries) -> botocore S3 client
_CLIENT_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")
_clients_lock = threading.Lock()


class ObjectMissing(DataError):
    """An object that is not in its bucket (the bucket itself exists)."""


def endpoint() -> str:
    """The S3 endpoint the clients use: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"


def timeouts() -> tuple[float, int]:
    """(seconds an S3 request may wait to connect, or for the next bytes of a reply; tries per request):
    $CGAN_PIPE_S3_TIMEOUT (default 30) and $CGAN_PIPE_S3_TRIES (default 3), so that a server that accepts
    connections and never answers fails a command within about their product, naming the endpoint."""
    try:
        seconds = float(os.environ.get("CGAN_PIPE_S3_TIMEOUT", 30))
        tries = int(os.environ.get("CGAN_PIPE_S3_TRIES", 3))
    except ValueError:
        raise ConfigError(f"CGAN_PIPE_S3_TIMEOUT ({os.environ.get('CGAN_PIPE_S3_TIMEOUT')!r}) must be seconds and "
                          f"CGAN_PIPE_S3_TRIES ({os.environ.get('CGAN_PIPE_S3_TRIES')!r}) a whole number") from None
    if seconds <= 0 or tries < 1:
        raise ConfigError("CGAN_PIPE_S3_TIMEOUT must be > 0 and CGAN_PIPE_S3_TRIES at least 1")
    return seconds, tries


def filesystem(url: str) -> Any:
    """The fsspec filesystem for `url`'s scheme (s3fs for s3://, with the standard AWS credential chain, and
    bounded waits and tries: `timeouts`; one per process and setting)."""
    import fsspec

    scheme = url.split(":", 1)[0]
    options: dict[str, Any] = {}
    if scheme == "s3":  # s3fs retries (with backoff) what botocore gave up on: one botocore attempt per try
        seconds, tries = timeouts()
        options = {"config_kwargs": {"connect_timeout": seconds, "read_timeout": seconds,
                                     "retries": {"total_max_attempts": 1}}}
    try:
        fs = fsspec.filesystem(scheme, **options)
    except ImportError as exc:
        package = {"s3": "s3fs", "gs": "gcsfs"}.get(scheme, f"an fsspec filesystem for {scheme}://")
        raise ConfigError(f"{url}: reading {scheme}:// needs {package} ({exc}); pip install {package}") from None
    if scheme == "s3":
        fs.retries = tries  # s3fs takes its tries per request from this attribute, not from an argument
    return fs


def _client() -> Any:
    """The botocore S3 client that reads and writes whole objects (one per process and settings): the standard
    AWS credential chain and endpoint settings, the waits and tries of `timeouts`. The body of an upload is
    not hashed again for the request's signature: the upload carries the sha256 it was written with as its
    checksum, which the server checks. (s3fs, used for listings and multipart uploads, costs twice the CPU
    per whole-object read or write, and asks for an object's size before each read.)"""
    seconds, tries = timeouts()
    key = (os.getpid(), *map(os.environ.get, _CLIENT_SETTINGS), seconds, tries)  # a forked process makes its own
    with _clients_lock:
        if key not in _clients:
            import botocore.session
            from botocore.config import Config

            config = Config(connect_timeout=seconds, read_timeout=seconds, max_pool_connections=4 * UPLOAD_THREADS,
                            retries={"total_max_attempts": tries, "mode": "standard"},
                            s3={"payload_signing_enabled": False}, request_checksum_calculation="when_required")
            _clients[key] = botocore.session.get_session().create_client("s3", config=config)
        return _clients[key]


def _s3(operation: str, **arguments: Any) -> Any:
    """`_client()`'s `operation`, its error answers turned into the Python errors s3fs gives for them (a
    missing bucket or key: FileNotFoundError; access denied: PermissionError), as `explained` expects."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    try:
        return getattr(_client(), operation)(**arguments)
    except ClientError as exc:
        raise translate_boto_error(exc) from exc


def _key(url: str) -> str:
    """The path fsspec takes for `url` (bucket/key for object stores, the URL itself for http)."""
    return url if url.startswith(("http://", "https://")) else url.split("://", 1)[1]


@contextlib.contextmanager
def explained(url: str, doing: str) -> Iterator[None]:
    """Turn a storage client's failure while `doing` something with `url` into a DataError that names the
    bucket or key and says what to do. The clients have already made their tries, with backoff (`timeouts`)."""
    bucket = url.split("/")[2] if "://" in url else url
    try:
        yield
    except FileNotFoundError as exc:
        if "bucket does not exist" in str(exc):
            raise DataError(f"{url}: no bucket {bucket!r} at {endpoint()}; create it (e.g. `aws s3 mb s3://{bucket}`), "
                            f"or check the name and AWS_ENDPOINT_URL") from None
        raise ObjectMissing(f"{url}: not found while {doing}") from None
    except PermissionError as exc:
        raise DataError(f"{url}: access denied while {doing} ({exc}); check the credentials (AWS_ACCESS_KEY_ID and "
                        f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials) and bucket {bucket!r}'s "
                        f"policy") from None
    except (OSError, ValueError, TimeoutError) as exc:
        raise DataError(f"{url}: failed while {doing} ({type(exc).__name__}: {exc}); {_check_server()}") from None
    except Exception as exc:  # noqa: BLE001  the clients' own families, which they let through
        if type(exc).__module__.split(".")[0] not in ("botocore", "urllib3", "aiohttp", "aiobotocore", "s3fs",
                                                      "fsspec"):
            raise
        hint = " (no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)" \
            if "Credentials" in type(exc).__name__ else ""
        raise DataError(f"{url}: failed while {doing} ({type(exc).__name__}: {exc}){hint}; {_check_server()}") \
            from None


def _check_server() -> str:
    seconds, tries = timeouts()
    return (f"check that the server at {endpoint()} is up and reachable (AWS_ENDPOINT_URL), then rerun (each "
            f"request had {tries} tries of up to {seconds:g} s without a reply: CGAN_PIPE_S3_TRIES, "
            f"CGAN_PIPE_S3_TIMEOUT)")


def read_bytes(url: str) -> bytes:
    """The whole object at `url`; DataError naming it when it cannot be read."""
    with explained(url, "reading it"):
        if not url.startswith("s3://"):
            return filesystem(url).cat_file(_key(url))
        bucket, _, key = _key(url).partition("/")
        body = _s3("get_object", Bucket=bucket, Key=key)["Body"]
        with contextlib.closing(body):
            return body.read()


def read_checked(url: str, size: int, sha256: str, where: str) -> bytes:
    """The object at `url`, which the manifest at `where` lists with `size` bytes and `sha256`; DataError
    when it is missing or its bytes are not those."""
    try:
        data = read_bytes(url)
    except ObjectMissing:
        raise DataError(f"{url}: listed in {where} but missing from the bucket; prepare the shard set "
                        f"again") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha256:
        raise DataError(f"{url}: its bytes are not those the manifest records ({len(data)} bytes, sha256 "
                        f"{digest[:12]}...; {where} says {size} bytes, {sha256[:12]}...); run `cgan-pipe "
                        f"verify` on the set, and prepare it again")
    return data


def object_sizes(url: str, recursive: bool = False) -> dict[str, int]:
    """The objects under the prefix `url` (directly under it, or at any depth with `recursive`), by name
    relative to it, with their sizes; empty when there are none."""
    with explained(url, "listing it"):
        fs = filesystem(url)
        fs.invalidate_cache(_key(url))  # what another process wrote since
        try:
            if recursive:
                entries = list(fs.find(_key(url), detail=True, withdirs=False).values())
            else:
                entries = [e for e in fs.ls(_key(url), detail=True, refresh=True) if e.get("type") == "file"]
        except FileNotFoundError as exc:
            if "bucket does not exist" in str(exc):
                raise
            return {}
    return {e["name"].removeprefix(_key(url) + "/"): e["size"] for e in entries}


class LocalFiles:
    """Local paths for the files of the shard set at `where`, by name: the files themselves in a folder; for a
    URL, copies downloaded on first request into `scratch` (see `local_copies`)."""

    def __init__(self, where: Path | str, scratch: Path | None):
        self.where, self.scratch = where, scratch

    def __call__(self, name: str) -> Path:
        if self.scratch is None:
            return Path(self.where) / name
        path = self.scratch / name
        if not path.exists():
            with explained(f"{self.where}/{name}", "downloading it"):
                filesystem(str(self.where)).get_file(_key(f"{self.where}/{name}"), str(path))
        return path

    def release(self, name: str) -> None:
        """Delete the downloaded copy of `name`, if any (never a file of a folder)."""
        if self.scratch is not None:
            (self.scratch / name).unlink(missing_ok=True)


@contextlib.contextmanager
def local_copies(where: Path | str) -> Iterator[LocalFiles]:
    """LocalFiles for the shard set at `where`; for a URL, the copies live in a temp folder removed on exit."""
    if not is_url(where):
        yield LocalFiles(where, None)
        return
    with tempfile.TemporaryDirectory(prefix="cgan-pipe-copies-") as folder:
        yield LocalFiles(where, Path(folder))


def check_objects(url: str, expected: dict[str, int], where: str) -> None:
    """DataError naming the first object of `expected` ({name: size}, listed by the manifest at `where`)
    that is missing under `url` or has another size."""
    found = object_sizes(url)
    for name, size in expected.items():
        if name not in found:
            raise DataError(f"{url}/{name}: listed in {where} but missing from the bucket; prepare the shard set "
                            f"again")
        if size is not None and found[name] != size:
            raise DataError(f"{url}/{name}: {found[name]} bytes where {where} says {size} (replaced or "
                            f"truncated); run `cgan-pipe verify {url}`, and prepare the shard set again")


def staging_dir(url: str) -> Path:
    """The local folder where a job writing to `url` builds its outputs before they are uploaded (and where a
    killed job's finished parts wait for its rerun)."""
    return default_cache_dir() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


def upload_file(path: Path, url: str, sha256: str | None = None) -> None:
    """Upload the file at `path` as the object `url`, recording its sha256 (`sha256`, or computed) with it;
    the object appears only once the upload completes."""
    digest = sha256 or file_sha256(path)
    with explained(url, "uploading it"):
        if path.stat().st_size > SINGLE_PUT_BYTES:
            filesystem(url).put_file(str(path), _key(url), Metadata={SHA256_KEY: digest})
        else:
            _put(url, path.read_bytes(), digest)


def write_object(url: str, data: bytes) -> None:
    """Store `data` as the object `url` (a small record; it appears whole or not at all)."""
    with explained(url, "writing it"):
        _put(url, data, hashlib.sha256(data).hexdigest())


def _put(url: str, data: bytes, sha256: str) -> None:
    """One PUT of the object `url`, its sha256 (hex) recorded in its metadata and sent as its checksum."""
    bucket, _, key = _key(url).partition("/")
    _s3("put_object", Bucket=bucket, Key=key, Body=data, Metadata={SHA256_KEY: sha256},
        ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode())


def delete_objects(url: str, names: list[str]) -> None:
    """Delete the objects `names` (relative to the prefix `url`) that exist."""
    if names:
        with explained(url, f"deleting {len(names)} objects from it"):
            filesystem(url).rm([f"{_key(url)}/{name}" for name in names])


def published(local: Path, url: str) -> None:
    """Remove the staging folder `local` once its files are all in the bucket at `url`."""
    log.info(f"{url}: complete; removing the local copy {local}")
    shutil.rmtree(local, ignore_errors=True)


def abort_unfinished_uploads(url: str, which: Callable[[str], bool]) -> None:
    """Abort the multipart uploads a killed writer left under `url` (their parts are invisible but stored), of
    the objects whose names relative to it `which` selects (another writer's uploads in progress are left
    alone)."""
    with explained(url, "aborting its unfinished uploads"):
        fs = filesystem(url)
        bucket, _, prefix = _key(url).partition("/")
        listed = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        for upload in listed.get("Uploads", []):
            if which(upload["Key"].removeprefix(prefix + "/")):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
