"""Training on CPU: steps run, outputs appear, checkpoints are safe, a rerun resumes."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys

import pytest
import torch

from cgan_pipe.errors import ConfigError, DataError, TrainingError
from cgan_pipe.train.checkpoint import list_checkpoints, load_checkpoint
from cgan_pipe.train.loop import train

from cgan_pipe.config import DataConfig

from cgan_pipe.data.shards import prepare

from conftest import ROOT, cifar_members, small_config, write_tar


def test_train_writes_metrics_samples_and_checkpoints(small_shards, tmp_path):
    result = train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    assert result.steps == 4 and result.resumed_from == 0 and result.images_per_s > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all({"loss_d", "loss_g", "images_per_s", "data_wait", "kimg", "epoch"} <= r.keys() for r in rows)
    assert rows[-1]["epoch"] == round(4 * 16 / 200, 3)  # 4 steps of 16 over the 200 samples
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000002.pt", "ckpt-0000004.pt"]
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4
    assert {"G", "D", "G_ema", "opt_g", "opt_d", "rng", "dataset"} <= state.keys()
    assert state["dataset"]["class_names"][3] == "cat"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_d")] == [2, 4]
    assert [e.value for e in events.Scalars("train/loss_g")] == pytest.approx([r["loss_g"] for r in rows])
    assert (tmp_path / "curves.png").exists()


def test_training_with_diffaugment_runs_and_a_bad_policy_names_the_key(small_shards, tmp_path):
    result = train(small_config(tmp_path, steps=2, diffaugment="color,translation,cutout"), small_shards, tmp_path,
                   progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    with pytest.raises(ConfigError, match="train.diffaugment: unknown DiffAugment transform 'rotate'"):
        small_config(tmp_path, diffaugment="rotate")


def test_only_the_newest_keep_checkpoints_are_kept(small_shards, tmp_path):
    train(small_config(tmp_path, steps=8, checkpoint_every=1, keep_checkpoints=2), small_shards, tmp_path,
          progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000007.pt", "ckpt-0000008.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_pruning_deletes_only_what_loads_as_a_checkpoint(small_shards, tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "ckpt-9999999.pt").mkdir(parents=True)  # a folder, and a file, named as far newer checkpoints
    (folder / "ckpt-9999998.pt").write_text("notes that are not a checkpoint")
    train(small_config(tmp_path, steps=2), small_shards, tmp_path, progress=False)
    result = train(small_config(tmp_path, steps=6, keep_checkpoints=1), small_shards, tmp_path, progress=False)
    assert result.resumed_from == 2 and result.checkpoint == folder / "ckpt-0000006.pt"
    assert load_checkpoint(result.checkpoint)["step"] == 6  # the checkpoint it reports exists
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-0000006.pt", "ckpt-9999998.pt", "ckpt-9999999.pt"]
    assert (folder / "ckpt-9999998.pt").read_text() == "notes that are not a checkpoint"


@pytest.mark.parametrize("lost", ["config", "dataset", "G", "rng"])
def test_an_incomplete_newest_checkpoint_is_named_and_resume_falls_back(small_shards, tmp_path, lost):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    newest = tmp_path / "checkpoints" / "ckpt-0000004.pt"
    state = load_checkpoint(newest)
    del state[lost]  # the right kind and version, a part missing
    torch.save(state, newest)
    with pytest.raises(DataError, match=rf"ckpt-0000004.pt: incomplete checkpoint \({lost} is missing\)"):
        load_checkpoint(newest)
    warnings = []
    result = train(small_config(tmp_path, steps=6), small_shards, tmp_path, progress=False, warn=warnings.append)
    assert result.resumed_from == 2 and result.steps == 6 and "incomplete checkpoint" in warnings[0]


def test_a_width_no_memory_holds_stops_training_before_it_allocates(small_shards, tmp_path):
    cfg = small_config(tmp_path, {"model": {"g_width": 100_000_000}})  # 409 GB of weights were tried before
    with pytest.raises(ConfigError, match=r"model.g_width 100000000, model.d_width 64: the dcgan networks"):
        train(cfg, small_shards, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("part, value, message", [
    ("G", {"stem.0.weight": "not a tensor"}, "G holds values that are not tensors"),
    ("opt_d", {"lr": 0.1}, "opt_d is not an optimiser's state"),
    ("rng", {"torch": torch.zeros(4)}, "its random number state is not a byte tensor"),
    ("step", "4", "step is not an int"),
    ("config", {"name": "x", "data": {"source": "a"}, "train": {"steps": -1}}, r"its config: train.steps: must be > 0"),
])
def test_a_checkpoint_part_of_the_wrong_shape_is_named(checkpoint, tmp_path, part, value, message):
    state = load_checkpoint(checkpoint)
    state[part] = value
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(DataError, match=rf"odd.pt: incomplete checkpoint \({message}"):
        load_checkpoint(tmp_path / "odd.pt")


def test_rerun_resumes_and_continues_the_step_count(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    first = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    done = train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    assert done.images_per_s is None and done.steps == 4  # already complete: nothing ran
    more = train(small_config(tmp_path, steps=6), small_shards, tmp_path, progress=False)
    assert more.resumed_from == 4 and more.steps == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    resumed = load_checkpoint(more.checkpoint)
    assert not torch.equal(resumed["G"]["stem.0.weight"], first["G"]["stem.0.weight"])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_resumed_run_goes_on_within_the_epoch_its_checkpoint_recorded(small_shards, tmp_path, backend, caplog):
    loader = {"loader": {"backend": backend, "threads": 1, "shuffle_buffer": 8}}
    train(small_config(tmp_path, loader), small_shards, tmp_path, progress=False)  # 4 x 16 of 200 samples
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert state["data_position"] == [{"epoch": 0, "started": [1]}]  # within the first shard of epoch 0
    with caplog.at_level("INFO", logger="cgan_pipe.train.loop"):
        more = train(small_config(tmp_path, loader, steps=20), small_shards, tmp_path, progress=False)
    assert more.resumed_from == 4
    assert "the data goes on in epoch 0, each of the loader's 1 streams past the shards it had started (1)" \
        in caplog.text
    assert load_checkpoint(more.checkpoint)["data_position"][0]["epoch"] == 1  # the shorter epoch 0 ended


def test_resume_after_a_kill_drops_metrics_rows_past_the_checkpoint(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "ckpt-0000004.pt").unlink()  # as if killed between step 2's save and step 4's
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss')  # and a row cut short
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_resume_refuses_a_checkpoint_of_another_model_naming_the_difference(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    cfg = small_config(tmp_path, steps=6)
    cfg.model.g_width = 32
    with pytest.raises(DataError, match=r"different model or dataset \(model.g_width: 64 in the checkpoint, 32 now\)"):
        train(cfg, small_shards, tmp_path, progress=False)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w')",))

    path = tmp_path / "evil.pt"
    torch.save({"kind": "cgan-pipe-checkpoint", "version": 1, "x": Payload()}, path)
    with pytest.raises(DataError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a cgan-pipe checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_the_resnet_model_trains_and_records_its_architecture(small_shards, tmp_path):
    cfg = small_config(tmp_path, steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="resnet", g_width=32, d_width=32))
    result = train(cfg, small_shards, tmp_path, progress=False)
    assert result.steps == 2 and load_checkpoint(result.checkpoint)["config"]["model"]["arch"] == "resnet"


def test_the_r3gan_model_trains_with_its_loss_conditioned_on_quality_and_exports(quality_shards, tmp_path):
    from cgan_pipe.config import ExportConfig
    from cgan_pipe.export import export
    from cgan_pipe.schema import from_options

    cfg = small_config(tmp_path, {"model": {"arch": "r3gan", "g_width": 32, "d_width": 32},
                                  "compression": {"mode": "condition"}},
                       steps=2, loss="rpgan", r1_gamma=0.5, r2_gamma=0.5, r1_every=1, log_every=1)
    result = train(cfg, quality_shards, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and rows[-1]["skipped"] == 0 and math.isfinite(rows[-1]["loss_d"])
    settings = from_options(ExportConfig, {"n": ("--n", 4), "quality_cond": ("--quality-cond", 50)})
    out = export(result.checkpoint, tmp_path / "out", settings, device=torch.device("cpu"), progress=False)
    assert len(list(out.files.rglob("*-qc50.jpg"))) == 4


def test_a_corrupt_newest_checkpoint_is_named_and_resume_falls_back_to_the_one_before(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    newest = tmp_path / "checkpoints" / "ckpt-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a failing disk
    warnings = []
    result = train(small_config(tmp_path, steps=6), small_shards, tmp_path, progress=False, warn=warnings.append)
    assert result.resumed_from == 2 and result.steps == 6
    assert len(warnings) == 2 and "ckpt-0000004.pt: unreadable checkpoint" in warnings[0]
    assert "ckpt-0000004.pt was not a readable checkpoint; it was moved to ckpt-0000004.pt.unreadable" in warnings[1]
    assert (tmp_path / "checkpoints" / "ckpt-0000004.pt.unreadable").stat().st_size == 1000  # kept, not replaced
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # the rows past step 2 were dropped and logged again


def test_max_minutes_stops_cleanly_and_a_rerun_finds_the_budget_spent(small_shards, tmp_path):
    cfg = small_config(tmp_path, steps=10_000, max_minutes=0.02, log_every=1000, sample_every=1000,
                       checkpoint_every=1000)
    result = train(cfg, small_shards, tmp_path, progress=False)
    assert 0 < result.steps < 10_000
    state = load_checkpoint(result.checkpoint)  # the final checkpoint is written at the budget
    assert state["step"] == result.steps and state["train_seconds"] >= 0.02 * 60
    assert (tmp_path / "samples" / f"step-{result.steps:07d}.png").exists() and (tmp_path / "curves.png").exists()
    again = train(cfg, small_shards, tmp_path, progress=False)
    assert again.images_per_s is None and again.steps == result.steps  # nothing left to do


def test_r1_bf16_autocast_and_channels_last_train_on_the_cpu(small_shards, tmp_path):
    cfg = small_config(tmp_path, steps=2, r1_gamma=1.0, r1_every=1, precision="bf16", channels_last=True,
                       loss="nonsaturating")
    result = train(cfg, small_shards, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
        train(small_config(tmp_path / "fp16", precision="fp16"), small_shards, tmp_path / "fp16", progress=False)


def _poison_generator(run_dir):
    """Rewrite the newest checkpoint with NaN generator weights (as a diverged run would leave them)."""
    path = list_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(path)
    for key in state["G"]:
        if state["G"][key].is_floating_point():
            state["G"][key].fill_(float("nan"))
    torch.save(state, path)
    return path


def test_a_nan_loss_stops_training_and_names_the_last_good_checkpoint(small_shards, tmp_path):
    train(small_config(tmp_path, steps=2), small_shards, tmp_path, progress=False)
    poisoned = _poison_generator(tmp_path)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; training stopped and the last good "
                                            r"checkpoint is .*ckpt-0000002.pt"):
        train(small_config(tmp_path, steps=6), small_shards, tmp_path, progress=False)
    assert list_checkpoints(tmp_path / "checkpoints") == [poisoned]  # nothing half-written, nothing replaced


def test_nan_losses_can_be_skipped_and_counted_until_too_many_in_a_row(small_shards, tmp_path):
    train(small_config(tmp_path, steps=2), small_shards, tmp_path, progress=False)
    _poison_generator(tmp_path)
    with pytest.raises(TrainingError, match="50 steps in a row had non-finite losses"):
        train(small_config(tmp_path, steps=100, on_nonfinite="skip", log_every=10), small_shards, tmp_path,
              progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if r["step"] > 2] == [8, 18, 28, 38, 48]


def test_two_torchrun_ranks_train_on_disjoint_data_and_keep_identical_weights(small_shards, tmp_path):
    pipeline = tmp_path / "ddp.yaml"
    pipeline.write_text(f"""
