"""Tissue detection, patch grids, and splits that keep every test pixel out of training patches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from histosynth.data.labels import auto_label_thresholds, tissue_pixels

SPLITS = ("train", "val", "test", "holdout")


@dataclass
class Patch:
    source: int
    x: int  # level-0 px
    y: int
    size0: float  # side in level-0 px
    split: str = "train"

    def box(self) -> tuple[float, float, float, float]:
        return self.x, self.y, self.x + self.size0, self.y + self.size0


def tissue_mask(thumbnail: np.ndarray, max_hole: int = 64) -> np.ndarray:
    """Otsu on saturation (capped so an all-tissue image stays tissue) + closing/opening + small-hole filling.

    Holes up to ``max_hole`` thumbnail px are filled (specks of glass in tissue); larger ones are real lumens or
    tears, and filling them would keep patches of bare glass.
    """
    thresholds = auto_label_thresholds(thumbnail)
    mask = tissue_pixels(thumbnail, thresholds["saturation"])
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_opening(mask, iterations=1)
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    sizes = np.bincount(holes.ravel(), minlength=count + 1)  # (count+1,) px per hole; 0 = not a hole
    small = sizes <= max_hole
    small[0] = False
    return mask | small[holes]


def patch_grid(source: int, dimensions: tuple[int, int], size0: float, stride0: float, tissue: np.ndarray,
               thumb_scale: float, min_tissue: float) -> list[Patch]:
    """Patches of ``size0`` level-0 px every ``stride0`` px whose tissue fraction (on the thumbnail) ≥ min_tissue."""
    width, height = dimensions
    ys = np.arange(0, height - size0 + 1e-6, stride0)  # (rows,) level-0 px
    xs = np.arange(0, width - size0 + 1e-6, stride0)  # (cols,)
    if len(ys) == 0 or len(xs) == 0:
        return []
    # Each patch's footprint on the thumbnail, at least one thumbnail pixel; fractions from a summed-area table
    # so a whole slide's grid costs a few array operations rather than a Python loop per position.
    y0 = (ys * thumb_scale).astype(int)
    y1 = np.maximum(y0 + 1, ((ys + size0) * thumb_scale).astype(int))
    x0 = (xs * thumb_scale).astype(int)
    x1 = np.maximum(x0 + 1, ((xs + size0) * thumb_scale).astype(int))
    th, tw = tissue.shape
    y0, y1, x0, x1 = (np.minimum(v, limit) for v, limit in ((y0, th), (y1, th), (x0, tw), (x1, tw)))
    table = np.zeros((th + 1, tw + 1), np.int64)  # (th+1, tw+1)
    table[1:, 1:] = tissue.astype(np.int64).cumsum(0).cumsum(1)
    sums = (table[y1[:, None], x1[None, :]] - table[y0[:, None], x1[None, :]]
            - table[y1[:, None], x0[None, :]] + table[y0[:, None], x0[None, :]])  # (rows, cols)
    areas = (y1 - y0)[:, None] * (x1 - x0)[None, :]  # (rows, cols)
    keep = (areas > 0) & (sums >= min_tissue * np.maximum(areas, 1) - 1e-9)
    return [Patch(source, int(round(xs[c])), int(round(ys[r])), size0) for r, c in zip(*np.nonzero(keep))]


def band_regions(dimensions: tuple[int, int], tissue: np.ndarray, val_fraction: float, test_fraction: float,
                 size0: float, stride0: float) -> dict[str, tuple[int, int, int, int]]:
    """Split one slide into train / val / test bands along its longer axis, by tissue amount.

    Cuts are snapped to the patch grid and each requested band is made at least one patch deep, so a small
    image still gets a test (and val) patch; patches straddling a cut belong to no band.
    """
    width, height = dimensions
    axis = 0 if height >= width else 1  # 0: bands of rows
    profile = tissue.sum(axis=1 - axis).astype(np.float64) + 1e-9
    cumulative = np.cumsum(profile) / profile.sum()
    length = height if axis == 0 else width
    scale = length / len(profile)
    last_start = np.floor((length - size0) / stride0) * stride0  # the last grid position that fits

    def snap(position: float) -> float:
        return round(position / stride0) * stride0

    cut_test = snap(np.searchsorted(cumulative, 1 - test_fraction) * scale) if test_fraction > 0 else length
    if test_fraction > 0:
        cut_test = min(cut_test, last_start)
    cut_val = snap(np.searchsorted(cumulative, 1 - val_fraction - test_fraction) * scale) if val_fraction > 0 \
        else cut_test
    if val_fraction > 0:
        cut_val = min(cut_val, np.floor((cut_test - size0) / stride0) * stride0)
        if cut_val < size0:  # too small for a val band: keep training room
            cut_val = cut_test
    spans = {"train": (0, int(cut_val)), "val": (int(cut_val), int(cut_test)), "test": (int(cut_test), length)}
    if axis == 0:
        return {k: (0, a, width, b) for k, (a, b) in spans.items()}
    return {k: (a, 0, b, height) for k, (a, b) in spans.items()}


def inside(patch: Patch, box: tuple[int, int, int, int], tolerance: float = 1.0) -> bool:
    """True when the patch lies in the box (a sub-pixel rounding overhang allowed)."""
    x0, y0, x1, y1 = patch.box()
    return x0 >= box[0] and y0 >= box[1] and x1 <= box[2] + tolerance and y1 <= box[3] + tolerance


def overlaps(a: Patch, b: Patch, tolerance: float = 1.0) -> bool:
    """True when two patches share more than a sliver; level-0 positions are rounded, sizes are not."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax0 < bx1 - tolerance and bx0 < ax1 - tolerance and ay0 < by1 - tolerance and by0 < ay1 - tolerance


