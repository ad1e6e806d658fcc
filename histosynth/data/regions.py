"""Region-level weak labels: tissue compartments at the label-map scale, the layouts a mask model can learn.

Per-pixel colour classes make a nucleus (1–2 px at the mask model's 4 µm/px) a class of its own, and the layouts
turn into salt-and-pepper. Compartments — background, stroma, dense cellular tissue (epidermis, epithelium, tumour
nests) — are what DiffInfinite and STEDM condition on. Here they are found without annotation:

1. per label-map cell (8×8 dataset pixels): tissue fraction, nuclear fraction (the colour labeller's nuclei),
   and the mean CIELAB colour of its tissue pixels;
2. each of those averaged over a neighbourhood (Gaussian, σ = 12 µm: about 30 µm across), so a compartment is
   described by what surrounds it, not by the nucleus or fibre that happens to sit in one cell;
3. background where the neighbourhood holds less than half tissue; the tissue cells of all slides clustered
   together with k-means (standardised features, a fixed seed), clusters ordered by nuclear fraction, so class 2 is
   the least cellular (stroma-like) and the last class the most (epithelium-like);
4. connected regions smaller than ``min_region_um2`` merged into their surroundings.

Nuclei stay part of the texture the image model draws inside each compartment. Hand-written: no maintained library
labels tissue compartments without a trained model; the steps are scikit-image, SciPy and scikit-learn calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2lab

from histosynth.data.labels import PALETTE, UNKNOWN, auto_labels
from histosynth.errors import HistosynthError

NEIGHBOURHOOD_SIGMA_UM = 12.0  # Gaussian σ of the neighbourhood statistics: ≈ 30 µm full width at half maximum
MIN_REGION_UM2 = 2500.0  # 50 × 50 µm: smaller regions join their surroundings
FIT_SAMPLES = 200_000  # tissue cells drawn for k-means; every cell is then assigned to its nearest centre
_CHANNELS = ("tissue", "nuclei", "L", "a", "b")  # per-cell sums: counts, then colour summed over tissue pixels


def region_classes(n: int) -> list[dict]:
    """The class map of ``n`` region classes: 1 background, then tissue compartments by rising nuclear density."""
    if n < 2:
        raise HistosynthError(f"--classes must be at least 2 for region labels (background and tissue), got {n}")
    tissue = n - 1
    if tissue == 1:
        names = ["tissue"]
    else:
        names = ["stroma"] + [f"intermediate {i}" for i in range(1, tissue - 1)] + ["cellular"]
    colours = {"tissue": [230, 100, 190], "stroma": [230, 100, 190], "cellular": [60, 40, 170]}
    classes = [UNKNOWN, {"id": 1, "name": "background", "color": [235, 235, 235]}]
    for i, name in enumerate(names):
        classes.append({"id": i + 2, "name": name, "color": colours.get(name, PALETTE[i % len(PALETTE)])})
    return classes


REGION_MEANINGS = {
    "background": "glass or no tissue: less than half of the ~30 µm neighbourhood is tissue",
    "stroma": "the least cellular tissue compartment: connective tissue, collagen, dermis",
    "cellular": "the most cellular compartment: epidermis, epithelium, tumour nests, dense infiltrates",
    "intermediate": "compartments between the two in nuclear density (with --classes above 3)",
}


def cell_sums(rgb: np.ndarray, thresholds: dict, factor: int) -> np.ndarray:
    """Per factor×factor cell of an RGB window (its sides multiples of ``factor``): (5, h/f, w/f) sums of tissue
    pixels, nuclear pixels and the L*, a*, b* colour of the tissue pixels."""
    labels = auto_labels(rgb, thresholds)  # 1 background, 2 stroma-coloured, 3 nuclei-coloured
    tissue = labels >= 2
    lab = rgb2lab(rgb)  # (H, W, 3)
    planes = [tissue, labels == 3] + [lab[..., i] * tissue for i in range(3)]
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    return np.stack([np.asarray(p, np.float64)[:h * factor, :w * factor].reshape(h, factor, w, factor).sum((1, 3))
                     for p in planes]).astype(np.float32)  # (5, h, w)


@dataclass
class RegionModel:
    """The fitted clustering shared by every slide of a dataset."""

    centres: np.ndarray  # (k, F) in standardised units, ordered by nuclear fraction
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    sigma_cells: float
    min_region_cells: int
    pixels_per_cell: int

    def assign(self, features: np.ndarray) -> np.ndarray:
        """(N, F) raw features -> cluster index 0..k-1 (0 least cellular)."""
        z = (features - self.mean) / self.std
        distances = ((z[:, None, :] - self.centres[None]) ** 2).sum(-1)  # (N, k)
        return distances.argmin(1)


def neighbourhood(sums: np.ndarray, sigma_cells: float, pixels_per_cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(tissue fraction (h, w), features (h, w, 4): nuclear fraction of tissue and mean L*, a*, b* of tissue) over
    a Gaussian neighbourhood of every cell."""
    smoothed = np.stack([ndimage.gaussian_filter(p.astype(np.float64), sigma_cells, mode="reflect") for p in sums])
    tissue = smoothed[0]
    fraction = tissue / pixels_per_cell
    per_tissue = smoothed[1:] / np.maximum(tissue, 1e-6)  # (4, h, w)
    return fraction, np.moveaxis(per_tissue, 0, -1)


