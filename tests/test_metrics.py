"""Metrics: the distances against independent numpy computations, the FID Inception loader, the evaluator."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pickle
import socket
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cgan_pipe.cli import main
from cgan_pipe.config import EvalConfig, LoaderConfig
from cgan_pipe.data.batch import DatasetInfo
from cgan_pipe.data.loader import open_loader
from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.metrics import inception
from cgan_pipe.metrics.evaluate import Evaluator, check_eval_settings, inception_weights
from cgan_pipe.metrics.inception import FidInception, load_fid_inception
from cgan_pipe.metrics.quality import file_quality, recompress, spearman
from cgan_pipe.metrics.stats import feature_stats, frechet_distance, inception_score, kernel_inception_distance

CPU = torch.device("cpu")


def _features(seed: int, n: int = 2000, dims: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dims)) @ rng.normal(size=(dims, dims)) + shift


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    a = feature_stats(np.zeros((2, 3)))  # replaced below: only the Gaussians' parameters matter
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    a = type(a)(mean_a, np.diag(var_a), 100)
    b = type(a)(mean_b, np.diag(var_b), 100)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_an_independent_eigenvalue_computation():
    a, b = feature_stats(_features(0)), feature_stats(_features(1, shift=0.5))
    # tr((S_a S_b)^1/2) as the sum of square roots of the (real, non-negative) eigenvalues of S_a S_b
    trace_sqrt = np.sqrt(np.linalg.eigvals(a.cov @ b.cov).real.clip(0)).sum()
    expected = ((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)  # identical sets score ~0


def test_kid_matches_a_plain_loop_and_is_near_zero_for_samples_of_one_distribution():
    x, y = _features(2, n=40, dims=4), _features(3, n=40, dims=4, shift=1.0)

    def k(u, v):
        return (u @ v / 4 + 1) ** 3

    m = 40
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert kernel_inception_distance(x, y, subset_size=40, subsets=1) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    first, second = np.random.default_rng(4).normal(size=(2, 2000, 8))  # two samples of one distribution
    same = kernel_inception_distance(first, second, subset_size=500)
    other = kernel_inception_distance(first, second + 0.5, subset_size=500)
    assert abs(same) < 0.05 * other and kernel_inception_distance(first, first) < 0.05 * other


def test_inception_score_is_1_for_uniform_and_k_for_confident_balanced_predictions():
    assert inception_score(np.full((100, 10), 0.1), splits=2) == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(confident, splits=10) == pytest.approx(10.0, rel=1e-6)


def test_fid_inception_loads_a_state_dict_and_refuses_what_is_not_one(tmp_path):
    torch.manual_seed(0)
    model = FidInception()
    torch.save(model.net.state_dict(), tmp_path / "weights.pth")
    loaded = load_fid_inception(tmp_path / "weights.pth")
    with torch.no_grad():
        features, logits = loaded(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(features).all()
    with pytest.raises(ConfigError, match="missing.pth not found; download https://github.com/mseitzer"):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="other.pth: not the FID Inception-v3 weights"):
        load_fid_inception(tmp_path / "other.pth")

    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump(Payload(), handle)
    with pytest.raises(DataError, match="evil.pth: unreadable as a weights file"):
        load_fid_inception(tmp_path / "evil.pth")


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A web server on 127.0.0.1 serving `served/`, WEIGHTS_URL pointed at a weights file in it named with
    its sha256 prefix as the real one is; returns (the file served, the requests it answered)."""
    served = tmp_path / "served"
    served.mkdir()
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(FidInception().net.state_dict(), buffer)
    name = f"pt_inception-test-{hashlib.sha256(buffer.getvalue()).hexdigest()[:8]}.pth"
    (served / name).write_bytes(buffer.getvalue())
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(inception, "WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}/{name}")
    yield served / name, requests
    server.shutdown()


def test_the_fid_weights_are_fetched_once_checked_and_cached(weights_server, tmp_path):
    served, requests = weights_server
    labelled = DatasetInfo(32, 3, ("a", "b"), 10)
    cfg = EvalConfig(metrics=["classifier", "fid", "kid"], cache_dir=str(tmp_path / "cache"))
    check_eval_settings(cfg, labelled)  # before any training: fetched into the cache folder
    cached = tmp_path / "cache" / served.name
    assert cached.read_bytes() == served.read_bytes() and len(requests) == 1
    assert inception_weights(cfg) == cached and len(requests) == 1  # from the cache, not downloaded again
    load_fid_inception(cached)
    cached.unlink()
    served.write_bytes(served.read_bytes()[:-1] + b"x")  # no longer the bytes its name's checksum says
    with pytest.raises(DataError, match="does not match the checksum in its name"):
        inception_weights(cfg)
    assert not cached.exists() and list((tmp_path / "cache").iterdir()) == []  # nothing half-kept


