"""Privacy / memorisation measures: authenticity, the C_T data-copying test, and nearest-neighbour search.

No maintained package implements these, so they are written here from the papers' definitions:
  * authenticity — Alaa et al. 2022, "How Faithful is your Synthetic Data?" (ICML), as design.md §7 states it;
  * C_T — Meehan, Chaudhuri & Dasgupta 2020, "A Non-Parametric Test to Detect Data-Copying in Generative Models"
    (AISTATS);
  * nearest neighbours over the 8 dihedral transforms of training patches, so a flipped or rotated copy is found.

The measures are pure functions of feature matrices (rows = samples); the image-level search takes images and a
feature function.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from histosynth.dihedral import NAMES as DIHEDRAL_NAMES
from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError
from histosynth.eval.features import pixel_features
from histosynth.eval.fidelity import CHUNK, check_features, check_same_space, knn_radii, pairwise_distances


def nearest(x: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of x: (distance to its nearest row of ``reference``, that row's index), both (N,)."""
    distance = np.empty(len(x))
    index = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), CHUNK):
        d = pairwise_distances(x[start:start + CHUNK], reference)  # (c, R)
        index[start:start + CHUNK] = d.argmin(1)
        distance[start:start + CHUNK] = d.min(1)
    return distance, index


def authenticity(generated: np.ndarray, train: np.ndarray) -> float:
    """Share of generated g with d(g, r) > d(r, nearest other training sample), r = g's nearest (Alaa et al. 2022)."""
    train = check_features(train, "authenticity, training set", 2, "a nearest other training sample")
    generated = check_features(generated, "authenticity, generated set", 1, "authenticity")
    check_same_space(generated, train)
    train_gap = knn_radii(train, 1)  # (T,) distance from each training sample to its nearest other one
    distance, index = nearest(generated, train)  # (G,), (G,)
    return float((distance > train_gap[index]).mean())


MIN_CT_CELL = 20  # samples per group below which the Mann-Whitney normal approximation is not trusted


def ct_test(generated: np.ndarray, holdout: np.ndarray, train: np.ndarray, k: int = 5, min_cell: int = 20,
            seed: int = 0) -> dict[str, Any]:
    """C_T data-copying statistic (Meehan et al. 2020): holdout-weighted mean of per-cell Mann–Whitney z-scores.

    Cells are k-means clusters of the training features. Within each cell, distances run to the nearest training
    point *of that cell* (as the paper defines them: copying is local to a region of the data). U counts the
    (generated, holdout) pairs whose generated-to-train distance is the larger (ties count ½), and
    z = (U − mn/2) / sqrt(mn(m + n + 1)/12) with m holdout and n generated samples in the cell; z ≪ 0 means the
    generated samples sit closer to the training set than fresh data does (copying), z ≫ 0 underfitting.

    Cell rule: a cell is used only if it holds at least ``min_cell`` holdout *and* ``min_cell`` generated samples;
    ``min_cell`` may not go below 20, what the normal approximation of U needs. Other cells are dropped and reported
    with z = None. C_T = Σ w·z / Σ w over the used cells, w = the cell's share of the holdout set.
    """
    if min_cell < MIN_CT_CELL:
        raise HistosynthError(f"C_T: a cell needs at least {MIN_CT_CELL} holdout and generated samples for its "
                              f"z-score (got a minimum of {min_cell})")
    train = check_features(train, "C_T, training set", k, f"k-means with k = {k} cells")
    holdout = check_features(holdout, "C_T, holdout set", min_cell, f"a z-score per cell (min_cell = {min_cell})")
    generated = check_features(generated, "C_T, generated set", min_cell, f"a z-score per cell (min_cell = {min_cell})")
    check_same_space(generated, train)
    check_same_space(holdout, train)
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(train)
    train_cell = kmeans.labels_  # (T,)
    holdout_cell = kmeans.predict(holdout)  # (H,)
    generated_cell = kmeans.predict(generated)  # (G,)
    cells, weighted, total_weight = [], 0.0, 0.0
    for cell in range(k):
        own = train[train_cell == cell]  # (T_c, D): the cell's own training points
        in_holdout, in_generated = holdout[holdout_cell == cell], generated[generated_cell == cell]
        m, n = len(in_holdout), len(in_generated)
        weight = m / len(holdout)
        z = None
        if m >= min_cell and n >= min_cell:
            d_holdout, _ = nearest(in_holdout, own)  # (m,)
            d_generated, _ = nearest(in_generated, own)  # (n,)
            u = mannwhitneyu(d_generated, d_holdout, alternative="two-sided").statistic  # pairs gen > holdout
            z = float((u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12))
            weighted += weight * z
            total_weight += weight
        cells.append({"cell": cell, "n_train": int((train_cell == cell).sum()), "n_holdout": m, "n_generated": n,
                      "weight": weight, "z": z})
    if total_weight == 0:
        raise HistosynthError(
            f"C_T: no cell holds at least {min_cell} holdout and {min_cell} generated samples; with k = {k} cells"
            f" give at least about {k * min_cell} holdout and {k * min_cell} generated samples, or lower k")
    return {"ct": weighted / total_weight, "cells": cells}


