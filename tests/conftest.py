"""Shared fixtures: small real CIFAR-10 archives and shard sets built in temp folders."""

from __future__ import annotations

import functools
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from cgan_pipe.config import DataConfig

from cgan_pipe.data.shards import prepare
from data.make_sample import PER_CLASS as SAMPLE_PER_CLASS, first_per_class

# What cgan-pipe caches (checked shards, trained classifiers) goes to a folder of this test run, not ~/.cache;
# the folder goes when the run ends.
TEST_CACHE = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cgan-pipe-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    """Remove this run's cache folder."""
    shutil.rmtree(TEST_CACHE, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
# The full CIFAR-10 tars, when present (../shared beside the project, or CGAN_PIPE_TEST_CIFAR10).
CIFAR = Path(os.environ.get("CGAN_PIPE_TEST_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))
# In the repository: the first 80 JPEGs of each class of CIFAR-10's test split and the first 40 of its train
# split, members named as in the full tars, so that the suite runs from a clone without ../shared
# (tests/data/make_sample.py makes it from the full tars).
SAMPLE = ROOT / "tests" / "data" / "cifar10-sample.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
needs_full_cifar = pytest.mark.skipif(not (CIFAR / "train.tar").exists(),
                                      reason=f"needs the full CIFAR-10 train.tar in {CIFAR} (../shared/data/cifar10)")


def cifar_members(split: str, per_class: int) -> dict[str, bytes]:
    """The first `per_class` JPEGs of each class of a CIFAR-10 split: {member name: bytes}, from the full tar
    when present, else from the sample in the repository (the same members)."""
    path = CIFAR / f"{split}.tar"
    if not path.exists():
        if per_class > SAMPLE_PER_CLASS[split]:
            pytest.fail(f"{path} is missing and {SAMPLE.name} holds {SAMPLE_PER_CLASS[split]} per class of {split}")
        path = SAMPLE
    return first_per_class(path, split, per_class)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """Write `members` ({name: bytes}) as a plain tar."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def small_tar(tmp_path_factory) -> Path:
    """A tar of an image-folder tree: 20 real CIFAR-10 test JPEGs per class (200 images)."""
    return write_tar(tmp_path_factory.mktemp("src") / "cifar-small.tar", cifar_members("test", 20))


@pytest.fixture(scope="session")
def cifar_tar(tmp_path_factory) -> Path:
    """A tar of an image-folder tree: 80 real CIFAR-10 test JPEGs per class (800 images)."""
    return write_tar(tmp_path_factory.mktemp("src") / "cifar-800.tar", cifar_members("test", 80))


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, small_tar) -> Path:
    """A shard set (2 shards) prepared from `small_tar`."""
    out = tmp_path_factory.mktemp("shards")
    prepare(DataConfig(str(small_tar), shard_size=120), out, progress=False)
    return out


@pytest.fixture(scope="session")
def quality_shards(tmp_path_factory, small_tar):
    """The 200 test images re-encoded at JPEG q10, q50 and q90: 600 samples, 200 per quality."""
    out = tmp_path_factory.mktemp("quality")
    prepare(DataConfig(str(small_tar), qualities=[10, 50, 90], reencode=True, shard_size=150), out, progress=False)
    return out


def small_config(run_dir: Path, sections: dict | None = None, **train):
    """A pipeline config with a small, fast DCGAN training on CPU in `run_dir` (plus any other `sections`)."""
    from cgan_pipe.config import config_from_dict

    raw = {
        "name": "t", "run_dir": str(run_dir), "data": {"source": "unused"}, "loader": {"threads": 1},
        "model": {"z_dim": 32, "g_width": 64, "d_width": 64},
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "sample_every": 2, "checkpoint_every": 2,
                  "device": "cpu", **train},
    }
    for section, values in (sections or {}).items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, small_shards) -> Path:
    """A small conditional DCGAN trained for 2 steps on `small_shards`."""
    from cgan_pipe.train.loop import train

    run_dir = tmp_path_factory.mktemp("run")
    return train(small_config(run_dir, steps=2), small_shards, run_dir, progress=False).checkpoint


@pytest.fixture(scope="session")
def quality_checkpoint(tmp_path_factory, quality_shards) -> Path:
    """A small DCGAN conditioned on class and JPEG quality (compression.mode: condition), 2 steps on
    `quality_shards` (q10/q50/q90)."""
    from cgan_pipe.train.loop import train

    run_dir = tmp_path_factory.mktemp("quality-run")
    cfg = small_config(run_dir, {"compression": {"mode": "condition"}}, steps=2)
    return train(cfg, quality_shards, run_dir, progress=False).checkpoint


UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]  # a namespace where this user may mount file systems


@functools.cache
def can_mount() -> bool:
    """Whether this machine lets an unprivileged user mount a tmpfs in a namespace of its own (`UNSHARE`)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


# The secret key of the test S3 server's credentials: tests grep every output of a run for it.
S3_SECRET = "cgan-pipe-test-secret-5c1f0e"


def start_s3_server(**env: str):
    """A real S3-compatible server (moto's, `python -m moto.server`) on a free port of 127.0.0.1, in a process of
    its own, with `env` added to its environment: (the process, its endpoint URL)."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the test S3 server (moto) did not start on port {port}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """The test S3 server, and this process's clients (s3fs, boto3, DALI) pointed at it through the standard
    AWS settings. It runs in a process of its own: DALI's S3 client holds the GIL while it waits for a reply,
    so a server thread in this process could not answer it."""
    server, endpoint = start_s3_server()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "cgan-pipe-test-key",
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           # never the user's own AWS settings
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture()
def bucket(s3_server) -> str:
    """A new, empty bucket on the test S3 server: its s3:// URL."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