def test_offline_the_fid_weights_say_how_to_give_a_local_copy(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(inception, "WEIGHTS_URL", f"http://127.0.0.1:{port}/{inception.WEIGHTS_NAME}")
    with pytest.raises(ConfigError, match=r"could not be downloaded from http://127.0.0.1.*set "
                                          r"eval.inception_weights to its local path"):
        check_eval_settings(EvalConfig(metrics=["is"], cache_dir=str(tmp_path)), DatasetInfo(32, 3, ("a",), 10))


def test_eval_settings_are_checked_before_any_work():
    labelled = DatasetInfo(32, 3, ("a", "b"), 10)
    with pytest.raises(ConfigError, match="'classifier' needs class labels"):
        check_eval_settings(EvalConfig(metrics=["classifier"]), DatasetInfo(32, 3, (), 10))
    with pytest.raises(ConfigError, match="eval.inception_weights: .*nope.pth not found"):
        check_eval_settings(EvalConfig(metrics=["is"], inception_weights="/nope.pth"), labelled)
    with pytest.raises(ConfigError, match=r"eval.n_samples: 1,000,000,000,000 generated and up to 10,000 real "
                                          r"images would need [\d,.]+ GiB for their features, more than"):
        check_eval_settings(EvalConfig(metrics=["classifier"], n_samples=10**12), labelled)


class _RealImages(nn.Module):
    """A 'generator' that returns real images of the requested classes (the best a generator can do)."""

    quality_conditioned = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.by_class = {int(c): images[labels == c] for c in labels.unique()}

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: None = None) -> torch.Tensor:
        picks = (z[:, 0].abs() * 1000).long()
        return torch.stack([self.by_class[int(c)][int(p) % len(self.by_class[int(c)])] for c, p in zip(labels, picks)])


class _Noise(nn.Module):
    quality_conditioned = False

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(z[0, 0].abs() * 1e6))
        return torch.rand(z.shape[0], 3, 32, 32, generator=generator) * 2 - 1


def test_evaluator_ranks_real_images_far_above_noise_and_caches_its_classifier(small_shards, tmp_path):
    cfg = EvalConfig(n_samples=200, n_reference=200, classifier_steps=60, cache_dir=str(tmp_path), batch_size=100)
    loader_cfg = LoaderConfig(threads=1)
    evaluator = Evaluator(small_shards, cfg, loader_cfg, CPU)
    batch = next(iter(open_loader(small_shards, LoaderConfig(threads=1, hflip=False), 200, 1, CPU)))
    real = evaluator(_RealImages(batch.images, batch.labels), z_dim=8)
    noise = evaluator(_Noise(), z_dim=8)
    assert real["classifier_fd"] < 0.25 * noise["classifier_fd"]
    assert real["class_accuracy"] > 0.25 and real["class_accuracy"] > noise["class_accuracy"]
    assert real["real_accuracy"] == pytest.approx(float(evaluator.reference["classifier_accuracy"]))
    cached = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert cached == ["classifier2-60.pt", "reference-classifier2-60-200.npz"]
    again = Evaluator(small_shards, cfg, loader_cfg, CPU)  # from the cache: same classifier, same reference
    assert again(_Noise(), z_dim=8)["classifier_fd"] == noise["classifier_fd"]