# ----------------------------------------------------------------------------------------------------------------
# Nearest neighbours over dihedral transforms


def _dihedral(batch: np.ndarray, index: int) -> np.ndarray:
    """Transform ``index`` (0–7) of (B, H, W, C) images, contiguous (feature functions may reject negative strides)."""
    return np.ascontiguousarray(dihedral(batch, index, axes=(1, 2)))


@dataclass(frozen=True)
class NeighbourPair:
    """A generated image, its nearest training image and the transform of the training image that matched."""

    generated: int  # index into the generated images
    train: int  # index into the training images
    transform: int  # 0–7, see DIHEDRAL_NAMES
    distance: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "transform_name": DIHEDRAL_NAMES[self.transform]}


def _stack(images: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    return np.stack([np.asarray(images[i]) for i in range(start, stop)])  # (B, H, W, 3)


def nearest_neighbours(generated_imgs: Sequence[np.ndarray], train_imgs: Sequence[np.ndarray],
                       feature_fn: Callable[[np.ndarray], np.ndarray] = pixel_features, top: int | None = None,
                       batch_size: int = 64) -> list[NeighbourPair]:
    """Nearest training image of every generated image over the 8 flips/rotations of each training image.

    Returns pairs sorted by distance (closest first), the first ``top`` of them if given. Non-square training
    images use only the 4 transforms that keep their shape. Streams over the training set: memory is
    O(generated × batch).
    """
    if len(generated_imgs) == 0 or len(train_imgs) == 0:
        raise HistosynthError("nearest neighbours: needs at least 1 generated and 1 training image")
    n_generated = len(generated_imgs)
    generated = np.concatenate([
        np.asarray(feature_fn(_stack(generated_imgs, s, min(s + batch_size, n_generated))), dtype=np.float64)
        for s in range(0, n_generated, batch_size)])  # (G, D)
    best_distance = np.full(len(generated), np.inf)
    best_train = np.zeros(len(generated), dtype=np.int64)
    best_transform = np.zeros(len(generated), dtype=np.int64)
    for start in range(0, len(train_imgs), batch_size):
        batch = _stack(train_imgs, start, min(start + batch_size, len(train_imgs)))  # (B, H, W, 3)
        square = batch.shape[1] == batch.shape[2]
        for transform in range(8) if square else (0, 2, 4, 6):
            features = np.asarray(feature_fn(_dihedral(batch, transform)), dtype=np.float64)  # (B, D)
            d = pairwise_distances(generated, features)  # (G, B)
            column = d.argmin(1)  # (G,)
            value = d[np.arange(len(generated)), column]  # (G,)
            better = value < best_distance
            best_distance[better] = value[better]
            best_train[better] = start + column[better]
            best_transform[better] = transform
    order = np.argsort(best_distance, kind="stable")
    pairs = [NeighbourPair(int(g), int(best_train[g]), int(best_transform[g]), float(best_distance[g])) for g in order]
    return pairs[:top] if top is not None else pairs


def neighbour_figure(pairs: Sequence[NeighbourPair], generated_imgs: Sequence[np.ndarray],
                     train_imgs: Sequence[np.ndarray], top: int = 8):
    """A Figure of the ``top`` closest pairs: each generated image above its (transformed) nearest training image."""
    from matplotlib.figure import Figure

    shown = list(pairs)[:top]
    columns = max(len(shown), 1)
    figure = Figure(figsize=(1.6 * columns, 3.9))
    axes = figure.subplots(2, columns, squeeze=False)
    for column, pair in enumerate(shown):
        train_view = _dihedral(np.asarray(train_imgs[pair.train])[None], pair.transform)[0]  # (H, W, 3)
        axes[0, column].imshow(np.asarray(generated_imgs[pair.generated]))
        axes[0, column].set_title(f"generated {pair.generated}", fontsize=7)
        axes[1, column].imshow(train_view)
        axes[1, column].set_title(f"train {pair.train}, {DIHEDRAL_NAMES[pair.transform]}\nd = {pair.distance:.3g}",
                                  fontsize=7)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.tight_layout()
    return figure
