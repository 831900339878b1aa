"""cgan-pipe at archive scale, against a real S3-compatible server (moto's) on 127.0.0.1 and a local folder:

1. build: an archive of N real images (CIFAR-10's 50,000 training JPEGs, each written N/50,000 times with
   another random crop, flip and JPEG quality 60-95), as one plain tar;
2. prepare it into a folder and into the bucket (images/s, peak RSS of the process tree, peak local disk
   of the bucket's staging folder), and check that the two sets hold the same bytes;
3. both loaders (DALI and torch, CPU) over a whole epoch of each set with loader.bucket_cache_mb at 10% of
   the set (images/s, RSS of the process tree every 50 batches), and from the bucket through a proxy that
   adds 20 ms to every request;
4. train: a short training from the bucket, killed with SIGKILL once its first checkpoint is written, and
   rerun (the step and epoch position it goes on from, processes left, the bucket unchanged);
5. shuffle: over the bucket's stream (DALI), the shards and classes in each batch.

    python benchmarks/archive_scale.py ../shared/data/cifar10/train.tar --images 1000000 \\
        --shard-size 1000 --work /tmp/scale --out archive-scale.json

Needs the test extras (moto[server]) and about 3x the set's size in memory (the server keeps objects in
memory) and on disk. Results go to --out after each stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bucket import bucket_contents, start_server  # noqa: E402  (the bucket benchmark's helpers)

CLI = str(Path(sys.executable).with_name("cgan-pipe"))
METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


def build_archive(source: Path, images: int, out: Path) -> dict[str, object]:
    """Write `images` variants of the JPEGs in the tar `source` into the tar `out` (kept when it exists)."""
    from cgan_pipe.data import tars

    if out.exists():
        return {"archive": str(out), "bytes": out.stat().st_size, "kept": True}
    members = [m for m in tars.iter_members(source) if m.name.endswith(".jpg")]
    start = time.perf_counter()
    jobs = [(str(source), [(m.name, m.offset, m.size) for m in members], copy)
            for copy in range((images + len(members) - 1) // len(members))]
    written = 0
    with open(f"{out}.part", "wb") as tar, Pool(os.cpu_count()) as pool:
        for chunk in pool.imap(_variants, jobs):
            take = min(len(chunk), images - written)
            tar.write(b"".join(chunk[:take]))
            written += take
        tar.write(b"\0" * 1024)
    os.replace(f"{out}.part", out)
    return {"archive": str(out), "images": written, "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1)}


def _variants(job: tuple[str, list[tuple[str, int, int]], int]) -> list[bytes]:
    """Copy number `copy` of every member: a random crop (24-32 px, resized back to 32), a flip, a quality."""
    import io

    from PIL import Image

    from cgan_pipe.data import tars

    source, members, copy = job
    rng = random.Random(copy)
    out = []
    for name, offset, size in members:
        image = Image.open(io.BytesIO(tars.read_span(Path(source), offset, size))).convert("RGB")
        side = rng.randint(24, 32)
        x, y = rng.randint(0, 32 - side), rng.randint(0, 32 - side)
        image = image.crop((x, y, x + side, y + side)).resize((32, 32), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        data = io.BytesIO()
        image.save(data, "JPEG", quality=rng.randint(60, 95))
        _, cls, file = name.rsplit("/", 2)
        out.append(tars.member_bytes(f"big/{cls}/{copy:03d}-{file}", data.getvalue()))
    return out


class Sampler:
    """Samples the resident memory of a process tree (VmRSS summed) and the bytes under a folder, every 0.2 s."""

    def __init__(self, pid: int, folder: Path | None = None):
        self.pid, self.folder, self.peak_rss, self.peak_disk = pid, folder, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, tree_rss(self.pid))
            if self.folder is not None:
                self.peak_disk = max(self.peak_disk, folder_bytes(self.folder))

    def close(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        return {"peak_rss_mib": round(self.peak_rss / 2**20, 1), "peak_disk_mib": round(self.peak_disk / 2**20, 1)}


def tree_rss(pid: int) -> int:
    """Bytes resident in process `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        children.setdefault(int(fields["PPid"]), []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total


def folder_bytes(folder: Path) -> int:
    """Bytes in the files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def timed_prepare(archive: Path, out: str, shard_size: int, images: int, staging: Path | None,
                  server: int) -> dict:
    """`cgan-pipe prepare` of the archive into `out`: seconds, images/s, peak RSS and staging disk, and the CPU
    seconds of the S3 server (process `server`), which shares this machine's cores with prepare."""
    server_cpu = cpu_seconds(server)
    start = time.perf_counter()
    job = subprocess.Popen([CLI, "prepare", str(archive), out, "--shard-size", str(shard_size), "-q"])
    sampler = Sampler(job.pid, staging)
    _, status, usage = os.wait4(job.pid, 0)  # usage: prepare and the workers it waited for
    job.returncode = os.waitstatus_to_exitcode(status)
    if job.returncode != 0:
        raise SystemExit(f"prepare into {out} failed")
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "images_per_s": round(images / seconds), **sampler.close(),
            "prepare_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "server_cpu_s": round(cpu_seconds(server) - server_cpu, 1)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DelayProxy:
    """A TCP proxy on 127.0.0.1 in front of `port` that holds each HTTP request `delay` seconds before passing
    it on: a server a network's round trip away."""

    def __init__(self, port: int, delay: float):
        self.target, self.delay = port, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        sockets = [client, upstream]
        try:
            while True:
                ready, _, _ = select.select(sockets, [], [])
                for sock in ready:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    if sock is client and data.startswith(METHODS):
                        time.sleep(self.delay)
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


def epoch_probe(shards: str, backend: str, cache_mb: int, batches: int, every: int) -> None:
    """(Run in a child process.) Read the first epoch with `backend` on the CPU, batches of 256 (at most
    `batches` of them), and print a JSON line per `every` batches: images so far, seconds, RSS of this
    process tree. The epoch ends where the batches' marks say the next one begins."""
    import torch

    from cgan_pipe.config import LoaderConfig
    from cgan_pipe.data.loader import open_loader

    cfg = LoaderConfig(backend=backend, threads=os.cpu_count() or 1, bucket_cache_mb=cache_mb)
    loader = iter(open_loader(shards, cfg, 256, 0, torch.device("cpu")))
    images = next(loader).images.shape[0]  # the first batch waits for the workers to start: not timed
    start = time.perf_counter()
    for number in range(1, batches):
        batch = next(loader)
        if batch.mark.epoch > 0:
            break
        images += batch.images.shape[0]
        if number % every == 0:
            print(json.dumps({"images": images, "seconds": round(time.perf_counter() - start, 2),
                              "rss_mib": round(tree_rss(os.getpid()) / 2**20, 1)}), flush=True)
    print(json.dumps({"images": images, "seconds": round(time.perf_counter() - start, 2),
                      "rss_mib": round(tree_rss(os.getpid()) / 2**20, 1)}), flush=True)


def run_probe(shards: str, backend: str, cache_mb: int, batches: int, env: dict[str, str], server: int) -> dict:
    """`epoch_probe` in a child process: images/s, and RSS over the run against RSS after its first 5%; the CPU
    seconds of the S3 server (process `server`) meanwhile."""
    command = [sys.executable, __file__, "--probe", shards, backend, str(cache_mb), str(batches)]
    server_cpu = cpu_seconds(server)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    server_cpu = cpu_seconds(server) - server_cpu
    if result.returncode != 0:
        raise SystemExit(f"loader probe {backend} on {shards} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    last = rows[-1]
    early = next(r for r in rows if r["images"] >= 0.05 * last["images"])
    return {"images": last["images"], "seconds": last["seconds"],
            "images_per_s": round(last["images"] / last["seconds"]), "rss_at_5pct_mib": early["rss_mib"],
            "peak_rss_mib": max(r["rss_mib"] for r in rows),
            "peak_over_5pct": round(max(r["rss_mib"] for r in rows) / early["rss_mib"], 3),
            "server_cpu_s": round(server_cpu, 1),
            "rss_mib_over_time": [(r["images"], r["rss_mib"]) for r in rows]}


def shuffle_measure(url: str, folder: Path, cache_mb: int, batches: int) -> dict:
    """Over `batches` batches of 256 from the bucket's shard stream (what DALI reads): how many shards each
    batch mixes, its largest share from one shard, and how far its class counts are from the set's."""
    import numpy as np

    from cgan_pipe.data.manifest import parse_dali_index, read_manifest, read_remote_manifest
    from cgan_pipe.data.shard_stream import ShardStream

    manifest = read_manifest(folder)
    shard_of: dict[str, int] = {}  # a sample's source path -> its shard, from the folder's .json members
    for number, shard in enumerate(manifest.shards):
        data = (folder / shard.tar).read_bytes()
        for files in parse_dali_index(folder / shard.index):
            meta = next(f for f in files if f.ext == "json")
            shard_of[json.loads(data[meta.offset:meta.offset + meta.size])["source"]] = number
    remote = read_remote_manifest(url)
    stream = ShardStream(url, remote.shards, 256, 0, 4096, cache_mb << 20, True, with_meta=True)
    share = np.array([remote.class_histogram[n] for n in remote.class_names], float)
    share /= share.sum()
    shards_per_batch, largest, chi2, stream_labels = [], [], [], []
    for number, (_, classes, metas, _marks) in enumerate(stream):
        if number == batches:
            break
        labels = [int(bytes(c)) for c in classes]
        ids = [shard_of[json.loads(bytes(m))["source"]] for m in metas]
        counts = np.bincount(ids)
        shards_per_batch.append(int((counts > 0).sum()))
        largest.append(float(counts.max() / len(ids)))
        observed = np.bincount(labels, minlength=len(share))
        expected = share * len(labels)
        chi2.append(float(((observed - expected) ** 2 / expected).sum()))
        stream_labels.extend(labels)
    same_next = np.array(stream_labels[1:]) == np.array(stream_labels[:-1])
    return {"batches": len(chi2), "shards_per_batch_mean": round(float(np.mean(shards_per_batch)), 1),
            "shards_per_batch_min": int(np.min(shards_per_batch)),
            "largest_share_of_one_shard_mean": round(float(np.mean(largest)), 3),
            "class_chi2_mean": round(float(np.mean(chi2)), 2), "class_chi2_iid": len(share) - 1,
            "next_sample_same_class": round(float(np.mean(same_next)), 4),
            "next_sample_same_class_iid": round(float((share ** 2).sum()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="CIFAR-10's train.tar (../shared/data/cifar10/train.tar)")
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/archive-scale", help="folder for the archive, shards and caches")
    parser.add_argument("--delay-batches", type=int, default=400, help="batches read through the 20 ms proxy")
    parser.add_argument("--stages", default="build,prepare,loader,train,shuffle",
                        help="which to run; without prepare, the folder's set from an earlier run is uploaded")
    parser.add_argument("--backends", default="dali,torch", help="the loaders the loader stage times")
    parser.add_argument("--out", default="archive-scale.json", help="results (those of other stages kept)")
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results.update(images=args.images, shard_size=args.shard_size, machine=machine())

    def save() -> None:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    archive = work / f"archive-{args.images}.tar"
    if "build" in stages or not archive.exists():
        results["build"] = build_archive(Path(args.source), args.images, archive)
        save()
    server, env = start_server()
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # staging and caches of this run only
    try:
        import fsspec

        from cgan_pipe.data.bucket import staging_dir, upload_file

        fsspec.filesystem("s3").mkdir("scale")
        folder, url = work / "shards", "s3://scale/shards"
        if "prepare" in stages:
            subprocess.run(["rm", "-rf", str(folder), str(work / "cache")], check=True)
            results["prepare_folder"] = timed_prepare(archive, str(folder), args.shard_size, args.images, None,
                                                      server.pid)
            save()
            subprocess.run(["rm", "-rf", str(work / "cache")], check=True)  # each run hashes the source afresh
            results["prepare_bucket"] = timed_prepare(archive, url, args.shard_size, args.images, staging_dir(url),
                                                      server.pid)
            results["prepare_bucket_over_folder"] = round(results["prepare_folder"]["seconds"]
                                                          / results["prepare_bucket"]["seconds"], 3)
            results["bucket_equals_folder"] = bucket_contents(url) == {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
            save()
        else:
            for path in sorted(folder.iterdir(), key=lambda path: path.name == "manifest.json"):  # manifest last
                upload_file(path, f"{url}/{path.name}")
        set_mib = sum(p.stat().st_size for p in folder.glob("*.tar")) / 2**20
        cache_mb = max(1, int(set_mib / 10))
        results["set_mib"], results["bucket_cache_mb"] = round(set_mib), cache_mb
        results["manifest_load_s"] = manifest_load_seconds(folder, url)
        save()
        epoch = (args.images + 255) // 256
        for backend in args.backends.split(",") if "loader" in stages else ():
            for name, where in (("folder", str(folder)), ("bucket", url)):
                results[f"loader_{backend}_{name}"] = run_probe(where, backend, cache_mb, 2 * epoch, {}, server.pid)
                save()
            proxy = DelayProxy(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]), 0.020)
            results[f"loader_{backend}_bucket_20ms"] = run_probe(
                url, backend, cache_mb, args.delay_batches,
                {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}, server.pid)
            save()
        if "train" in stages:
            results["killed_training"] = killed_training(url, work)
            save()
        if "shuffle" in stages:
            results["shuffle"] = shuffle_measure(url, folder, cache_mb, min(epoch, 1000))
            save()
    finally:
        server.terminate()
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("loader_")}, indent=2))
    for key, value in results.items():
        if key.startswith("loader_"):
            print(key, {k: v for k, v in value.items() if k != "rss_mib_over_time"})


def killed_training(url: str, work: Path) -> dict[str, object]:
    """Train from the bucket (DALI on the CPU, a small DCGAN, batch 64, a checkpoint every 40 steps), SIGKILL
    the whole process tree once the first checkpoint is written, and rerun: the step and epoch position the
    rerun goes on from, whether any process outlived the kill, and whether the bucket changed."""
    import fsspec

    from cgan_pipe.train.checkpoint import list_checkpoints, load_checkpoint

    fs = fsspec.filesystem("s3")

    def listing() -> dict[str, str]:  # every object's name and ETag (its MD5)
        fs.invalidate_cache()
        return {name: info["ETag"] for name, info in fs.find(url.removeprefix("s3://"), detail=True).items()}

    before = listing()
    run_dir = work / "train-run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    pipeline = work / "train.yaml"
    pipeline.write_text(f"name: scale\nrun_dir: {run_dir}\ndata:\n  source: unused\nloader:\n  shards: {url}\n"
                        f"  backend: dali\n  bucket_cache_mb: 351\nmodel:\n  z_dim: 64\n  g_width: 32\n"
                        f"  d_width: 32\neval:\n  metrics: []\ntrain:\n  steps: 200\n  batch_size: 64\n"
                        f"  checkpoint_every: 40\n  sample_every: 200\n  log_every: 20\n  device: cpu\n")
    job = subprocess.Popen([CLI, "train", str(pipeline), "-q"], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list_checkpoints(run_dir / "checkpoints") and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, 9)
    job.wait()
    time.sleep(1)
    survivors = [pid for pid in os.listdir("/proc") if pid.isdigit() and _session(int(pid)) == job.pid]
    killed_at = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    rerun = subprocess.run([CLI, "train", str(pipeline), "-v"], capture_output=True, text=True)
    goes_on = next((line[line.index("the data goes on"):] for line in rerun.stderr.splitlines()
                    if "the data goes on in epoch" in line), None)
    return {"checkpoint_step": killed_at["step"], "checkpoint_position": killed_at["data_position"],
            "processes_left": len(survivors), "rerun_rc": rerun.returncode,
            "rerun_says": [line for line in rerun.stdout.splitlines() if "resumed from step" in line][:1],
            "rerun_log": goes_on, "bucket_unchanged": listing() == before}


def _session(pid: int) -> int | None:
    """The session id of process `pid` (None once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def manifest_load_seconds(folder: Path, url: str) -> dict[str, float]:
    """Seconds to read and check the manifest of the set in `folder` and in the bucket at `url` (best of 3)."""
    from cgan_pipe.data.manifest import shard_set_manifest

    seconds = {}
    for name, where in (("folder", folder), ("bucket", url)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            shard_set_manifest(where)
            times.append(time.perf_counter() - start)
        seconds[name] = round(min(times), 3)
    return seconds


def machine() -> str:
    """This machine in a few words: CPU model and count, memory."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    memory = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))) / 2**20
    return f"{os.cpu_count()} x {model}, {memory:.0f} GiB"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        epoch_probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), every=50)
    else:
        main()