def test_eval_command_prints_json_scores(checkpoint, small_shards, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(checkpoint), "--shards", str(small_shards), "--n", "100",
                                       "--cache-dir", str(tmp_path), "--classifier-steps", "20", "--json", "-q"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["step"] == 2 and scores["n_samples"] == 100 and 0 <= scores["class_accuracy"] <= 1
    bad = CliRunner().invoke(main, ["eval", str(checkpoint), "--shards", str(small_shards), "--metrics", "fid",
                                    "--inception-weights", str(tmp_path / "missing.pth")])
    assert bad.exit_code == 2 and "eval.inception_weights" in bad.output


def test_fid_kid_and_is_run_end_to_end_with_a_weights_file(small_shards, tmp_path):
    """With (random) Inception weights the whole FID/KID/IS path runs and caches its reference features."""
    torch.manual_seed(0)
    model = FidInception()
    for weight in model.parameters():  # default-initialised layers give (nearly) constant features
        if weight.dim() > 1:
            torch.nn.init.normal_(weight, 0.0, 0.05)
    torch.save(model.net.state_dict(), tmp_path / "weights.pth")
    cfg = EvalConfig(metrics=["fid", "kid", "is"], inception_weights=str(tmp_path / "weights.pth"), n_samples=20,
                     n_reference=20, cache_dir=str(tmp_path / "cache"), batch_size=10)
    scores = Evaluator(small_shards, cfg, LoaderConfig(threads=1), CPU)(_Noise(), z_dim=8)
    assert scores["fid"] > 0 and np.isfinite(scores["kid"]) and scores["inception_score"] >= 1
    assert len(list((tmp_path / "cache").glob("*/reference-inception-*-20.npz"))) == 1


def test_spearman_matches_the_rank_difference_formula_and_averages_tied_ranks():
    rng = np.random.default_rng(0)
    x, y = rng.permutation(50).astype(float), rng.permutation(50).astype(float)
    d = x - y  # permutations of 0..49 are their own ranks minus one
    assert spearman(x, y) == pytest.approx(1 - 6 * (d * d).sum() / (50 * (50 ** 2 - 1)))
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 1, 2, 2], [5, 6, 7, 8]) == pytest.approx(np.corrcoef([1.5, 1.5, 3.5, 3.5], [1, 2, 3, 4])[0, 1])


def test_file_quality_reads_the_quality_a_jpeg_was_written_at():
    import io

    from PIL import Image

    from conftest import cifar_members

    original = next(iter(cifar_members("test", 1).values()))
    assert file_quality(original) == 75  # the shared CIFAR-10 JPEGs are libjpeg q75
    for quality in (10, 30, 95):
        out = io.BytesIO()
        Image.open(io.BytesIO(original)).save(out, format="JPEG", quality=quality)
        assert file_quality(out.getvalue()) == quality
    png = io.BytesIO()
    Image.open(io.BytesIO(original)).save(png, format="PNG")
    assert file_quality(png.getvalue()) is None and file_quality(b"not an image") is None


class _CompressedReals(_RealImages):
    """A perfect quality-conditioned 'generator': real images JPEG-compressed at the requested quality."""

    quality_conditioned = True

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        return recompress(super().forward(z, labels), quality.mul(100).round())


class _QualityBlindNoise(_Noise):
    quality_conditioned = True

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        return super().forward(z, labels)


def test_the_quality_metric_tells_a_generator_that_follows_the_quality_from_one_that_ignores_it(small_shards,
                                                                                                tmp_path):
    cfg = EvalConfig(metrics=["quality"], n_samples=200, quality_levels=[10, 90], quality_steps=100,
                     cache_dir=str(tmp_path), batch_size=100)
    evaluator = Evaluator(small_shards, cfg, LoaderConfig(threads=1), CPU)
    batch = next(iter(open_loader(small_shards, LoaderConfig(threads=1, hflip=False), 200, 1, CPU)))
    follows = evaluator(_CompressedReals(batch.images, batch.labels), z_dim=8, qualities=[10, 90])
    ignores = evaluator(_QualityBlindNoise(), z_dim=8, qualities=[10, 90])
    assert follows["quality_spearman"] > 0.6 and abs(ignores["quality_spearman"]) < 0.3
    assert follows["quality_by_level"]["10"] + 20 < follows["quality_by_level"]["90"]
    assert follows["block_edge_ratio_by_level"]["10"] > 1.4 > follows["block_edge_ratio_by_level"]["90"]
    assert follows["quality_mae"] < ignores["quality_mae"]
    assert "quality-regressor-100.pt" in [p.name for p in next(tmp_path.iterdir()).iterdir()]
    plain = evaluator(_RealImages(batch.images, batch.labels), z_dim=8)  # not conditioned: the mean estimate only
    assert "quality_spearman" not in plain and 1 <= plain["estimated_quality"] <= 100
    assert 0.9 < plain["block_edge_ratio"] < 1.3  # the stored q75 images: nearly no block structure
