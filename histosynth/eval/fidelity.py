"""Fidelity measures, pure functions of feature matrices (rows = samples): FID, KID, precision/recall/density/coverage.

Features come from ``histosynth.eval.features``; a value is only meaningful beside the same measure in the same
feature space between two real sets (design.md §7).

PRDC is written here from Naeem et al. 2020 rather than taken from the ``prdc`` package: that package prints to
stdout on every call and computes distances with a fixed pool of 8 worker processes.
"""
from __future__ import annotations

import warnings

import numpy as np

from histosynth.errors import HistosynthError

CHUNK = 2048  # rows per block of pairwise distances: bounds memory at CHUNK x N doubles


def check_features(x: np.ndarray, what: str, minimum: int, why: str) -> np.ndarray:
    """Check a (N, D) feature matrix has at least ``minimum`` rows and finite values; return it as float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise HistosynthError(f"{what}: expected an (N, D) feature matrix, got shape {x.shape}")
    if len(x) < minimum:
        raise HistosynthError(f"{what}: {why} needs at least {minimum} samples, got {len(x)}")
    if not np.isfinite(x).all():
        raise HistosynthError(f"{what}: features contain NaN or infinite values")
    return x


def check_same_space(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise HistosynthError(f"feature widths differ ({a.shape[1]} vs {b.shape[1]}): not the same feature space")


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below zero by round-off set to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians (Dowson & Landau 1982): |μa−μb|² + tr(Σa + Σb − 2(Σa Σb)^½)."""
    # tr((Σa Σb)^½) = tr((Σa^½ Σb Σa^½)^½): the inner matrix is symmetric PSD, so eigh is stable and real,
    # unlike scipy.linalg.sqrtm of the non-symmetric product, which returns complex parts for near-singular Σ.
    root_a = _psd_sqrt(sigma_a)
    inner = root_a @ sigma_b @ root_a  # (D, D) symmetric PSD
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)
    return max(value, 0.0)  # round-off can leave -1e-13 for identical sets


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017) between two feature sets, in their feature space."""
    a = check_features(a, "FID, first set", 2, "a covariance")
    b = check_features(b, "FID, second set", 2, "a covariance")
    check_same_space(a, b)
    dim = a.shape[1]
    if min(len(a), len(b)) < dim:
        warnings.warn(f"FID with {min(len(a), len(b))} samples in {dim} dimensions: the covariance is singular"
                      f" and FID is strongly biased; use at least {dim} samples per set", UserWarning, stacklevel=2)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False).reshape(dim, dim),
                            b.mean(0), np.cov(b, rowvar=False).reshape(dim, dim))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(u, v) = (u·v / d + 1)³ (Bińkowski et al. 2018)."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3  # (m, m)
    k_yy = (y @ y.T / dim + 1) ** 3  # (m, m)
    k_xy = (x @ y.T / dim + 1) ** 3  # (m, m)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): (mean, std) of unbiased MMD² over random subsets."""
    a = check_features(a, "KID, first set", 2, "an unbiased MMD estimate")
    b = check_features(b, "KID, second set", 2, "an unbiased MMD estimate")
    check_same_space(a, b)
    if subsets < 1:
        raise HistosynthError(f"KID needs at least 1 subset, got {subsets}")
    size = min(subset_size, len(a), len(b))  # subsets are drawn without replacement, so no larger than a set
    rng = np.random.default_rng(seed)
    values = np.array([_polynomial_mmd2(a[rng.choice(len(a), size, replace=False)],
                                        b[rng.choice(len(b), size, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())


def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(x), len(y)), computed in float64 and clipped at 0."""
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T  # (n, m)
    return np.sqrt(np.clip(squared, 0, None))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (the row itself excluded) -> (N,)."""
    radii = np.empty(len(x))
    for start in range(0, len(x), CHUNK):
        block = pairwise_distances(x[start:start + CHUNK], x)  # (c, N), the zero self-distance included
        radii[start:start + CHUNK] = np.partition(block, k, axis=1)[:, k]  # k-th after self at index 0
    return radii


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of fake vs real samples with k-NN balls (Naeem et al. 2020)."""
    real = check_features(real, "PRDC, real set", k + 1, f"k-nearest-neighbour balls with k = {k}")
    fake = check_features(fake, "PRDC, generated set", k + 1, f"k-nearest-neighbour balls with k = {k}")
    check_same_space(real, fake)
    real_radii = knn_radii(real, k)  # (R,)
    fake_radii = knn_radii(fake, k)  # (F,)
    inside_count = np.zeros(len(fake))  # how many real balls contain each fake sample
    recalled = np.zeros(len(real), dtype=bool)  # real sample inside some fake ball
    covered = np.zeros(len(real), dtype=bool)  # real ball holding at least one fake sample
    for start in range(0, len(real), CHUNK):
        d = pairwise_distances(real[start:start + CHUNK], fake)  # (c, F)
        radius = real_radii[start:start + CHUNK, None]  # (c, 1)
        inside_count += (d < radius).sum(0)
        recalled[start:start + CHUNK] = (d < fake_radii[None, :]).any(1)
        covered[start:start + CHUNK] = d.min(1) < radius[:, 0]
    return {
        "precision": float((inside_count > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(inside_count.mean() / k),
        "coverage": float(covered.mean()),
    }
