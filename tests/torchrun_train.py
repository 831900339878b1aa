"""Run by torchrun from test_train.py (not a test itself): train on 2 ranks, record what each saw."""

import hashlib
import json
import sys
from pathlib import Path

from cgan_pipe.config import load_pipeline
from cgan_pipe.data.loader import open_loader
from cgan_pipe.devices import resolve_device
from cgan_pipe.distributed import rank_and_world, ranks
from cgan_pipe.train.loop import train

pipeline, shards, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = load_pipeline(pipeline)
with ranks("gloo"):
    rank, world = rank_and_world()
    result = train(cfg, shards, cfg.run_path, progress=False)
    # One epoch of this rank's training stream, exactly as train() opened it: which images come in.
    loader = open_loader(shards, cfg.loader, cfg.train.batch_size // world, cfg.seed, resolve_device("cpu", "-"))
    seen, batches = [], iter(loader)
    while len(seen) < loader.samples_per_epoch:
        batch = next(batches)
        seen += [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in batch.images]
(out / f"rank{rank}.json").write_text(json.dumps({"weights": result.weights_sha256, "steps": result.steps,
                                                  "seen": seen, "world": world}))
