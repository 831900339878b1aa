"""Shard sets in a bucket, measured against a real S3-compatible server (moto's) on 127.0.0.1:

1. prepare SOURCE into the bucket vs into a local folder (seconds);
2. `cgan-pipe bench loader` (DALI, CPU) on those shards from the bucket (whole shards fetched ahead, and
   DALI's own S3 client) vs from the folder;
3. prepare and generate killed with SIGKILL once their upload has begun, then rerun: the bucket's objects
   (names and sha256) against an uninterrupted run's.

    python benchmarks/bucket.py ../shared/data/cifar10/train.tar --out bucket-bench.json

Needs the test extras (moto[server]). Everything runs in a temporary folder; the server holds the objects in
memory (about twice the shard set).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


def start_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on a free port of 127.0.0.1, and the environment that points the clients at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    return server, env


def cli(*args: str, **popen: object) -> float:
    """Run cgan-pipe with `args` to the end; its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([CLI, *args, "-q"], check=True, **popen)
    return time.perf_counter() - start


def bucket_contents(url: str) -> dict[str, str]:
    """Every object under `url`: relative name -> sha256 of its bytes."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    key = url.removeprefix("s3://")
    return {name.removeprefix(key + "/"): hashlib.sha256(fs.cat_file(name)).hexdigest() for name in fs.find(key)}


def killed_then_rerun(args: list[str], url: str, marker: str) -> dict[str, object]:
    """Start cgan-pipe `args` (writing to `url`), SIGKILL it once its first object is in the bucket, check that
    the completion `marker` is not there, rerun it to the end; what was there at the kill, and the time."""
    import fsspec

    fs = fsspec.filesystem("s3")
    key = url.removeprefix("s3://")
    job = subprocess.Popen([CLI, *args, "-q"])
    while job.poll() is None:
        fs.invalidate_cache()
        found = fs.find(key) if fs.exists(key) else []
        if found:
            job.send_signal(signal.SIGKILL)
            job.wait()
            break
        time.sleep(0.05)
    fs.invalidate_cache()
    at_kill = sorted(name.removeprefix(key + "/") for name in fs.find(key))
    start = time.perf_counter()
    cli(*args)
    return {"objects_at_kill": len(at_kill), "marker_at_kill": marker in at_kill,
            "rerun_seconds": round(time.perf_counter() - start, 2), "killed_before_end": job.returncode == -9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="raw images to prepare (e.g. ../shared/data/cifar10/train.tar)")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=400, help="batches of 256 timed by bench loader")
    parser.add_argument("--generate", type=int, default=20000, help="images generate writes into the bucket")
    parser.add_argument("--out", default="bucket-bench.json")
    args = parser.parse_args()
    server, env = start_server()
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    results: dict[str, object] = {"source": args.source, "shard_size": args.shard_size}
    try:
        with tempfile.TemporaryDirectory(prefix="bucket-bench-") as scratch:
            os.environ["XDG_CACHE_HOME"] = str(Path(scratch) / "cache")  # staging and caches of this run only
            local = Path(scratch) / "shards"
            prep = ["--shard-size", str(args.shard_size), "--workers", str(os.cpu_count())]
            results["prepare_local_s"] = round(cli("prepare", args.source, str(local), *prep), 2)
            results["prepare_bucket_s"] = round(cli("prepare", args.source, "s3://bench/whole", *prep), 2)
            whole = bucket_contents("s3://bench/whole")
            results["bucket_equals_folder"] = whole == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                                        for p in local.iterdir() if p.is_file()}
            for name, where in (("loader_folder", str(local)), ("loader_bucket", "s3://bench/whole")):
                record = Path(scratch) / f"{name}.json"
                cli("bench", "loader", where, "--backends", "dali", "--batches", str(args.batches),
                    "--json", str(record))
                results[name] = json.loads(record.read_text())
            record = Path(scratch) / "loader_samples.json"  # DALI's own S3 client: slow, so fewer batches
            cli("bench", "loader", "s3://bench/whole", "--backends", "dali", "--bucket-reads", "samples",
                "--batches", str(max(1, args.batches // 40)), "--json", str(record))
            results["loader_bucket_samples"] = json.loads(record.read_text())
            speed = {name: next(r["images_per_s"] for r in results[name] if r["device"] == "cpu")
                     for name in ("loader_folder", "loader_bucket", "loader_bucket_samples")}
            results["loader_images_per_s"] = {name: round(v) for name, v in speed.items()}
            results["loader_bucket_over_folder"] = round(speed["loader_bucket"] / speed["loader_folder"], 3)
            results["prepare_killed"] = killed_then_rerun(["prepare", args.source, "s3://bench/cut", *prep],
                                                          "s3://bench/cut", "manifest.json")
            results["prepare_killed"]["equal"] = bucket_contents("s3://bench/cut") == whole

            pipeline = Path(scratch) / "tiny.yaml"
            pipeline.write_text(f"name: tiny\nrun_dir: {scratch}/run\ndata:\n  source: unused\nloader:\n"
                                f"  shards: {local}\ntrain:\n  steps: 2\n  batch_size: 16\n  device: cpu\n")
            cli("train", str(pipeline))
            checkpoint = str(next(Path(scratch, "run", "checkpoints").glob("*.pt")))
            gen = ["generate", checkpoint, "--n", str(args.generate), "--output", "shards", "--device", "cpu",
                   "--shard-size", "1000"]
            results["generate_bucket_s"] = round(cli(gen[0], gen[1], "s3://bench/gen-whole", *gen[2:]), 2)
            results["generate_killed"] = killed_then_rerun([gen[0], gen[1], "s3://bench/gen-cut", *gen[2:]],
                                                           "s3://bench/gen-cut", "export.json")
            results["generate_killed"]["equal"] = (bucket_contents("s3://bench/gen-cut")
                                                   == bucket_contents("s3://bench/gen-whole"))
    finally:
        server.terminate()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("loader_") or k in (
        "loader_images_per_s", "loader_bucket_over_folder")}, indent=2))


if __name__ == "__main__":
    main()