def assign_groups(groups: list[str], val_fraction: float, test_fraction: float, rng: np.random.Generator) -> dict:
    """Whole cases (or slides) to splits, at least one in train; test and val only when there are enough groups."""
    unique = sorted(set(groups))
    order = [unique[i] for i in rng.permutation(len(unique))]
    n = len(order)
    n_test = int(round(n * test_fraction)) if n >= 3 else (1 if n == 2 and test_fraction > 0 else 0)
    n_val = int(round(n * val_fraction)) if n - n_test >= 3 else 0
    split = {g: "test" for g in order[:n_test]}
    split.update({g: "val" for g in order[n_test:n_test + n_val]})
    split.update({g: "train" for g in order[n_test + n_val:]})
    return split


class _BoxIndex:
    """Patches bucketed by source and coarse cell, so "does this patch overlap any of those?" costs O(1)."""

    def __init__(self, cell: float):
        self.cell = max(cell, 1.0)
        self.cells: dict[tuple[int, int, int], list[Patch]] = {}

    def _keys(self, patch: Patch) -> list[tuple[int, int, int]]:
        x0, y0, x1, y1 = patch.box()
        c = self.cell
        return [(patch.source, i, j) for i in range(int(x0 // c), int(x1 // c) + 1)
                for j in range(int(y0 // c), int(y1 // c) + 1)]

    def add(self, patch: Patch) -> None:
        for key in self._keys(patch):
            self.cells.setdefault(key, []).append(patch)

    def hits(self, patch: Patch) -> bool:
        return any(overlaps(patch, other) for key in self._keys(patch) for other in self.cells.get(key, ()))


def choose_holdout(train: list[Patch], fraction: float, rng: np.random.Generator) -> list[Patch]:
    """An i.i.d. random subset of non-overlapping training-region patches; overlapping training patches are dropped,
    so no holdout pixel is ever trained on."""
    target = int(round(len(train) * fraction))
    chosen: list[Patch] = []
    index = _BoxIndex(max((p.size0 for p in train), default=1.0))
    for i in rng.permutation(len(train)):
        if len(chosen) >= target:
            break
        candidate = train[i]
        if not index.hits(candidate):
            candidate.split = "holdout"
            chosen.append(candidate)
            index.add(candidate)
    return chosen


def drop_overlapping(patches: list[Patch], holdout: list[Patch]) -> list[Patch]:
    """``patches`` without the training patches that overlap a holdout patch."""
    index = _BoxIndex(max((p.size0 for p in holdout), default=1.0))
    for patch in holdout:
        index.add(patch)
    return [p for p in patches if not (p.split == "train" and index.hits(p))]
