"""The archive-scale benchmark (benchmarks/archive_scale.py) on 50,000 images: prepare into a folder and into a
bucket on the test S3 server, both loaders over a whole epoch with the cache at 10% of the set, a training
from the bucket killed and resumed, and the shuffle measure. Checked here: what it reports holds (the same bytes in both places, whole epochs read, local
scratch bounded), not its speed, which docs/benchmarks.md records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar"


@pytest.mark.skipif(not CIFAR.exists(), reason=f"needs the CIFAR-10 archive at {CIFAR} (../shared/data)")
def test_fifty_thousand_images_through_a_bucket_with_the_cache_at_a_tenth_of_the_set(tmp_path):
    out = tmp_path / "scale.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "archive_scale.py"), str(CIFAR), "--images", "50000",
               "--shard-size", "1000", "--delay-batches", "20", "--work", str(tmp_path / "work"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    scale = json.loads(out.read_text())
    assert scale["build"]["images"] == 50000
    assert scale["bucket_equals_folder"] is True
    assert scale["prepare_bucket"]["peak_disk_mib"] <= 1000  # data.upload_scratch: 1GB
    assert scale["bucket_cache_mb"] <= scale["set_mib"] / 10
    for backend in ("dali", "torch"):
        for where in ("folder", "bucket"):
            probe = scale[f"loader_{backend}_{where}"]
            assert probe["images"] == 50000  # one whole epoch, each sample once
            assert probe["peak_rss_mib"] >= probe["rss_at_5pct_mib"] > 0
        assert scale[f"loader_{backend}_bucket_20ms"]["images"] == 20 * 256  # not a whole epoch: 20 batches
    killed = scale["killed_training"]
    assert killed["processes_left"] == 0 and killed["bucket_unchanged"] is True and killed["rerun_rc"] == 0
    assert killed["rerun_says"] == [] or f"resumed from step {killed['checkpoint_step']}" in killed["rerun_says"][0]
    position = killed["checkpoint_position"][0]
    assert killed["rerun_log"].startswith(f"the data goes on in epoch {position['epoch']}")
    shuffle = scale["shuffle"]
    assert shuffle["batches"] == 196 and shuffle["shards_per_batch_min"] >= 1
    assert 0 < shuffle["next_sample_same_class"] < 1