def fit_regions(slide_sums: list[np.ndarray], n_classes: int, cell_mpp: float, factor: int, seed: int = 0,
                sigma_um: float = NEIGHBOURHOOD_SIGMA_UM, min_region_um2: float = MIN_REGION_UM2) -> RegionModel:
    """k-means over the tissue cells of every slide (n_classes − 1 clusters), ordered by nuclear fraction;
    ``slide_sums`` from ``cell_sums`` with cells of ``factor``² pixels, each ``cell_mpp`` µm wide."""
    k = n_classes - 1
    sigma_cells = sigma_um / cell_mpp
    samples = []
    for sums in slide_sums:
        fraction, features = neighbourhood(sums, sigma_cells, factor * factor)
        samples.append(features[fraction > 0.5])
    tissue = np.concatenate(samples) if samples else np.empty((0, 4))
    if len(tissue) < k:
        raise HistosynthError(f"region labels need at least {k} tissue cells; the slides have {len(tissue)}")
    rng = np.random.default_rng(seed)
    if len(tissue) > FIT_SAMPLES:
        tissue = tissue[rng.choice(len(tissue), FIT_SAMPLES, replace=False)]
    mean, std = tissue.mean(0), tissue.std(0)
    from sklearn.cluster import KMeans  # here: generation imports this module for its region rule alone

    std = np.where(std > 1e-9, std, 1.0)
    kmeans = KMeans(k, n_init=10, random_state=seed).fit((tissue - mean) / std)
    # Rank clusters by nuclear fraction (feature 0, in raw units): class 2 least cellular, the last class most.
    order = np.argsort(kmeans.cluster_centers_[:, 0] * std[0] + mean[0], kind="stable")
    return RegionModel(kmeans.cluster_centers_[order], mean, std, sigma_cells,
                       max(1, int(round(min_region_um2 / cell_mpp ** 2))), factor * factor)


def region_map(sums: np.ndarray, model: RegionModel) -> np.ndarray:
    """(h, w) uint8 region classes of one slide: 1 background, 2.. tissue compartments, small regions merged."""
    fraction, features = neighbourhood(sums, model.sigma_cells, model.pixels_per_cell)
    regions = np.ones(fraction.shape, np.uint8)
    tissue = fraction > 0.5
    if tissue.any():
        regions[tissue] = model.assign(features[tissue]).astype(np.uint8) + 2
    return merge_small_regions(regions, model.min_region_cells)


def merge_small_regions(regions: np.ndarray, min_cells: int, passes: int = 4) -> np.ndarray:
    """Regions (8-connected, one class) smaller than ``min_cells`` take the commonest class around them.

    Each small region is handled inside its own bounding box (one cell wider), so the cost follows the small
    regions, not the map: a gigapixel layout at the mask model's scale has millions of cells."""
    regions = regions.copy()
    structure = np.ones((3, 3), bool)
    height, width = regions.shape
    for _ in range(passes):
        changed = False
        for value in np.unique(regions):
            components, count = ndimage.label(regions == value, structure)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())
            boxes = ndimage.find_objects(components)
            for index in np.flatnonzero(sizes < min_cells):
                if index == 0:
                    continue
                rows, cols = boxes[index - 1]
                box = (slice(max(0, rows.start - 1), min(height, rows.stop + 1)),
                       slice(max(0, cols.start - 1), min(width, cols.stop + 1)))
                region = components[box] == index
                ring = ndimage.binary_dilation(region, structure) & ~region
                around = regions[box][ring]
                if around.size == 0:
                    continue
                regions[box][region] = np.bincount(around).argmax()
                changed = True
        if not changed:
            break
    return regions


def sample_regions(regions: np.ndarray, origin: tuple[float, float], size: tuple[int, int], scale: float,
                   cell: float, num_classes: int) -> np.ndarray:
    """Class ids (h, w) of the window at level-0 ``origin`` of ``size`` px at ``scale`` px per level-0 px, from a
    slide-wide region map whose cells are ``cell`` level-0 px wide, with smooth borders: each class's indicator is
    interpolated bilinearly to the window's pixels and the likeliest class wins (nearest-neighbour upsampling would
    leave staircases the size of a cell)."""
    ys = (origin[1] + (np.arange(size[1]) + 0.5) / scale) / cell - 0.5  # (h,) in cell units
    xs = (origin[0] + (np.arange(size[0]) + 0.5) / scale) / cell - 0.5  # (w,)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"))  # (2, h, w)
    best = np.full((size[1], size[0]), -1.0)
    out = np.zeros((size[1], size[0]), np.uint8)
    for value in range(1, num_classes + 1):
        indicator = (regions == value).astype(np.float32)
        if not indicator.any():
            continue
        likelihood = ndimage.map_coordinates(indicator, grid, order=1, mode="nearest")
        better = likelihood > best
        out[better], best[better] = value, likelihood[better]
    return out
