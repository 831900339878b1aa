"""Distribution distances on feature vectors: Frechet distance, KID, Inception Score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a set of feature vectors (float64), and how many made them."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """The mean and (unbiased) covariance of an (N, D) feature array."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need an (N, D) array with N >= 2, got shape {features.shape}")
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (FID on Inception features).

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); the trace of the square root is taken as
    the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric, so no
    complex parts or ill-conditioned general matrix square root arise.
    """
    diff = a.mean - b.mean
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 1000, subsets: int = 100,
                              seed: int = 0) -> float:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with kernel (x.y / D + 1)^3, averaged over
    random subsets of `subset_size` vectors drawn from each (N, D) set."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    dims = a.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx = (x @ x.T / dims + 1) ** 3
        k_yy = (y @ y.T / dims + 1) ** 3
        k_xy = (x @ y.T / dims + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        total += within - 2.0 * k_xy.mean()
    return float(total / subsets)


def inception_score(probabilities: np.ndarray, splits: int = 10) -> float:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over `splits`
    equal parts of the (N, classes) class-probability array."""
    p = np.asarray(probabilities, dtype=np.float64)
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