name: ddp
run_dir: {tmp_path / "run"}
data: {{source: unused}}
loader: {{threads: 1, hflip: false}}
model: {{z_dim: 32, g_width: 32, d_width: 32}}
train: {{steps: 3, batch_size: 16, log_every: 1, sample_every: 3, checkpoint_every: 3, device: cpu}}
""")
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}",
               str(ROOT / "tests" / "torchrun_train.py"), str(pipeline), str(small_shards), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged: one model on both ranks
    seen = [set(r["seen"]) for r in ranks]
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == 200  # disjoint halves of all 200 images
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["ckpt-0000003.pt"]


@pytest.mark.slow  # inductor compiles C++ for the CPU: about a minute
def test_compiled_training_saves_plain_state_dicts(small_shards, tmp_path):
    result = train(small_config(tmp_path, steps=2, compile=True), small_shards, tmp_path, progress=False)
    state = load_checkpoint(result.checkpoint)
    assert not any(key.startswith("_orig_mod.") for key in state["G"])  # loads into an uncompiled network
    assert "stem.0.weight" in state["G"]


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_condition_mode_trains_g_and_d_on_each_samples_recorded_quality(quality_shards, tmp_path, arch):
    cfg = small_config(tmp_path, {"compression": {"mode": "condition"}, "model": {"arch": arch}}, steps=2)
    result = train(cfg, quality_shards, tmp_path, progress=False)
    state = load_checkpoint(result.checkpoint)
    assert state["dataset"]["qualities"] == [10, 50, 90]
    assert any(key.startswith("embed_quality.") for key in state["G"]) and \
        any(key.startswith("embed_quality.") for key in state["D"])
    from cgan_pipe.generation import generate, load_generator

    G, _, z_dim = load_generator(state, ema=True, device=torch.device("cpu"))
    labels = torch.zeros(4, dtype=torch.int64)
    low, high = generate(G, z_dim, [0, 1, 2, 3], labels, torch.device("cpu"), 10), \
        generate(G, z_dim, [0, 1, 2, 3], labels, torch.device("cpu"), 90)
    assert (low != high).any()  # the requested quality reaches the pixels


def test_condition_mismatch_shows_d_reals_with_wrong_qualities_and_changes_its_update(quality_shards, tmp_path,
                                                                                      monkeypatch):
    from cgan_pipe.models import dcgan

    calls, forward = [], dcgan.Discriminator.forward

    def recording(self, images, labels, quality=None):
        calls.append(quality.detach().clone())
        return forward(self, images, labels, quality)

    def trained_d(weight: float, run_dir) -> dict:
        cfg = small_config(run_dir, {"compression": {"mode": "condition", "condition_mismatch_weight": weight}},
                           steps=1)
        return load_checkpoint(train(cfg, quality_shards, run_dir, progress=False).checkpoint)["D"]

    without = trained_d(0.0, tmp_path / "a")
    monkeypatch.setattr(dcgan.Discriminator, "forward", recording)
    with_mismatch = trained_d(0.5, tmp_path / "b")
    d_phase = calls[0]  # then the G phase's call
    assert d_phase.numel() == 3 * 16  # reals, fakes, and every real again (each has a level 40 points away)
    reals, fakes, mismatched = d_phase.split(16)
    assert torch.equal(reals, fakes) and ((mismatched - reals).abs() > 0.3).all()
    assert any(not torch.equal(with_mismatch[k], without[k]) for k in without)


def test_condition_mode_on_shards_without_qualities_says_how_to_make_them(small_tar, tmp_path):
    from cgan_pipe.data.shards import prepare

    png = tmp_path / "png"
    prepare(DataConfig(str(small_tar), format="png", shard_size=120), png, progress=False)
    cfg = small_config(tmp_path / "run", {"compression": {"mode": "condition"}}, steps=2)
    with pytest.raises(ConfigError, match=r"no JPEG quality .*cgan-pipe prepare SOURCE OUT --format jpeg"):
        train(cfg, png, tmp_path / "run", progress=False)


def test_ambient_mode_compresses_fakes_at_the_drawn_quality_before_d_sees_them(small_shards, tmp_path, monkeypatch):
    import cgan_pipe.train.loss as loss

    seen, simulate = [], loss.simulate_jpeg

    def recording(images, quality, rounding):
        seen.append(quality.detach().round())
        assert rounding == "straight_through"
        return simulate(images, quality, rounding)

    monkeypatch.setattr(loss, "simulate_jpeg", recording)
    cfg = small_config(tmp_path, {"compression": {"mode": "ambient", "ambient_rounding": "straight_through"},
                                  "loader": {"jpeg_distort": [20, 30]}}, steps=2)
    result = train(cfg, small_shards, tmp_path, progress=False)
    state = load_checkpoint(result.checkpoint)
    assert not any(key.startswith("embed_quality.") for key in state["G"])  # G itself is clean, unconditioned
    assert len(seen) == 4  # each step: the D phase's fakes and the G phase's
    assert all(((q >= 20) & (q <= 30)).all() and q.numel() == 16 for q in seen)
    resumed = small_config(tmp_path, {"loader": {"jpeg_distort": [20, 30]}}, steps=3)
    with pytest.raises(DataError, match=r"compression.mode: 'ambient' in the checkpoint, 'none' now"):
        train(resumed, small_shards, tmp_path, progress=False)


@pytest.mark.parametrize("arch", ["resnet", "r3gan"])
def test_ambient_mode_trains_the_residual_families_with_a_clean_g(small_shards, tmp_path, arch):
    cfg = small_config(tmp_path, {"model": {"arch": arch, "g_width": 32, "d_width": 32},
                                  "compression": {"mode": "ambient", "ambient_d_quality": True},
                                  "loader": {"jpeg_distort": [20, 30]}},
                       steps=2, loss="rpgan" if arch == "r3gan" else "hinge", r1_gamma=0.5, r2_gamma=0.5, r1_every=1,
                       log_every=1)
    result = train(cfg, small_shards, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == 0 and math.isfinite(rows[-1]["loss_d"]) and math.isfinite(rows[-1]["loss_g"])
    state = load_checkpoint(result.checkpoint)
    assert not any(key.startswith("embed_quality.") for key in state["G"])  # G clean, unconditioned on quality
    assert any(key.startswith("embed_quality.") for key in state["D"])  # D told each image's quality
    from cgan_pipe.generation import generate, load_generator

    G, _, z_dim = load_generator(state, ema=True, device=torch.device("cpu"))
    images = generate(G, z_dim, [0, 1], torch.zeros(2, dtype=torch.int64), torch.device("cpu"), None)
    assert images.shape[-3:] == (3, 32, 32)


def test_ambient_recode_reals_passes_the_real_batch_through_the_same_codec(small_shards, tmp_path, monkeypatch):
    import cgan_pipe.train.loss as loss

    coded, simulate = [], loss.simulate_jpeg

    def recording(images, quality, rounding):
        coded.append(images.requires_grad)  # reals carry no gradient; fakes in the G phase do
        return simulate(images, quality, rounding)

    monkeypatch.setattr(loss, "simulate_jpeg", recording)
    cfg = small_config(tmp_path, {"compression": {"mode": "ambient", "ambient_recode_reals": True},
                                  "loader": {"jpeg_distort": [20, 30]}}, steps=2)
    train(cfg, small_shards, tmp_path, progress=False)
    assert coded == [False, False, True] * 2  # each step: the reals, the D phase's fakes, the G phase's fakes


def test_the_ambient_null_space_penalty_is_part_of_the_generator_update(small_shards, tmp_path):
    def trained_g(weight: float, run_dir) -> dict:
        cfg = small_config(run_dir, {"compression": {"mode": "ambient", "ambient_null_weight": weight},
                                     "loader": {"jpeg_distort": [10, 10]}}, steps=1)
        return load_checkpoint(train(cfg, small_shards, run_dir, progress=False).checkpoint)["G"]

    with_penalty, without = trained_g(1.0, tmp_path / "a"), trained_g(0.0, tmp_path / "b")
    assert any(not torch.equal(with_penalty[k], without[k]) for k in with_penalty)  # same seed, same data otherwise
    assert all(torch.equal(trained_g(0.0, tmp_path / "c")[k], without[k]) for k in without)  # and it is deterministic


def test_ambient_d_quality_tells_d_the_quality_and_leaves_g_clean(small_shards, tmp_path):
    cfg = small_config(tmp_path, {"compression": {"mode": "ambient", "ambient_d_quality": True},
                                  "loader": {"jpeg_distort": [20, 30]}}, steps=2)
    state = load_checkpoint(train(cfg, small_shards, tmp_path, progress=False).checkpoint)
    assert any(key.startswith("embed_quality.") for key in state["D"])  # D was built for, and given, qualities
    assert not any(key.startswith("embed_quality.") for key in state["G"])
    resumed = small_config(tmp_path, {"compression": {"mode": "ambient"}, "loader": {"jpeg_distort": [20, 30]}},
                           steps=3)
    with pytest.raises(DataError, match=r"compression.ambient_d_quality: True in the checkpoint, False now"):
        train(resumed, small_shards, tmp_path, progress=False)


def test_r1_runs_with_a_compiled_discriminator(small_shards, tmp_path, monkeypatch):
    """R1 differentiates D's input gradient again, which compiled graphs cannot ("torch.compile with
    aot_autograd does not currently support double backward"); aot_eager compiles the same graphs as the
    default backend without generating code, so the test takes seconds."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    cfg = small_config(tmp_path, steps=2, compile=True, r1_gamma=1.0, r1_every=1)
    result = train(cfg, small_shards, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and rows[-1]["skipped"] == 0 and math.isfinite(rows[-1]["loss_d"])


@pytest.mark.parametrize("labelled", [True, False])
def test_r1_under_fp16_loss_scaling_is_applied_not_overflowed(small_shards, tmp_path, monkeypatch, labelled):
    """fp16 needs a GPU in use, but autocast to fp16 and torch.amp.GradScaler work on the CPU too, which is
    enough to show the mechanism: scaling R1's inner gradient by the GradScaler (2**16 at first) gave each
    logit of an unconditional D (an fp16 logit) a gradient over fp16's maximum of 65504, so the penalty was
    inf at its first step, which stopped training (or, with on_nonfinite: skip, silently never applied R1).
    A class-conditional D's logit is float32 (the class embedding promotes it), and survived at this size."""
    import cgan_pipe.train.loop as loop

    monkeypatch.setattr(loop, "_autocast_dtype", lambda precision, device: torch.float16)
    if not labelled:
        members = {f"imgs/{i}.jpg": data for i, data in enumerate(cifar_members("test", 4).values())}
        small_shards = tmp_path / "unlabelled"
        prepare(DataConfig(str(write_tar(tmp_path / "u.tar", members))), small_shards, progress=False)

    cfg = small_config(tmp_path / "run", steps=3, r1_gamma=1.0, r1_every=1, log_every=1)  # on_nonfinite: stop
    train(cfg, small_shards, tmp_path / "run", progress=False)  # a non-finite penalty raises TrainingError
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 0]


