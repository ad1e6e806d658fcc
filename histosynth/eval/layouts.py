"""Layout realism: do generated masks look like real label maps at the same scale?

Pure functions of class-id masks (design.md §8: metrics over data, extraction elsewhere):
- class fractions — how much of each compartment;
- connected-component sizes per class (µm²) — coherent regions or speckle;
- boundary length per area (µm of class border per mm²) — smooth or ragged borders;
each compared as a relative difference |generated − real| / real, beside the largest difference between independent
draws of real crops (how far real layouts stray from their own reference); and a classifier two-sample test on
one-hot crops (eval/c2st.py) beside the same test between two draws of real crops.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from histosynth.errors import HistosynthError

TOLERANCE = 0.25  # "within 25 % of the real statistic"


def _check(masks: list[np.ndarray]) -> list[np.ndarray]:
    if not masks:
        raise HistosynthError("no masks to measure")
    for mask in masks:
        if mask.ndim != 2:
            raise HistosynthError(f"masks are 2-D class-id arrays, got shape {mask.shape}")
    return [np.asarray(m) for m in masks]


def layout_statistics(masks: list[np.ndarray], num_classes: int, mpp: float) -> dict:
    """Statistics of class-id masks at ``mpp`` µm/px (class 0, unknown, is left out of every statistic).

    ``class_fractions[c]``: share of known pixels of class c; ``component_um2[c]``: median area of the 8-connected
    regions of class c (regions touching the crop border included, as in both sets); ``components_per_mm2[c]``;
    ``boundary_um_per_mm2``: length of the borders between different classes per mm² of mask.
    """
    masks = _check(masks)
    pixel_um2 = mpp * mpp
    counts = np.zeros(num_classes + 1, np.int64)
    sizes: dict[int, list[float]] = {c: [] for c in range(1, num_classes + 1)}
    edges = 0
    area_px = 0
    structure = np.ones((3, 3), bool)
    for mask in masks:
        counts += np.bincount(mask.ravel(), minlength=num_classes + 1)[:num_classes + 1]
        area_px += mask.size
        for c in range(1, num_classes + 1):
            components, n = ndimage.label(mask == c, structure)
            if n:
                sizes[c] += (np.bincount(components.ravel())[1:] * pixel_um2).tolist()
        known = mask > 0
        horizontal = (mask[:, 1:] != mask[:, :-1]) & known[:, 1:] & known[:, :-1]
        vertical = (mask[1:] != mask[:-1]) & known[1:] & known[:-1]
        edges += int(horizontal.sum() + vertical.sum())
    known_px = max(int(counts[1:].sum()), 1)
    area_mm2 = area_px * pixel_um2 / 1e6
    return {
        "n_masks": len(masks),
        "mpp": mpp,
        "class_fractions": {c: float(counts[c] / known_px) for c in range(1, num_classes + 1)},
        "component_um2": {c: float(np.median(sizes[c])) if sizes[c] else 0.0 for c in sizes},
        "components_per_mm2": {c: len(sizes[c]) / area_mm2 for c in sizes},
        # Each differing neighbour pair is one pixel side of border: mpp µm long.
        "boundary_um_per_mm2": edges * mpp / area_mm2,
    }


def relative_differences(generated: dict, real: dict, min_fraction: float = 0.02) -> dict:
    """|generated − real| / real for each statistic of ``layout_statistics``; per-class statistics only for classes
    holding at least ``min_fraction`` of the real pixels (a ratio to a near-zero value says nothing)."""
    present = [c for c, share in real["class_fractions"].items() if share >= min_fraction]

    def rel(a: float, b: float) -> float:
        return abs(a - b) / abs(b) if b else (0.0 if a == b else float("inf"))

    out = {"boundary_um_per_mm2": rel(generated["boundary_um_per_mm2"], real["boundary_um_per_mm2"])}
    for key in ("class_fractions", "component_um2", "components_per_mm2"):
        out[key] = {c: rel(generated[key][c], real[key][c]) for c in present}
    return out


def largest_differences(differences: list[dict]) -> dict:
    """The largest of several ``relative_differences`` results, statistic by statistic (classes compared in all).

    Given the differences of several independent draws of real crops from one reference draw, this is how far real
    layouts themselves stray from the reference: a generated statistic closer than that cannot be told from real by
    that statistic on this much data."""
    if not differences:
        raise HistosynthError("no differences to take the largest of")
    out = {"boundary_um_per_mm2": max(d["boundary_um_per_mm2"] for d in differences)}
    for key in ("class_fractions", "component_um2", "components_per_mm2"):
        shared = set.intersection(*(set(d[key]) for d in differences))
        out[key] = {c: max(d[key][c] for d in differences) for c in sorted(shared)}
    return out


def within_tolerance(differences: dict, tolerance: float = TOLERANCE) -> dict:
    """Which statistics are within ``tolerance`` (relative); ``all`` when every one is."""
    checks = {"boundary_um_per_mm2": differences["boundary_um_per_mm2"] <= tolerance}
    for key in ("class_fractions", "component_um2", "components_per_mm2"):
        checks[key] = all(v <= tolerance for v in differences[key].values())
    checks["all"] = all(checks.values())
    return checks


def one_hot_crops(masks: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Class-id masks (N of (h, w)) -> one-hot float32 (N, K, h, w) over classes 1..K, for the two-sample test."""
    masks = _check(masks)
    stacked = np.stack(masks)  # (N, h, w)
    return np.stack([(stacked == c) for c in range(1, num_classes + 1)], 1).astype(np.float32)