def test_resuming_keeps_the_fused_optimizer_whatever_the_checkpoint_was_made_with(small_shards, tmp_path):
    """Checkpoints from before the fused optimizer hold per-tensor Adam states (step counters on the CPU);
    loading one must not switch the optimizer back, or its counters stay on the host (on a GPU, a host read
    per parameter per step)."""
    train(small_config(tmp_path, steps=2), small_shards, tmp_path, progress=False)
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = load_checkpoint(path)
    for key in ("opt_g", "opt_d"):
        for group in state[key]["param_groups"]:
            group["fused"], group["foreach"] = None, None
    torch.save(state, path)
    implementations = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        implementations.append(self.param_groups[0]["fused"])
        return step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", recording)
        result = train(small_config(tmp_path, steps=3), small_shards, tmp_path, progress=False)
    assert result.resumed_from == 2 and implementations == [True, True]  # D's step, then G's


def test_compiled_training_compiles_in_its_first_epoch_only(small_shards, tmp_path, monkeypatch):
    """Each network's graphs (with and without gradients, then the partial last batch of an epoch, made
    dynamic) are compiled in the first epoch; later epochs, and their partial batches, recompile nothing.
    aot_eager traces and guards as the default backend does, without generating code."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    graphs = {}
    for steps in (12, 40):  # 200 samples in batches of 16: 12 full batches and one of 8 per epoch
        torch.compiler.reset()
        counters.clear()
        cfg = small_config(tmp_path / f"run{steps}", steps=steps, compile=True, log_every=1000, sample_every=1000,
                           checkpoint_every=1000)
        train(cfg, small_shards, tmp_path / f"run{steps}", progress=False)
        graphs[steps] = counters["stats"]["unique_graphs"]
    torch.compiler.reset()
    assert graphs == {12: 4, 40: 6}  # G and D with and without gradients; then each once for a partial batch


def test_sample_grids_show_twenty_classes_spread_over_many():
    from cgan_pipe.data.batch import DatasetInfo
    from cgan_pipe.train.loop import _grid_inputs

    many = DatasetInfo(64, 3, tuple(f"c{i}" for i in range(100)), 0)
    _, labels, _ = _grid_inputs(many, 8, 0, torch.device("cpu"), None)
    rows = labels[::10].tolist()
    assert len(labels) == 200 and len(rows) == 20 and rows[0] == 0 and rows[-1] == 99 and rows == sorted(set(rows))
    few = DatasetInfo(32, 3, tuple("abc"), 0)
    assert _grid_inputs(few, 8, 0, torch.device("cpu"), None)[1][::10].tolist() == [0, 1, 2]
